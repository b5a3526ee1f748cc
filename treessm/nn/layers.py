"""Small building blocks shared by the tree-SSM layers and backbones.

These are the usual vision-backbone helpers (stochastic depth, a channel LayerNorm for
``[B, C, H, W]`` maps, the transformer MLP) written once here so that models do not
depend on timm.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_int, check_number

__all__ = ["drop_path", "DropPath", "LayerNorm2d", "Mlp"]


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
