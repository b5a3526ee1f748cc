r"""Row-wise operators of the tree-SSM layers, each one pass over the rows each way on the
CPU and on CUDA.

* :func:`silu_mix`: the local mixing of :class:`treessm.nn.TreeSSMConv`,
  :math:`\mathrm{SiLU}(a \odot u + b \odot m)` for rows ``u``, ``m`` ``[N, C]`` and
  per-channel weights ``a``, ``b`` ``[C]``;
* :func:`norm_gate`: the output gate of the selective tree SSMs,
  :math:`\mathrm{LN}(y) \odot \mathrm{SiLU}(z)` (a LayerNorm over the ``C`` channels of
  each row, with its affine ``w``, ``b``).

On the CPU (float32, float64) the forward and the backward of each run as one numba pass
over the rows: the forward writes its output only, and the backward recomputes what the
forward formed (the pre-activation; the row's mean and deviation) instead of keeping it,
where torch's compositions write several fresh ``[N, C]`` arrays each way (on one thread
at ``[10^5, 128]`` most of their time is the page faults of those arrays). Sums over a
row's channels are vectorised reductions, in the one order of the compiled code; sums over
the rows (the gradients of the per-channel parameters) run in fixed chunks of
:data:`CHUNK_ROWS` rows, in row order within a chunk and over the chunks in order: the
same bits with any number of threads. The threads share whole chunks, forward and
backward, so fewer rows than a chunk run on the calling thread alone: split finer, the
handoffs and the kernel calls cost more than such rows take (``TreeSSMConv(64, 64)``'s
training step with two threads, two processes each: 4.5-4.7 -> 4.0-4.1 ms on 100
vertices, 20.8-20.9 -> 19.0-19.9 ms on 2,708, unchanged on 10^4). On CUDA the extension's
kernels do the same (``torch.ops.treessm.cuda_silu_mix``, ``cuda_norm_gate`` and their
backwards: a warp a row, the sums over rows in fixed per-block partial sums added in order,
so the same bits on every run), for rows of at most :data:`CUDA_MAX_ROW_BYTES` bytes
(1,536 float32 channels), where torch's compositions launch three kernels forward and about
ten backward. Elsewhere the torch compositions that define the operators
(:func:`silu_mix_reference`, :func:`norm_gate_reference`) run, keeping only their inputs
for the backward on large arrays (:mod:`treessm.ops.recompute`): the gate's composition
would keep four ``[N, C]`` arrays, the mixing's three, where the inputs are two.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from torch import Tensor

from ..typing import cuda_extension_available
from . import cpu_arrays, recompute
from .chunks import run_chunks
from .cpu_arrays import CHUNK_ROWS
from .selective_scan_cpu import _cast, _dot, _exp, _np, _opaque

__all__ = ["silu_mix", "silu_mix_reference", "norm_gate", "norm_gate_reference",
           "runs_on_kernels", "CHUNK_ROWS", "CUDA_MAX_ROW_BYTES"]

#: Bytes of a row (channels times the element size) up to which the CUDA kernels run: each
#: warp keeps two columns of partial sums of a row's width in shared memory.
CUDA_MAX_ROW_BYTES = 6144

U = np.uint64


def silu_mix_reference(u: Tensor, m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\mathrm{SiLU}(a \odot u + b \odot m)` in torch operators (any device, any
    dtype, autograd through them)."""
    return F.silu(torch.addcmul(a * u, b, m))


def norm_gate_reference(y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float
                        ) -> Tensor:
    r""":math:`\mathrm{LN}(y) \odot \mathrm{SiLU}(z)` in torch operators: the LayerNorm over
    the last dimension of ``y`` with the affine ``weight``, ``bias`` (in the dtype of ``y``)."""
    normed = F.layer_norm(y, y.shape[-1:], weight.to(y.dtype), bias.to(y.dtype), eps)
    return normed * F.silu(z)


# ---------------------------------------------------------------------------- kernels
# Rows are flat with unsigned offsets, the row index hidden from the optimiser (_opaque) and
# the division unchecked (error_model "numpy"): the loops over a row's channels vectorise.
@njit(inline="always")
def _rows_of(c0, c1, n):
    # the rows [r0, r1) of the chunks [c0, c1)
    rows = U(CHUNK_ROWS)
    return U(c0) * rows, min(U(c1) * rows, U(n))


@njit(inline="always")
def _chunk(k, n, pa, pb):
    # the rows [i0, i1) of chunk k, and its rows of the two partial sums, zeroed
    pa[k, :] = 0
    pb[k, :] = 0
    i0, i1 = _rows_of(k, k + U(1), n)
    return i0, i1, pa[k], pb[k]


@njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
def _mix_chunks(c0, c1, u2, m2, a, b, y2):
    c = U(u2.shape[1])
    u, m, y = u2.reshape(-1), m2.reshape(-1), y2.reshape(-1)
    one = _cast(a, 1)
    i0, i1 = _rows_of(c0, c1, u2.shape[0])
    for i in range(i0, i1):
        o = _opaque(i) * c
        for j in range(c):
            t = a[j] * u[o + j] + b[j] * m[o + j]
            y[o + j] = t / (one + _exp(-t))


@njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
def _mix_grad_chunks(c0, c1, g2, u2, m2, a, b, gu2, gm2, pa, pb):
    # chunk k: rows [k CHUNK_ROWS, (k + 1) CHUNK_ROWS); its sums into pa[k], pb[k]
    n, c = U(u2.shape[0]), U(u2.shape[1])
    u, m, g, gu, gm = u2.reshape(-1), m2.reshape(-1), g2.reshape(-1), gu2.reshape(-1), \
        gm2.reshape(-1)
    one = _cast(a, 1)
    for k in range(U(c0), U(c1)):
        i0, i1, sa, sb = _chunk(k, n, pa, pb)
        for i in range(i0, i1):
            o = _opaque(i) * c
            for j in range(c):
                uj, mj = u[o + j], m[o + j]
                t = a[j] * uj + b[j] * mj
                s = one / (one + _exp(-t))
                gt = g[o + j] * (s * (one + t * (one - s)))  # d SiLU(t) / dt = s (1 + t (1 - s))
                gu[o + j] = gt * a[j]
                gm[o + j] = gt * b[j]
                sa[j] += gt * uj
                sb[j] += gt * mj


@njit(inline="always")
def _row_moments(y, o, c, ones, dev, inv_c, eps):
    # the row's deviations from its mean into dev, and 1 / sqrt(variance + eps)
    mean = _dot(y[o:], ones, c) * inv_c
    for j in range(c):
        dev[j] = y[o + j] - mean
    return 1 / math.sqrt(_dot(dev, dev, c) * inv_c + eps)


@njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
def _gate_chunks(c0, c1, y2, z2, w, b, eps, out2):
    c = U(y2.shape[1])
    y, z, out = y2.reshape(-1), z2.reshape(-1), out2.reshape(-1)
    one = _cast(w, 1)
    inv_c = one / _cast(w, c)
    ones, dev = np.ones(c, w.dtype), np.empty(c, w.dtype)
    i0, i1 = _rows_of(c0, c1, y2.shape[0])
    for i in range(i0, i1):
        o = _opaque(i) * c
        r = _cast(w, _row_moments(y, o, c, ones, dev, inv_c, eps))
        for j in range(c):
            zj = z[o + j]
            out[o + j] = (dev[j] * r * w[j] + b[j]) * (zj / (one + _exp(-zj)))


@njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
def _gate_grad_chunks(c0, c1, g2, y2, z2, w, b, eps, gy2, gz2, pw, pb):
    n, c = U(y2.shape[0]), U(y2.shape[1])
    y, z, g, gy, gz = y2.reshape(-1), z2.reshape(-1), g2.reshape(-1), gy2.reshape(-1), \
        gz2.reshape(-1)
    one = _cast(w, 1)
    inv_c = one / _cast(w, c)
    ones, dev = np.ones(c, w.dtype), np.empty(c, w.dtype)
    gn = np.empty(c, w.dtype)
    for k in range(U(c0), U(c1)):
        i0, i1, sw, sb = _chunk(k, n, pw, pb)
        for i in range(i0, i1):
            o = _opaque(i) * c
            r = _cast(w, _row_moments(y, o, c, ones, dev, inv_c, eps))
            # (three short loops rather than one: each vectorises with few arrays to check)
            for j in range(c):
                nj = dev[j] * r  # the normalised value, kept in dev
                zj = z[o + j]
                s = one / (one + _exp(-zj))
                gz[o + j] = g[o + j] * (nj * w[j] + b[j]) * (s * (one + zj * (one - s)))
                gn[j] = g[o + j] * (zj * s)  # dL / d LN(y)
                dev[j] = nj
            for j in range(c):
                sw[j] += gn[j] * dev[j]
                sb[j] += gn[j]
            for j in range(c):
                gn[j] *= w[j]  # dL / d normalised
            m1 = _dot(gn, ones, c) * inv_c
            m2 = _dot(gn, dev, c) * inv_c
            for j in range(c):
                gy[o + j] = r * ((gn[j] - m1) - dev[j] * m2)


def _empty_rows(like: Tensor) -> Tensor:
    """An uninitialised CPU tensor of ``like``'s shape and dtype, from
    :func:`treessm.ops.cpu_arrays.empty` (on a cache line; huge pages when large)."""
    return torch.from_numpy(cpu_arrays.empty(tuple(like.shape), _np(like).dtype))


def _mix_cpu(u: Tensor, m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    y = _empty_rows(u)
    run_chunks(_mix_chunks, -(-u.shape[0] // CHUNK_ROWS), _np(u), _np(m), _np(a), _np(b),
               y.numpy())
    return y


def _chunked(n: int, c: int, dt, count: int):
    """The number of row chunks and ``count`` arrays of per-chunk partial sums ``[chunks,
    c]`` (one row of zeros when there is no row)."""
    chunks = -(-n // CHUNK_ROWS)
    return chunks, [np.zeros((max(chunks, 1), c), dt) for _ in range(count)]


def _over_chunks(p: np.ndarray) -> Tensor:
    """The partial sums ``[chunks, c]`` added over the chunks in order."""
    return torch.from_numpy(cpu_arrays.sum_rows_in_order(p))


def _mix_grad_cpu(g: Tensor, u: Tensor, m: Tensor, a: Tensor, b: Tensor
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    n, c = u.shape
    dt = _np(a).dtype
    chunks, (pa, pb) = _chunked(n, c, dt, 2)
    gu, gm = _empty_rows(u), _empty_rows(m)
    run_chunks(_mix_grad_chunks, chunks, _np(g), _np(u), _np(m), _np(a), _np(b), gu.numpy(),
               gm.numpy(), pa, pb)
    return gu, gm, _over_chunks(pa), _over_chunks(pb)


def _gate_cpu(y: Tensor, z: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    dt = _np(w).dtype
    out = _empty_rows(y)
    run_chunks(_gate_chunks, -(-y.shape[0] // CHUNK_ROWS), _np(y), _np(z), _np(w), _np(b),
               dt.type(eps), out.numpy())
    return out


def _gate_grad_cpu(g: Tensor, y: Tensor, z: Tensor, w: Tensor, b: Tensor, eps: float
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    n, c = y.shape
    dt = _np(w).dtype
    chunks, (pw, pb) = _chunked(n, c, dt, 2)
    gy, gz = _empty_rows(y), _empty_rows(z)
    run_chunks(_gate_grad_chunks, chunks, _np(g), _np(y), _np(z), _np(w), _np(b), dt.type(eps),
               gy.numpy(), gz.numpy(), pw, pb)
    return gy, gz, _over_chunks(pw), _over_chunks(pb)


# ---------------------------------------------------------------------------- operators
@torch.library.custom_op("treessm::silu_mix", mutates_args=())
def _silu_mix_op(u: Tensor, m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return _mix_cpu(u, m, a, b)


@_silu_mix_op.register_fake
def _(u, m, a, b):
    return torch.empty_like(u)


@torch.library.custom_op("treessm::silu_mix_backward", mutates_args=())
def _silu_mix_backward_op(g: Tensor, u: Tensor, m: Tensor, a: Tensor, b: Tensor
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _mix_grad_cpu(g, u, m, a, b)


@_silu_mix_backward_op.register_fake
def _(g, u, m, a, b):
    return torch.empty_like(u), torch.empty_like(m), torch.empty_like(a), torch.empty_like(b)


def _mix_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mix_backward(ctx, g):
    u, m, a, b = ctx.saved_tensors
    return torch.ops.treessm.silu_mix_backward(g.contiguous(), u, m, a, b)


_silu_mix_op.register_autograd(_mix_backward, setup_context=_mix_setup_context)


@_silu_mix_op.register_kernel("cuda")
def _(u, m, a, b):
    return torch.ops.treessm.cuda_silu_mix(u, m, a, b)


@_silu_mix_backward_op.register_kernel("cuda")
def _(g, u, m, a, b):
    return torch.ops.treessm.cuda_silu_mix_backward(g, u, m, a, b)


def runs_on_kernels(x: Tensor, other: Tensor, *params: Tensor) -> bool:
    """Whether :func:`silu_mix` and :func:`norm_gate` run their kernels for the rows ``x``,
    ``other`` and the per-channel ``params``: float32 or float64 matrices of one shape, and
    vectors of their channels, all of one dtype on one device, the CPU or, with the
    extension loaded, a CUDA device (rows of at most :data:`CUDA_MAX_ROW_BYTES` bytes). A
    layer that calls them under a recorded gradient calls them without one too, so that its
    outputs have the same bits either way."""
    if not (x.dtype in (torch.float32, torch.float64) and x.dim() == 2
            and other.device == x.device and other.dtype == x.dtype
            and other.shape == x.shape
            and all(p.dtype == x.dtype and p.device == x.device and p.shape == x.shape[1:]
                    for p in params)):
        return False
    if x.device.type == "cpu":
        return True
    return (x.is_cuda and 1 <= x.shape[1] * x.element_size() <= CUDA_MAX_ROW_BYTES
            and x.is_contiguous() and other.is_contiguous()
            and all(p.is_contiguous() for p in params) and cuda_extension_available())


def silu_mix(u: Tensor, m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\mathrm{SiLU}(a \odot u + b \odot m)`, ``u, m [N, C]``, ``a, b [C]``: one
    pass over the rows forward and one backward on the CPU and on CUDA (float32 or float64,
    all four of one dtype: :func:`runs_on_kernels`); :func:`silu_mix_reference` elsewhere.
    Gradients flow to all four."""
    if runs_on_kernels(u, m, a, b):
        return _silu_mix_op(u, m, a, b)
    if recompute.keeps_less(u, m, a, b):
        return recompute.recomputed(silu_mix_reference, u, m, a, b)
    return silu_mix_reference(u, m, a, b)


@torch.library.custom_op("treessm::norm_gate", mutates_args=())
def _norm_gate_op(y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return _gate_cpu(y, z, weight, bias, eps)


@_norm_gate_op.register_fake
def _(y, z, weight, bias, eps):
    return torch.empty_like(y)


@torch.library.custom_op("treessm::norm_gate_backward", mutates_args=())
def _norm_gate_backward_op(g: Tensor, y: Tensor, z: Tensor, weight: Tensor, bias: Tensor,
                           eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _gate_grad_cpu(g, y, z, weight, bias, eps)


@_norm_gate_backward_op.register_fake
def _(g, y, z, weight, bias, eps):
    return (torch.empty_like(y), torch.empty_like(z), torch.empty_like(weight),
            torch.empty_like(bias))


def _gate_setup_context(ctx, inputs, output):
    y, z, weight, bias, eps = inputs
    ctx.save_for_backward(y, z, weight, bias)
    ctx.eps = eps


def _gate_backward(ctx, g):
    y, z, weight, bias = ctx.saved_tensors
    return torch.ops.treessm.norm_gate_backward(g.contiguous(), y, z, weight, bias,
                                                ctx.eps) + (None,)


_norm_gate_op.register_autograd(_gate_backward, setup_context=_gate_setup_context)


@_norm_gate_op.register_kernel("cuda")
def _(y, z, weight, bias, eps):
    return torch.ops.treessm.cuda_norm_gate(y, z, weight, bias, eps)


@_norm_gate_backward_op.register_kernel("cuda")
def _(g, y, z, weight, bias, eps):
    return torch.ops.treessm.cuda_norm_gate_backward(g, y, z, weight, bias, eps)


def norm_gate(y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    r""":math:`\mathrm{LN}(y) \odot \mathrm{SiLU}(z)`, ``y, z [N, C]``, the LayerNorm's
    affine ``weight, bias [C]`` and ``eps``: one pass over the rows forward and one backward
    on the CPU and on CUDA (float32 or float64, all four of one dtype:
    :func:`runs_on_kernels`); :func:`norm_gate_reference` elsewhere. Gradients flow to all
    four tensors."""
    if runs_on_kernels(y, z, weight, bias):
        return _norm_gate_op(y, z, weight, bias, float(eps))
    if recompute.keeps_less(y, z, weight, bias):
        return recompute.recomputed(norm_gate_reference, y, z, weight, bias, eps)
    return norm_gate_reference(y, z, weight, bias, eps)
