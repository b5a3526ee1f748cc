"""prepare_graph: the undirected simple form of a graph, its neighbour operator, the cache
keyed by the edge_index tensor, PyG's adjacency formats and the dataset transform."""
import pytest
import torch
from torch_geometric import EdgeIndex
from torch_geometric.data import Batch, Data
from torch_geometric.transforms import ToSparseTensor

import treessm
from treessm.transforms import PrepareGraph


def _simple_by_hand(edge_index, weight=None):
    """{(a, b): mean weight} over undirected pairs a < b, self-loops dropped."""
    acc = {}
    for k, (a, b) in enumerate(edge_index.T.tolist()):
        if a == b:
            continue
        w = 1.0 if weight is None else float(weight[k])
        acc.setdefault((min(a, b), max(a, b)), []).append(w)
    return {e: sum(v) / len(v) for e, v in sorted(acc.items())}


def test_simple_form_and_neighbour_operator_by_hand():
    ei = torch.tensor([[0, 1, 1, 2, 3, 3, 4, 2], [1, 0, 2, 2, 4, 4, 3, 0]])
    w = torch.tensor([1.0, 3.0, 2.0, 9.0, 1.0, 2.0, 3.0, 4.0])
    g = treessm.prepare_graph(ei, 6, w, cache=False)
    expected = _simple_by_hand(ei, w)  # the two copies of (0, 1) average to 2, ...
    assert g.edge_index.T.tolist() == [list(e) for e in expected]
    assert g.edge_weight.tolist() == pytest.approx(list(expected.values()))
    assert expected[(3, 4)] == pytest.approx(2.0)
    dense = torch.zeros(6, 6)
    for (a, b), v in expected.items():
        dense[a, b] = dense[b, a] = v
    torch.testing.assert_close(g.adjacency.to_dense(), dense)
    torch.testing.assert_close(g.degree, dense.sum(1))
    adj, inv = g.operator(torch.float64)
    assert adj.dtype == torch.float64 and inv[5] == 0  # vertex 5 is isolated
    assert "PreparedGraph(num_nodes=6, num_edges=4, edge_weight=[4])" == repr(g)


def test_pyg_formats_give_the_same_graph():
    from torch_geometric.utils import coalesce

    torch.manual_seed(0)
    # no repeated (row, col) pair: a sparse adjacency holds one value per pair
    ei, w = coalesce(torch.randint(0, 30, (2, 80)), torch.rand(80) + 0.5, num_nodes=30)
    ref = treessm.prepare_graph(ei, 30, w, cache=False)
    data = Data(edge_index=ei, edge_weight=w, num_nodes=30)
    adj_t = ToSparseTensor(attr="edge_weight")(data.clone()).adj_t
    for other in (treessm.prepare_graph(adj_t, cache=False),
                  treessm.prepare_graph(EdgeIndex(ei, sparse_size=(30, 30)), edge_weight=w,
                                        cache=False),
                  treessm.prepare_graph(PrepareGraph()(data.clone()).edge_index, 30,
                                        PrepareGraph()(data.clone()).edge_weight, cache=False)):
        assert other.num_nodes == 30
        torch.testing.assert_close(other.edge_index, ref.edge_index)
        torch.testing.assert_close(other.edge_weight, ref.edge_weight)


def test_transform_marks_survive_batching_and_skip_the_sort(monkeypatch):
    graphs = [PrepareGraph()(Data(x=torch.randn(n, 2), edge_index=torch.randint(0, n, (2, 3 * n))))
              for n in (5, 9, 4)]
    batch = Batch.from_data_list(graphs)
    assert isinstance(batch.edge_index, EdgeIndex) and batch.edge_index.is_undirected
    import treessm.topology.prepared_graph as pg

    def no_sort(*args, **kwargs):
        raise AssertionError("a prepared batch was sorted again")

    monkeypatch.setattr(pg, "to_undirected", no_sort)
    g = treessm.prepare_graph(batch.edge_index, batch.num_nodes, cache=False)
    monkeypatch.undo()
    ref = treessm.prepare_graph(batch.edge_index.as_tensor(), batch.num_nodes, cache=False)
    torch.testing.assert_close(g.edge_index, ref.edge_index)
    # an EdgeIndex marked undirected that is not simple is still prepared correctly
    loops = EdgeIndex(torch.tensor([[0, 0, 1, 1], [0, 1, 0, 1]]), sparse_size=(2, 2),
                      sort_order="row", is_undirected=True)
    assert treessm.prepare_graph(loops, cache=False).edge_index.tolist() == [[0], [1]]


def test_cache_is_keyed_by_the_tensor_and_sees_in_place_changes():
    ei = torch.tensor([[0, 1, 2], [1, 2, 3]])
    g = treessm.prepare_graph(ei, 5)
    assert treessm.prepare_graph(ei, 5) is g  # same tensor, unchanged: one preparation
    assert treessm.prepare_graph(ei.clone(), 5) is not g  # equal values, another tensor
    assert treessm.prepare_graph(ei, 6) is not g
    ei[1, 2] = 4  # in place: the version counter moves on
    g2 = treessm.prepare_graph(ei, 5)
    assert g2 is not g and g2.edge_index.T.tolist() == [[0, 1], [1, 2], [2, 4]]
    w = torch.ones(3)
    gw = treessm.prepare_graph(ei, 5, w)
    w.mul_(2.0)
    assert treessm.prepare_graph(ei, 5, w).edge_weight.tolist() == [2.0, 2.0, 2.0]
    assert gw.edge_weight.tolist() == [1.0, 1.0, 1.0]


def test_bad_input_is_named():
    ei = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"vertex ids in \[0, 2\)"):
        treessm.prepare_graph(ei, 2)
    with pytest.raises(TypeError, match="edge_index must be a torch.Tensor"):
        treessm.prepare_graph([[0, 1], [1, 2]], 3)
    with pytest.raises(ValueError, match="edge_weight must be positive and finite"):
        treessm.prepare_graph(ei, 3, torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="edge_weight must be a floating-point"):
        treessm.prepare_graph(ei, 3, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="edge_attr must have shape"):
        treessm.prepare_graph(ei, 3, edge_attr=torch.ones(3, 2))
    with pytest.raises(ValueError, match="reduce must be one of"):
        treessm.prepare_graph(ei, 3, reduce="median")
    g = treessm.prepare_graph(ei, 3)
    with pytest.raises(ValueError, match="has 3 vertices but x has 4 rows"):
        treessm.GraphTopology()(torch.randn(4, 2), g)
    with pytest.raises(ValueError, match="edge_weight and edge_attr belong in prepare_graph"):
        treessm.GraphTopology()(torch.randn(3, 2), g, edge_weight=torch.ones(2))


def test_graph_topology_takes_every_format_and_prefers_heavy_edges():
    # a 4-cycle whose vertices all have the same features: every edge costs the same, so
    # the weights alone decide which edge the spanning tree leaves out
    ei = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    x = torch.ones(4, 3)
    topo = treessm.GraphTopology()
    light = torch.tensor([1.0, 1.0, 0.5, 1.0])  # (2, 3) is the lightest edge
    tree = topo(x, ei, edge_weight=light)
    edges = {tuple(sorted((v, p))) for v, p in enumerate(tree.parent.tolist()) if p >= 0}
    assert edges == {(0, 1), (1, 2), (0, 3)}
    assert topo(x, treessm.prepare_graph(ei, 4, light)).parent.tolist() == tree.parent.tolist()


def _grid_with_islands(seed=0):
    """A 6x6 grid with one edge per pair of vertices, two isolated vertices and a separate
    triangle: three components of 36, 3 and (twice) 1 vertices."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(36).view(6, 6)
    ei = torch.cat([torch.stack([idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1)]),
                    torch.stack([idx[:-1].reshape(-1), idx[1:].reshape(-1)]),
                    torch.tensor([[36, 37, 38], [37, 38, 36]])], 1)
    return ei[:, torch.randperm(ei.shape[1], generator=g)], 41


def test_tensor_keyed_cache_serves_only_the_same_unchanged_tensor():
    from treessm.topology.prepared_graph import TensorKeyedCache

    cache = TensorKeyedCache(size=2)
    a, b = torch.arange(4), torch.arange(4)
    cache.put((a, None), (5,), "a")
    assert cache.get((a, None), (5,)) == "a"
    assert cache.get((b, None), (5,)) is None  # equal values, another tensor
    assert cache.get((a, b), (5,)) is None and cache.get((a, None), (6,)) is None
    a.add_(1)  # in place: the version counter moves on
    assert cache.get((a, None), (5,)) is None
    cache.put((a, None), (5,), "a2")
    cache.put((b, None), (5,), "b")
    c = torch.arange(3)
    cache.put((c, None), (5,), "c")  # the least recently used entry (a) goes
    assert len(cache) == 2 and cache.get((a, None), (5,)) is None
    del c  # an entry goes with its tensor
    assert len(cache) == 1 and cache.get((b, None), (5,)) == "b"


def test_graph_topology_reuses_the_plan_of_a_prepared_graph_only():
    from treessm.topology import base

    ei, n = _grid_with_islands()
    x = torch.randn(n, 8)
    topo = treessm.GraphTopology()
    graph = treessm.prepare_graph(ei, n, cache=False)
    base._PLANS.clear()
    first = topo(x, graph)
    plan = base._PLANS.get((graph.edge_index, None), (n,))
    assert plan is not None and plan.src.tolist() == graph.edge_index[0].tolist()
    again = topo(x, graph)  # the same graph: the kept plan, the same tree
    assert base._PLANS.get((graph.edge_index, None), (n,)) is plan
    for a, b in ((first, again), (first, topo(x, ei))):
        assert torch.equal(a.parent, b.parent) and torch.equal(a.order, b.order)
    # another graph over the same vertices is not served that plan
    other = treessm.prepare_graph(ei[:, (ei != 36).all(0)], n, cache=False)
    tree = topo(x, other)
    assert base._PLANS.get((other.edge_index, None), (n,)) is not plan
    uncached = treessm.GraphTopology()(x, treessm.prepare_graph(ei[:, (ei != 36).all(0)], n,
                                                                  cache=False))
    assert torch.equal(tree.parent, uncached.parent) and tree.num_trees == 5


def test_device_build_hints_of_a_prepared_graph_give_the_same_tree():
    # the device builder runs on any device: on the CPU here, as on a GPU
    from treessm.topology import base

    ei, n = _grid_with_islands(1)
    graph = treessm.prepare_graph(ei, n, cache=False)
    topo = treessm.GraphTopology()
    base._DEVICE_HINTS.clear()
    for step in range(3):
        x = torch.randn(n, 4)
        if step == 2:  # equal costs everywhere: ties broken by edge order, as uncached
            x = torch.ones(n, 4)
        cost = topo.edge_cost(x, graph.edge_index)
        tree = topo._build_on_device(graph.edge_index, cost, n, None, None)
        hints = base._DEVICE_HINTS.get((graph.edge_index,), (n,))
        assert hints == dict(num_trees=4, max_tree_size=36)
        ref = treessm.topology.euler_tour.spanning_tree_on_device(graph.edge_index, cost, n)
        for name in ("parent", "order", "child_ptr", "tree_ptr", "depth"):
            assert torch.equal(getattr(tree, name), getattr(ref, name)), name
        assert tree.max_tree_size == ref.max_tree_size == 36
    # another graph (vertex 36 cut off the triangle) counts its own trees
    cut = treessm.prepare_graph(ei[:, (ei != 36).all(0)], n, cache=False)
    cost = topo.edge_cost(torch.randn(n, 4), cut.edge_index)
    assert topo._build_on_device(cut.edge_index, cost, n, None, None).num_trees == 5
    assert base._DEVICE_HINTS.get((cut.edge_index,), (n,))["num_trees"] == 5
