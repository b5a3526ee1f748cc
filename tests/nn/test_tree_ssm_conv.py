"""TreeSSMConv: the properties a graph pipeline relies on, on hand-made and PyG graphs."""
import inspect

import pytest
import torch
from torch_geometric import EdgeIndex
from torch_geometric.data import Batch, Data
from torch_geometric.transforms import ToSparseTensor
from torch_geometric.loader import DataLoader
from torch_geometric.nn import Sequential, global_mean_pool

import treessm
from captured_step import check_captured_step
from oracle import dense_tree_scan
from treessm.nn import TreeSSMConv
from treessm.nn.tree_ssm_conv import neighbour_mean
from treessm.transforms import PrepareGraph


def _graph(n, e, seed, c=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, n, (2, e), generator=g)


def _renumber(x, edge_index, seed):
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(x.shape[0])
    return perm, x[perm], inv[edge_index]


@pytest.fixture
def conv():
    torch.manual_seed(0)
    return TreeSSMConv(8, 12, d_state=3).double()


def test_repr_and_parameters():
    conv = TreeSSMConv(16, 32, d_state=4)
    assert repr(conv) == "TreeSSMConv(16, 32, d_state=4, d_inner=64)"
    names = {n for n, _ in conv.named_parameters()}
    assert {"in_proj.weight", "x_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight",
            "self_weight", "neighbour_weight"} <= names
    assert conv.d_inner == 64 and conv.dt_rank == 2  # 2 * out_channels, ceil(d_inner / 32)
    assert TreeSSMConv(4, 4, local_mixing=False, bias=False).in_proj.bias is None
    # the inner width is its own argument: a wide input does not widen the scan
    wide = TreeSSMConv(1433, 16, d_state=4, d_inner=32)
    assert wide.d_inner == 32 and wide.in_proj.weight.shape == (64, 1433)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permutation_equivariant(conv, seed):
    x, ei = _graph(60, 150, seed)
    x = x.double()
    y = conv(x, ei)
    perm, xp, eip = _renumber(x, ei, seed + 10)
    torch.testing.assert_close(conv(xp, eip), y[perm], rtol=1e-9, atol=1e-10)


def test_batch_consistent(conv):
    graphs = []
    for seed, (n, e) in enumerate([(7, 12), (1, 0), (30, 60), (12, 5)]):
        x, ei = _graph(n, e, seed)
        graphs.append(Data(x=x.double(), edge_index=ei))
    batch = Batch.from_data_list(graphs)
    y = conv(batch.x, batch.edge_index, batch=batch.batch)
    one_by_one = torch.cat([conv(d.x, d.edge_index) for d in graphs])
    torch.testing.assert_close(y, one_by_one, rtol=1e-10, atol=1e-12)


def test_directions_repeats_and_self_loops_do_not_matter(conv):
    x, ei = _graph(40, 90, 3)
    x = x.double()
    y = conv(x, ei)
    noisy = torch.cat([ei.flip(0), ei[:, :30], torch.arange(10).repeat(2, 1)], 1)
    torch.testing.assert_close(conv(x, noisy), y)
    torch.testing.assert_close(conv(x, torch.cat([ei, noisy], 1)), y)
    assert y.shape == (40, 12)


def test_isolated_vertices_and_components(conv):
    # two components and two isolated vertices: each vertex mixes only with its component
    x = torch.randn(9, 8, dtype=torch.float64)
    ei = torch.tensor([[0, 1, 2, 4, 5], [1, 2, 0, 5, 6]])
    y, tree = conv(x, ei, return_tree=True)
    assert tree.num_trees == 5  # {0, 1, 2}, {4, 5, 6}, {3}, {7}, {8}
    x2 = x.clone()
    x2[4:7] += 1.0  # change the second component only
    y2 = conv(x2, ei)
    torch.testing.assert_close(y2[[0, 1, 2, 3, 7, 8]], y[[0, 1, 2, 3, 7, 8]])
    assert not torch.allclose(y2[4:7], y[4:7])


def test_scan_matches_the_dense_definition(conv):
    # the block's states are the "both" scan of docs/concepts.md on its spanning forest,
    # with each edge's decay from the mean of its ends' steps
    x, ei = _graph(25, 60, 4)
    x = x.double()
    graph = treessm.prepare_graph(ei, 25)
    und = graph.edge_index
    u, _ = conv.project_in(x, graph)
    tree = conv.scan_tree(x, u, graph)
    dt, b, c = (u @ conv.x_proj.weight.T).split([conv.dt_rank, conv.d_state, conv.d_state], 1)
    delta = torch.nn.functional.softplus(dt @ conv.dt_proj.weight.T + conv.dt_proj.bias)
    parent = torch.where(tree.parent >= 0, tree.parent, torch.arange(25))
    edge = 0.5 * (delta + delta[parent])
    xs = torch.einsum("nd,ns,nd->nds", delta, b, u)
    w = torch.exp(torch.einsum("nd,ds->nds", edge, -torch.exp(conv.A_log)))
    h = dense_tree_scan(xs.reshape(25, -1), w.reshape(25, -1), tree.parent, "both")
    h = torch.nn.functional.layer_norm(h, h.shape[1:], conv.h_norm.weight, conv.h_norm.bias,
                                       conv.h_norm.eps).view(xs.shape)
    want = torch.einsum("nds,ns->nd", h, c) + conv.D * u
    torch.testing.assert_close(conv.selective_scan(u, tree), want, rtol=1e-10, atol=1e-12)
    # the forest is the minimum spanning forest of the cosine costs of u
    cost = torch.exp(-torch.nn.functional.cosine_similarity(u[und[0]], u[und[1]], dim=1))
    mask = treessm.minimum_spanning_tree(und, cost.detach(), 25)
    edges = {tuple(sorted(e)) for e in und[:, mask].T.tolist()}
    tree_edges = {tuple(sorted((v, p))) for v, p in enumerate(tree.parent.tolist()) if p >= 0}
    assert edges == tree_edges


def test_gradients_reach_every_parameter(conv):
    x, ei = _graph(30, 80, 5)
    x = x.double().requires_grad_()
    y = conv(x, ei)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_in_pyg_sequential_and_dataloader():
    torch.manual_seed(1)
    model = Sequential("x, edge_index, batch", [
        (TreeSSMConv(8, 16, d_state=2), "x, edge_index -> x"),
        torch.nn.ReLU(),
        (TreeSSMConv(16, 16, d_state=2), "x, edge_index -> x"),
        (global_mean_pool, "x, batch -> x"),
        torch.nn.Linear(16, 3),
    ])
    data = [Data(x=_graph(n, 2 * n, n)[0], edge_index=_graph(n, 2 * n, n)[1],
                 y=torch.tensor([n % 3])) for n in range(5, 17)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in DataLoader(data, batch_size=4, shuffle=True):
        loss = torch.nn.functional.cross_entropy(
            model(batch.x, batch.edge_index, batch.batch), batch.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert "TreeSSMConv(8, 16, d_state=2, d_inner=32)" in repr(model)


def test_edge_attr_distance():
    torch.manual_seed(2)
    x, ei = _graph(20, 50, 6)
    attr = torch.rand(50)
    conv = TreeSSMConv(8, 4, d_state=2, distance="edge_attr")
    _, tree = conv(x, ei, edge_attr=attr, return_tree=True)
    graph = treessm.prepare_graph(ei, 20, edge_attr=attr, reduce="min")
    und, cost = graph.edge_index, graph.edge_attr
    mask = treessm.minimum_spanning_tree(und, cost, 20)
    tree_edges = {tuple(sorted((v, p))) for v, p in enumerate(tree.parent.tolist()) if p >= 0}
    assert tree_edges == {tuple(e) for e in und[:, mask].T.tolist()}
    with pytest.raises(ValueError, match="needs a scalar edge_attr"):
        conv(x, ei)


def test_bad_input_is_named(conv):
    x, ei = _graph(10, 20, 7)
    x = x.double()
    cases = [
        ((x, ei + 10), ValueError, "edge_index must hold vertex ids in \\[0, 10\\)"),
        ((x, ei[0]), ValueError, "edge_index must have shape \\[2, E\\]"),
        ((x, ei.float()), TypeError, "edge_index must be an integer tensor"),
        ((x, ei, torch.rand(19)), ValueError, "edge_weight must have shape \\[E\\]"),
        ((x, ei, -torch.rand(20)), ValueError, "edge_weight must be positive and finite"),
        ((x[:, :5], ei), ValueError, "x must have in_channels = 8 columns"),
        ((x.masked_fill(torch.eye(10, 8, dtype=torch.bool), float("nan")), ei), ValueError,
         "x must be finite"),
        ((x.long(), ei), TypeError, "x must be a floating-point tensor"),
        ((x, "edges"), TypeError, "edge_index must be a torch.Tensor"),
    ]
    for args, kind, match in cases:
        with pytest.raises(kind, match=match):
            conv(*args)
    with pytest.raises(ValueError, match="batch must have shape \\[10\\]"):
        conv(x, ei, batch=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="batch must be sorted"):
        conv(x, ei[:, :0], batch=torch.tensor([1, 0] * 5))
    inf_cost = TreeSSMConv(8, 4, distance=lambda a, b: torch.full((a.shape[0],), float("inf")))
    with pytest.raises(ValueError, match="edge costs must be finite"):
        inf_cost(x.float(), ei)
    with pytest.raises(ValueError, match="tree_features must be one of"):
        TreeSSMConv(8, 4, tree_features="edges")
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        TreeSSMConv(0, 4)


def test_pyg_call_convention():
    # (x, edge_index, edge_weight) positionally, as GCNConv; batch only by keyword
    params = inspect.signature(TreeSSMConv.forward).parameters
    assert list(params)[1:4] == ["x", "edge_index", "edge_weight"]
    assert params["batch"].kind is inspect.Parameter.KEYWORD_ONLY
    x, ei = _graph(10, 20, 0)
    conv = TreeSSMConv(8, 4, d_state=2)
    with pytest.raises(TypeError, match="edge_weight must be a floating-point"):
        conv(x, ei, torch.zeros(10, dtype=torch.long))  # a batch vector in the weight's place


def test_edge_weight_weights_the_neighbour_mean_and_the_tree(conv):
    x, ei = _graph(30, 70, 11)
    x = x.double()
    torch.testing.assert_close(conv(x, ei, torch.ones(70, dtype=torch.float64)), conv(x, ei))
    w = torch.rand(70, dtype=torch.float64) + 0.1
    graph = treessm.prepare_graph(ei, 30, w)
    u = torch.randn(30, 5, dtype=torch.float64)
    by_hand = torch.zeros_like(u)
    dense = graph.adjacency.to_dense().double()
    for v in range(30):
        if dense[v].sum() > 0:
            by_hand[v] = (dense[v, :, None] * u).sum(0) / dense[v].sum()
    torch.testing.assert_close(neighbour_mean(u, graph), by_hand)
    y, tree = conv(x, ei, w, return_tree=True)
    assert not torch.allclose(y, conv(x, ei))
    # the tree: the minimum spanning forest of distance / weight
    u_inner, _ = conv.project_in(x, graph)
    cost = torch.exp(-torch.nn.functional.cosine_similarity(
        u_inner[graph.edge_index[0]], u_inner[graph.edge_index[1]], dim=1)) / graph.edge_weight
    mask = treessm.minimum_spanning_tree(graph.edge_index, cost.detach(), 30)
    assert ({tuple(e) for e in graph.edge_index[:, mask].T.tolist()}
            == {tuple(sorted((v, p))) for v, p in enumerate(tree.parent.tolist()) if p >= 0})


@pytest.mark.parametrize("in_channels", [3, 40])  # narrower and wider than d_inner = 24
def test_local_mixing_is_the_mean_of_the_projected_features(in_channels):
    # a u + b mean(u) with u = W x + b_in, whichever side the layer takes the mean on:
    # weighted edges, isolated vertices (mean 0, not b_in) and a bias that is not zero
    torch.manual_seed(5)
    conv = TreeSSMConv(in_channels, 12, d_state=2).double()
    with torch.no_grad():
        conv.in_proj.bias.normal_()
        conv.self_weight.normal_()
        conv.neighbour_weight.normal_()
    x = torch.randn(25, in_channels, dtype=torch.float64, requires_grad=True)
    ei = torch.randint(0, 20, (2, 40))  # vertices 20 .. 24 isolated
    graph = treessm.prepare_graph(ei, 25, torch.rand(40, dtype=torch.float64) + 0.1)
    u, z = conv.project_in(x, graph)
    raw = conv.in_proj(x)
    inner, gate = raw[:, :24], raw[:, 24:]
    want = torch.nn.functional.silu(conv.self_weight * inner
                                    + conv.neighbour_weight * neighbour_mean(inner, graph))
    # a prepared graph keeps its weights and degrees in float32: a vertex's mean weights
    # sum to one within about 1e-7, which is all that separates the two sides
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u, want, **close)
    torch.testing.assert_close(z, gate)
    # and its gradients, to x and to every parameter of the mixing
    params = (x, conv.in_proj.weight, conv.in_proj.bias, conv.self_weight, conv.neighbour_weight)
    got = torch.autograd.grad(u.sum(), params)
    for g, w in zip(got, torch.autograd.grad(want.sum(), params)):
        torch.testing.assert_close(g, w, **close)


def test_neighbour_mean_gradient():
    x, ei = _graph(12, 30, 12)
    graph = treessm.prepare_graph(ei, 12, torch.rand(30) + 0.2)
    u = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: neighbour_mean(t, graph), (u,))


def test_lazy_in_channels():
    torch.manual_seed(4)
    lazy = TreeSSMConv(-1, 6, d_state=2)
    assert repr(lazy) == "TreeSSMConv(-1, 6, d_state=2, d_inner=12)"
    x, ei = _graph(15, 40, 13, c=7)
    y = lazy(x, ei)
    assert y.shape == (15, 6) and lazy.in_proj.weight.shape == (24, 7)
    eager = TreeSSMConv(7, 6, d_state=2)
    eager.load_state_dict(lazy.state_dict())
    torch.testing.assert_close(eager(x, ei), y)
    with pytest.raises(ValueError, match="x must have in_channels = 7 columns"):
        lazy(x[:, :5], ei)
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        TreeSSMConv(-2, 4)


def test_adjacency_formats_give_the_same_output(conv):
    from torch_geometric.utils import coalesce

    x, ei = _graph(25, 60, 14)
    x = x.double()
    ei, w = coalesce(ei, torch.rand(60, dtype=torch.float64) + 0.5, num_nodes=25)
    ref = conv(x, ei, w)
    data = Data(x=x, edge_index=ei, edge_weight=w)
    adj_t = ToSparseTensor(attr="edge_weight")(data.clone()).adj_t
    prepared = PrepareGraph()(data.clone())
    outputs = [conv(x, adj_t), conv(x, EdgeIndex(ei, sparse_size=(25, 25)), w),
               conv(x, prepared.edge_index, prepared.edge_weight),
               conv(x, treessm.prepare_graph(ei, 25, w))]
    for out in outputs:
        torch.testing.assert_close(out, ref)


def test_prepared_graph_must_match_x(conv):
    x, ei = _graph(20, 40, 15)
    graph = treessm.prepare_graph(ei, 20)
    with pytest.raises(ValueError, match="has 20 vertices but x has 19 rows"):
        conv(x[:19].double(), graph)
    with pytest.raises(ValueError, match="belong in prepare_graph"):
        conv(x.double(), graph, torch.ones(graph.num_edges))


def test_cached_preparation_is_never_stale(conv):
    x, ei = _graph(30, 60, 16)
    x = x.double()
    y = conv(x, ei)
    assert treessm.prepare_graph(ei, 30) is treessm.prepare_graph(ei, 30)
    ei[1, :20] = (ei[1, :20] + 7) % 30  # change the graph in place
    torch.testing.assert_close(conv(x, ei), conv(x, ei.clone()))
    assert not torch.allclose(conv(x, ei), y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu():
    torch.manual_seed(3)
    conv = TreeSSMConv(8, 12, d_state=3)
    x, ei = _graph(500, 2000, 8)
    y = conv(x, ei)
    y_gpu = conv.cuda()(x.cuda(), ei.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y, rtol=1e-4, atol=1e-5)


def _assert_two_steps_equal(conv, x, ei):
    """Two training steps of ``conv`` give the same output and gradients, bit for bit."""
    runs = []
    for _ in range(2):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        out = conv(x, ei)
        out.square().sum().backward()
        runs.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in conv.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gradients_are_bitwise_reproducible():
    # the edge steps' gradient sums each vertex's children in a fixed order (no atomics):
    # two backward passes give the same bits
    torch.manual_seed(5)
    conv = TreeSSMConv(16, 16, d_state=4).cuda()
    x, ei = _graph(20000, 100000, 7, c=16)
    _assert_two_steps_equal(conv, x.cuda().requires_grad_(), ei.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_large_graph_repeats_its_bits():
    # 10^6 vertices and 5 10^6 edges, 64 channels: torch's sparse product (cuSPARSE) gave
    # the neighbour mean, and so the output and every gradient, other bits on a second step
    # at this size (not at 2 10^5); the extension's product adds each row in order
    n = 10**6
    g = torch.Generator(device="cuda").manual_seed(0)
    ei = torch.randint(0, n, (2, 5 * n), device="cuda", generator=g)
    x = torch.randn(n, 64, device="cuda", generator=g).requires_grad_()
    torch.manual_seed(0)
    _assert_two_steps_equal(TreeSSMConv(64, 64).cuda(), x, ei)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_keeping_less_for_the_backward_gives_the_same_bits(monkeypatch):
    """The layer's GPU path keeping only the inputs of its gate and mixing and the output
    of its softplus (treessm.ops.recompute: large arrays; here asked for on a small graph)
    gives the outputs of keeping everything, bit for bit, and its gradients up to the
    rounding of the softplus's slope (formed from its output)."""
    from treessm.ops import recompute

    torch.manual_seed(6)
    conv = TreeSSMConv(16, 16, d_state=4).cuda()
    x, ei = _graph(3000, 12000, 8, c=16)
    x, ei = x.cuda().requires_grad_(), ei.cuda()
    runs = []
    for lean in (False, True):
        monkeypatch.setattr(recompute, "keeps_less", lambda *t, lean=lean: lean)
        conv.zero_grad(set_to_none=True)
        x.grad = None
        out = conv(x, ei)
        out.square().sum().backward()
        runs.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in conv.parameters()])
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1:], runs[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("with_batch", [False, True])
def test_cuda_graph_capture_of_a_training_step(with_batch):
    """A whole training step (the spanning forest built on the device, the scan, the
    backward) is captured in a CUDA graph after eager warm-up steps; replays for new
    features give the eager step's gradients bit for bit. The features' checks, which read
    values on the host, run in the eager steps only."""
    torch.manual_seed(8)
    conv = TreeSSMConv(16, 16, d_state=4).cuda()
    x, ei = _graph(2000, 8000, 9, c=16)
    graph = treessm.prepare_graph(ei.cuda(), 2000)
    kw = dict(batch=(torch.arange(2000) // 700).cuda()) if with_batch else {}
    if with_batch:  # no edge between the examples
        keep = (kw["batch"][graph.edge_index[0]] == kw["batch"][graph.edge_index[1]]).cpu()
        graph = treessm.prepare_graph(graph.edge_index[:, keep.cuda()], 2000)
    static = x.cuda().requires_grad_()
    fresh = [torch.randn(x.shape, generator=torch.Generator().manual_seed(s)).cuda()
             for s in range(2)]
    check_captured_step(lambda inp: conv(inp, graph, **kw).square().sum(), static,
                        conv.parameters(), fresh)
    with pytest.raises(ValueError, match="must be finite"):  # eager steps still check
        conv(torch.full_like(static, float("nan")), graph, **kw)


def test_topology_argument_builds_the_tree():
    # a topology of one's own: the chain over the vertices, whatever the graph
    calls = []

    def chain(feat, graph, batch):
        calls.append((feat.shape, graph.num_nodes, batch))
        return treessm.topology.chain_tree(1, feat.shape[0], feat.device)

    x, _ = _graph(6, 0, seed=3)
    no_edges = torch.empty(2, 0, dtype=torch.long)
    torch.manual_seed(0)
    own = TreeSSMConv(8, 12, d_state=3, local_mixing=False, topology=chain).double()
    torch.manual_seed(0)
    default = TreeSSMConv(8, 12, d_state=3, local_mixing=False).double()
    y, tree = own(x.double(), no_edges, return_tree=True)
    assert calls == [(torch.Size([6, 24]), 6, None)]  # inner features, the prepared graph
    assert tree.parent.tolist() == [-1, 0, 1, 2, 3, 4]
    # the same layer given the chain's edges builds the same tree and computes the same
    chain_edges = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])
    assert torch.allclose(y, default(x.double(), chain_edges), atol=1e-12)
    # and without any edge, the default layer sees isolated vertices: another result
    assert not torch.allclose(y, default(x.double(), no_edges), atol=1e-6)


def test_topology_argument_errors():
    with pytest.raises(TypeError, match="topology must be a callable"):
        TreeSSMConv(8, 8, topology="knn")
    with pytest.raises(ValueError, match="give the distance to the topology"):
        TreeSSMConv(8, 8, distance="l2", topology=treessm.GraphTopology("l2"))
    conv = TreeSSMConv(8, 8, topology=lambda feat, graph, batch: treessm.topology.chain_tree(
        1, 2))
    with pytest.raises(ValueError, match="topology must return a Tree over the 5 vertices"):
        conv(torch.randn(5, 8), torch.tensor([[0], [1]]))
