r"""The local mixing of :class:`treessm.nn.TreeSSMConv` as one operator:
:math:`y = \mathrm{SiLU}(a \odot u + b \odot m)` for rows ``u``, ``m`` ``[N, C]`` and
per-channel weights ``a``, ``b`` ``[C]``.

On the CPU (float32, float64) the forward and the backward each run as one numba pass over
the rows: the forward writes ``y`` only, and the backward recomputes the pre-activation
instead of keeping it, where torch's composition writes three ``[N, C]`` arrays forward and
five backward (on one thread at ``[10^5, 128]``, most of their time is the page faults of
those fresh arrays). The sums over the rows (the gradients of ``a`` and ``b``) run in fixed
chunks of :data:`CHUNK_ROWS` rows, in row order within a chunk and over the chunks in
order: the same bits with any number of threads. Elsewhere :func:`silu_mix_reference`, the
torch composition that defines the operator, runs.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from torch import Tensor

from .chunks import run_chunks
from .selective_scan_cpu import _cast, _exp, _opaque

__all__ = ["silu_mix", "silu_mix_reference", "CHUNK_ROWS"]

#: Rows of one partial sum of the weights' gradients (a fixed split: the sums do not depend
#: on the number of threads).
CHUNK_ROWS = 4096

U = np.uint64


def silu_mix_reference(u: Tensor, m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\mathrm{SiLU}(a \odot u + b \odot m)` in torch operators (any device, any
    dtype, autograd through them)."""
    return F.silu(torch.addcmul(a * u, b, m))


# ---------------------------------------------------------------------------- kernels
# Rows are flat with unsigned offsets, the row index hidden from the optimiser (_opaque) and
# the division unchecked (error_model "numpy"): the loops over a row's channels vectorise.
@njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
def _forward_rows(i0, i1, u2, m2, a, b, y2):
    c = U(u2.shape[1])
    u, m, y = u2.reshape(-1), m2.reshape(-1), y2.reshape(-1)
    one = _cast(a, 1)
    for i in range(U(i0), U(i1)):
        o = _opaque(i) * c
        for j in range(c):
            t = a[j] * u[o + j] + b[j] * m[o + j]
            y[o + j] = t / (one + _exp(-t))


@njit(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
def _backward_chunks(c0, c1, g2, u2, m2, a, b, gu2, gm2, pa, pb):
    # chunk k: rows [k CHUNK_ROWS, (k + 1) CHUNK_ROWS); its sums into pa[k], pb[k]
    n, c = U(u2.shape[0]), U(u2.shape[1])
    u, m, g, gu, gm = u2.reshape(-1), m2.reshape(-1), g2.reshape(-1), gu2.reshape(-1), \
        gm2.reshape(-1)
    one = _cast(a, 1)
    rows = U(CHUNK_ROWS)
    for k in range(U(c0), U(c1)):
        sa, sb = pa[k], pb[k]
        for j in range(c):
            sa[j] = 0
            sb[j] = 0
        for i in range(k * rows, min((k + U(1)) * rows, n)):
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


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _forward_cpu(u: Tensor, m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    y = np.empty(tuple(u.shape), _np(a).dtype)
    run_chunks(_forward_rows, u.shape[0], _np(u), _np(m), _np(a), _np(b), y)
    return torch.from_numpy(y)


def _backward_cpu(g: Tensor, u: Tensor, m: Tensor, a: Tensor, b: Tensor
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    n, c = u.shape
    dt = _np(a).dtype
    chunks = -(-n // CHUNK_ROWS)
    gu, gm = np.empty((n, c), dt), np.empty((n, c), dt)
    pa, pb = np.zeros((max(chunks, 1), c), dt), np.zeros((max(chunks, 1), c), dt)
    run_chunks(_backward_chunks, chunks, _np(g), _np(u), _np(m), _np(a), _np(b), gu, gm, pa, pb)
    ga, gb = pa[0].copy(), pb[0].copy()
    for k in range(1, chunks):  # over the chunks in order
        ga += pa[k]
        gb += pb[k]
    t = torch.from_numpy
    return t(gu), t(gm), t(ga), t(gb)


# ---------------------------------------------------------------------------- operators
@torch.library.custom_op("treessm::silu_mix", mutates_args=())
def _silu_mix_op(u: Tensor, m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return _forward_cpu(u, m, a, b)


@_silu_mix_op.register_fake
def _(u, m, a, b):
    return torch.empty_like(u)


@torch.library.custom_op("treessm::silu_mix_backward", mutates_args=())
def _silu_mix_backward_op(g: Tensor, u: Tensor, m: Tensor, a: Tensor, b: Tensor
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward_cpu(g, u, m, a, b)


@_silu_mix_backward_op.register_fake
def _(g, u, m, a, b):
    return torch.empty_like(u), torch.empty_like(m), torch.empty_like(a), torch.empty_like(b)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, g):
    u, m, a, b = ctx.saved_tensors
    return torch.ops.treessm.silu_mix_backward(g.contiguous(), u, m, a, b)


_silu_mix_op.register_autograd(_backward, setup_context=_setup_context)


def silu_mix(u: Tensor, m: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\mathrm{SiLU}(a \odot u + b \odot m)`, ``u, m [N, C]``, ``a, b [C]``: one
    pass over the rows forward and one backward on the CPU (float32 or float64, all four of
    one dtype); :func:`silu_mix_reference` elsewhere. Gradients flow to all four."""
    if (u.device.type == "cpu" and u.dtype in (torch.float32, torch.float64) and u.dim() == 2
            and all(t.dtype == u.dtype and t.device == u.device for t in (m, a, b))
            and m.shape == u.shape and a.shape == b.shape == u.shape[1:]):
        return _silu_mix_op(u, m, a, b)
    return silu_mix_reference(u, m, a, b)
