"""The GrootL tree and the causal tree of sequences, each against its definition written
out with plain Python loops."""
import math

import pytest
import torch

from oracle import kruskal_parents
from treessm import SequenceTopology, Tree, tree_scan
from treessm.topology import chain_tree
from treessm.topology.sequence import (TIE_RTOL, CausalSequenceTopology, GrootLTopology,
                                       causal_forest, causal_parents, grootl_edges)

FIELDS = ("parent", "order", "child_ptr", "tree_ptr", "depth", "batch")


def cosine_cost(a, b):
    a, b = a.double(), b.double()
    return math.exp(-float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-24))


def same_tree(a, b):
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------------------- causal tree
def loop_causal_parents(feat, k, cost=cosine_cost, valid=None, rtol=TIE_RTOL):
    """The definition: the latest of the k tokens before t whose cost ties with the best."""
    b, length, _ = feat.shape
    out = []
    for i in range(b):
        row = []
        for t in range(length):
            cands = [s for s in range(max(0, t - k), t) if valid is None or valid[i][s]]
            if not cands:
                row.append(-1)
                continue
            costs = {s: cost(feat[i, s], feat[i, t]) for s in cands}
            low = min(costs.values())
            row.append(max(s for s in cands if costs[s] <= low + rtol * abs(low)))
        out.append(row)
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5, 12])
def test_causal_parents_match_the_definition(k):
    feat = torch.randn(3, 9, 6, generator=torch.Generator().manual_seed(k))
    assert causal_parents(feat, k).tolist() == loop_causal_parents(feat, k)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_causal_parents_of_outer_products_match_the_definition(k):
    # features given as factors f and o of x = f (outer) o: the same parents as the loop
    # definition over x formed in full, with repeated tokens (ties) and a zero row
    gen = torch.Generator().manual_seed(40 + k)
    f, o = torch.randn(3, 11, 5, generator=gen), torch.randn(3, 11, 4, generator=gen)
    f[:, 4:7], o[:, 4:7] = f[:, 4:5], o[:, 4:5]
    f[1, 2] = 0
    x = (f.unsqueeze(-1) * o.unsqueeze(-2)).flatten(2)
    assert causal_parents(f, k, outer=o).tolist() == loop_causal_parents(x, k)
    valid = torch.rand(3, 11, generator=gen) > 0.3
    assert torch.equal(causal_parents(f, k, valid=valid, outer=o),
                       causal_parents(x, k, valid=valid))
    topo = CausalSequenceTopology(k)
    same_tree(topo(f, outer=o), topo(x))
    with pytest.raises(ValueError, match="distance='cosine' only"):
        causal_parents(f, k, "l2", outer=o)
    with pytest.raises(ValueError, match="outer must have the tokens of feat"):
        causal_parents(f, k, outer=o[:, :5])


def test_causal_parents_with_k_one_is_the_chain():
    feat = torch.randn(2, 5, 3)
    assert causal_parents(feat, 1).tolist() == [[-1, 0, 1, 2, 3]] * 2
    tree = CausalSequenceTopology(k=1)(feat)
    assert torch.equal(tree.parent, chain_tree(2, 5).parent)


def test_causal_parents_ties_go_to_the_latest_token():
    # tokens 0, 1 and 2 equal: token 3 (equal too) hangs below token 2, the nearest;
    # token 4 is closest to token 1 exactly, which no tie changes
    base = torch.tensor([1.0, 0.0, 0.0])
    feat = torch.stack([base, base, base, base, torch.tensor([0.0, 1.0, 0.0])])[None]
    feat[0, 1] = torch.tensor([0.0, 1.0, 0.2])
    assert causal_parents(feat, 3).tolist() == [[-1, 0, 0, 2, 1]]
    # equal up to rounding is equal: the nearest wins whatever the rounding
    noisy = base.repeat(4, 1) + 1e-7 * torch.tensor([[0.0, 3, 0], [0, -2, 1], [0, 1, 1], [0, 0, 0]])
    assert causal_parents(noisy[None], 3).tolist() == [[-1, 0, 1, 2]]
    # differences well above rounding decide, with or without the tolerance
    apart = base.repeat(4, 1) + 1e-2 * torch.tensor([[0.0, 3, 0], [0, -2, 1], [0, 1, 1],
                                                     [0, 2, 0]])
    expected = loop_causal_parents(apart[None], 3, rtol=0.0)
    assert expected == [[-1, 0, 0, 0]]
    assert causal_parents(apart[None], 3).tolist() == expected
    assert causal_parents(apart[None], 3, tie_rtol=0.0).tolist() == expected


def test_causal_parents_distances_and_valid_mask():
    g = torch.Generator().manual_seed(5)
    feat = torch.randn(2, 8, 4, generator=g)
    l2 = lambda a, b: float((a.double() - b.double()).norm())  # noqa: E731
    assert causal_parents(feat, 3, "l2").tolist() == loop_causal_parents(feat, 3, l2)
    manhattan = lambda a, b: (a - b).abs().sum(-1)  # noqa: E731
    assert causal_parents(feat, 3, manhattan).tolist() == \
        loop_causal_parents(feat, 3, lambda a, b: float(manhattan(a, b)))
    valid = torch.rand(2, 8, generator=g) > 0.4
    valid[0, :3] = False  # the first tokens have no candidate at all
    assert causal_parents(feat, 3, valid=valid).tolist() == \
        loop_causal_parents(feat, 3, valid=valid.tolist())


def test_causal_topology_builds_a_causal_forest():
    feat = torch.randn(3, 11, 5, generator=torch.Generator().manual_seed(2))
    topo = CausalSequenceTopology(k=4)
    tree = topo(feat)
    parent = torch.tensor(loop_causal_parents(feat, 4))
    flat = torch.where(parent >= 0, parent + torch.arange(3)[:, None] * 11, -1).reshape(-1)
    same_tree(tree, Tree.from_parent(flat, torch.arange(3).repeat_interleave(11)))
    assert tree.num_trees == 3 and tree.roots.tolist() == [0, 11, 22]
    # every ancestor is earlier: a "down" scan of a one-hot input at token s reaches only
    # tokens at or after s
    x = torch.eye(33, dtype=torch.float64)
    reach = tree_scan(x, torch.full_like(x, 0.5), tree, "down")  # reach[v, s]: s above v
    later = torch.arange(33)[None, :] > torch.arange(33)[:, None]
    assert (reach[later] == 0).all()
    assert repr(topo) == "CausalSequenceTopology(k=4, tie_rtol=1e-05, distance='cosine')"


@pytest.mark.parametrize("masked", [False, True])
def test_causal_forest_on_device_path_equals_host_layout(masked):
    feat = torch.randn(4, 13, 3, generator=torch.Generator().manual_seed(7))
    valid = None
    if masked:
        valid = torch.ones(4, 13, dtype=torch.bool)
        valid[1, :4] = False  # left padding: several roots in one sequence
    parent = causal_parents(feat, 3, valid=valid)
    host = causal_forest(parent, on_device=False)
    device = causal_forest(parent, rooted_at_first=not masked, on_device=True)
    same_tree(device, host)
    assert host.num_trees == (4 if not masked else 8)


def test_causal_validation():
    with pytest.raises(ValueError, match="k must be a positive int"):
        CausalSequenceTopology(k=0)
    with pytest.raises(TypeError, match="k must be a positive int"):
        CausalSequenceTopology(k=2.0)
    with pytest.raises(ValueError, match="tie_rtol"):
        CausalSequenceTopology(tie_rtol=-1.0)
    with pytest.raises(ValueError, match="distance"):
        CausalSequenceTopology(distance="manhattan")
    with pytest.raises(ValueError, match=r"\[B, L, C\]"):
        CausalSequenceTopology()(torch.randn(4, 3))
    with pytest.raises(ValueError, match="valid"):
        causal_parents(torch.randn(2, 4, 3), 2, valid=torch.ones(2, 5, dtype=torch.bool))
    assert causal_parents(torch.randn(2, 1, 3), 3).tolist() == [[-1], [-1]]
    assert CausalSequenceTopology()(torch.randn(2, 0, 3)).num_nodes == 0


# ---------------------------------------------------------------------------- GrootL tree
def loop_grootl_pairs(length, context_len, window=3):
    """Candidate pairs of the authors' construction, in the reversed sequence (position i
    is token L - 1 - i): the chain, and the edges from each position to the next 1, 2
    and 3 positions within the last ``context_len`` positions."""
    c = length if context_len is None else min(context_len, length)
    pairs = set()
    for i in range(length - 1):
        pairs.add((i, i + 1))
    if c > 2:
        for i in range(length - c, length):
            for d in range(1, window + 1):
                if i + d < length:
                    pairs.add((i, i + d))
    # back to token ids, earlier token first
    return {(length - 1 - j, length - 1 - i) for i, j in pairs}


def loop_mst_parents(feat, pairs):
    """Kruskal by increasing cost, then each tree walked from the last token."""
    length = feat.shape[0]
    return kruskal_parents(length, pairs, lambda s, t: cosine_cost(feat[s], feat[t]),
                           length - 1)


@pytest.mark.parametrize("length, context_len", [(9, None), (9, 5), (9, 3), (9, 2), (6, 40),
                                                 (3, None), (1, None)])
def test_grootl_tree_matches_the_authors_construction(length, context_len):
    feat = torch.randn(2, length, 4, generator=torch.Generator().manual_seed(length))
    topo = GrootLTopology(context_len=context_len)
    ei = grootl_edges(1, length, topo._effective_context(length))
    assert {(int(s), int(t)) for s, t in ei.T} == loop_grootl_pairs(length, context_len)
    tree = topo(feat)
    expected = []
    for b in range(2):
        local = loop_mst_parents(feat[b], loop_grootl_pairs(length, context_len))
        expected += [p + b * length if p >= 0 else -1 for p in local]
    assert tree.parent.tolist() == expected
    assert tree.roots.tolist() == [length - 1, 2 * length - 1]


@pytest.mark.parametrize("context_len", [None, 6, 2])
def test_grootl_tree_of_outer_products_matches_the_definition(context_len):
    # features given as factors f and o of x = f (outer) o: the tree of the loop definition
    # over x formed in full; then, with repeated tokens (ties, which the loop leaves to
    # chance) and zero rows of either factor, the same tree as from x; float64; the checks
    gen = torch.Generator().manual_seed(50 if context_len is None else 50 + context_len)
    length = 10
    f, o = torch.randn(2, length, 5, generator=gen), torch.randn(2, length, 3, generator=gen)
    x = (f.unsqueeze(-1) * o.unsqueeze(-2)).flatten(2)
    topo = GrootLTopology(context_len=context_len)
    expected = []
    for b in range(2):
        local = loop_mst_parents(x[b], loop_grootl_pairs(length, context_len))
        expected += [p + b * length if p >= 0 else -1 for p in local]
    assert topo(f, outer=o).parent.tolist() == expected
    f[:, 4:7], o[:, 4:7] = f[:, 4:5], o[:, 4:5]
    f[0, 2], o[1, 8] = 0, 0
    x = (f.unsqueeze(-1) * o.unsqueeze(-2)).flatten(2)
    same_tree(topo(f, outer=o), topo(x))
    same_tree(topo(f.double(), outer=o.double()), topo(x.double()))
    with pytest.raises(ValueError, match="distance='cosine' only"):
        GrootLTopology(distance="l2")(f, outer=o)
    with pytest.raises(ValueError, match="outer must have the tokens of feat"):
        topo(f, outer=o[:, :5])
    with pytest.raises(ValueError, match="finite"):
        topo(f, outer=torch.full_like(o, math.nan))


def test_grootl_tree_is_not_causal_but_its_chain_part_is():
    # tokens 0, 1 and 3 alike, token 2 apart: the skip edges join 0, 1 and 3, and token 2
    # hangs below token 1, so token 1 aggregates a later token
    feat = torch.tensor([[[1.0, 0.0], [1.0, 0.02], [0.0, 1.0], [1.0, 0.01]]])
    assert GrootLTopology()(feat).parent.tolist() == [3, 3, 1, -1]
    # without the skip edges the tree is the chain towards the last token
    assert GrootLTopology(context_len=2)(feat).parent.tolist() == [1, 2, 3, -1]
    feat = torch.randn(1, 8, 3)
    chain = GrootLTopology(context_len=2)(feat)
    assert chain.parent.tolist() == [1, 2, 3, 4, 5, 6, 7, -1]
    # an "up" scan over that chain is Mamba's recurrence with w[t] on the edge (t-1, t)
    x, w = torch.randn(8, 2, dtype=torch.float64), torch.rand(8, 2, dtype=torch.float64)
    up = tree_scan(x, torch.roll(w, -1, 0), chain, "up")
    torch.testing.assert_close(up, tree_scan(x, w, chain_tree(1, 8), "down"))


def test_grootl_validation_and_repr():
    assert repr(GrootLTopology(7)) == \
        "GrootLTopology(context_len=7, window=3, distance='cosine')"
    with pytest.raises(ValueError, match="context_len"):
        GrootLTopology(context_len=-1)
    with pytest.raises(TypeError, match="window"):
        GrootLTopology(window="3")
    with pytest.raises(ValueError, match=r"\[B, L, C\]"):
        GrootLTopology()(torch.randn(3, 4))
    assert GrootLTopology()(torch.randn(0, 4, 2)).num_nodes == 0
    # the sequence topology keeps its behaviour
    assert SequenceTopology(window=2)(torch.randn(1, 3, 2)).roots.tolist() == [0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: torch.cuda.is_available() is False")
def test_causal_and_grootl_trees_on_cuda_equal_the_cpu_trees():
    feat = torch.randn(4, 50, 8, generator=torch.Generator().manual_seed(3))
    for topo in (CausalSequenceTopology(k=3), GrootLTopology(context_len=30)):
        host, device = topo(feat), topo(feat.cuda())
        assert device.parent.is_cuda
        for name in FIELDS:
            assert torch.equal(getattr(device, name).cpu(), getattr(host, name)), name
    valid = torch.ones(4, 50, dtype=torch.bool)
    valid[2, :7] = False
    host = CausalSequenceTopology(k=3)(feat, valid)
    device = CausalSequenceTopology(k=3)(feat.cuda(), valid.cuda())
    for name in FIELDS:
        assert torch.equal(getattr(device, name).cpu(), getattr(host, name)), name
