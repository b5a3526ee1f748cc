"""Device-side tree construction against independent oracles.

Oracles: the plain Kruskal of tests/oracle.py (edges sorted by ``(cost, index)``),
scipy's minimum spanning tree weight, a breadth-first rooting written here, and
``Tree.from_parent`` for the plan.
"""
import math

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from oracle import kruskal_mask
from treessm import Tree, _checks
from treessm.topology import boruvka
from treessm.topology.boruvka import spanning_forest
from treessm.topology import euler_tour
from treessm.topology.euler_tour import forest_on_device, parent_from_forest
from treessm.topology.euler_tour import spanning_tree_on_device as build_tree
from treessm.ops.plan import choose_schedule

CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda,
                   pytest.mark.skipif(not torch.cuda.is_available(),
                                      reason="needs a CUDA GPU: torch.cuda.is_available() is False")])
DEVICES = ["cpu", CUDA]
FIELDS = ("parent", "order", "child_ptr", "tree_ptr", "depth")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: torch.cuda.is_available() is False")


# ---------------------------------------------------------------------------- oracles
def root_oracle(edge_index, mask, n, roots=None):
    """Parent array: each component rooted at its lowest listed root, else lowest vertex."""
    adj = [[] for _ in range(n)]
    ei = edge_index.tolist()
    for e in np.flatnonzero(mask.numpy()).tolist():
        u, v = ei[0][e], ei[1][e]
        adj[u].append(v)
        adj[v].append(u)
    listed = set(roots.tolist()) if roots is not None else set()
    parent = [-1] * n
    seen = [False] * n
    for s in range(n):
        if seen[s]:
            continue
        members, stack = [s], [s]
        seen[s] = True
        while stack:
            x = stack.pop()
            for y in adj[x]:
                if not seen[y]:
                    seen[y] = True
                    members.append(y)
                    stack.append(y)
        cand = [v for v in members if v in listed]
        r = min(cand) if cand else min(members)
        done, stack = {r}, [r]
        while stack:
            x = stack.pop()
            for y in adj[x]:
                if y not in done:
                    done.add(y)
                    parent[y] = x
                    stack.append(y)
    return torch.tensor(parent, dtype=torch.long)


def grid_edges(b, h, w, connectivity):
    idx = torch.arange(b * h * w).view(b, h, w)
    pairs = [(idx[:, :, :-1], idx[:, :, 1:]), (idx[:, :-1, :], idx[:, 1:, :])]
    if connectivity == 8:
        pairs += [(idx[:, :-1, :-1], idx[:, 1:, 1:]), (idx[:, :-1, 1:], idx[:, 1:, :-1])]
    return torch.cat([torch.stack([a.reshape(-1), c.reshape(-1)]) for a, c in pairs], 1)


def assert_same_tree(tree, ref, batch=None):
    for f in FIELDS:
        a, b = getattr(tree, f), getattr(ref, f)
        assert a.dtype == torch.long, f
        assert torch.equal(a.cpu(), b.cpu()), f"{f} differs:\n{a}\n{b}"
    assert tree.num_nodes == ref.num_nodes and tree.num_trees == ref.num_trees
    if batch is None:
        assert tree.batch is None
    else:
        assert torch.equal(tree.batch.cpu(), batch.cpu())


def random_graph(gen, n, e, ties=False):
    ei = torch.randint(0, n, (2, e), generator=gen)
    cost = torch.randint(0, 3, (e,), generator=gen).float() if ties else \
        torch.randn(e, generator=gen)
    return ei, cost


# ---------------------------------------------------------------------------- spanning forest
def test_spanning_forest_by_hand():
    # equal costs: the lower index wins, so the last edge of the triangle closes the cycle
    tri = torch.tensor([[0, 1, 0], [1, 2, 2]])
    assert spanning_forest(tri, torch.ones(3), 3).tolist() == [True, True, False]
    # a cheap self-loop is never taken; of two parallel edges the first one is
    ei = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 2, 2]])
    cost = torch.tensor([-5.0, 2.0, 2.0, 1.0, 5.0])
    assert spanning_forest(ei, cost, 3).tolist() == [False, True, False, True, False]
    # -0.0 equals +0.0: a tie, so the lower index wins; -1 is cheaper than both
    ei = torch.tensor([[0, 0, 1], [1, 1, 2]])
    assert spanning_forest(ei, torch.tensor([0.0, -0.0, -1.0]), 3).tolist() == [True, False, True]
    assert spanning_forest(ei, torch.tensor([-0.0, 0.0, -1.0]), 3).tolist() == [True, False, True]
    # infinite cost edges are still usable when nothing else connects
    assert spanning_forest(ei, torch.tensor([math.inf, 1.0, 0.0]), 3).tolist() == [False, True, True]


def test_spanning_forest_degenerate():
    empty = torch.zeros(2, 0, dtype=torch.long)
    assert spanning_forest(empty, torch.zeros(0), 5).shape == (0,)
    assert spanning_forest(empty, torch.zeros(0), 0).shape == (0,)
    loop = torch.tensor([[0], [0]])
    assert spanning_forest(loop, torch.ones(1), 1).tolist() == [False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
@pytest.mark.parametrize("ties", [False, True])
def test_spanning_forest_matches_kruskal(device, dtype, ties):
    gen = torch.Generator().manual_seed(1 + 2 * int(ties))
    for _ in range(25):
        n = int(torch.randint(1, 60, (1,), generator=gen))
        e = int(torch.randint(0, 3 * n, (1,), generator=gen))  # sparse: many components
        ei, cost = random_graph(gen, n, e, ties or dtype == torch.int64)
        cost = (cost * 4).to(dtype) if dtype == torch.int64 else cost.to(dtype)
        got = spanning_forest(ei.to(device), cost.to(device), n)
        assert got.device.type == device
        assert torch.equal(got.cpu(), kruskal_mask(ei, cost, n))


def test_spanning_forest_total_weight_matches_scipy():
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        n = int(torch.randint(2, 80, (1,), generator=gen))
        pairs = torch.randint(0, n, (2, 2 * n), generator=gen)
        lo, hi = pairs.min(0).values, pairs.max(0).values
        keep = np.unique((lo * n + hi)[lo != hi].numpy())
        ei = torch.from_numpy(np.stack([keep // n, keep % n]))
        cost = torch.rand(ei.shape[1], generator=gen, dtype=torch.float64) + 0.1
        mask = spanning_forest(ei, cost, n)
        graph = scipy.sparse.coo_matrix((cost.numpy(), (ei[0].numpy(), ei[1].numpy())),
                                        shape=(n, n))
        ref = scipy.sparse.csgraph.minimum_spanning_tree(graph)
        ncomp = scipy.sparse.csgraph.connected_components(graph, directed=False)[0]
        assert int(mask.sum()) == n - ncomp
        assert math.isclose(float(cost[mask].sum()), float(ref.sum()), rel_tol=1e-12)


def test_spanning_forest_size_bound_and_adversarial_hooks():
    # costs rising along a path make every vertex hook onto its left neighbour in the first
    # round: one hook chain of length N, the deepest pointer jumping can face
    n = 3000
    ei = torch.stack([torch.arange(n - 1), torch.arange(1, n)])
    for cost in (torch.arange(n - 1).float(), -torch.arange(n - 1).float()):
        assert bool(spanning_forest(ei, cost, n).all())
    # a batch of grids, solved with the component bound H*W, equals the unbounded solve
    ei = grid_edges(3, 9, 11, 8)
    cost = torch.rand(ei.shape[1], generator=torch.Generator().manual_seed(3))
    ref = kruskal_mask(ei, cost, 3 * 99)
    assert torch.equal(spanning_forest(ei, cost, 3 * 99, max_tree_size=99), ref)
    assert torch.equal(spanning_forest(ei, cost, 3 * 99), ref)


def test_cross_check_with_cpu_kruskal():
    mst = pytest.importorskip("treessm.topology.mst")
    gen = torch.Generator().manual_seed(11)
    for _ in range(10):
        ei, cost = random_graph(gen, 50, 120, ties=True)
        assert torch.equal(spanning_forest(ei, cost, 50), mst.minimum_spanning_tree(ei, cost, 50))


# ---------------------------------------------------------------------------- build_tree
def test_build_tree_by_hand():
    ei = torch.tensor([[0, 1, 1, 3, 0], [1, 2, 3, 4, 2]])
    cost = torch.tensor([1.0, 1.0, 1.0, 1.0, 9.0])
    tree = build_tree(ei, cost, 6, roots=torch.tensor([1]))  # vertex 5 is isolated
    assert tree.parent.tolist() == [1, -1, 1, 1, 3, -1]
    assert tree.order.tolist() == [1, 0, 2, 3, 4, 5]
    assert tree.depth.tolist() == [1, 0, 1, 1, 2, 0]
    assert tree.child_ptr.tolist() == [1, 4, 4, 4, 5, 6, 6]
    assert tree.tree_ptr.tolist() == [0, 5, 6]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("known_trees", [True, False])
def test_build_tree_grids(device, connectivity, known_trees):
    gen = torch.Generator().manual_seed(connectivity)
    b, h, w = 4, 9, 13
    n = b * h * w
    ei = grid_edges(b, h, w, connectivity)
    cost = (torch.rand(ei.shape[1], generator=gen) * 50).round()  # many ties
    roots = torch.arange(b) * h * w
    batch = torch.arange(b).repeat_interleave(h * w)
    tree = build_tree(ei.to(device), cost.to(device), n, roots.to(device), batch.to(device),
                      num_trees=b if known_trees else None,
                      max_tree_size=h * w if known_trees else None)
    assert tree.device.type == device
    parent = root_oracle(ei, kruskal_mask(ei, cost, n), n, roots)
    assert_same_tree(tree, Tree.from_parent(parent, batch), batch)
    assert tree.roots.tolist() == roots.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_build_tree_many_components(device):
    gen = torch.Generator().manual_seed(5)
    for trial in range(30):
        n = int(torch.randint(1, 120, (1,), generator=gen))
        e = int(torch.randint(0, 2 * n, (1,), generator=gen))
        ei, cost = random_graph(gen, n, e, ties=bool(trial % 2))
        # several preferred roots, some sharing a component (the lowest of them wins)
        roots = torch.randint(0, n, (int(torch.randint(0, 6, (1,), generator=gen)),),
                              generator=gen)
        mask = kruskal_mask(ei, cost, n)
        parent = root_oracle(ei, mask, n, roots)
        ref = Tree.from_parent(parent)
        tree = build_tree(ei.to(device), cost.to(device), n, roots.to(device))
        assert_same_tree(tree, ref)
        tree = build_tree(ei.to(device), cost.to(device), n, roots.to(device),
                          num_trees=ref.num_trees)
        assert_same_tree(tree, ref)
        got = parent_from_forest(ei.to(device), mask.to(device), n, roots.to(device))
        assert torch.equal(got.cpu(), parent)


def _root_of(parent):
    """The root of every vertex of a parent array (a list)."""
    root = list(range(len(parent)))
    for v in range(len(parent)):
        r = v
        while parent[r] >= 0:
            r = parent[r]
        root[v] = r
    return torch.tensor(root, dtype=torch.long)


@pytest.mark.parametrize("device", DEVICES)
def test_forest_on_device_matches_from_parent(device):
    gen = torch.Generator().manual_seed(11)
    for trial in range(30):
        n = int(torch.randint(1, 150, (1,), generator=gen))
        ei, cost = random_graph(gen, n, int(torch.randint(0, 3 * n, (1,), generator=gen)),
                                ties=False)
        roots = torch.randint(0, n, (int(torch.randint(0, 5, (1,), generator=gen)),),
                              generator=gen)
        mask = kruskal_mask(ei, cost, n)
        parent = root_oracle(ei, mask, n, roots)
        ref = Tree.from_parent(parent, torch.zeros(n, dtype=torch.long))
        forest = ei[:, mask]
        flip = torch.rand(forest.shape[1], generator=gen) < 0.5  # either direction
        forest = torch.where(flip, forest.flip(0), forest)
        root = _root_of(parent.tolist())
        tree = forest_on_device(forest.to(device), root.to(device), ref.num_trees,
                                ref.batch.to(device),
                                max_tree_size=None if trial % 2 else ref.max_tree_size)
        assert_same_tree(tree, ref, ref.batch)
    assert forest_on_device(torch.zeros(2, 0, dtype=torch.long),
                            torch.zeros(0, dtype=torch.long), 0).num_nodes == 0


def test_forest_on_device_input_errors():
    edges = torch.tensor([[1], [0]])
    with pytest.raises(TypeError, match="root must be a 1-D LongTensor"):
        forest_on_device(edges, [0, 0], 1)
    with pytest.raises(ValueError, match=r"root must hold vertex ids in \[0, 2\)"):
        forest_on_device(edges, torch.tensor([0, 5]), 1)
    with pytest.raises(TypeError, match="root must be an integer tensor"):
        forest_on_device(edges, torch.tensor([0.0, 0.0]), 1)
    with pytest.raises(ValueError, match="num_trees"):
        forest_on_device(edges, torch.tensor([0, 0]), -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,e", [(5000, 2000), (3000, 60000)])
def test_build_tree_drops_more_than_the_spare_slots(device, n, e):
    # thousands of trees (padding copies) or of edges outside the forest: more dropped
    # elements than the scatters' spare slots, which they then share
    gen = torch.Generator().manual_seed(n)
    ei, cost = random_graph(gen, n, e, ties=False)
    mask = kruskal_mask(ei, cost, n)
    ref = Tree.from_parent(root_oracle(ei, mask, n, None))
    assert_same_tree(build_tree(ei.to(device), cost.to(device), n), ref)
    assert_same_tree(build_tree(ei.to(device), cost.to(device), n, num_trees=ref.num_trees),
                     ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("profile", ["rising", "random"])
def test_build_tree_long_path(device, profile):
    # depth N - 1: nothing in the construction may loop over depth
    n = 20000
    gen = torch.Generator().manual_seed(2)
    ei = torch.stack([torch.arange(n - 1), torch.arange(1, n)])
    perm = torch.randperm(n - 1, generator=gen)
    ei = ei[:, perm]
    ei[:, ::2] = ei[:, ::2].flip(0)  # either direction
    cost = perm.float() if profile == "rising" else torch.rand(n - 1, generator=gen)
    roots = torch.tensor([n - 1])
    tree = build_tree(ei.to(device), cost.to(device), n, roots.to(device), num_trees=1)
    assert tree.depth.max().item() == n - 1
    assert tree.order.tolist() == list(range(n - 1, -1, -1))
    parent = torch.arange(1, n + 1)
    parent[-1] = -1
    assert_same_tree(tree, Tree.from_parent(parent))
    # the same path rooted at its lowest vertex, through parent_from_forest
    got = parent_from_forest(ei.to(device), torch.ones(n - 1, dtype=torch.bool, device=device), n)
    assert torch.equal(got.cpu(), torch.arange(-1, n - 1))


def test_build_tree_degenerate():
    empty = torch.zeros(2, 0, dtype=torch.long)
    tree = build_tree(empty, torch.zeros(0), 0)
    assert_same_tree(tree, Tree.from_parent(torch.zeros(0, dtype=torch.long)))
    tree = build_tree(empty, torch.zeros(0), 4, roots=torch.tensor([2]), num_trees=4)
    assert_same_tree(tree, Tree.from_parent(torch.full((4,), -1)))
    tree = build_tree(torch.tensor([[0], [0]]), torch.ones(1), 1)
    assert_same_tree(tree, Tree.from_parent(torch.tensor([-1])))


def test_build_tree_matches_cpu_rooting():
    rooting = pytest.importorskip("treessm.topology.rooting")
    gen = torch.Generator().manual_seed(13)
    ei = grid_edges(3, 6, 7, 4)
    cost = torch.rand(ei.shape[1], generator=gen)
    roots = torch.tensor([3, 42 + 20, 84 + 41])
    mask = kruskal_mask(ei, cost, 126)
    parent = rooting.root_forest(ei[:, mask], 126, roots)
    assert_same_tree(build_tree(ei, cost, 126, roots, num_trees=3), Tree.from_parent(parent))


def test_input_errors():
    ei = torch.tensor([[0, 1], [1, 2]])
    cost = torch.ones(2)
    with pytest.raises(ValueError, match="edge_index"):
        build_tree(torch.zeros(3, 2, dtype=torch.long), cost, 3)
    with pytest.raises(TypeError, match="edge_index"):
        spanning_forest(ei.float(), cost, 3)
    with pytest.raises(ValueError, match="edge_index"):
        spanning_forest(ei, cost, 2)  # vertex 2 out of range
    with pytest.raises(ValueError, match="cost"):
        spanning_forest(ei, torch.ones(3), 3)
    with pytest.raises(TypeError, match="cost"):
        spanning_forest(ei, torch.ones(2, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match="roots"):
        build_tree(ei, cost, 3, roots=torch.tensor([3]))
    with pytest.raises(ValueError, match="batch"):
        build_tree(ei, cost, 3, batch=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_trees"):
        build_tree(ei, cost, 3, num_trees=4)
    with pytest.raises(ValueError, match="num_nodes"):
        spanning_forest(ei, cost, -1)
    with pytest.raises(ValueError, match="max_tree_size"):
        spanning_forest(ei, cost, 3, max_tree_size=0)
    with pytest.raises(ValueError, match="mask"):
        parent_from_forest(ei, torch.ones(3, dtype=torch.bool), 3)


def test_no_gradient():
    ei = torch.tensor([[0, 1], [1, 2]])
    cost = torch.rand(2, requires_grad=True)
    tree = build_tree(ei, cost, 3)
    assert not tree.parent.requires_grad


# ---------------------------------------------------------------------------- no host sync
class _ForbidHostSync(TorchDispatchMode):
    """Fails on every operator that needs the device's answer on the host."""

    FORBIDDEN = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
                 "aten::nonzero_numpy", "aten::argwhere", "aten::masked_select", "aten::equal",
                 "aten::allclose", "aten::bincount", "aten::repeat_interleave", "aten::unique",
                 "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
                 "aten::histc"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation: {name}")
        if name in ("aten::index", "aten::index_put", "aten::index_put_"):
            for ix in args[1]:
                if ix is not None and ix.dtype in (torch.bool, torch.uint8):
                    raise AssertionError(f"host synchronisation: boolean mask in {name}")
        self.count += 1
        return func(*args, **(kwargs or {}))


def _forbid_python_reads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("host synchronisation: a tensor was read on the host")
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, fail)


def test_build_tree_has_no_host_sync(monkeypatch):
    b, h, w = 2, 5, 6
    ei = grid_edges(b, h, w, 4)
    cost = torch.rand(ei.shape[1], generator=torch.Generator().manual_seed(0))
    roots = torch.tensor([14, 44])
    batch = torch.arange(b).repeat_interleave(h * w)
    ref = build_tree(ei, cost, b * h * w, roots, batch, num_trees=b, max_tree_size=h * w)
    # the id range check reads values; it runs on CPU tensors only and is skipped on a GPU
    monkeypatch.setattr(boruvka, "check_index_range", lambda *args: None)
    monkeypatch.setattr(_checks, "check_index_range", lambda *args: None)
    monkeypatch.setattr(euler_tour, "check_index_range", lambda *args: None)
    with _ForbidHostSync() as guard:
        with pytest.raises(AssertionError, match="host synchronisation"):
            torch.ones(2).sum().item()  # the guard sees what it must see
    with monkeypatch.context() as m:
        _forbid_python_reads(m)
        with _ForbidHostSync() as guard:
            tree = build_tree(ei, cost, b * h * w, roots, batch, num_trees=b, max_tree_size=h * w)
            spanning_forest(ei, cost.double(), b * h * w)
            parent_from_forest(ei, torch.zeros(ei.shape[1], dtype=torch.bool), b * h * w, roots)
            forest_on_device(tree.parent[None, 1:].new_tensor([[1, 2], [0, 0]]),
                             torch.zeros(3, dtype=torch.long), 1)
    assert guard.count > 100
    assert_same_tree(tree, ref, batch)


@needs_cuda
@pytest.mark.cuda
def test_cuda_no_sync_and_graph_capture():
    b, h, w = 3, 12, 10
    n = b * h * w
    ei = grid_edges(b, h, w, 4).cuda()
    gen = torch.Generator().manual_seed(9)
    costs = [torch.rand(ei.shape[1], generator=gen).cuda() for _ in range(2)]
    roots = (torch.arange(b) * h * w + 5).cuda()
    batch = torch.arange(b).repeat_interleave(h * w).cuda()
    args = dict(num_trees=b, max_tree_size=h * w)
    build_tree(ei, costs[0], n, roots, batch, **args)  # warm up kernels and allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        build_tree(ei, costs[0], n, roots, batch, **args)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    cost = costs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        build_tree(ei, cost, n, roots, batch, **args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = build_tree(ei, cost, n, roots, batch, **args)
    for c in costs:
        cost.copy_(c)
        graph.replay()
        torch.cuda.synchronize()
        fresh = build_tree(ei.cpu(), c.cpu(), n, roots.cpu(), batch.cpu(), **args)
        assert_same_tree(captured, fresh, batch)


def test_compacting_boruvka_equals_the_fixed_rounds():
    from treessm.topology.boruvka import boruvka, boruvka_compacting, edge_keys

    g = torch.Generator().manual_seed(12)
    for n, e, ties in ((1, 0, False), (2, 3, True), (50, 40, False), (300, 1500, False),
                       (300, 1500, True), (1000, 900, False)):
        ei = torch.randint(0, n, (2, e), generator=g)  # self-loops, repeats, components
        cost = (torch.randint(0, 3, (e,), generator=g).float() if ties
                else torch.rand(e, generator=g))
        key = edge_keys(cost)
        fixed = boruvka(ei, key, n, n)
        compact = boruvka_compacting(ei, key, n)
        assert torch.equal(fixed[0], compact[0]) and torch.equal(fixed[1], compact[1])


@pytest.mark.parametrize("device", DEVICES)
def test_compacting_boruvka_equals_the_fixed_rounds_on_a_large_graph(device):
    # a random graph merges into one giant component whose slot most edges of the late
    # rounds point at (the case the CUDA selection kernel is built for); on a GPU both run
    # the CUDA operator, checked against the tensor rounds on the CPU
    from treessm.topology.boruvka import boruvka, boruvka_compacting, edge_keys

    g = torch.Generator().manual_seed(14)
    n = 20000
    ei = torch.randint(0, n, (2, 5 * n), generator=g)
    key = edge_keys(torch.rand(5 * n, generator=g))
    want = boruvka(ei, key, n, n)
    for run in (boruvka(ei.to(device), key.to(device), n, n),
                boruvka_compacting(ei.to(device), key.to(device), n)):
        assert torch.equal(run[0].cpu(), want[0]) and torch.equal(run[1].cpu(), want[1])
    assert torch.equal(want[0], kruskal_mask(ei, key, n))


@needs_cuda
@pytest.mark.cuda
def test_cuda_boruvka_matches_the_tensor_rounds():
    # the CUDA operator (all rounds, three launches each) against the tensor rounds on the
    # CPU: chosen edges and labels, bit for bit, run to run; with the exact bound on the
    # largest component as well
    from treessm.topology.boruvka import _NO_EDGE, boruvka, ceil_log2, edge_keys
    from treessm.typing import load_cuda_extension

    load_cuda_extension()
    g = torch.Generator().manual_seed(5)
    n = 200_000
    order = torch.randperm(n, generator=g)
    chain = torch.stack([order[:-1], order[1:]])  # one path through shuffled ids
    star = torch.stack([torch.zeros(n - 1, dtype=torch.long), torch.arange(1, n)])
    grouped = torch.randint(0, n // 50, (300_000,), generator=g) * 50 + torch.randint(
        0, 50, (2, 300_000), generator=g)  # 4,000 components of 50 ids
    sparse = torch.randint(0, n, (2, n // 2), generator=g)  # many trees, isolated vertices
    dense = torch.randint(0, n, (2, 5 * n), generator=g)
    for ei, largest in ((chain, n), (star, n), (grouped, 50), (sparse, n), (dense, n),
                        (dense[:, :0], 1)):
        e = ei.shape[1]
        for cost in (torch.randn(e, generator=g), torch.randint(0, 4, (e,), generator=g).float()):
            key = edge_keys(cost)
            for size in sorted({n, largest}):
                want = boruvka(ei, key, n, size)
                got = boruvka(ei.cuda(), key.cuda(), n, size)
                assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
                again = torch.ops.treessm.cuda_boruvka(ei.cuda(), key.cuda(), n,
                                                       ceil_log2(size), _NO_EDGE | e)
                assert torch.equal(again[0], got[0]) and torch.equal(again[1], got[1])
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.treessm.cuda_boruvka(dense.cuda().int(), key.cuda(), n, 3, _NO_EDGE)


def test_counting_build_reports_sizes():
    # without num_trees the build counts the trees and the largest tree on the host, and
    # records no level count, as a build given the count (later builds of a graph layer)
    # records none: the scans of both take the same schedule and plans
    g = torch.Generator().manual_seed(13)
    n = 400
    ei = torch.randint(0, n, (2, 700), generator=g)
    cost = torch.rand(700, generator=g)
    tree = build_tree(ei, cost, n)
    ref = Tree.from_parent(tree.parent)
    assert tree.num_trees == ref.num_trees
    assert tree.num_levels is None and tree.max_tree_size == ref.max_tree_size
    for name in ("order", "child_ptr", "tree_ptr", "depth"):
        assert torch.equal(getattr(tree, name), getattr(ref, name)), name
    # a forest with a tree above PHASES_MIN_TREE_SIZE, whose schedule a level count changed
    n = 6000
    ei = torch.randint(0, n, (2, 5 * n), generator=g)
    cost = torch.rand(5 * n, generator=g)
    counted = build_tree(ei, cost, n)
    given = build_tree(ei, cost, n, num_trees=counted.num_trees,
                       max_tree_size=counted.max_tree_size)
    assert counted.num_levels is None and given.num_levels is None
    assert choose_schedule(counted, row_bytes=512) == choose_schedule(given, row_bytes=512) \
        == "tiles"


@needs_cuda
@pytest.mark.cuda
def test_cuda_pointer_jump_matches_the_tensor_rounds():
    from treessm.ops.pointer_jump import pointer_jump
    from treessm.typing import load_cuda_extension

    load_cuda_extension()
    g = torch.Generator().manual_seed(9)
    m = 500_000
    order = torch.randperm(m, generator=g)
    succ = torch.empty(m, dtype=torch.long)
    succ[order[:-1]] = order[1:]
    succ[order[-1]] = order[-1]  # one list through shuffled ids
    for combine, code, end in ((torch.add, 0, 0), (torch.minimum, 1, 10 ** 6)):
        value = torch.randint(-100, 100, (m,), generator=g)
        value[order[-1]] = end
        for rounds in (0, 3, 19, 20):
            want = pointer_jump(succ, value, rounds, combine)
            got = torch.ops.treessm.cuda_pointer_jump(succ.cuda(), value.cuda(), rounds, code)
            assert torch.equal(got.cpu(), want)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.treessm.cuda_pointer_jump(succ.cuda().int(), value.cuda(), 3, 0)
    with pytest.raises(RuntimeError, match="combine"):
        torch.ops.treessm.cuda_pointer_jump(succ.cuda(), value.cuda(), 3, 2)
