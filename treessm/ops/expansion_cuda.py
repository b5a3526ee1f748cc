"""The expanded selective tree scan on CUDA: the problems the fused walk does not run
(``"both"``, the state normalisation, ``d_state`` above 16; with ``d_state`` at least 2)
in blocks of channels, each block's state expansion formed, scanned by
:func:`treessm.tree_scan`'s CUDA kernels and read out by the kernels of
``extensions/treessm_cuda/expansion_kernels.cuh``, one pass over the block's ``[N, W, S]``
rows each; the backward recomputes a block's states (keeping the parts of a ``"both"``
scan, so that the scan's backward does not scan them again) and reduces its gradients the
same way. Only one block's expansion is held at a time, in the forward and in the
backward; nothing of it is kept between them.

:class:`ExpandedScan` returns the read-out before the normalisation, ``y1 = sum_s C g h``
(``g`` the normalisation's weight, or 1), and the mean and squared deviations of each
vertex's ``D * S`` states (the blocks' moments combined in order by
:func:`combined_moments`); :mod:`treessm.ops.selective_scan` forms the output from them.
The values and gradients are the same bits on every run.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..tree import Tree
from ..typing import load_cuda_extension
from . import cuda
from .plan import scan_plan

__all__ = ["ExpandedScan", "combined_moments", "block_width", "MAX_ROW_BYTES"]

#: Bytes of one vertex's states in a block that the kernels take at most (the per-warp
#: column sums of the parameters' gradients live in shared memory):
#: ``expansion_kernels.cuh``, ``kMaxColumnBytes``.
MAX_ROW_BYTES = 8192


def block_width(width: int, d_state: int, dtype: torch.dtype) -> int:
    """Channels of a block: ``width`` at most, and at most :data:`MAX_ROW_BYTES` of states
    a vertex; 0 when not even one channel fits."""
    return min(width, MAX_ROW_BYTES // (d_state * dtype.itemsize))


def combined_moments(parts: Sequence[Tuple[int, Tensor, Tensor]], total: int
                     ) -> Tuple[Tensor, Tensor]:
    """The mean and squared deviations of each row over all its columns from those of
    column blocks ``(columns, mean, m2)``, combined in order (Chan's formula): the mean of
    the means weighted by the blocks' sizes; the squared deviations within the blocks plus
    those of the block means about it."""
    mu = sum(mean * (k / total) for k, mean, _ in parts)
    m2 = sum(m2 for _, _, m2 in parts) + sum(k * (mean - mu).square() for k, mean, _ in parts)
    return mu, m2


def _kernels():
    """The extension's operators (``torch.ops.treessm``), loaded."""
    load_cuda_extension()
    return torch.ops.treessm


def _blocks(d: int, width: int) -> List[Tuple[int, int]]:
    return [(c0, min(width, d - c0)) for c0 in range(0, d, width)]


def _scan(x: Tensor, w: Tensor, tree: Tree, direction: str):
    """``(h, parts)``: the scan of a block as a list of one or two tensors whose sum it is
    (the kernels read the two parts of ``"both"`` under the tiled schedule without a pass
    adding them) and what :func:`_scan_backward` takes from it
    (:func:`treessm.ops.cuda.forward_with_parts`)."""
    if tree.num_trees == tree.num_nodes:  # no edge: every direction gives h = x
        return [x], None
    return cuda.forward_with_parts(x, w, scan_plan(tree, x.shape[1], x.dtype), direction)


def _scan_backward(gh: Tensor, x: Optional[Tensor], w: Tensor, h: Tensor, parts, tree: Tree,
                   direction: str) -> Tuple[List[Tensor], Tensor]:
    """``(gx, gw)``, ``gx`` a list of addends as :func:`_scan` gives ``h``."""
    if tree.num_trees == tree.num_nodes:
        return [gh], torch.zeros_like(w)
    return cuda.backward_from_parts(gh, x, w, h, parts, scan_plan(tree, w.shape[1], w.dtype),
                                    direction)


def _second(addends: List[Tensor]) -> Optional[Tensor]:
    return addends[1] if len(addends) > 1 else None


class ExpandedScan(torch.autograd.Function):
    """``(y1 [N, D], mu [N], m2 [N])`` of the selective scan of ``u``, with the vertex steps
    ``dx`` and edge steps ``de`` (``[N, D]``, bias and softplus applied), ``A [D, S]``,
    ``B, C [N, S]``, the normalisation's weight ``g [D, S]`` (or ``None``), over ``tree``
    in ``direction``, ``width`` channels a block (:func:`block_width`); ``mu`` and ``m2``
    are empty without ``moments``. All tensors contiguous, float32 or float64, on one CUDA
    device."""

    @staticmethod
    def forward(ctx, u: Tensor, dx: Tensor, de: Tensor, A: Tensor, B: Tensor, C: Tensor,
                g: Optional[Tensor], tree: Tree, direction: str, width: int, moments: bool):
        n, d = u.shape
        s = A.shape[1]
        y1 = u.new_empty(n, d)
        parts = []
        for c0, wb in _blocks(d, width):
            x, w = _kernels().cuda_selective_expand(u, dx, de, A, B, c0, wb)
            h = _scan(x, w, tree, direction)[0]  # its parts are not kept
            del x, w
            gb = None if g is None else g[c0:c0 + wb]
            mean, m2 = _kernels().cuda_selective_readout(h[0], _second(h), C, gb, c0, moments,
                                                         y1)
            del h
            parts.append((wb * s, mean, m2))
        mu, m2 = combined_moments(parts, d * s) if moments else (u.new_empty(0), u.new_empty(0))
        ctx.save_for_backward(u, dx, de, A, B, C, g, mu)
        ctx.args = (tree, direction, width, moments)
        return y1, mu, m2

    @staticmethod
    @once_differentiable
    def backward(ctx, gy1: Tensor, gmu: Tensor, gm2: Tensor):
        u, dx, de, A, B, C, g, mu = ctx.saved_tensors
        tree, direction, width, moments = ctx.args
        n, d = u.shape
        s = A.shape[1]
        gy1 = gy1.contiguous()
        share_mean = share_m2 = None
        if moments:  # per state: d mu / d h = 1 / (D S); d m2 / d h = 2 (h - mu)
            share_mean = (gmu / (d * s)).contiguous()
            share_m2 = (2 * gm2).contiguous()
        gu, gdx, ge = (torch.empty_like(u) for _ in range(3))
        gA = torch.empty_like(A)
        # written by the first block, added to by the others (zeros without a channel)
        gB, gC = (torch.empty_like(t) if d else torch.zeros_like(t) for t in (B, C))
        gg = None if g is None else torch.empty_like(g)
        for i, (c0, wb) in enumerate(_blocks(d, width)):
            x, w = _kernels().cuda_selective_expand(u, dx, de, A, B, c0, wb)
            h, parts = _scan(x, w, tree, direction)
            if parts is not None:  # the backward reads the parts instead of x
                x = None
            gb = None if g is None else g[c0:c0 + wb]
            gh, ggb = _kernels().cuda_selective_readout_backward(
                gy1, share_mean, share_m2, mu if moments else None, h[0], _second(h), C, gb, c0,
                i > 0, gC)
            # h[0] is what the scan's backward takes as its output where there are no parts
            gx, gw = _scan_backward(gh, x, w, h[0], parts, tree, direction)
            del gh, h, x, w, parts
            gA[c0:c0 + wb] = _kernels().cuda_selective_expand_backward(
                gx[0], _second(gx), gw, u, dx, de, A, B, c0, i > 0, gu, gdx, ge, gB)
            if gg is not None:
                gg[c0:c0 + wb] = ggb
        return gu, gdx, ge, gA, gB, gC, gg, None, None, None, None
