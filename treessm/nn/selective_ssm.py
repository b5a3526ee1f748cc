r"""The selective state-space core of every treessm layer.

Mamba's selective SSM has four parameters per layer: ``x_proj`` (the input-dependent rank-
``dt_rank`` step and the projections :math:`B`, :math:`C`), ``dt_proj`` (the step's
up-projection and bias), ``A_log`` (:math:`A = -\exp(A_{\log})`) and the skip ``D``.
:class:`SelectiveSSM` registers them, initialises them as Mamba does and feeds them to the
fused :func:`treessm.selective_tree_scan`; :class:`~treessm.nn.TreeSSM`,
:class:`~treessm.nn.TreeSSMConv` and :class:`~treessm.nn.GrootLMixer` differ only in where
their inner features and trees come from and in the rule for the step of a tree edge.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .._checks import check_number, check_optional_choice
from ..ops import selective_tree_scan
from ..ops.selective_scan import SELECTIVE_BACKENDS
from ..tree import Tree
from .layers import NarrowLinear

__all__ = ["SelectiveSSM"]


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


class SelectiveSSM(nn.Module):
    r"""Parameters, initialisation and discretisation of Mamba's selective SSM over a tree.

    For inner features :math:`u_v \in \mathbb{R}^{d_{inner}}`,

    .. math::
        \delta_v, B_v, C_v = \mathrm{split}(W_x u_v), \qquad
        \Delta_v = \mathrm{softplus}(W_\Delta \delta_v + b_\Delta), \qquad
        A = -\exp(A_{\log}),

    and :meth:`ssm` returns :math:`y_v = \sum_s C_{v,s} h_{v,\cdot,s} + D \odot u_v` for the
    states :math:`h` of :func:`treessm.selective_tree_scan` over a tree. Subclasses call
    :meth:`_build_ssm` where these parameters belong in their registration order and
    :meth:`reset_ssm_parameters` where their initialisation draws its random numbers.

    Attributes:
        edge_step (str): the step of the tree edge :math:`(v, \mathrm{parent}(v))`:
            ``"child"`` (the child's own step, GrootV and GrootL) or ``"mean"`` (the mean
            of the two ends', symmetric).

    Shapes:
        - :meth:`ssm` **input:** inner features :math:`(N, d_{inner})` and a tree over
          :math:`N` vertices
        - :meth:`ssm` **output:** :math:`(N, d_{inner})`

    Raises:
        ValueError: from ``_build_ssm``, on ``dt_min``, ``dt_max`` or ``dt_init_floor`` not
            positive with ``dt_min <= dt_max``, or an unknown ``backend``.

    Example:
        >>> class Mixer(SelectiveSSM):                  # the smallest subclass
        ...     def __init__(self, d_inner, d_state):
        ...         super().__init__()
        ...         self._build_ssm(d_inner, d_state, dt_rank=2)
        ...         self.reset_ssm_parameters()
        >>> tree = treessm.Tree.from_parent([-1, 0, 0, 1])
        >>> Mixer(8, 4).ssm(torch.randn(4, 8), tree).shape
        torch.Size([4, 8])
    """

    edge_step = "child"

    def _build_ssm(self, d_inner: int, d_state: int, dt_rank: int, dt_min: float = 1e-3,
                   dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                   backend: Optional[str] = None) -> None:
        dt_min = check_number(dt_min, "dt_min", 0, low_open=True)
        dt_max = check_number(dt_max, "dt_max", 0, low_open=True)
        if not dt_min <= dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got "
                             f"{dt_min!r} and {dt_max!r}")
        dt_init_floor = check_number(dt_init_floor, "dt_init_floor", 0, low_open=True)
        backend = check_optional_choice(backend, "backend", ("auto",) + SELECTIVE_BACKENDS)
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.backend = backend
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = NarrowLinear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        # Mamba's convention: the SSM's A and D are not weight-decayed.
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def reset_ssm_parameters(self) -> None:
        r"""Mamba's initialisation of the step, state and skip parameters (``x_proj`` is
        the subclass's to reset): :math:`W_\Delta` uniform in :math:`\pm d_{rank}^{-1/2}`,
        :math:`\Delta` log-uniform in ``[dt_min, dt_max]`` (at least ``dt_init_floor``)
        through the inverse softplus of its bias, S4D-real :math:`A = -(1, \dots, N)`,
        :math:`D = 1`."""
        with torch.no_grad():
            std = self.dt_rank ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
            dt = torch.exp(torch.rand(self.d_inner) * (log_hi - log_lo) + log_lo)
            self.dt_proj.bias.copy_(_inverse_softplus(dt.clamp(min=self.dt_init_floor)))
            a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
            self.A_log.copy_(torch.log(a).expand(self.d_inner, self.d_state))
            self.D.fill_(1.0)

    def ssm_inputs(self, u: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        r"""The step before its softplus, :math:`W_\Delta \delta + b_\Delta` (``[*,
        d_inner]``), and :math:`B`, :math:`C` (``[*, d_state]``) of inner features
        ``u [*, d_inner]``, in the dtype the projections give. ``dt_proj`` is called as a
        module, so an adapter on it (PEFT's LoRA) takes effect."""
        dt, b, c = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return self.dt_proj(dt), b, c

    def ssm(self, u: Tensor, tree: Tree, direction: str = "both", *, skip: bool = True,
            edge_step=None, inputs: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
            **options):
        r""":math:`\sum_s C_s h_{\cdot,s} + D \odot u` for flat inner features
        ``u [N, d_inner]`` over ``tree``, by :func:`treessm.selective_tree_scan` (``options``
        are its keyword arguments: ``initial_state``, ``state_vertices``, ``state_norm``,
        ...). ``skip=False`` leaves out :math:`D \odot u`; ``edge_step`` replaces the rule of
        :attr:`edge_step`, with a tensor of edge steps in the form of the step before its
        softplus; ``inputs`` are :meth:`ssm_inputs` of ``u`` when they are at hand. The
        result is float32 (float64 for float64 ``u``), whatever the dtype of ``u``, as in
        Mamba's kernels."""
        acc = torch.promote_types(u.dtype, torch.float32)
        delta, b, c = self.ssm_inputs(u) if inputs is None else inputs
        return selective_tree_scan(
            u.to(acc), delta, -torch.exp(self.A_log.to(acc)), b, c, tree,
            D=self.D if skip else None, delta_softplus=True, direction=direction,
            edge_step=self.edge_step if edge_step is None else edge_step,
            backend=self.backend, **options)
