"""Properties on inputs that hypothesis draws (and shrinks when one fails):

* every tree_scan backend and direction equals the dense oracle of tests/oracle.py on
  random forests, outputs and both gradients, for weights of any sign and size;
* minimum_spanning_tree equals the plain Kruskal of tests/oracle.py on multigraphs with
  ties, signed zeros, self-loops and repeated edges;
* the graph layers are equivariant: renumbering the vertices renumbers the tree and
  permutes TreeSSMConv's output rows;
* the causal sequence modes are causal: changing later tokens changes no earlier output.

The number of examples is bounded so the suite keeps its time; the ``explore`` profile
(``HYPOTHESIS_PROFILE=explore``, see tests/conftest.py) draws many more.
"""
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import dense_tree_scan, kruskal_mask
from treessm import GraphTopology, Tree, minimum_spanning_tree, tree_scan
from treessm.nn import GrootLMixer, TreeSSMConv
from treessm.ops.tree_scan import DIRECTIONS, available_backends
from treessm.topology import CausalSequenceTopology

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = [(device, backend) for device in DEVICES for backend in available_backends(device)]


@st.composite
def forests(draw, max_nodes=12):
    """A parent list: vertices inserted in a random order, each after the first few roots
    below a random earlier one."""
    n = draw(st.integers(0, max_nodes))
    if n == 0:
        return []
    order = draw(st.permutations(range(n)))
    num_roots = draw(st.integers(1, n))
    parent = [-1] * n
    for i in range(num_roots, n):
        parent[order[i]] = order[draw(st.integers(0, i - 1))]
    return parent


def _weights(kind: str, shape, gen):
    if kind == "decay":  # (0, 1), as exp(delta * A) gives them
        return torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == "any":  # either sign, above one
        return 4 * torch.rand(shape, generator=gen, dtype=torch.float64) - 2
    if kind == "sparse":  # exact zeros and ones cut and join paths
        return torch.randint(0, 2, shape, generator=gen).double()
    raise ValueError(kind)


@settings(max_examples=200)
@given(parent=forests(), channels=st.integers(1, 3), direction=st.sampled_from(DIRECTIONS),
       where=st.sampled_from(BACKENDS), kind=st.sampled_from(["decay", "any", "sparse"]),
       seed=st.integers(0, 2 ** 16))
def test_tree_scan_equals_the_dense_oracle(parent, channels, direction, where, kind, seed):
    device, backend = where
    gen = torch.Generator().manual_seed(seed)
    n = len(parent)
    x = torch.randn(n, channels, generator=gen, dtype=torch.float64)
    w = _weights(kind, (n, channels), gen)
    grad = torch.randn(n, channels, generator=gen, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    expected = dense_tree_scan(xr, wr, parent, direction)
    if n:  # the oracle never reads the weights of roots: no gradient is zero gradient
        gx_ref, gw_ref = (g if g is not None else torch.zeros_like(x) for g in
                          torch.autograd.grad(expected, (xr, wr), grad, allow_unused=True))

    tree = Tree.from_parent(torch.tensor(parent, dtype=torch.long), validate=False).to(device)
    xs = x.to(device).requires_grad_()
    ws = w.to(device).requires_grad_()
    out = tree_scan(xs, ws, tree, direction, backend=backend)
    torch.testing.assert_close(out.cpu(), expected.detach(), rtol=1e-10, atol=1e-10)
    if n:
        gx, gw = torch.autograd.grad(out, (xs, ws), grad.to(device))
        torch.testing.assert_close(gx.cpu(), gx_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gw.cpu(), gw_ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- spanning trees
@st.composite
def multigraphs(draw, max_nodes=10, max_edges=24):
    """Edges (self-loops and repeats allowed) with weights from a small set, so that ties
    are common; signed zeros among them."""
    n = draw(st.integers(0, max_nodes))
    if n == 0:
        return 0, [], []
    pairs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                          max_size=max_edges))
    weights = draw(st.lists(st.sampled_from([-1.5, -0.0, 0.0, 0.25, 1.0, 2.0, 3.0]),
                            min_size=len(pairs), max_size=len(pairs)))
    return n, pairs, weights


@settings(max_examples=200)
@given(graph=multigraphs(), dtype=st.sampled_from([torch.float32, torch.float64,
                                                   torch.float16, torch.bfloat16]),
       index_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_minimum_spanning_tree_equals_plain_kruskal(graph, dtype, index_dtype):
    n, pairs, weights = graph
    ei = torch.tensor(pairs, dtype=index_dtype).reshape(-1, 2).t()
    w = torch.tensor(weights, dtype=dtype)
    assert torch.equal(minimum_spanning_tree(ei, w, n), kruskal_mask(ei, w, n))


# ---------------------------------------------------------------------------- equivariance
@st.composite
def graphs_and_permutations(draw, max_nodes=14):
    n = draw(st.integers(1, max_nodes))
    pairs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                          max_size=3 * n))
    perm = draw(st.permutations(range(n)))
    return n, pairs, perm


def _undirected(tree: Tree, relabel=None):
    parent = tree.parent.tolist()
    return {tuple(sorted((v if relabel is None else relabel[v],
                          p if relabel is None else relabel[p])))
            for v, p in enumerate(parent) if p >= 0}


@functools.lru_cache(maxsize=1)
def _conv():
    torch.manual_seed(0)
    return TreeSSMConv(4, 3, d_state=2).double().eval()


@given(case=graphs_and_permutations(), seed=st.integers(0, 2 ** 16))
def test_graph_layers_are_permutation_equivariant(case, seed):
    n, pairs, perm = case
    # continuous random features: distinct costs, so no tie decides the tree
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ei = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).t()
    p = torch.tensor(perm)  # vertex v becomes p[v]
    x_p = torch.empty_like(x)
    x_p[p] = x
    ei_p = p[ei]
    tree = GraphTopology()(x, ei)
    assert _undirected(GraphTopology()(x_p, ei_p)) == _undirected(tree, perm)
    with torch.no_grad():
        y = _conv()(x, ei)
        y_p = _conv()(x_p, ei_p)
    torch.testing.assert_close(y_p[p], y, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------- causality
@given(batch=st.integers(1, 2), length=st.integers(1, 12), k=st.integers(1, 4),
       cut=st.data(), seed=st.integers(0, 2 ** 16))
def test_causal_tree_scan_is_causal(batch, length, k, cut, seed):
    t0 = cut.draw(st.integers(0, length - 1))
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(batch, length, 3, generator=gen, dtype=torch.float64)
    later = feat.clone()
    later[:, t0 + 1:] = torch.randn(batch, length - t0 - 1, 3, generator=gen,
                                    dtype=torch.float64)
    x = torch.randn(batch * length, 2, generator=gen, dtype=torch.float64)
    w = torch.rand(batch * length, 2, generator=gen, dtype=torch.float64)
    topology = CausalSequenceTopology(k)
    trees = [topology(f) for f in (feat, later)]
    for tree in trees:
        local = torch.arange(batch * length) % length
        parent = tree.parent
        assert bool(((parent < 0) | ((parent % length < local) & (local - parent % length
                                                                   <= k))).all())
    h, h_later = (tree_scan(x, w, tree, "down").view(batch, length, 2) for tree in trees)
    torch.testing.assert_close(h_later[:, :t0 + 1], h[:, :t0 + 1], rtol=0, atol=0)


@functools.lru_cache(maxsize=2)
def _mixer(mode):
    torch.manual_seed(1)
    return GrootLMixer(6, state_size=3, mode=mode).double().eval()


@given(mode=st.sampled_from(["chain", "causal"]), length=st.integers(1, 10), cut=st.data(),
       seed=st.integers(0, 2 ** 16))
def test_causal_mixer_modes_are_causal(mode, length, cut, seed):
    t0 = cut.draw(st.integers(0, length - 1))
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(2, length, 6, generator=gen, dtype=torch.float64)
    later = s.clone()
    later[:, t0 + 1:] += torch.randn(2, length - t0 - 1, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y, y_later = _mixer(mode)(s), _mixer(mode)(later)
    torch.testing.assert_close(y_later[:, :t0 + 1], y[:, :t0 + 1], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["paper"])
def test_paper_mode_is_not_causal(mode):
    # the property above would fail for the authors' tree (the test can fail)
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(1, 12, 6, generator=gen, dtype=torch.float64)
    later = s.clone()
    later[:, 6:] += 3 * torch.randn(1, 6, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y, y_later = _mixer(mode)(s), _mixer(mode)(later)
    assert not torch.allclose(y_later[:, :6], y[:, :6])
