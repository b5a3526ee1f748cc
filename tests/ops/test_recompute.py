"""treessm.ops.recompute: when the layers keep less for the backward, and the recomputed
composition's gradients (every argument, any subset needing them, autocast)."""
import pytest
import torch

from saved import saved_storages, storages
from treessm.ops.recompute import KEEP_LESS_MIN_ELEMENTS, keeps_less, recomputed


def test_keeps_less_off_the_cpu_for_large_arrays_under_a_gradient():
    large = torch.empty(KEEP_LESS_MIN_ELEMENTS, device="meta", requires_grad=True)
    assert keeps_less(large)
    assert not keeps_less(torch.empty(KEEP_LESS_MIN_ELEMENTS - 1, device="meta",
                                      requires_grad=True))
    assert not keeps_less(large.detach())
    assert keeps_less(large.detach(), torch.ones(2, requires_grad=True))  # a parameter's
    with torch.no_grad():
        assert not keeps_less(large)
    assert not keeps_less(torch.zeros(KEEP_LESS_MIN_ELEMENTS, requires_grad=True))  # CPU
    seen = []

    def probe(x):  # inside a torch.func transform
        seen.append(keeps_less(large))
        return (x * x).sum()

    torch.func.grad(probe)(torch.ones(3))
    assert seen == [False]


def _composition(x, y, w, scale):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], w) * torch.sigmoid(y) * scale


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False),
                                   (False, False, True)])
def test_recomputed_gradients_are_the_composition_s(needs):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    w, grad = torch.randn(8, generator=g), torch.randn(3, 5, 8, generator=g)
    plain = [t.clone().requires_grad_(n) for t, n in zip((x, y, w), needs)]
    lean = [t.clone().requires_grad_(n) for t, n in zip((x, y, w), needs)]
    want = _composition(*plain, 0.5)
    kept, got = saved_storages(recomputed, _composition, *lean, 0.5)
    assert torch.equal(got, want)
    assert kept <= storages(*lean)
    want_g = torch.autograd.grad(want, [t for t in plain if t.requires_grad], grad)
    got_g = torch.autograd.grad(got, [t for t in lean if t.requires_grad], grad)
    assert all(torch.equal(a, b) for a, b in zip(got_g, want_g))


def test_recomputed_backward_runs_under_the_forward_s_autocast():
    """The backward, outside the autocast region, forms the composition again as the
    forward did inside it (else its gradients would differ)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    w = torch.randn(16, generator=g)

    def composition(x, y, w):
        return (x @ y.t()).relu() @ (y * w)  # matmuls run in bfloat16 under autocast

    plain = [t.clone().requires_grad_() for t in (x, y, w)]
    lean = [t.clone().requires_grad_() for t in (x, y, w)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = composition(*plain)
        got = recomputed(composition, *lean)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    grad = torch.randn(want.shape, generator=g).bfloat16()
    want_g = torch.autograd.grad(want, plain, grad)
    got_g = torch.autograd.grad(got, lean, grad)
    assert all(torch.equal(a, b) for a, b in zip(got_g, want_g))


def test_second_derivatives():
    """A backward that builds its own graph (gradient penalties, gradgradcheck) reaches the
    inputs through the recomputed composition and through the lean softplus."""
    from treessm.ops.selective_scan import _Softplus

    g = torch.Generator().manual_seed(2)
    x, y = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(4, generator=g, dtype=torch.float64)
    x, w = x.requires_grad_(), w.requires_grad_()

    def composition(x, w):
        return torch.nn.functional.layer_norm(x, (4,), w) * torch.sigmoid(y)

    assert torch.autograd.gradgradcheck(lambda x, w: recomputed(composition, x, w), (x, w))
    steps = (torch.randn(9, generator=g, dtype=torch.float64) * 8).requires_grad_()
    assert torch.autograd.gradcheck(_Softplus.apply, (steps,))
    assert torch.autograd.gradgradcheck(_Softplus.apply, (steps,))
