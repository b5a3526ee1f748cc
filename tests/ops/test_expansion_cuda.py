"""The expanded selective scan on CUDA (:mod:`treessm.ops.expansion_cuda`): its loop over
blocks of channels, the moments' combination and the hand-written backward, run on the CPU
with the four kernels replaced by their definitions in torch (the kernels themselves are
checked against the same definitions in ``tests/extensions/test_expansion_host.py``),
against the readable reference :func:`selective_tree_scan_ref` and autograd through it; then
the real kernels on a GPU where there is one."""
import pytest
import torch

from oracle import all_roots, chain, random_forest, single_vertex, star
from treessm import selective_tree_scan
from treessm.ops import expansion_cuda
from treessm.ops import selective_scan as module
from treessm.ops.selective_scan import reference_tree_scan, selective_tree_scan_ref

from test_selective_scan import _assert_same, _problem, _value_and_grads, assert_cuda_gradcheck


# ---------------------------------------------------------------------------- kernels, in torch
def _expand(u, dx, de, A, B, c0, width):
    blk = slice(c0, c0 + width)
    x = (dx[:, blk] * u[:, blk])[:, :, None] * B[:, None, :]
    w = torch.exp(de[:, blk, None] * A[blk])
    return x.flatten(1), w.flatten(1)


def _read(C, g, width):
    read = C[:, None, :].expand(-1, width, -1)
    return read if g is None else read * g


def _readout(h, h2, C, g, c0, moments, y1):
    if h2 is not None:
        h = h + h2
    width = h.shape[1] // C.shape[1]
    y1[:, c0:c0 + width] = (h.view(h.shape[0], width, -1) * _read(C, g, width)).sum(-1)
    if not moments:
        return h.new_empty(0), h.new_empty(0)
    mean = h.mean(1)
    return mean, (h - mean[:, None]).square().sum(1)


def _readout_backward(gy1, share_mean, share_m2, mu, h, h2, C, g, c0, accumulate, gC):
    if h2 is not None:
        h = h + h2
    n, s = C.shape
    width = h.shape[1] // s
    hv = h.view(n, width, s)
    gy = gy1[:, c0:c0 + width, None]
    gh = gy * _read(C, g, width)
    if share_mean is not None:
        gh = gh + share_mean[:, None, None]
    if share_m2 is not None:
        gh = gh + share_m2[:, None, None] * (hv - mu[:, None, None])
    part = (gy * (1 if g is None else g) * hv).sum(1)
    gC.copy_(gC + part if accumulate else part)
    gg = (gy * C[:, None, :] * hv).sum(0) if g is not None else h.new_zeros(0, s)
    return gh.flatten(1), gg


def _expand_backward(gx, gx2, gw, u, dx, de, A, B, c0, accumulate, gu, gdx, ge, gB):
    if gx2 is not None:
        gx = gx + gx2
    n, s = B.shape
    width = gx.shape[1] // s
    blk = slice(c0, c0 + width)
    gx, gw = gx.view(n, width, s), gw.view(n, width, s)
    w = torch.exp(de[:, blk, None] * A[blk])
    q = (gx * B[:, None, :]).sum(-1)
    gu[:, blk] = q * dx[:, blk]
    gdx[:, blk] = q * u[:, blk]
    ge[:, blk] = (gw * w * A[blk]).sum(-1)
    part = (gx * (dx[:, blk] * u[:, blk])[:, :, None]).sum(1)
    gB.copy_(gB + part if accumulate else part)
    return (gw * w * de[:, blk, None]).sum(0)


class _ReferenceScan:
    """``treessm.ops.cuda``'s scan with parts and its backward, by the torch reference (the
    plan is the tree); ``"both"`` keeps parts for its backward (here the input itself), as
    the tiled kernels do, and its backward must then not be given ``x``; it gives the scan
    and the gradient of ``"both"`` as two halves, which the kernels add as they read them."""

    @staticmethod
    def backward(gh, x, w, h, tree, direction):
        with torch.enable_grad():
            xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
            out = reference_tree_scan(xs, ws, tree, direction)
            return torch.autograd.grad(out, [xs, ws], gh)

    @staticmethod
    def forward(x, w, tree, direction):
        return reference_tree_scan(x, w, tree, direction)

    @staticmethod
    def forward_with_parts(x, w, tree, direction):
        h = reference_tree_scan(x, w, tree, direction)
        return _addends(h, direction), ([x.clone()] if direction == "both" else None)

    @staticmethod
    def backward_from_parts(gh, x, w, h, parts, tree, direction):
        if parts is not None:
            assert x is None
            x = parts[0]
        gx, gw = _ReferenceScan.backward(gh, x, w, h, tree, direction)
        return _addends(gx, direction), gw


def _addends(h, direction):
    return [h / 2, h / 2] if direction == "both" else [h]


class _Ops:
    cuda_selective_expand = staticmethod(_expand)
    cuda_selective_readout = staticmethod(_readout)
    cuda_selective_readout_backward = staticmethod(_readout_backward)
    cuda_selective_expand_backward = staticmethod(_expand_backward)


@pytest.fixture
def on_cpu(monkeypatch):
    """ExpandedScan with the kernels' definitions and the reference scan, on the CPU."""
    monkeypatch.setattr(expansion_cuda, "_kernels", lambda: _Ops)
    monkeypatch.setattr(expansion_cuda, "cuda", _ReferenceScan)
    monkeypatch.setattr(expansion_cuda, "scan_plan", lambda tree, channels, dtype: tree)


def _kernels_route(block_bytes):
    def run(u, delta, A, B, C, tree, D=None, delta_bias=None, delta_softplus=False,
            direction="both", edge_step="child", state_norm=False, norm_weight=None,
            norm_bias=None, norm_eps=1e-5):
        return module._expanded_kernels(u, delta, A, B, C, tree, D, delta_bias, delta_softplus,
                                        direction, edge_step, state_norm=state_norm,
                                        norm_weight=norm_weight, norm_bias=norm_bias,
                                        norm_eps=norm_eps, block_bytes=block_bytes)
    return run


FORESTS = {
    "single_vertex": lambda: single_vertex(),
    "all_roots": lambda: all_roots(7),
    "random": lambda: random_forest(40, 3, torch.Generator().manual_seed(2)),
    "deep_chain": lambda: chain(50, torch.Generator().manual_seed(3)),
    "star": lambda: star(15, center=4),
}


@pytest.mark.parametrize("name", list(FORESTS))
@pytest.mark.parametrize("direction", ["both", "up", "down"])
@pytest.mark.parametrize("rule", ["child", "mean", "given"])
def test_blocks_match_the_reference(on_cpu, name, direction, rule):
    parent = FORESTS[name]()
    n, d, s = parent.numel(), 9, 3
    tree, leaves, kw = _problem(parent, d=d, s=s, rule=rule, direction=direction)
    g = torch.Generator().manual_seed(6)
    for norm, affine, width in ((True, True, 2), (True, False, 4), (False, False, 9),
                                (False, False, 4)):
        kw_case = dict(kw, state_norm=norm)
        case = dict(leaves)
        if affine:
            case["norm_weight"] = (1 + torch.randn(d, s, generator=g, dtype=torch.float64)
                                   ).requires_grad_()
            case["norm_bias"] = torch.randn(d * s, generator=g, dtype=torch.float64
                                            ).requires_grad_()
        want = _value_and_grads(selective_tree_scan_ref, tree, case, kw_case)
        got = _value_and_grads(_kernels_route(width * n * s * 8), tree, case, kw_case)
        _assert_same(got, want)


def test_each_block_is_scanned_once_each_way(on_cpu, monkeypatch):
    # the forward scans each block once and keeps nothing of it; the backward rescans each
    # block once, and its scan's backward takes that scan's parts
    calls = []
    for name in ("forward", "forward_with_parts", "backward", "backward_from_parts"):
        real = getattr(_ReferenceScan, name)
        monkeypatch.setattr(_ReferenceScan, name, staticmethod(
            lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a)))
    tree, leaves, kw = _problem(random_forest(30, 2, torch.Generator().manual_seed(4)), d=8,
                                s=3, rule="mean")
    y = _kernels_route(2 * 30 * 3 * 8)(tree=tree, **leaves, **kw, state_norm=True)
    assert calls == ["forward_with_parts"] * 4
    calls.clear()
    y.sum().backward()
    assert calls == ["forward_with_parts", "backward_from_parts", "backward"] * 4


def test_block_width_bounds_a_vertex_states():
    assert expansion_cuda.block_width(128, 4, torch.float32) == 128
    assert expansion_cuda.block_width(4096, 1, torch.float32) == 2048
    assert expansion_cuda.block_width(4096, 1, torch.float64) == 1024
    assert expansion_cuda.block_width(8, 4096, torch.float32) == 0


# ---------------------------------------------------------------------------- on a GPU
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _forbid_torch_blocks(monkeypatch):
    def torch_blocks(*args, **kwargs):
        raise AssertionError("the expansion kernels should run this problem")

    monkeypatch.setattr(module, "expanded_in_blocks", torch_blocks)


@_CUDA
@pytest.mark.parametrize("name", list(FORESTS))
@pytest.mark.parametrize("direction", ["both", "up", "down"])
@pytest.mark.parametrize("rule", ["child", "mean", "given"])
def test_cuda_kernels_match_the_reference(name, direction, rule, monkeypatch):
    _forbid_torch_blocks(monkeypatch)
    parent = FORESTS[name]()
    d, s = 70, 20 if direction != "both" else 3  # state_norm or d_state > 16: not the walk
    tree, leaves, kw = _problem(parent, d=d, s=s, rule=rule, direction=direction)
    kw["state_norm"] = direction != "both"
    want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
    cuda = {k: v.detach().cuda() for k, v in leaves.items()}
    got = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw)
    _assert_same(([o.cpu() for o in got[0]], {k: v.cpu() for k, v in got[1].items()}), want)


@_CUDA
def test_cuda_one_state_a_channel_composes_torch_operators(monkeypatch):
    # d_state 1: the states are no larger than u, and torch's broadcasts (autograd keeping
    # them) run GrootV's layers faster than the kernels' recomputing backward
    def kernels(*args, **kwargs):
        raise AssertionError("d_state 1 should take the torch blocks")

    monkeypatch.setattr(module, "_expanded_kernels", kernels)
    parent = random_forest(300, 3, torch.Generator().manual_seed(4))
    tree, leaves, kw = _problem(parent, d=16, s=1, rule="child", direction="both")
    kw["state_norm"] = True
    want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
    cuda = {k: v.detach().cuda() for k, v in leaves.items()}
    got = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw)
    _assert_same(([o.cpu() for o in got[0]], {k: v.cpu() for k, v in got[1].items()}), want)


@_CUDA
def test_cuda_kernels_in_blocks_float32_affine_norm_and_bitwise_repeats(monkeypatch):
    _forbid_torch_blocks(monkeypatch)
    monkeypatch.setattr(module, "EXPANSION_BLOCK_BYTES", 1)
    monkeypatch.setattr(module, "EXPANSION_MIN_ROW_BYTES", 5 * 4 * 4)  # blocks of 5 channels
    parent = random_forest(3000, 5, torch.Generator().manual_seed(8), locality=40)
    tree, leaves, kw = _problem(parent, d=23, s=4, rule="mean", direction="both")
    g = torch.Generator().manual_seed(9)
    leaves["norm_weight"] = (1 + torch.randn(23, 4, generator=g, dtype=torch.float64)
                             ).requires_grad_()
    leaves["norm_bias"] = torch.randn(23 * 4, generator=g, dtype=torch.float64).requires_grad_()
    kw["state_norm"] = True
    want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
    cuda = {k: v.detach().float().cuda() for k, v in leaves.items()}
    first = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw)
    again = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw)
    for a, b in zip(first[0], again[0]):
        assert torch.equal(a, b)
    for k in first[1]:
        assert torch.equal(first[1][k], again[1][k]), k
    _assert_same(([o.double().cpu() for o in first[0]],
                  {k: v.double().cpu() for k, v in first[1].items()}), want, rtol=2e-3,
                 atol=2e-3)


@_CUDA
def test_cuda_kernels_gradcheck(monkeypatch):
    _forbid_torch_blocks(monkeypatch)
    tree, leaves, kw = _problem(random_forest(12, 2, torch.Generator().manual_seed(43)), d=3,
                                s=2, rule="mean", direction="both")
    kw["state_norm"] = True
    assert_cuda_gradcheck(tree, leaves, kw)
