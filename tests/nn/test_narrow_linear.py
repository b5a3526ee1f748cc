"""NarrowLinear, the selective SSMs' step projection: torch.nn.Linear's parameters and
outputs, and gradients equal to nn.Linear's up to the order of the sums, with the weight's
gradient formed as (x^T g)^T on the CPU."""
import pytest
import torch

from treessm.nn import GrootLMixer, NarrowLinear, TreeSSM, TreeSSMConv


def _pair(fan_in, fan_out, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    narrow = NarrowLinear(fan_in, fan_out, bias=bias).to(dtype)
    plain = torch.nn.Linear(fan_in, fan_out, bias=bias).to(dtype)
    plain.load_state_dict(narrow.state_dict())
    return narrow, plain


def _grads(layer, x, grad):
    xg = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(xg)
    out.backward(grad)
    return out, xg.grad, [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 4), (0, 4), (300, 4), (3, 50, 2)])
def test_outputs_and_gradients_are_linear_s(shape, bias):
    """Output bitwise equal to nn.Linear's; gradients equal in float64 up to rounding, for
    a split (strided) input, a batch of sequences, one row and no row."""
    fan_in, fan_out = shape[-1], 24
    narrow, plain = _pair(fan_in, fan_out, bias, torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape[:-1], fan_in + 3, dtype=torch.float64, generator=g)[..., :fan_in]
    grad = torch.randn(*shape[:-1], fan_out, dtype=torch.float64, generator=g)
    out_n, gx_n, gp_n = _grads(narrow, x, grad)
    out_p, gx_p, gp_p = _grads(plain, x, grad)
    assert torch.equal(out_n, out_p)
    torch.testing.assert_close(gx_n, gx_p, rtol=1e-12, atol=1e-12)
    assert len(gp_n) == len(gp_p) == (2 if bias else 1)
    for a, b in zip(gp_n, gp_p):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_weight_gradient_is_formed_from_x_transposed():
    """The weight's gradient has the bits of (x^T g)^T (nn.Linear's is g^T x, its sums
    in another order: whether their float32 bits differ depends on the BLAS and the CPU),
    formed by the layer's own autograd function, run after run."""
    narrow, plain = _pair(4, 128)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20000, 12, generator=g)[:, :4]
    grad = torch.randn(20000, 128, generator=g)
    out, _, (gw, gb) = _grads(narrow, x, grad)
    assert type(out.grad_fn).__name__ == "_NarrowLinearFunctionBackward"  # the path that ran
    assert torch.equal(gw, x.contiguous().t().mm(grad).t())
    assert torch.equal(gb, grad.sum(0))
    out_plain, _, (gw_plain, _) = _grads(plain, x, grad)
    assert type(out_plain.grad_fn).__name__ != "_NarrowLinearFunctionBackward"
    torch.testing.assert_close(gw, gw_plain, rtol=1e-4, atol=1e-3)
    _, _, (again, _) = _grads(narrow, x, grad)
    assert torch.equal(gw, again)


def test_gradcheck_and_second_derivatives():
    from torch.func import functional_call

    narrow, _ = _pair(3, 5, dtype=torch.float64)
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias):
        return functional_call(narrow, {"weight": weight, "bias": bias}, (x,))

    inputs = (x, narrow.weight.detach().requires_grad_(), narrow.bias.detach().requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_torch_func_grad_and_vmap():
    """torch.func transforms (per-example gradients) see nn.Linear's gradients."""
    from torch.func import functional_call, grad, vmap

    narrow, plain = _pair(4, 16, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    params = {k: v.detach() for k, v in narrow.named_parameters()}

    def loss(module, p, xi):
        return functional_call(module, p, (xi[None],)).square().sum()

    per_n = vmap(grad(lambda p, xi: loss(narrow, p, xi)), in_dims=(None, 0))(params, x)
    per_p = vmap(grad(lambda p, xi: loss(plain, p, xi)), in_dims=(None, 0))(params, x)
    for k in params:
        torch.testing.assert_close(per_n[k], per_p[k], rtol=1e-12, atol=1e-12)


def test_inference_and_state_dict_are_linear_s():
    narrow, plain = _pair(4, 8)
    assert narrow.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 4)
    with torch.no_grad():
        assert torch.equal(narrow(x), plain(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_n, y_p = narrow(x), plain(x)
    assert y_n.dtype == y_p.dtype == torch.bfloat16 and torch.equal(y_n, y_p)


@pytest.mark.parametrize("make", [lambda: TreeSSM(8, d_state=2),
                                  lambda: TreeSSMConv(8, 6, d_state=2),
                                  lambda: GrootLMixer(8, state_size=4)])
def test_the_layers_step_projection_is_narrow(make):
    layer = make()
    assert type(layer.dt_proj) is NarrowLinear
    assert isinstance(layer.dt_proj, torch.nn.Linear)


@pytest.mark.parametrize("args,error,match", [
    ((-1, 3), ValueError, "in_features"), ((2.5, 3), TypeError, "in_features"),
    ((2, -3), ValueError, "out_features"), ((2, 3, "yes"), TypeError, "bias")])
def test_bad_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        NarrowLinear(*args)
