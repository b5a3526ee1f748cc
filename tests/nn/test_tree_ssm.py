import math

import pytest
import torch
import torch.nn.functional as F

import oracle
from captured_step import check_captured_step
from treessm import Tree
from treessm.nn import TreeSSM, raster_tree


class RecordingTopology:
    """Builds row-major chains and records how it was called."""

    def __init__(self):
        self.calls = []

    def __call__(self, feat):
        self.calls.append(dict(requires_grad=feat.requires_grad,
                               grad_enabled=torch.is_grad_enabled(), grad_fn=feat.grad_fn,
                               shape=tuple(feat.shape)))
        b, h, w, _ = feat.shape
        return raster_tree(b, h, w, feat.device)


class FixedTopology:
    def __init__(self, tree):
        self.tree = tree

    def __call__(self, feat):
        return self.tree


def _layer_norm(x, dims, weight, bias, eps):
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def dense_tree_ssm(layer, x, parent):
    """The TreeSSM formula evaluated from the layer's parameters with the dense oracle."""
    b, h, w, _ = x.shape
    n = b * h * w
    xz = x.reshape(n, -1) @ layer.in_proj.weight.T
    u, z = xz[:, :layer.d_inner], xz[:, layer.d_inner:]
    if layer.conv is not None:
        u = F.conv2d(u.reshape(b, h, w, -1).permute(0, 3, 1, 2), layer.conv.weight,
                     layer.conv.bias, padding=layer.d_conv // 2, groups=layer.d_inner)
        u = u.permute(0, 2, 3, 1).reshape(n, -1)
    u = u * torch.sigmoid(u)
    proj = u @ layer.x_proj.weight.T
    r, s = layer.dt_rank, layer.d_state
    dt, bb, cc = proj[:, :r], proj[:, r:r + s], proj[:, r + s:]
    delta = torch.log1p(torch.exp(dt @ layer.dt_proj.weight.T + layer.dt_proj.bias))
    a = -torch.exp(layer.A_log)
    xs = torch.einsum("nd,ns,nd->nds", delta, bb, u)
    ws = torch.exp(torch.einsum("nd,ds->nds", delta, a))
    hs = oracle.dense_tree_scan(xs, ws, parent, "both")
    hs = _layer_norm(hs, (1, 2), layer.h_norm.weight.view(hs.shape[1:]),
                     layer.h_norm.bias.view(hs.shape[1:]), layer.h_norm.eps)
    y = torch.einsum("nds,ns->nd", hs, cc) + layer.D * u
    y = _layer_norm(y, (1,), layer.out_norm.weight, layer.out_norm.bias, layer.out_norm.eps)
    y = y * (z * torch.sigmoid(z))
    return (y @ layer.out_proj.weight.T).reshape(b, h, w, -1)


def _perturb(layer, generator):
    # away from the initialisation, so that every parameter matters in the comparison
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


@pytest.mark.parametrize("d_state", [1, 3])
def test_matches_dense_oracle_on_random_tree(d_state):
    g = torch.Generator().manual_seed(d_state)
    torch.manual_seed(0)
    layer = TreeSSM(6, d_state=d_state, ssm_ratio=1.5, bias=False).double()
    _perturb(layer, g)
    x = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)
    parents = [oracle.random_forest(12, 1, generator=g), oracle.random_forest(12, 2, generator=g)]
    parent = torch.cat([parents[0], torch.where(parents[1] >= 0, parents[1] + 12, -1)])
    tree = Tree.from_parent(parent, torch.arange(2).repeat_interleave(12))
    out = layer(x, tree=tree)
    torch.testing.assert_close(out, dense_tree_ssm(layer, x, parent), rtol=1e-9, atol=1e-10)


def test_raster_is_bidirectional_selective_scan_by_hand():
    # one channel, one state: the core's read-out C h + D u on a chain 0 - 1 - 2 written
    # out by hand from the layer's own step, decay and projections
    layer = TreeSSM(1, d_state=1, ssm_ratio=1.0, d_conv=0, scan="raster").double()
    u = torch.tensor([[0.5], [-1.0], [2.0]], dtype=torch.float64)
    dt, b, c = (u @ layer.x_proj.weight.T).unbind(1)
    delta = F.softplus(dt * layer.dt_proj.weight[0, 0] + layer.dt_proj.bias[0])
    x = delta * b * u[:, 0]
    w = torch.exp(-torch.exp(layer.A_log[0, 0]) * delta)
    h = torch.stack([x[0] + w[1] * x[1] + w[1] * w[2] * x[2],
                     w[1] * x[0] + x[1] + w[2] * x[2],
                     w[1] * w[2] * x[0] + w[2] * x[1] + x[2]])
    y = layer.ssm(u, raster_tree(1, 1, 3), "both")[:, 0]
    torch.testing.assert_close(y, c * h + layer.D[0] * u[:, 0])
    assert ((w > 0) & (w < 1)).all()


@pytest.mark.parametrize("d_state", [1, 4])
@pytest.mark.parametrize("scan", ["tree", "raster"])
def test_shapes(d_state, scan):
    layer = TreeSSM(16, d_state=d_state, scan=scan)
    x = torch.randn(2, 5, 7, 16)
    out, tree = layer(x, return_tree=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert isinstance(tree, Tree) and tree.num_nodes == 70 and tree.num_trees == 2
    u = torch.randn(9, layer.d_inner)
    assert layer.selective_scan(u, raster_tree(1, 3, 3)).shape == (9, layer.d_inner)


def test_init_and_repr():
    layer = TreeSSM(40, d_state=3, dt_min=0.01, dt_max=0.05)
    assert layer.d_inner == 80 and layer.dt_rank == 3
    torch.testing.assert_close(layer.A_log, torch.log(torch.tensor([1.0, 2, 3])).expand(80, 3))
    assert torch.equal(layer.D, torch.ones(80))
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 0.01 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    assert layer.in_proj.bias is None and layer.out_proj.bias is None and layer.conv.bias is None
    assert layer.in_proj.out_features == 160 and layer.x_proj.out_features == 3 + 6
    text = repr(layer)
    assert text.startswith("TreeSSM(\n  40, d_inner=80, d_state=3, dt_rank=3, d_conv=3, scan='tree'\n")
    for child in ("(in_proj): Linear(in_features=40, out_features=160", "(conv): Conv2d(80, 80",
                  "(x_proj): Linear", "(dt_proj): NarrowLinear", "(h_norm): LayerNorm((240,)",
                  "(out_norm): LayerNorm((80,)", "(out_proj): Linear"):
        assert child in text, child  # print(model) shows the whole network
    assert TreeSSM(8, bias=True).in_proj.bias is not None


def test_gradients_reach_all_parameters_and_not_the_tree():
    torch.manual_seed(0)
    topo = RecordingTopology()
    layer = TreeSSM(8, d_state=2, conv_bias=True, bias=True, topology=topo)
    x = torch.randn(2, 4, 4, 8, requires_grad=True)
    out = layer(x)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    (call,) = topo.calls
    assert call == dict(requires_grad=False, grad_enabled=False, grad_fn=None,
                        shape=(2, 4, 4, layer.d_inner))


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = TreeSSM(3, d_state=2, ssm_ratio=1.0, scan="raster").double()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_tree_scan_follows_the_tree():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 8)
    raster = TreeSSM(8, scan="raster")
    same = TreeSSM(8, topology=RecordingTopology())
    same.load_state_dict(raster.state_dict())
    torch.testing.assert_close(same(x), raster(x))
    # the default (cosine MST of the grid) is a different tree, so a different output
    learned = TreeSSM(8)
    learned.load_state_dict(raster.state_dict())
    out, tree = learned(x, return_tree=True)
    assert not torch.equal(tree.parent, raster_tree(2, 4, 5).parent)
    assert not torch.allclose(out, raster(x))


def test_precomputed_tree_argument():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    topo = RecordingTopology()
    layer = TreeSSM(8, topology=topo)
    second = oracle.random_forest(12, 1, generator=g)
    parent = torch.cat([oracle.random_forest(12, 1, generator=g),
                        torch.where(second >= 0, second + 12, -1)])
    tree = Tree.from_parent(parent, torch.arange(2).repeat_interleave(12))
    x = torch.randn(2, 3, 4, 8)
    out, used = layer(x, tree=tree, return_tree=True)
    assert used is tree and topo.calls == []
    fixed = TreeSSM(8, topology=FixedTopology(tree))
    fixed.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out, fixed(x))
    with pytest.raises(ValueError, match="tree must span"):
        layer(x[:1], tree=tree)
    with pytest.raises(TypeError, match="tree must be a treessm.Tree"):
        layer(x, tree=parent)


def test_bfloat16_autocast_keeps_scan_in_float32(monkeypatch):
    import treessm.nn.selective_ssm as core

    torch.manual_seed(0)
    layer = TreeSSM(8, scan="raster")
    seen = []
    scan = core.selective_tree_scan

    def recording(u, *args, **kwargs):
        y = scan(u, *args, **kwargs)
        seen.append((u.dtype, y.dtype))
        return y

    monkeypatch.setattr(core, "selective_tree_scan", recording)
    x = torch.randn(1, 4, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert seen == [(torch.float32, torch.float32)]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), layer(x), atol=0.05, rtol=0.05)


def test_raster_tree():
    tree = raster_tree(2, 2, 2)
    assert tree.parent.tolist() == [-1, 0, 1, 2, -1, 4, 5, 6]
    assert tree.batch.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert raster_tree(2, 2, 2) is tree  # cached
    with pytest.raises(ValueError, match="height"):
        raster_tree(1, 0, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=0), "d_model"),
    (dict(d_model=8, d_state=0), "d_state"),
    (dict(d_model=8, ssm_ratio=0.0), "ssm_ratio"),
    (dict(d_model=8, dt_rank=0), "dt_rank"),
    (dict(d_model=8, d_conv=2), "d_conv"),
    (dict(d_model=8, dt_min=0.2, dt_max=0.1), "dt_min"),
    (dict(d_model=8, dt_init_floor=0.0), "dt_init_floor"),
    (dict(d_model=8, scan="spiral"), "scan"),
    (dict(d_model=8, scan="raster", topology=RecordingTopology()), "topology"),
    (dict(d_model=8, backend="gpu"), "backend"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TreeSSM(**kwargs)


def test_invalid_input():
    layer = TreeSSM(8)
    with pytest.raises(ValueError, match=r"\[B, H, W, 8\]"):
        layer(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, H, W, 8\]"):
        layer(torch.randn(16, 8))
    with pytest.raises(TypeError, match="topology"):
        TreeSSM(8, topology="grid")


def test_extra_macs():
    layer = TreeSSM(16, d_state=2)
    assert layer.extra_macs(10) == 8 * 10 * 32 * 2 + 2 * 10 * 32
    assert math.isclose(layer.extra_macs(20), 2 * layer.extra_macs(10))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d_state", [1, 4])
def test_cuda_graph_capture_of_a_training_step(d_state):
    # GrootV's layer: the grid tree built from the features on the device, the scan and the
    # backward captured in a CUDA graph; replays for new images equal eager steps
    torch.manual_seed(3)
    layer = TreeSSM(32, d_state=d_state).cuda()
    g = torch.Generator().manual_seed(4)
    static = torch.randn(2, 12, 12, 32, generator=g).cuda().requires_grad_()
    fresh = [torch.randn(2, 12, 12, 32, generator=g).cuda() for _ in range(2)]
    check_captured_step(lambda x: layer(x).square().sum(), static, layer.parameters(), fresh)
