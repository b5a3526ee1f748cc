"""The layers' row-wise operators, SiLU(a u + b m) and LN(y) SiLU(z): the CPU kernels against
the torch compositions that define them (output and all four gradients), gradcheck, extreme
inputs, bitwise reproducibility with any number of threads, the fallbacks, aligned outputs,
torch.compile; on a GPU the CUDA kernels the same way (against the compositions in float64,
gradcheck, the same bits run to run, rows too wide for them, malformed arguments)."""
import functools

import numba
import pytest
import torch

import treessm
from saved import saved_storages, storages
from treessm.ops import pointwise as pw

EPS = 1e-5
_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# name -> (operator, reference); each takes two [N, C] row tensors and two [C] vectors
OPS = {
    "silu_mix": (pw.silu_mix, pw.silu_mix_reference),
    "norm_gate": (functools.partial(pw.norm_gate, eps=EPS),
                  functools.partial(pw.norm_gate_reference, eps=EPS)),
}


def _inputs(n, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, m = (torch.randn(n, c, dtype=dtype, generator=g) * 3 + 1 for _ in range(2))
    a, b = (torch.randn(c, dtype=dtype, generator=g) for _ in range(2))
    return u, m, a, b, torch.randn(n, c, dtype=dtype, generator=g)


def _run(fn, u, m, a, b, gy):
    ins = [t.clone().requires_grad_() for t in (u, m, a, b)]
    y = fn(*ins)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in ins]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("n,c", [(0, 8), (1, 1), (1, 3), (7, 37), (pw.CHUNK_ROWS + 3, 5),
                                 (300, 128)])
def test_against_the_torch_composition(op, n, c, dtype, tol):
    fused, reference = OPS[op]
    u, m, a, b, gy = _inputs(n, c, dtype)
    got = _run(fused, u, m, a, b, gy)
    want = _run(reference, u, m, a, b, gy)
    for name, x, y in zip(("out", "rows", "other rows", "first vector", "second vector"),
                          got, want):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("op", OPS)
def test_the_kernels_run_on_the_cpu(op):
    # the operator, not the composition: its autograd node is the custom op's
    u, m, a, b, _ = _inputs(4, 3, torch.float32)
    y = OPS[op][0](u, m, a.requires_grad_(), b)
    assert op in type(y.grad_fn).__name__.lower()


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_float64(op):
    u, m, a, b, _ = _inputs(9, 4, torch.float64)
    ins = tuple(t.requires_grad_() for t in (u, m, a, b))
    assert torch.autograd.gradcheck(OPS[op][0], ins)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_CUDA)])
def test_extreme_inputs_stay_finite(op, device):
    # SiLU(t) -> 0 as t -> -inf and -> t as t -> +inf; a LayerNorm of a constant row is its
    # bias
    u = torch.tensor([[-1e4, -100.0, 0.0, 100.0, 1e4], [3.0] * 5], device=device)
    m = torch.tensor([[0.0] * 5, [-1e4, -100.0, 0.0, 100.0, 1e4]], device=device)
    a, b = torch.ones(5, device=device), torch.linspace(-1, 1, 5, device=device)
    fused, reference = OPS[op]
    got = _run(fused, u, m, a, b, torch.ones_like(u))
    want = _run(reference, *(t.double() for t in (u, m, a, b, torch.ones_like(u))))
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_bitwise_reproducible_with_any_number_of_threads(op):
    u, m, a, b, gy = _inputs(3 * pw.CHUNK_ROWS + 17, 64, torch.float32, seed=3)
    before = numba.get_num_threads()
    runs = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
            numba.set_num_threads(threads)
            runs.append(_run(OPS[op][0], u, m, a, b, gy))
    finally:
        numba.set_num_threads(before)
    for run in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], run))


@pytest.mark.parametrize("op", OPS)
def test_outputs_and_gradients_start_on_a_cache_line(op):
    u, m, a, b, gy = _inputs(50, 8, torch.float32)
    for t in _run(OPS[op][0], u, m, a, b, gy)[:3]:
        assert t.data_ptr() % 64 == 0


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", ["bfloat16", "mixed dtypes", "broadcast rows"])
def test_other_inputs_take_the_composition(op, case):
    u, m, a, b, _ = _inputs(6, 4, torch.float32)
    if case == "bfloat16":
        u, m = u.bfloat16(), m.bfloat16()
    elif case == "mixed dtypes":
        a = a.double()
    else:
        m = m[:1]
    fused, reference = OPS[op]
    assert torch.equal(fused(u, m, a, b), reference(u, m, a, b))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", ["bfloat16", "rows of three dimensions", "autocast"])
def test_compositions_keep_only_their_inputs(op, case, monkeypatch):
    """Where the torch composition runs (any device but the CPU kernels' cases) on large
    arrays under a recorded gradient, the backward keeps the four inputs only and forms the
    intermediate arrays again: the same output and gradients as the composition's own
    autograd, bit for bit (here on the CPU, asked for)."""
    from treessm.ops import recompute

    monkeypatch.setattr(recompute, "keeps_less", lambda *t: any(x.requires_grad for x in t))
    u, m, a, b, gy = _inputs(40, 8, torch.float32)
    if case == "bfloat16":
        u, m, gy = u.bfloat16(), m.bfloat16(), gy.bfloat16()
    else:  # rows of three dimensions, with or without autocast
        u, m, gy = (t.view(5, 8, 8) for t in (u, m, gy))
    fused, reference = OPS[op]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
    ins = [t.clone().requires_grad_() for t in (u, m, a, b)]
    with autocast:
        kept, out = saved_storages(fused, *ins)
    assert kept <= storages(*ins)
    with autocast:
        _, out_ref = saved_storages(reference, *ins)
    assert torch.equal(out, out_ref)
    grads = torch.autograd.grad(out, ins, gy.to(out.dtype))
    grads_ref = torch.autograd.grad(out_ref, ins, gy.to(out.dtype))
    assert all(torch.equal(x, y) for x, y in zip(grads, grads_ref))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_compositions_inside_a_users_checkpoint(op, reentrant, monkeypatch):
    """A model that checkpoints its blocks (either kind of torch.utils.checkpoint) around the
    compositions that keep only their inputs gets their gradients bit for bit."""
    from torch.utils.checkpoint import checkpoint

    from treessm.ops import recompute

    monkeypatch.setattr(recompute, "keeps_less", lambda *t: any(x.requires_grad for x in t))
    u, m, a, b, _ = _inputs(40, 8, torch.float32)
    u, m = u.view(5, 8, 8), m.view(5, 8, 8)  # rows of three dimensions: the composition
    fused, reference = OPS[op]
    plain = [t.clone().requires_grad_() for t in (u, m, a, b)]
    reference(*plain).sin().sum().backward()
    ins = [t.clone().requires_grad_() for t in (u, m, a, b)]
    checkpoint(lambda *t: fused(*t).sin(), *ins, use_reentrant=reentrant).sum().backward()
    assert all(torch.equal(t.grad, p.grad) for t, p in zip(ins, plain))


@pytest.mark.parametrize("op", OPS)
def test_compiles_in_one_graph(op):
    u, m, a, b, gy = _inputs(50, 8, torch.float32)
    compiled = torch.compile(OPS[op][0], fullgraph=True, backend="aot_eager")
    got = _run(compiled, u, m, a, b, gy)
    want = _run(OPS[op][0], u, m, a, b, gy)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("make,inputs", [
    (lambda: treessm.nn.TreeSSMConv(8, 6, d_state=2),
     lambda g: (torch.randn(30, 8, generator=g), torch.randint(0, 30, (2, 90), generator=g))),
    (lambda: treessm.nn.TreeSSM(8, d_state=2), lambda g: (torch.randn(2, 5, 6, 8, generator=g),)),
])
def test_layers_give_the_same_bits_with_and_without_a_gradient(make, inputs):
    torch.manual_seed(0)
    layer = make()
    args = inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        inference = layer(*args)
    training = layer(*args)
    assert training.requires_grad and torch.equal(training.detach(), inference)



def _cuda(*tensors):
    return [t.cuda() for t in tensors]


@_CUDA
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,n,c", [
    (torch.float32, 0, 8), (torch.float32, 1, 1), (torch.float32, 7, 37),
    (torch.float32, 3000, 128), (torch.float32, 600, 1536), (torch.float64, 50, 768),
    (torch.float64, 9000, 64)])
def test_cuda_kernels_match_the_compositions(op, dtype, n, c):
    fused, reference = OPS[op]
    u, m, a, b, gy = _cuda(*_inputs(n, c, dtype, seed=c))
    got = _run(fused, u, m, a, b, gy)
    want = _run(reference, *(t.double() for t in (u, m, a, b, gy)))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, x, y in zip(("out", "rows", "other rows", "first vector", "second vector"),
                          got, want):
        assert x.dtype == dtype and x.shape == y.shape and x.is_cuda, name
        scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol * scale, msg=name)
    if n:  # the kernels ran, not the composition
        y = fused(u, m, a.requires_grad_(), b)
        assert op in type(y.grad_fn).__name__.lower()


@_CUDA
@pytest.mark.parametrize("op", OPS)
def test_cuda_gradcheck_float64(op):
    u, m, a, b, _ = _cuda(*_inputs(9, 40, torch.float64))
    ins = tuple(t.requires_grad_() for t in (u, m, a, b))
    assert torch.autograd.gradcheck(OPS[op][0], ins)


@_CUDA
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_repeat_their_bits(op):
    u, m, a, b, gy = _cuda(*_inputs(20000, 128, torch.float32, seed=5))
    first = _run(OPS[op][0], u, m, a, b, gy)
    again = _run(OPS[op][0], u, m, a, b, gy)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


@_CUDA
@pytest.mark.parametrize("op", OPS)
def test_cuda_rows_too_wide_for_the_kernels_take_the_composition(op):
    c = pw.CUDA_MAX_ROW_BYTES // 4 + 1
    u, m, a, b, _ = _cuda(*_inputs(5, c, torch.float32))
    assert not pw.runs_on_kernels(u, m, a, b)
    fused, reference = OPS[op]
    assert torch.equal(fused(u, m, a, b), reference(u, m, a, b))


@_CUDA
def test_cuda_kernels_reject_malformed_arguments():
    from treessm.typing import load_cuda_extension

    load_cuda_extension()
    ops = torch.ops.treessm
    u, m, a, b, g = _cuda(*_inputs(6, 4, torch.float32))
    with pytest.raises(RuntimeError, match="m must have shape"):
        ops.cuda_silu_mix(u, m[:3], a, b)
    with pytest.raises(RuntimeError, match="b must be a contiguous"):
        ops.cuda_silu_mix(u, m, a, b.double())
    with pytest.raises(RuntimeError, match="weight must be a contiguous"):
        ops.cuda_norm_gate(u, m, a.cpu(), b, EPS)
    with pytest.raises(RuntimeError, match="y must be float32 or float64"):
        ops.cuda_norm_gate(u.half(), m.half(), a.half(), b.half(), EPS)
    with pytest.raises(RuntimeError, match="columns"):
        wide = torch.zeros(2, 4000, device="cuda")
        ops.cuda_norm_gate_backward(wide, wide, wide, wide[0], wide[0], EPS)
    with pytest.raises(RuntimeError, match="g must have shape"):
        ops.cuda_silu_mix_backward(g[:2], u, m, a, b)
