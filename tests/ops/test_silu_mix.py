"""The local mixing operator SiLU(a u + b m): the CPU kernels against the torch composition
that defines it (output and all four gradients), gradcheck, bitwise reproducibility with any
number of threads, the fallbacks, torch.compile."""
import numba
import pytest
import torch

from treessm.ops import silu_mix as sm


def _inputs(n, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, m = (torch.randn(n, c, dtype=dtype, generator=g) * 3 for _ in range(2))
    a, b = (torch.randn(c, dtype=dtype, generator=g) for _ in range(2))
    return u, m, a, b, torch.randn(n, c, dtype=dtype, generator=g)


def _run(fn, u, m, a, b, gy):
    ins = [t.clone().requires_grad_() for t in (u, m, a, b)]
    y = fn(*ins)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in ins]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("n,c", [(0, 8), (1, 1), (7, 37), (sm.CHUNK_ROWS + 3, 5), (300, 128)])
def test_against_the_torch_composition(n, c, dtype, tol):
    u, m, a, b, gy = _inputs(n, c, dtype)
    got = _run(sm.silu_mix, u, m, a, b, gy)
    want = _run(sm.silu_mix_reference, u, m, a, b, gy)
    for name, x, y in zip(("y", "u", "m", "a", "b"), got, want):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * scale, msg=name)


def test_the_kernels_run_on_the_cpu():
    # the operator, not the composition: its autograd node is the custom op's
    u, m, a, b, _ = _inputs(4, 3, torch.float32)
    y = sm.silu_mix(u, m, a.requires_grad_(), b)
    assert "silu_mix" in type(y.grad_fn).__name__.lower()


def test_gradcheck_float64():
    u, m, a, b, _ = _inputs(9, 4, torch.float64)
    ins = tuple(t.requires_grad_() for t in (u, m, a, b))
    assert torch.autograd.gradcheck(sm.silu_mix, ins)


def test_extreme_pre_activations_stay_finite():
    # SiLU(t) -> 0 as t -> -inf and -> t as t -> +inf; its derivative stays in [-0.1, 1.1]
    u = torch.tensor([[-1e4, -100.0, 0.0, 100.0, 1e4]])
    m = torch.zeros_like(u)
    a, b = torch.ones(5), torch.ones(5)
    got = _run(sm.silu_mix, u, m, a, b, torch.ones_like(u))
    want = _run(sm.silu_mix_reference, u.double(), m.double(), a.double(), b.double(),
                torch.ones_like(u).double())
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y.float(), rtol=1e-6, atol=1e-6)


def test_bitwise_reproducible_with_any_number_of_threads():
    u, m, a, b, gy = _inputs(3 * sm.CHUNK_ROWS + 17, 64, torch.float32, seed=3)
    before = numba.get_num_threads()
    runs = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
            numba.set_num_threads(threads)
            runs.append(_run(sm.silu_mix, u, m, a, b, gy))
    finally:
        numba.set_num_threads(before)
    for run in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], run))


@pytest.mark.parametrize("case", ["bfloat16", "mixed dtypes", "broadcast rows"])
def test_other_inputs_take_the_composition(case):
    u, m, a, b, _ = _inputs(6, 4, torch.float32)
    if case == "bfloat16":
        u, m = u.bfloat16(), m.bfloat16()
    elif case == "mixed dtypes":
        a = a.double()
    else:
        m = m[:1]
    assert torch.equal(sm.silu_mix(u, m, a, b), sm.silu_mix_reference(u, m, a, b))


def test_compiles_in_one_graph():
    u, m, a, b, gy = _inputs(50, 8, torch.float32)
    compiled = torch.compile(sm.silu_mix, fullgraph=True, backend="aot_eager")
    got = _run(compiled, u, m, a, b, gy)
    want = _run(sm.silu_mix, u, m, a, b, gy)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
