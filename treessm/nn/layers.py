"""Small building blocks shared by the tree-SSM layers and backbones.

These are the usual vision-backbone helpers (stochastic depth, a channel LayerNorm for
``[B, C, H, W]`` maps, the transformer MLP) written once here so that models do not
depend on timm, and the linear layer of the selective SSMs' step projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_int, check_number

__all__ = ["drop_path", "DropPath", "LayerNorm2d", "Mlp", "NarrowLinear"]


def drop_path(x: Tensor, p: float = 0.0, training: bool = False) -> Tensor:
    r"""Stochastic depth: zero the whole residual branch of each example with probability
    ``p`` and scale the kept ones by :math:`1 / (1 - p)` (Huang et al., 2016).

    Args:
        x (Tensor): residual branch, examples first.
        p (float): drop probability in ``[0, 1)``. (default: ``0.0``)
        training (bool): identity unless ``True``. (default: ``False``)

    Shapes:
        - **input:** :math:`(B, *)`
        - **output:** :math:`(B, *)`

    Returns:
        Tensor like ``x``: each example's branch kept and scaled, or zero.

    Raises:
        ValueError: if ``p`` is not in ``[0, 1)``.

    Example:
        >>> x = torch.ones(4, 3)
        >>> torch.equal(drop_path(x, 0.5, training=False), x)     # identity in evaluation
        True
        >>> sorted(set(drop_path(x, 0.5, training=True).flatten().tolist())) in ([0.0, 2.0], [2.0], [0.0])
        True
    """
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    r"""Module form of :func:`drop_path`, active in training mode only.

    Args:
        p (float): drop probability in ``[0, 1)``. (default: ``0.0``)

    Shapes:
        - **input:** :math:`(B, *)`
        - **output:** :math:`(B, *)`

    Returns:
        Calling the module returns :func:`drop_path` of its input.

    Raises:
        ValueError: if ``p`` is not in ``[0, 1)``.

    Example:
        >>> DropPath(0.1).eval()(torch.ones(2, 3)).sum().item()
        6.0
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = check_number(p, "p", 0.0, 1.0, high_open=True)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerNorm2d(nn.LayerNorm):
    r""":class:`torch.nn.LayerNorm` over the channels of a channels-first map.

    Args:
        normalized_shape (int): the channels :math:`C`; the other arguments are
            :class:`torch.nn.LayerNorm`'s.

    Shapes:
        - **input:** :math:`(B, C, H, W)`
        - **output:** :math:`(B, C, H, W)`

    Returns:
        Calling the module returns the map normalised over its channels at every pixel.

    Raises:
        RuntimeError: from :func:`torch.nn.functional.layer_norm` when the input does not
            have :math:`C` channels in dimension 1.

    Example:
        >>> y = LayerNorm2d(8)(torch.randn(2, 8, 5, 5))
        >>> y.shape, torch.allclose(y.mean(1), torch.zeros(2, 5, 5), atol=1e-5)
        (torch.Size([2, 8, 5, 5]), True)
    """

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    r"""Two-layer perceptron of a transformer block, applied on the last dimension.

    .. math::
        \mathrm{Mlp}(x) = W_2\, \mathrm{drop}(\mathrm{GELU}(W_1 x + b_1)) + b_2

    Args:
        in_channels (int): input and output channels.
        hidden_channels (int): hidden channels.
        drop (float): dropout after each layer. (default: ``0.0``)
        bias (bool): learn the additive biases. (default: ``True``)

    Shapes:
        - **input:** :math:`(*, C_{in})`
        - **output:** :math:`(*, C_{in})`

    Returns:
        Calling the module returns :math:`\mathrm{Mlp}(x)`.

    Raises:
        ValueError: if a channel count is not a positive int or ``drop`` not in ``[0, 1)``.

    Example:
        >>> Mlp(16, 64)(torch.randn(2, 7, 16)).shape
        torch.Size([2, 7, 16])
    """

    def __init__(self, in_channels: int, hidden_channels: int, drop: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.in_channels = in_channels = check_int(in_channels, "in_channels", 1)
        self.hidden_channels = hidden_channels = check_int(hidden_channels, "hidden_channels", 1)
        drop = check_number(drop, "drop", 0.0, 1.0, high_open=True)
        bias = check_bool(bias, "bias")
        self.fc1 = nn.Linear(in_channels, hidden_channels, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_channels, in_channels, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.hidden_channels}"


class _NarrowLinearFunction(torch.autograd.Function):
    r"""``F.linear`` whose weight gradient is formed as :math:`(x^\top g)^\top`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        gx = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        gw = (x.reshape(-1, x.shape[-1]).t().mm(rows).t().contiguous()
              if ctx.needs_input_grad[1] else None)
        gb = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class NarrowLinear(nn.Linear):
    r""":class:`torch.nn.Linear` for few input features and many rows, such as the
    selective SSMs' step projection ``dt_proj`` (``dt_rank`` to ``d_inner`` features).

    The same parameters, initialisation and outputs as :class:`torch.nn.Linear`. On the
    CPU, when a gradient is recorded, the weight's gradient is formed as
    :math:`(x^\top g)^\top` (``[in, rows] @ [rows, out]``) instead of torch's
    :math:`g^\top x` (``[out, rows] @ [rows, in]``), which the CPU BLAS runs 5 to 20 times
    slower for fewer than 12 input features (``benchmarks/narrow_linear_cpu.py``); the two
    differ only in the order of the sums. Elsewhere it is :func:`torch.nn.functional.linear`.

    Args:
        in_features (int): input features :math:`H_{in}`.
        out_features (int): output features :math:`H_{out}`.
        bias (bool): learn an additive bias. (default: ``True``)
        device, dtype: of the parameters, as for :class:`torch.nn.Linear`.
            (default: ``None``)

    Shapes:
        - **input:** :math:`(*, H_{in})`
        - **output:** :math:`(*, H_{out})`

    Returns:
        Calling the module returns :math:`x W^\top + b`.

    Raises:
        TypeError, ValueError: if a feature count is not a non-negative int, or ``bias`` not
            a bool.
        RuntimeError: from :func:`torch.nn.functional.linear` when the input's last
            dimension is not ``in_features``.

    Example:
        >>> proj = NarrowLinear(4, 128)
        >>> x = torch.randn(10, 4)
        >>> torch.equal(proj(x), torch.nn.functional.linear(x, proj.weight, proj.bias))
        True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__(check_int(in_features, "in_features", 0),
                         check_int(out_features, "out_features", 0), check_bool(bias, "bias"),
                         device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or not torch.is_grad_enabled()
                or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight, self.bias)
        return _NarrowLinearFunction.apply(x, self.weight, self.bias)
