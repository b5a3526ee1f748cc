"""Spanning-tree builds replayed from CUDA graphs (``treessm.topology.captured``): replays
equal eager builds and the CPU's trees, trees handed out earlier never change, a changed
graph is recorded anew, and nothing is recorded where it must not be."""
import pytest
import torch

import treessm
from treessm.topology import captured
from treessm.topology.euler_tour import spanning_tree_on_device

FIELDS = ("parent", "order", "child_ptr", "tree_ptr", "depth")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: torch.cuda.is_available() is False")


def _graph(seed, n=3000, e=9000):
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, e), generator=g)  # self-loops, repeats, several components
    return ei, n, g


def _same(a, b):
    return all(torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()) for f in FIELDS)


def test_nothing_recorded_on_the_cpu():
    ei, n, g = _graph(0)
    cost = torch.rand(ei.shape[1], generator=g)
    assert captured.captured_build(ei, cost, n, None, None, dict(num_trees=1)) is None


@needs_cuda
@pytest.mark.cuda
def test_replays_equal_eager_builds_and_the_cpu_tree():
    # edge_attr costs: the same numbers on both devices, so the trees must be equal
    ei, n, g = _graph(1)
    topo = treessm.GraphTopology("edge_attr")
    attr = torch.rand(ei.shape[1], generator=g)
    graph_cpu = treessm.prepare_graph(ei, n, edge_attr=attr, reduce="min", cache=False)
    graph = treessm.prepare_graph(ei.cuda(), n, edge_attr=attr.cuda(), reduce="min",
                                  cache=False)
    x = torch.zeros(n, 1)
    captured._BUILDS.clear()
    trees = []
    for step in range(4):
        attr = torch.rand(graph_cpu.edge_attr.shape[0], generator=g)
        graph_cpu.edge_attr.copy_(attr)
        graph.edge_attr.copy_(attr)
        tree = topo(x.cuda(), graph)
        want = topo(x, graph_cpu)
        assert _same(tree, want), step
        trees.append((tree, want))
    assert len(captured._BUILDS) == 1  # the first build counted, the later ones replayed
    for tree, want in trees:  # later replays left the trees handed out unchanged
        assert _same(tree, want)
    # the graph changed in place: recorded anew, not replayed stale
    graph.edge_index[:, :50] = graph.edge_index[:, 50:100].clone()
    graph_cpu.edge_index[:, :50] = graph_cpu.edge_index[:, 50:100].clone()
    for _ in range(2):
        assert _same(topo(x.cuda(), graph), topo(x, graph_cpu))


@needs_cuda
@pytest.mark.cuda
def test_replay_equals_the_eager_build_bit_for_bit():
    ei, n, g = _graph(2)
    ei = ei.cuda()
    tree = spanning_tree_on_device(ei, torch.rand(ei.shape[1], device="cuda"), n)
    hints = dict(num_trees=tree.num_trees, max_tree_size=tree.max_tree_size)
    captured._BUILDS.clear()
    batch = torch.zeros(n, dtype=torch.long, device="cuda")
    for seed in range(3):
        cost = torch.rand(ei.shape[1], generator=torch.Generator().manual_seed(seed)).cuda()
        got = captured.captured_build(ei, cost, n, None, batch, hints)
        want = spanning_tree_on_device(ei, cost, n, None, batch, **hints)
        assert got is not None and _same(got, want) and got.batch is batch
        assert got.num_trees == want.num_trees and got.max_tree_size == want.max_tree_size


@needs_cuda
@pytest.mark.cuda
def test_nothing_recorded_for_large_graphs_or_while_capturing(monkeypatch):
    ei, n, g = _graph(3)
    ei = ei.cuda()
    cost = torch.rand(ei.shape[1], generator=g).cuda()
    hints = dict(num_trees=spanning_tree_on_device(ei, cost, n).num_trees, max_tree_size=n)
    captured._BUILDS.clear()
    monkeypatch.setattr(captured, "CAPTURE_MAX_EDGES", ei.shape[1] - 1)
    assert captured.captured_build(ei, cost, n, None, None, hints) is None
    monkeypatch.undo()
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):  # a caller's own capture: its build is recorded there
        assert captured.captured_build(ei, cost, n, None, None, hints) is None
        cost.mul_(1)
    assert len(captured._BUILDS) == 0
    assert captured.captured_build(ei, cost, n, None, None, hints) is not None
    assert len(captured._BUILDS) == 1


@needs_cuda
@pytest.mark.cuda
def test_recorded_under_inference_mode_replays_outside_it():
    # an evaluation pass under torch.inference_mode() records the build; training steps
    # after it replay it (the recording's buffers must be writable outside that mode)
    ei, n, g = _graph(4)
    ei = ei.cuda()
    hints = dict(num_trees=spanning_tree_on_device(ei, torch.rand(ei.shape[1], device="cuda"),
                                                   n).num_trees, max_tree_size=n)
    captured._BUILDS.clear()
    costs = [torch.rand(ei.shape[1], generator=torch.Generator().manual_seed(s)).cuda()
             for s in range(3)]
    with torch.inference_mode():
        first = captured.captured_build(ei, costs[0], n, None, None, hints)
    for cost in costs[1:]:
        got = captured.captured_build(ei, cost, n, None, None, hints)
        assert _same(got, spanning_tree_on_device(ei, cost, n, **hints))
    assert _same(first, spanning_tree_on_device(ei, costs[0], n, **hints))
    with torch.inference_mode():
        again = captured.captured_build(ei, costs[0], n, None, None, hints)
    assert _same(again, first) and len(captured._BUILDS) == 1


def test_causal_trees_not_recorded_on_the_cpu():
    from treessm.topology import sequence
    sequence._CAUSAL_BUILDS.clear()
    topo = treessm.topology.CausalSequenceTopology(k=3)
    tree = topo(torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(0)))
    assert tree.num_nodes == 100 and len(sequence._CAUSAL_BUILDS) == 0


@needs_cuda
@pytest.mark.cuda
def test_causal_trees_replayed_equal_eager_builds():
    # a causal mixer's tree: recorded once per shape, replayed for new features; trees
    # handed out earlier stay as they were; with valid tokens given it builds eagerly
    from treessm.topology import sequence
    sequence._CAUSAL_BUILDS.clear()
    topo = treessm.topology.CausalSequenceTopology(k=4)
    g = torch.Generator().manual_seed(3)
    handed = []
    for step in range(3):
        f, o = torch.randn(3, 300, 16, generator=g), torch.randn(3, 300, 4, generator=g)
        tree = topo(f.cuda(), outer=o.cuda())
        eager = topo._build_tree(f.cuda(), None, o.cuda())
        cpu = topo(f, outer=o)
        assert _same(tree, eager) and _same(tree, cpu)
        assert torch.equal(tree.batch.cpu(), cpu.batch)
        handed.append((tree, eager))
    assert len(sequence._CAUSAL_BUILDS) == 1
    assert all(_same(tree, eager) for tree, eager in handed)
    valid = torch.ones(3, 300, dtype=torch.bool, device="cuda")
    assert _same(topo(f.cuda(), valid, outer=o.cuda()), cpu)
    assert len(sequence._CAUSAL_BUILDS) == 1


def test_release_recordings_empties_every_cache():
    # every cache of recorded graphs (tiled and walk plans, causal trees, forest builds) is
    # dropped by one call; placeholders stand in for recordings, which need a GPU
    from treessm.ops import recorded, tiles, walk
    from treessm.topology import sequence
    caches = (tiles._RECORDINGS, walk._RECORDINGS, sequence._CAUSAL_BUILDS)
    for cache in caches:
        cache._kept["placeholder"] = object()
    ei = torch.zeros(2, 1, dtype=torch.long)
    captured._BUILDS.put((ei, None), (), object())
    assert all(len(cache) == 1 for cache in caches) and len(captured._BUILDS) == 1
    recorded.release_recordings()
    assert all(len(cache) == 0 for cache in caches) and len(captured._BUILDS) == 0
