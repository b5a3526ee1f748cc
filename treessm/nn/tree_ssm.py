"""The selective tree state-space mixer (TreeSSM) of GrootV.

A Mamba-style selective SSM whose recurrence runs over a tree instead of a sequence:
the tree is built from the layer's own features (a minimum spanning tree of the
4-neighbour pixel grid under cosine dissimilarity, by default) and every vertex
aggregates every other vertex of its tree with the product of the per-edge decays on
the path between them (:func:`treessm.selective_tree_scan`, direction ``"both"``).

The SSM proper (:meth:`TreeSSM.selective_scan`) takes flat vertex features and a
:class:`~treessm.Tree`, so the same parameters and code serve images, sequences and
graphs; :meth:`TreeSSM.forward` is the image form on channels-last ``[B, H, W, C]`` maps.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_bool, check_choice, check_int, check_int_or_auto, check_number
from ..ops.pointwise import norm_gate, runs_on_kernels
from ..topology import GridTopology, chain_tree
from ..topology.layout import empty_forest
from ..tree import Tree
from .selective_ssm import SelectiveSSM

__all__ = ["TreeSSM", "SelectiveTreeSSM", "raster_tree"]

SCANS = ("tree", "raster")


def raster_tree(batch_size: int, height: int, width: int, device="cpu") -> Tree:
    r"""One chain per image through its pixels in row-major order, rooted at pixel (0, 0)
    (:func:`treessm.topology.chain_tree` over ``batch_size`` chains of ``height * width``).

    A ``"both"`` tree scan over it is a bidirectional selective scan over the raster
    sequence, and a ``"down"`` scan is exactly Mamba's causal recurrence.

    Args:
        batch_size (int), height (int), width (int): grid of ``[B, H, W]`` vertices with ids
            ``b * H * W + i * W + j``.
        device (torch.device or str): device of the tree. (default: ``"cpu"``)

    Shapes:
        - **output:** a :class:`~treessm.Tree` over :math:`N = BHW` vertices

    Returns:
        :class:`~treessm.Tree`

    Raises:
        ValueError: if a size is not a non-negative int.

    Example:
        >>> raster_tree(1, 2, 2).parent.tolist()       # (0,0) -> (0,1) -> (1,0) -> (1,1)
        [-1, 0, 1, 2]
    """
    for name, value in (("batch_size", batch_size), ("height", height), ("width", width)):
        check_int(value, name, 1)
    return chain_tree(batch_size, height * width, device)


def records_grad(*tensors: Tensor) -> bool:
    """Whether autograd records an operation on ``tensors``: else a layer may overwrite its
    own intermediate arrays instead of allocating new ones."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    # in the dtype of x, whatever the dtype of the affine parameters
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype),
                        norm.bias.to(x.dtype), norm.eps)


class SelectiveTreeSSM(SelectiveSSM):
    r"""The selective SSM of GrootV's mixer (:class:`~treessm.nn.SelectiveSSM`) with its two
    LayerNorms: :math:`\mathrm{LN}_h` over the ``d_inner * d_state`` states of a vertex
    before the read-out, and the LayerNorm of the output before the gate. Subclasses add the
    input and output projections and decide where the tree comes from; they call
    :meth:`_build_ssm` where these parameters belong in their registration order.

    The scan (:meth:`selective_scan`) is :func:`treessm.selective_tree_scan` in direction
    ``"both"`` with the state normalisation; the step of a tree edge follows
    :attr:`edge_step` (``docs/concepts.md``).

    Shapes:
        - :meth:`selective_scan` **input:** :math:`(N, d_{inner})` and a tree over
          :math:`N` vertices; **output:** :math:`(N, d_{inner})`
        - :meth:`project_out` **input:** :math:`(*, d_{inner})` twice; **output:**
          :math:`(*, d_{out})`

    Raises:
        ValueError: as :class:`~treessm.nn.SelectiveSSM`.

    Example:
        >>> class Mixer(SelectiveTreeSSM):
        ...     def __init__(self, d_inner):
        ...         super().__init__()
        ...         self._build_ssm(d_inner, 1, 2, 1e-3, 0.1, 1e-4, None)
        ...         self.reset_ssm_parameters()
        >>> tree = treessm.Tree.from_parent([-1, 0, 0])
        >>> Mixer(8).selective_scan(torch.randn(3, 8), tree).shape
        torch.Size([3, 8])
    """

    def _build_ssm(self, d_inner: int, d_state: int, dt_rank: int, dt_min: float,
                   dt_max: float, dt_init_floor: float, backend: Optional[str]) -> None:
        super()._build_ssm(d_inner, d_state, dt_rank, dt_min, dt_max, dt_init_floor, backend)
        # one LayerNorm over the d_inner * d_state states of a vertex, on a flat view: the
        # CUDA backward of torch's layer_norm with a two-dimensional normalized_shape
        # returns a wrongly shaped weight gradient (torch 2.11, seen on an H200)
        self.h_norm = nn.LayerNorm(d_inner * d_state)
        self.out_norm = nn.LayerNorm(d_inner)

    def reset_ssm_parameters(self) -> None:
        """Mamba's step, state and skip (:meth:`SelectiveSSM.reset_ssm_parameters`), and
        the LayerNorms as identities."""
        super().reset_ssm_parameters()
        self.h_norm.reset_parameters()
        self.out_norm.reset_parameters()

    def selective_scan(self, u: Tensor, tree: Tree) -> Tensor:
        r"""The SSM proper on flat vertex features: :math:`C \cdot \mathrm{LN}_h(h) + D u`,
        fused (:func:`treessm.selective_tree_scan` with ``state_norm``).

        Args:
            u (Tensor [N, d_inner]): inner features (after the local mixing and SiLU).
            tree (Tree): forest over the N vertices.

        Returns:
            Tensor [N, d_inner] in float32 (float64 for float64 input).
        """
        return self.ssm(u, tree, "both", state_norm=True, norm_weight=self.h_norm.weight,
                        norm_bias=self.h_norm.bias, norm_eps=self.h_norm.eps)

    def project_out(self, y: Tensor, z: Tensor) -> Tensor:
        r""":math:`W_{out}(\mathrm{LN}(y) \odot \mathrm{SiLU}(z))` for ``y, z [*, d_inner]``."""
        # z carries the working dtype of the layer (bfloat16 under autocast or in a half
        # model), which the output projection expects
        affine = (self.out_norm.weight, self.out_norm.bias)
        if runs_on_kernels(y, z, *affine) or records_grad(y, z, *affine):
            # one operator (on the CPU and CUDA one pass over the rows each way)
            return self.out_proj(norm_gate(y, z, *affine, self.out_norm.eps).to(z.dtype))
        # nothing to differentiate: the gate applied in the array of the SiLU
        return self.out_proj(F.silu(z).mul_(_layer_norm(self.out_norm, y)).to(z.dtype))

    def extra_macs(self, num_nodes: int) -> int:
        """Multiply-accumulates of one forward pass over ``num_nodes`` vertices that an
        operator-level counter such as :class:`torch.utils.flop_counter.FlopCounterMode`
        does not see: the tree scan (one per entry for the leaf-to-root pass, three for the
        root-to-leaf pass), the discretisation (three), :math:`C \\cdot h` (one), the skip
        and the gate (one each per inner channel). Tree construction is not counted."""
        states = num_nodes * self.d_inner * self.d_state
        return 8 * states + 2 * num_nodes * self.d_inner


class TreeSSM(SelectiveTreeSSM):
    r"""Selective state-space mixer over a tree (the core layer of GrootV).

    For vertex features :math:`x_v \in \mathbb{R}^{d_{model}}` the layer computes

    .. math::
        u_v, z_v &= W_{in} x_v, \qquad u \leftarrow \mathrm{SiLU}(\mathrm{DWConv}_{3\times3}(u))

        \Delta_v &= \mathrm{softplus}(W_\Delta W_r u_v + b_\Delta), \quad
        B_v = W_B u_v, \quad C_v = W_C u_v, \quad A = -\exp(A_{\log})

        h_v &= \sum_{u \in \mathcal{T}(v)} S(u, v)\, \Delta_u B_u u_u, \qquad
        S(u, v) = \prod_{e \in \mathrm{path}(u, v)} \exp(\Delta_e A)

        y_v &= W_{out}\big(\mathrm{LN}(C_v \cdot \mathrm{LN}_h(h_v) + D \odot u_v)
              \odot \mathrm{SiLU}(z_v)\big)

    per inner channel and state, where :math:`\mathcal{T}(v)` is the tree of :math:`v` and
    the decay of edge :math:`(e, \mathrm{parent}(e))` is that of its child :math:`e`. The
    tree is built without gradient from :math:`u` by ``topology`` in every forward pass
    (``scan="tree"``), or is a row-major chain per image (``scan="raster"``, a plain
    bidirectional selective scan), or is given to :meth:`forward`.

    :math:`\mathrm{LN}_h` normalises each vertex's hidden state over all its
    ``d_inner * d_state`` entries; with ``d_state=1`` this is the LayerNorm over the inner
    channels that GrootV applies to the scan output, which keeps the scale of :math:`h`
    independent of the size of the tree. The discretisation, the scan and both norms run
    in float32 even under autocast, as Mamba's kernels do.

    Args:
        d_model (int): input and output channels.
        d_state (int): state size :math:`N` per inner channel; states are flattened into the
            channels of the scan. (default: ``1``)
        ssm_ratio (float): ``d_inner = int(ssm_ratio * d_model)``. (default: ``2.0``)
        dt_rank (int or str): rank of the :math:`\Delta` projection; ``"auto"`` is
            :math:`\lceil d_{model} / 16 \rceil`. (default: ``"auto"``)
        d_conv (int): kernel size of the depthwise convolution over the grid in
            :meth:`forward`; ``0`` disables it. Must be odd. (default: ``3``)
        conv_bias (bool): learn a bias in the depthwise convolution. (default: ``False``)
        dt_min (float), dt_max (float): :math:`\Delta` is initialised log-uniformly in
            ``[dt_min, dt_max]`` (Mamba). (default: ``0.001``, ``0.1``)
        dt_init_floor (float): lower clamp of the initial :math:`\Delta`. (default: ``1e-4``)
        scan (str): ``"tree"`` (build a tree from the features) or ``"raster"`` (one
            row-major chain per image). (default: ``"tree"``)
        topology (callable, optional): maps ``[B, H, W, d_inner]`` features to a
            :class:`~treessm.Tree`; only with ``scan="tree"``. (default:
            ``GridTopology(4, "cosine")``)
        backend (str, optional): :func:`treessm.selective_tree_scan` backend; by default
            the fastest one for the device. (default: ``None``)
        bias (bool): learn biases in the input and output projections. (default: ``False``)

    Shapes:
        - **input:** features :math:`(B, H, W, d_{model})`, channels last; optionally a tree
          over the :math:`BHW` pixels
        - **output:** features :math:`(B, H, W, d_{model})`

    Raises:
        ValueError, TypeError: on an argument outside its range (named in the message),
            ``topology`` with ``scan="raster"``, or a ``topology`` that is not callable.

    Example:
        >>> mixer = TreeSSM(32, d_state=2)
        >>> y, tree = mixer(torch.randn(2, 8, 8, 32), return_tree=True)
        >>> y.shape, tree.num_trees                     # one spanning tree per image
        (torch.Size([2, 8, 8, 32]), 2)
    """

    def __init__(self, d_model: int, d_state: int = 1, ssm_ratio: float = 2.0,
                 dt_rank: Union[int, str] = "auto", d_conv: int = 3, conv_bias: bool = False,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 scan: str = "tree", topology: Optional[Callable[[Tensor], Tree]] = None,
                 backend: Optional[str] = None, bias: bool = False):
        super().__init__()
        d_model = check_int(d_model, "d_model", 1)
        d_state = check_int(d_state, "d_state", 1)
        ssm_ratio = check_number(ssm_ratio, "ssm_ratio", 0, low_open=True)
        if int(ssm_ratio * d_model) < 1:
            raise ValueError(f"ssm_ratio must be positive with int(ssm_ratio * d_model) >= 1, "
                             f"got {ssm_ratio!r}")
        dt_rank = check_int_or_auto(dt_rank, "dt_rank", math.ceil(d_model / 16))
        d_conv = check_int(d_conv, "d_conv", 0)
        if d_conv > 0 and d_conv % 2 == 0:
            raise ValueError(f"d_conv must be 0 or an odd positive int, got {d_conv!r}")
        conv_bias = check_bool(conv_bias, "conv_bias")
        bias = check_bool(bias, "bias")
        scan = check_choice(scan, "scan", SCANS)
        if topology is not None:
            if scan != "tree":
                raise ValueError(f"topology is only used with scan='tree', got scan={scan!r}")
            if not callable(topology):
                raise TypeError(f"topology must be a callable Topology, got "
                                f"{type(topology).__name__}")
        self.d_model = d_model
        self.d_conv = d_conv
        self.scan = scan
        if scan == "tree" and topology is None:
            topology = GridTopology(4, "cosine")
        self.topology = topology

        d_inner = int(ssm_ratio * d_model)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner,
                              bias=conv_bias) if d_conv > 0 else None
        self.act = nn.SiLU()
        self._build_ssm(d_inner, d_state, dt_rank, dt_min, dt_max, dt_init_floor, backend)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self):
        r"""Initialise as GrootV/VMamba train it: projections truncated normal (std 0.02),
        :math:`\Delta` log-uniform in ``[dt_min, dt_max]`` through the inverse softplus of
        its bias, S4D-real :math:`A = -(1, \dots, N)`, :math:`D = 1`."""
        for lin in (self.in_proj, self.out_proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        # the order of the random draws of earlier releases: x_proj, conv, then the SSM
        self.x_proj.reset_parameters()
        if self.conv is not None:
            self.conv.reset_parameters()
        self.reset_ssm_parameters()

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def scan_tree(self, u: Tensor) -> Tree:
        """The tree the scan runs on, from the inner features ``u [B, H, W, d_inner]``
        (no gradient flows through its construction)."""
        b, h, w, _ = u.shape
        if self.scan == "raster":
            return raster_tree(b, h, w, u.device)
        return self.topology(u.detach().float())

    def project_in(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Inner features ``u`` (input projection, depthwise convolution, SiLU) and the
        pre-activation gate ``z`` of a channels-last map ``x [B, H, W, d_model]``; both
        ``[B, H, W, d_inner]``."""
        u, z = self.in_proj(x).chunk(2, dim=-1)
        if self.conv is not None:
            u = self.conv(u.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.act(u), z

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, tree: Optional[Tree] = None,
                return_tree: bool = False) -> Union[Tensor, Tuple[Tensor, Tree]]:
        """Mix a channels-last image batch ``x [B, H, W, d_model]``.

        Args:
            x (Tensor [B, H, W, d_model]): input maps.
            tree (Tree, optional): forest over the ``B * H * W`` pixels (ids
                ``b * H * W + i * W + j``) to scan instead of building one. (default: ``None``)
            return_tree (bool): also return the tree that was used, e.g. to share it with
                later layers. (default: ``False``)

        Returns:
            Tensor [B, H, W, d_model], or ``(Tensor, Tree)`` with ``return_tree``.

        Raises:
            ValueError: if ``x`` is not a ``[B, H, W, d_model]`` tensor, or ``tree`` is not
                over its ``B * H * W`` pixels.
        """
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != self.d_model:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a [B, H, W, {self.d_model}] channels-last tensor, "
                             f"got {shape}")
        bsz, height, width, _ = x.shape
        n = bsz * height * width
        if tree is not None:
            if not isinstance(tree, Tree):
                raise TypeError(f"tree must be a treessm.Tree, got {type(tree).__name__}")
            if tree.num_nodes != n:
                raise ValueError(f"tree must span the B * H * W = {n} pixels of x, got "
                                 f"{tree.num_nodes} vertices")
        if n == 0:  # no pixel (B, H or W is 0): an empty map, connected to the parameters
            out = self.out_proj(self.in_proj(x)[..., :self.d_inner])
            return (out, empty_forest(x.device) if tree is None else tree) if return_tree else out
        u, z = self.project_in(x)
        if tree is None:
            tree = self.scan_tree(u)
        y = self.selective_scan(u.reshape(n, self.d_inner), tree)
        out = self.project_out(y, z.reshape(n, self.d_inner)).view(bsz, height, width, -1)
        return (out, tree) if return_tree else out

    def extra_repr(self) -> str:
        return (f"{self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"dt_rank={self.dt_rank}, d_conv={self.d_conv}, scan={self.scan!r}")
