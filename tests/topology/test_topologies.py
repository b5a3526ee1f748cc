"""Grid, sequence and graph topologies, and the Topology extension API."""

import networkx as nx
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
import torch

import treessm
from treessm import GraphTopology, GridTopology, SequenceTopology, Topology, Tree
from treessm.topology import minimum_spanning_tree
from treessm.topology.distance import edge_cost

FIELDS = ("parent", "order", "child_ptr", "tree_ptr", "depth")


def tree_edges(tree):
    """Undirected edges (child, parent) of a tree as a set of sorted pairs."""
    child = torch.nonzero(tree.parent >= 0).view(-1)
    return {(min(a, b), max(a, b)) for a, b in zip(child.tolist(), tree.parent[child].tolist())}


def check_forest(tree, batch=None):
    """Structural invariants: Tree.from_parent agrees, parents come before children."""
    ref = Tree.from_parent(tree.parent, batch)
    for name in FIELDS:
        assert torch.equal(getattr(tree, name), getattr(ref, name)), name
    pos = torch.empty_like(tree.order)
    pos[tree.order] = torch.arange(tree.num_nodes)
    has = tree.parent >= 0
    assert (pos[tree.parent[has]] < pos[has]).all()
    if batch is not None:
        assert torch.equal(tree.batch, batch)
        assert (batch[tree.parent[has]] == batch[has]).all()


def scipy_total(edge_index, cost, n):
    ei = edge_index.numpy()
    mat = scipy.sparse.coo_matrix((cost.double().numpy(), (ei[0], ei[1])), shape=(n, n))
    return float(scipy.sparse.csgraph.minimum_spanning_tree(mat.tocsr()).sum())


def tree_cost(tree, feat, distance="cosine"):
    child = torch.nonzero(tree.parent >= 0).view(-1)
    ei = torch.stack([child, tree.parent[child]])
    return float(edge_cost(feat, ei, distance).double().sum())


# ---------------------------------------------------------------------------- grid
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("shape", [(3, 7, 6), (1, 1, 1), (2, 1, 5), (2, 4, 1)])
def test_grid_spanning_rooted_at_first_pixel(connectivity, shape):
    b, h, w = shape
    feat = torch.randn(b, h, w, 5, generator=torch.Generator().manual_seed(h * w))
    topo = GridTopology(connectivity=connectivity)
    tree = topo(feat)
    n = b * h * w
    batch = torch.arange(b).repeat_interleave(h * w)
    check_forest(tree, batch)
    assert tree.num_nodes == n and tree.num_trees == b
    first = torch.arange(b) * h * w
    assert tree.roots.tolist() == first.tolist()
    assert int((tree.parent >= 0).sum()) == n - b  # N - 1 edges per image
    for u, v in tree_edges(tree):  # only grid neighbours
        (bu, bv), (iu, iv), (ju, jv) = np.unravel_index([u, v], (b, h, w))
        assert bu == bv
        assert max(abs(iu - iv), abs(ju - jv)) == 1
        if connectivity == 4:
            assert abs(iu - iv) + abs(ju - jv) == 1
    # optimal: same total cost as scipy on the candidate graph
    ei, _, _ = topo.candidate_edges(feat)
    cost = topo.edge_cost(feat.reshape(n, -1), ei)
    assert tree_cost(tree, feat.reshape(n, -1)) == pytest.approx(scipy_total(ei, cost, n),
                                                                  rel=1e-5)


def test_grid_two_colour_regions_cross_once():
    """Left half red, right half blue: the tree crosses the border exactly once."""
    h, w = 6, 8
    feat = torch.zeros(1, h, w, 3)
    feat[..., : w // 2, 0] = 1.0
    feat[..., w // 2:, 2] = 1.0
    feat[..., 1] = 0.3  # the colours are not orthogonal; every crossing costs the same
    tree = GridTopology(distance="cosine")(feat)
    crossing = [(u, v) for u, v in tree_edges(tree) if (u % w < w // 2) != (v % w < w // 2)]
    # all crossings tie, so the first listed one wins: the horizontal edge of row 0
    assert crossing == [(w // 2 - 1, w // 2)]
    # one crossing made cheaper: that one is used
    feat[0, 4, w // 2, 0] = 0.5
    tree = GridTopology(distance="cosine")(feat)
    crossing = [(u, v) for u, v in tree_edges(tree) if (u % w < w // 2) != (v % w < w // 2)]
    assert crossing == [(4 * w + w // 2 - 1, 4 * w + w // 2)]


def test_grid_eight_connectivity_uses_diagonals():
    # a checkerboard of two colours: only diagonal neighbours share a colour
    h = w = 4
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    colour = ((i + j) % 2).float()
    feat = torch.stack([colour, 1 - colour], -1)[None]
    tree = GridTopology(connectivity=8)(feat)
    check_forest(tree, torch.zeros(h * w, dtype=torch.long))
    diagonal = [(u, v) for u, v in tree_edges(tree) if abs(u // w - v // w) == 1
                and abs(u % w - v % w) == 1]
    assert len(diagonal) == h * w - 2  # everything but one bridge between the two colours
    tree4 = GridTopology(connectivity=4)(feat)
    assert all(abs(u - v) in (1, w) for u, v in tree_edges(tree4))


def test_grid_l2_and_callable_distance():
    feat = torch.randn(2, 5, 5, 3, generator=torch.Generator().manual_seed(1))
    n = 50
    for distance in ("l2", lambda a, b: (a - b).abs().sum(-1)):
        topo = GridTopology(distance=distance)
        tree = topo(feat)
        ei, _, _ = topo.candidate_edges(feat)
        cost = topo.edge_cost(feat.reshape(n, -1), ei)
        assert tree_cost(tree, feat.reshape(n, -1), distance) == \
            pytest.approx(scipy_total(ei, cost, n), rel=1e-5)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("distance", ["cosine", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_fused_kernel_equals_the_steps(connectivity, distance, dtype):
    topo = GridTopology(connectivity, distance)
    feat = torch.randn(3, 6, 7, 18, generator=torch.Generator().manual_seed(9)).to(dtype)
    fused = topo(feat)
    steps = Topology.__call__(topo, feat)  # candidate_edges, edge_cost, ... one by one
    for name in FIELDS + ("batch",):
        assert torch.equal(getattr(fused, name), getattr(steps, name)), name


def test_grid_is_deterministic_and_caches_candidates():
    topo = GridTopology()
    feat = torch.randn(2, 6, 6, 4)
    a, b = topo(feat), topo(feat.clone())
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert topo.candidate_edges(feat)[0] is topo.candidate_edges(feat.clone())[0]


def test_grid_accepts_grad_and_half_features():
    feat = torch.randn(1, 4, 4, 3, requires_grad=True)
    tree = GridTopology()(feat)
    assert not tree.parent.requires_grad
    tree_h = GridTopology()(feat.detach().half())
    assert tree_h.num_nodes == 16 and tree_h.num_trees == 1


def test_grid_empty_batch():
    tree = GridTopology()(torch.zeros(0, 4, 4, 2))
    assert tree.num_nodes == 0 and tree.num_trees == 0


def test_zero_channels():
    # no information: every cost ties, so the first listed edges win
    assert GridTopology()(torch.zeros(2, 3, 3, 0)).num_trees == 2
    assert SequenceTopology()(torch.zeros(2, 3, 0)).parent.tolist() == [-1, 0, 1, -1, 3, 4]
    assert GraphTopology()(torch.zeros(3, 0), torch.tensor([[0, 1], [1, 2]])).parent.tolist() \
        == [-1, 0, 1]


def test_grid_nan_features_raise():
    feat = torch.randn(1, 3, 3, 2)
    feat[0, 1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        GridTopology()(feat)


def test_grid_validation_and_repr():
    assert repr(GridTopology()) == "GridTopology(connectivity=4, distance='cosine')"
    assert repr(GridTopology(8, "l2")) == "GridTopology(connectivity=8, distance='l2')"
    with pytest.raises(ValueError, match="connectivity"):
        GridTopology(connectivity=6)
    with pytest.raises(ValueError, match="distance"):
        GridTopology(distance="hamming")
    with pytest.raises(ValueError, match=r"feat must have shape \[B, H, W, C\]"):
        GridTopology()(torch.randn(4, 4, 3))
    with pytest.raises(TypeError, match="feat"):
        GridTopology()(torch.ones(1, 4, 4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="feat"):
        GridTopology()(np.ones((1, 4, 4, 3)))


# ---------------------------------------------------------------------------- sequence
def test_sequence_chain_is_the_sequence():
    tree = SequenceTopology()(torch.randn(3, 6, 4))
    expected = [-1 if t % 6 == 0 else t - 1 for t in range(18)]
    assert tree.parent.tolist() == expected
    assert tree.roots.tolist() == [0, 6, 12]
    check_forest(tree, torch.arange(3).repeat_interleave(6))


@pytest.mark.parametrize("window", [2, 3, 5])
def test_sequence_window(window):
    b, length = 2, 12
    feat = torch.randn(b, length, 8, generator=torch.Generator().manual_seed(window))
    topo = SequenceTopology(window=window)
    tree = topo(feat)
    check_forest(tree, torch.arange(b).repeat_interleave(length))
    assert tree.roots.tolist() == [0, length]
    assert int((tree.parent >= 0).sum()) == b * (length - 1)
    assert all(abs(u - v) <= window and u // length == v // length for u, v in tree_edges(tree))
    ei, _, n = topo.candidate_edges(feat)
    assert ei.shape[1] == b * sum(length - k for k in range(1, window + 1))
    cost = topo.edge_cost(feat.reshape(n, -1), ei)
    assert tree_cost(tree, feat.reshape(n, -1)) == pytest.approx(scipy_total(ei, cost, n),
                                                                  rel=1e-5)


def test_sequence_skip_edge_is_taken():
    # tokens 0 and 2 are identical, 1 is different: with window 2 the tree jumps 0 -> 2
    feat = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    assert SequenceTopology(window=1)(feat).parent.tolist() == [-1, 0, 1]
    assert SequenceTopology(window=2)(feat).parent.tolist() == [-1, 0, 0]


def test_sequence_validation_and_repr():
    assert repr(SequenceTopology(window=2)) == "SequenceTopology(window=2, distance='cosine')"
    with pytest.raises(ValueError, match="window"):
        SequenceTopology(window=0)
    with pytest.raises(TypeError, match="window"):
        SequenceTopology(window=1.5)
    with pytest.raises(ValueError, match=r"feat must have shape \[B, L, C\]"):
        SequenceTopology()(torch.randn(5, 4))
    tree = SequenceTopology(window=4)(torch.randn(2, 1, 3))  # one token: no edges
    assert tree.parent.tolist() == [-1, -1] and tree.num_trees == 2


# ---------------------------------------------------------------------------- graph
def karate_edges():
    g = nx.karate_club_graph()
    ei = torch.tensor(list(g.edges()), dtype=torch.long).T
    return torch.cat([ei, ei.flip(0)], 1)  # both directions, as PyG stores it


def test_graph_karate_club_networkx():
    ei = karate_edges()
    x = torch.randn(34, 8, generator=torch.Generator().manual_seed(0))
    tree = GraphTopology()(x, ei)
    check_forest(tree, torch.zeros(34, dtype=torch.long))
    assert tree.num_trees == 1 and tree.roots.tolist() == [0]
    assert tree_edges(tree) <= {(min(u, v), max(u, v)) for u, v in ei.T.tolist()}
    cost = edge_cost(x, ei)
    assert tree_cost(tree, x) == pytest.approx(scipy_total(ei, cost, 34), rel=1e-5)


def test_graph_karate_club_pyg():
    from torch_geometric.datasets import KarateClub

    data = KarateClub()[0]
    topo = GraphTopology()
    tree = topo(data.x, data.edge_index)
    # one-hot features: every edge costs exp(0), so the first listed edges win (Kruskal order)
    mask = minimum_spanning_tree(data.edge_index, edge_cost(data.x, data.edge_index), 34)
    assert tree_edges(tree) == {(min(u, v), max(u, v))
                                for u, v in data.edge_index[:, mask].T.tolist()}
    assert tree.num_trees == 1 and tree.roots.tolist() == [0]


def test_graph_batch_and_components():
    # graph 0: path 0-1-2 plus isolated 3; graph 1: triangle 4-5-6
    ei = torch.tensor([[0, 1, 4, 5, 6], [1, 2, 5, 6, 4]])
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    x = torch.tensor([[1.0, 0], [1, 0.1], [1, 0.2], [0, 1], [1, 0], [0, 1], [1, 1]])
    tree = GraphTopology()(x, ei, batch)
    check_forest(tree, batch)
    assert tree.roots.tolist() == [0, 3, 4]  # lowest vertex of each component
    assert tree.num_trees == 3
    assert int((tree.parent[4:] >= 0).sum()) == 2  # the triangle loses one edge
    tree_none = GraphTopology()(x, ei)
    assert torch.equal(tree_none.batch, torch.zeros(7, dtype=torch.long))
    assert torch.equal(tree_none.parent, tree.parent)


def test_graph_unsorted_batch_is_refused():
    # PyG's loaders number every graph's vertices contiguously; an interleaved batch is a
    # caller's mistake (it would silently split the work wrongly elsewhere)
    ei = torch.tensor([[0, 2, 1], [2, 4, 3]])
    batch = torch.tensor([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="batch must be sorted"):
        GraphTopology(distance="l2")(torch.randn(5, 2), ei, batch)


def test_graph_validation():
    topo = GraphTopology()
    x = torch.randn(3, 2)
    ei = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="different examples"):
        topo(x, ei, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="edge_index"):
        topo(x, torch.tensor([[0, 1], [1, 3]]))
    with pytest.raises(ValueError, match="batch"):
        topo(x, ei, torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="batch"):
        topo(x, ei, torch.zeros(3))
    with pytest.raises(ValueError, match=r"x must have shape \[N, C\]"):
        topo(torch.randn(3), ei)
    with pytest.raises(TypeError, match="x"):
        topo(torch.ones(3, 2, dtype=torch.long), ei)
    assert repr(topo) == "GraphTopology(distance='cosine')"


# ---------------------------------------------------------------------------- extension API
class FirstChannelGrid(GridTopology):
    """Cost from the first channel only (a custom edge_cost step)."""

    def edge_cost(self, feat, edge_index):
        return (feat[edge_index[0], 0] - feat[edge_index[1], 0]).abs()


class MaximumSpanningGrid(GridTopology):
    """A different spanning_tree step: the maximum spanning tree."""

    def spanning_tree(self, edge_index, cost, num_nodes):
        return minimum_spanning_tree(edge_index, -cost, num_nodes)


class CornerRootedGrid(GridTopology):
    """A different root rule: the top-left pixel."""

    def roots(self, feat):
        b, h, w, _ = feat.shape
        return torch.arange(b) * h * w


def test_custom_edge_cost():
    feat = torch.randn(2, 5, 5, 3, generator=torch.Generator().manual_seed(4))
    topo = FirstChannelGrid()
    tree = topo(feat)
    ei, batch, n = topo.candidate_edges(feat)
    cost = (feat.reshape(n, -1)[ei[0], 0] - feat.reshape(n, -1)[ei[1], 0]).abs()
    mask = minimum_spanning_tree(ei, cost, n)
    assert tree_edges(tree) == {(min(u, v), max(u, v)) for u, v in ei[:, mask].T.tolist()}
    check_forest(tree, batch)


def test_custom_spanning_tree_and_roots():
    feat = torch.randn(1, 4, 4, 3, generator=torch.Generator().manual_seed(5))
    n = 16
    tree = MaximumSpanningGrid()(feat)
    check_forest(tree, torch.zeros(n, dtype=torch.long))
    ei, _, _ = GridTopology().candidate_edges(feat)
    cost = edge_cost(feat.reshape(n, -1), ei)
    assert tree_cost(tree, feat.reshape(n, -1)) == \
        pytest.approx(-scipy_total(ei, -cost + 10, n) + 10 * (n - 1), rel=1e-5)
    assert CornerRootedGrid()(feat).roots.tolist() == [0]


def test_subclass_of_base_from_scratch():
    class Ring(Topology):
        """Vertices on a ring: candidate edges (i, i + 1 mod N)."""

        def candidate_edges(self, feat):
            n = feat.shape[0]
            i = torch.arange(n)
            return torch.stack([i, (i + 1) % n]), None, n

    feat = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.3, 1]])
    tree = Ring()(feat)
    # the most dissimilar ring edge (1-2) is dropped; root: lowest id
    assert tree_edges(tree) == {(0, 1), (2, 3), (0, 3)}
    assert tree.roots.tolist() == [0]
    assert repr(Ring()) == "Ring(distance='cosine')"


# ---------------------------------------------------------------------------- device path
def test_device_builder_agrees_with_cpu_path():
    topo = GridTopology()
    feat = torch.randn(3, 5, 6, 4)
    ei, batch, n = topo.candidate_edges(feat)
    cost = topo.edge_cost(feat.reshape(n, -1), ei)
    on_device = topo._build_on_device(ei, cost, n, topo.roots(feat), batch)
    cpu = topo(feat)
    for name in FIELDS + ("batch",):
        assert torch.equal(getattr(on_device, name), getattr(cpu, name)), name


def test_top_level_names():
    for name in ("Topology", "GridTopology", "SequenceTopology", "GraphTopology",
                 "minimum_spanning_tree"):
        assert name in treessm.__all__ and hasattr(treessm, name)


def test_trees_built_on_the_host_report_their_sizes():
    from treessm.ops.plan import level_plan

    feat = torch.randn(3, 17, 4)
    tree = SequenceTopology(window=1)(feat)
    assert tree.num_levels == int(level_plan(tree).tree_level_ptr[-1]) == 51
    assert tree.max_tree_size == 17
    wider = SequenceTopology(window=2)(feat)
    assert wider.num_levels == int(level_plan(wider).tree_level_ptr[-1])

    class MiddleRooted(SequenceTopology):
        def roots(self, feat):
            b, length, _ = feat.shape
            return torch.arange(b) * length + length // 2

    tree = MiddleRooted(window=1)(feat)
    assert tree.num_levels == int(level_plan(tree).tree_level_ptr[-1]) == 27
    grid = GridTopology()(torch.randn(2, 6, 7, 3))
    assert grid.max_tree_size == 42 and grid.num_levels == int(level_plan(grid).tree_level_ptr[-1])
