"""Numba CPU kernels of the fused selective tree scan (:mod:`treessm.ops.selective_scan`).

The kernels compute, per vertex ``v`` and inner channel ``d``,

* ``y[v, d] = sum_s C[v, s] g[d, s] h[v, d, s]`` where ``h[:, d, s]`` is the tree scan of
  ``x = dx * u * B`` with edge weights ``w = exp(de * A[d, s])`` (``g = 1`` without a
  read-out weight),
* optionally the mean and the sum of squared deviations of ``h[v, d, :]`` over the states
  (Welford's update, state by state), from which the caller forms a normalisation over all
  the states of a vertex, and ``h`` at requested vertices,

and the gradients of all of it, without ever holding ``h`` for all vertices and states.

Layout. The inputs are first copied into *breadth-first position order* and cut into blocks
of ``W`` channels (one 64-byte cache line: 16 float32 or 8 float64), the last one padded
with inert channels (``u = dx = de = A = 0``). A work item is one block of channels over one
group of whole trees; inside it the states are taken in chunks of ``Sb``, and for each chunk
the passes below run over the group's trees with the ``Sb * W`` lanes of a vertex as the
vectorised inner loop. Each thread owns a scratch buffer of a few ``[group size, Sb * W]``
arrays, reused from item to item: that and ``[N, D]`` / ``[N, S]`` arrays are all the
kernels allocate.

Passes (``docs/concepts.md``), in breadth-first positions, roots first or leaves first:

* ``down``: ``h[v] = x[v] + w[v] h[p]`` (and ``w[r] h0`` at a root ``r`` with an incoming
  state); backward: ``G = up(g_h)`` leaves first, ``dL/dw[v] = G[v] h[p]``, over the
  recomputed states;
* ``up``: ``h[v] = x[v] + sum_c w[c] h[c]``; backward: ``G = down(g_h)``,
  ``dL/dw[v] = h[v] G[p]``;
* ``both``: ``up``, then ``out[v] = w[v] (out[p] + x[p] + sum of w[s] up[s] over v's
  siblings s)`` with the sibling sums formed from prefix and suffix sums over the parent's
  children (never a total minus one's own term), ``h = up + out``; backward (self-adjoint):
  the same two passes over ``g_h``, and ``dL/dw[v] = up_x[v] Br_g[v] + up_g[v] Br_x[v]``
  with ``Br`` the bracket that ``out[v]`` multiplies by ``w[v]``.

Every sum runs in a fixed order, every output element is written by one work item, and the
work split does not depend on the number of threads: results are bitwise reproducible, with
any number of threads. Reductions over channels (the gradients of ``B`` and ``C``) add the
16 or 8 lanes of a block in a fixed pairwise tree and the blocks in ascending order;
reductions over vertices (``A``, ``g``) run in position order inside a group of trees and
over the groups in ascending order.
"""
from __future__ import annotations

import math
from collections import namedtuple
from typing import Optional, Tuple

import numpy as np
import torch
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.extending import intrinsic, overload

__all__ = ["forward", "backward"]

_LINE = 64  # bytes per cache line: channels per block
_MAX_LANES = 64  # states x channels of a block held per vertex and buffer
_MODES = {"both": 0, "up": 1, "down": 2}
_GROUP_MIN = 1024  # vertices: smallest group of whole trees made one work item
_GROUPS_PER_RUN = 64  # aim: this many groups when the forest has many trees

U = np.uint64


# ---------------------------------------------------------------------------- exp
@intrinsic
def _int_bits_as_f32(typingctx, i):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(inline="always")
def _exp_f32(x):
    # exp(x) = 2^k exp(r), r = x - k ln 2 in two parts (Cody-Waite), exp(r) by its
    # minimax polynomial (Cephes' expf): within 1 ulp of the correctly rounded result.
    # Straight-line code, so loops over lanes vectorise (numba's math.exp does not).
    # Below -87.33 (where float32 turns subnormal) the result is 0, above 88.72 inf.
    k = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - k * np.float32(0.693359375)
    r = r - k * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    e = p * r * r + r + np.float32(1.0)
    ki = np.int32(min(max(k, np.float32(-126.0)), np.float32(127.0)))
    e = e * _int_bits_as_f32((ki + np.int32(127)) << np.int32(23))
    e = np.float32(0.0) if x < np.float32(-87.33654) else e
    return np.float32(np.inf) if x > np.float32(88.72283) else e


def _exp(x):  # typed by the overload below
    return math.exp(x)


@overload(_exp)
def _exp_overload(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: math.exp(x)


# ---------------------------------------------------------------------------- argument bundles
# Built inside the parallel drivers (numba drops writes through tuples that a parallel
# function receives as arguments) and handed to the per-item functions.
_Dims = namedtuple("_Dims", "N S W Sb L nblk T K maxn mode has_gamma has_h0 moments "
                            "has_gstates")
_Inputs = namedtuple("_Inputs", "ub dxb deb ab bp cp gb h0b counts")
_Layout = namedtuple("_Layout", "ppos child_ptr tree_ptr groups srow snext")
_Outputs = namedtuple("_Outputs", "y1b meanb m2b statesb")
_GradIn = namedtuple("_GradIn", "gy1b gmeanb gm2b gstatesb meanb")
_Grads = namedtuple("_Grads", "gxb gdeb gbp gcp gap ggp gh0b")

_NUM_BUFFERS = 5  # [group size, Sb * W] rows per thread (the backward of "both")
_NUM_TEMPS = 8  # lane rows of temporaries after them


@njit(inline="always")
def _dims(dims):
    return _Dims(U(dims[0]), U(dims[1]), U(dims[2]), U(dims[3]), U(dims[2] * dims[3]),
                 U(dims[4]), U(dims[5]), U(dims[6]), U(dims[7]), dims[8], dims[9] != 0,
                 dims[10] != 0, dims[11] != 0, dims[12] != 0)


# ---------------------------------------------------------------------------- lane helpers
# Offsets are unsigned: signed indices make numba test each for wrap-around, which keeps
# the lane loops from vectorising. A vertex's chunk holds ``sb * W`` lanes, state-major
# (lane ``sl * W + dd`` is state ``s0 + sl`` of channel ``blk * W + dd``); its row in a
# buffer starts at ``(position - first position of the group) * L``.

@njit(inline="always")
def _x(dst, do, inp, d, iu, ib, sb):
    # x = (dx u) B
    W = d.W
    for sl in range(sb):
        bs = inp.bp[ib + sl]
        o = do + sl * W
        for dd in range(W):
            dst[o + dd] = inp.dxb[iu + dd] * inp.ub[iu + dd] * bs


@njit(inline="always")
def _w(dst, do, inp, d, iu, ia, sb):
    # w = exp(de A)
    W = d.W
    for sl in range(sb):
        o = sl * W
        for dd in range(W):
            dst[do + o + dd] = _exp(inp.deb[iu + dd] * inp.ab[ia + o + dd])


@njit(inline="always")
def _fill(dst, do, n, value):
    for l in range(n):
        dst[do + l] = value


@njit(inline="always")
def _lane_sum(t, to, W):
    # the W lanes of t[to:] added in a fixed pairwise tree (overwrites them)
    half = W >> U(1)
    while half > U(0):
        for l in range(half):
            t[to + l] += t[to + half + l]
        half >>= U(1)
    return t[to]


@njit(inline="always")
def _offsets(d, blk, i, s0):
    # start of position i's channel block, of its states, of the chunk's (A, g) lanes
    return (blk * d.N + U(i)) * d.W, U(i) * d.S + s0, (blk * d.S + s0) * d.W


@njit(inline="always")
def _emit(h, oh, i, blk, s0, sb, inp, lay, out, d):
    """Read the states ``h[oh:]`` of position ``i`` out: y, moments, requested states."""
    W = d.W
    iu, ib, ia = _offsets(d, blk, i, s0)
    for sl in range(sb):
        c = inp.cp[ib + sl]
        o = sl * W
        if d.has_gamma:
            for dd in range(W):
                out.y1b[iu + dd] += c * inp.gb[ia + o + dd] * h[oh + o + dd]
        else:
            for dd in range(W):
                out.y1b[iu + dd] += c * h[oh + o + dd]
    if d.moments:  # Welford's update, one state after the other
        for sl in range(sb):
            cnt = inp.counts[s0 + sl]
            o = oh + sl * W
            for dd in range(W):
                v = h[o + dd]
                d1 = v - out.meanb[iu + dd]
                m = out.meanb[iu + dd] + d1 / cnt
                out.meanb[iu + dd] = m
                out.m2b[iu + dd] += d1 * (v - m)
    r = lay.srow[i]
    while r >= 0:
        os = ((blk * d.K + U(r)) * d.S + s0) * W
        for l in range(sb * W):
            out.statesb[os + l] = h[oh + l]
        r = lay.snext[r]


# ---------------------------------------------------------------------------- passes
@njit(inline="always")
def _up(buf, oH, oW, ga, a, b, blk, s0, sb, inp, lay, d, emit, out):
    """Leaves first: ``H = up(x)`` in buffer ``oH``, each non-root's ``w`` in ``oW``."""
    L, n = d.L, sb * d.W
    for i in range(b - 1, a - 1, -1):
        iu, ib, ia = _offsets(d, blk, i, s0)
        oh = oH + U(i - ga) * L
        _x(buf, oh, inp, d, iu, ib, sb)
        for k in range(lay.child_ptr[i], min(lay.child_ptr[i + 1], b)):
            lk = U(k - ga) * L
            for l in range(n):
                buf[oh + l] += buf[oW + lk + l] * buf[oH + lk + l]
        if emit:
            _emit(buf, oh, i, blk, s0, sb, inp, lay, out, d)
        if i > a:
            _w(buf, oW + U(i - ga) * L, inp, d, iu, ia, sb)


@njit(inline="always")
def _down(buf, oH, ga, a, b, t, blk, s0, sb, inp, lay, d, emit, out):
    """Roots first: ``H = down(x)`` in buffer ``oH``; an incoming state ``h0[t]`` enters the
    root through the root's own edge weight."""
    L, W = d.L, d.W
    for i in range(a, b):
        iu, ib, ia = _offsets(d, blk, i, s0)
        oh = oH + U(i - ga) * L
        _x(buf, oh, inp, d, iu, ib, sb)
        if i > a:
            op = oH + U(lay.ppos[i] - ga) * L
            for sl in range(sb):
                o = sl * W
                for dd in range(W):
                    buf[oh + o + dd] += (_exp(inp.deb[iu + dd] * inp.ab[ia + o + dd])
                                         * buf[op + o + dd])
        elif d.has_h0:
            oz = ((blk * d.T + U(t)) * d.S + s0) * W
            for sl in range(sb):
                o = sl * W
                for dd in range(W):
                    buf[oh + o + dd] += (_exp(inp.deb[iu + dd] * inp.ab[ia + o + dd])
                                         * inp.h0b[oz + o + dd])
        if emit:
            _emit(buf, oh, i, blk, s0, sb, inp, lay, out, d)


@njit(inline="always")
def _out(buf, oU, oW, oO, ot, ga, a, b, blk, s0, sb, inp, lay, d, out):
    """Roots first, after :func:`_up`: ``out`` in buffer ``oO`` and ``h = up + out`` read
    out. ``out[v] = w[v] (out[p] + x[p] + prefix + suffix)`` over v's siblings."""
    L, n = d.L, sb * d.W
    t0, t1, t2, t3 = ot, ot + L, ot + U(2) * L, ot + U(3) * L
    la = U(a - ga) * L
    _fill(buf, oO + la, n, 0)
    _emit(buf, oU + la, a, blk, s0, sb, inp, lay, out, d)
    for i in range(a, b):
        k0, k1 = lay.child_ptr[i], min(lay.child_ptr[i + 1], b)
        if k0 >= k1:
            continue
        li = U(i - ga) * L
        iu, ib, ia = _offsets(d, blk, i, s0)
        _x(buf, t2, inp, d, iu, ib, sb)
        for l in range(n):  # out[p] + x[p]
            buf[t2 + l] = buf[oO + li + l] + buf[t2 + l]
        _fill(buf, t0, n, 0)  # suffix sums of w up, exclusive, parked in out[k]
        for k in range(k1 - 1, k0 - 1, -1):
            lk = U(k - ga) * L
            for l in range(n):
                buf[oO + lk + l] = buf[t0 + l]
                buf[t0 + l] += buf[oW + lk + l] * buf[oU + lk + l]
        _fill(buf, t1, n, 0)  # prefix sums
        for k in range(k0, k1):
            lk = U(k - ga) * L
            for l in range(n):
                wk = buf[oW + lk + l]
                br = buf[t2 + l] + (buf[t1 + l] + buf[oO + lk + l])
                buf[t1 + l] += wk * buf[oU + lk + l]
                ok = wk * br
                buf[oO + lk + l] = ok
                buf[t3 + l] = buf[oU + lk + l] + ok
            _emit(buf, t3, k, blk, s0, sb, inp, lay, out, d)


# ---------------------------------------------------------------------------- gradient helpers
@njit(inline="always")
def _grad_h(dst, do, h, oh, i, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl, readout):
    """``dL/dh`` of position ``i`` into ``dst[do:]`` given its states ``h[oh:]``; with
    ``readout`` also the gradients of ``C`` and ``g`` (read-out weight) it owes."""
    W = d.W
    iu, ib, ia = _offsets(d, blk, i, s0)
    for sl in range(sb):
        c = inp.cp[ib + sl]
        o = sl * W
        if d.has_gamma:
            for dd in range(W):
                dst[do + o + dd] = gin.gy1b[iu + dd] * c * inp.gb[ia + o + dd]
        else:
            for dd in range(W):
                dst[do + o + dd] = gin.gy1b[iu + dd] * c
    if d.moments:
        num = inp.counts[d.S - U(1)]
        for sl in range(sb):
            o = sl * W
            for dd in range(W):
                g2 = gin.gm2b[iu + dd]
                dst[do + o + dd] += (gin.gmeanb[iu + dd] / num
                                     + (g2 + g2) * (h[oh + o + dd] - gin.meanb[iu + dd]))
    if d.has_gstates:
        r = lay.srow[i]
        while r >= 0:
            os = ((blk * d.K + U(r)) * d.S + s0) * W
            for l in range(sb * W):
                dst[do + l] += gin.gstatesb[os + l]
            r = lay.snext[r]
    if readout:
        og = ((U(gi) * d.nblk + blk) * d.S + s0) * W
        for sl in range(sb):
            c = inp.cp[ib + sl]
            o = sl * W
            if d.has_gamma:
                for dd in range(W):
                    gh = gin.gy1b[iu + dd] * h[oh + o + dd]
                    buf[tl + dd] = gh * inp.gb[ia + o + dd]
                    gr.ggp[og + o + dd] += gh * c
            else:
                for dd in range(W):
                    buf[tl + dd] = gin.gy1b[iu + dd] * h[oh + o + dd]
            gr.gcp[(blk * d.N + U(i)) * d.S + s0 + sl] = _lane_sum(buf, tl, W)


@njit(inline="always")
def _grad_x(G, og, i, blk, s0, sb, inp, gr, d, buf, tl):
    """Accumulate what ``dL/dx = G[og:]`` at position ``i`` owes: ``sum_s G B`` (from which
    the caller forms the gradients of ``u`` and ``dx``) and the gradient of ``B``."""
    W = d.W
    iu, ib, ia = _offsets(d, blk, i, s0)
    for sl in range(sb):
        bs = inp.bp[ib + sl]
        o = og + sl * W
        for dd in range(W):
            gr.gxb[iu + dd] += G[o + dd] * bs
    for sl in range(sb):
        o = og + sl * W
        for dd in range(W):
            buf[tl + dd] = G[o + dd] * (inp.dxb[iu + dd] * inp.ub[iu + dd])
        gr.gbp[(blk * d.N + U(i)) * d.S + s0 + sl] = _lane_sum(buf, tl, W)


@njit(inline="always")
def _grad_w(gw, ogw, w, ow, i, gi, blk, s0, sb, inp, gr, d):
    """Accumulate what ``dL/dw = gw[ogw:]`` of position ``i``'s edge owes to ``de`` and
    ``A`` (``dw = w A dde + w de dA``)."""
    W = d.W
    iu, ib, ia = _offsets(d, blk, i, s0)
    og = ((U(gi) * d.nblk + blk) * d.S + s0) * W
    for sl in range(sb):
        o = sl * W
        for dd in range(W):
            tw = gw[ogw + o + dd] * w[ow + o + dd]
            gr.gdeb[iu + dd] += tw * inp.ab[ia + o + dd]
            gr.gap[og + o + dd] += tw * inp.deb[iu + dd]


# ---------------------------------------------------------------------------- backward passes
@njit(inline="always")
def _backward_down(buf, q, ot, gi, ga, a, b, t, blk, s0, sb, inp, lay, gin, gr, d, out):
    # H = down(x), then leaves first G = up(dL/dh) written over H, dL/dw[v] = G[v] H[p]
    L, n = d.L, sb * d.W
    oH, oW = U(0), q
    t0, t1, t2, tl = ot, ot + L, ot + U(2) * L, ot + U(6) * L
    _down(buf, oH, ga, a, b, t, blk, s0, sb, inp, lay, d, False, out)
    for i in range(b - 1, a - 1, -1):
        iu, ib, ia = _offsets(d, blk, i, s0)
        li = U(i - ga) * L
        oh = oH + li
        _grad_h(buf, t0, buf, oh, i, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl, True)
        for l in range(n):
            buf[oh + l] = buf[t0 + l]
        for k in range(lay.child_ptr[i], min(lay.child_ptr[i + 1], b)):
            lk = U(k - ga) * L
            for l in range(n):
                buf[oh + l] += buf[oW + lk + l] * buf[oH + lk + l]
        _grad_x(buf, oh, i, blk, s0, sb, inp, gr, d, buf, tl)
        if i > a:
            _w(buf, oW + li, inp, d, iu, ia, sb)
            op = oH + U(lay.ppos[i] - ga) * L  # the parent's row still holds H
            for l in range(n):
                buf[t2 + l] = buf[oh + l] * buf[op + l]
            _grad_w(buf, t2, buf, oW + li, i, gi, blk, s0, sb, inp, gr, d)
        elif d.has_h0:
            _w(buf, t1, inp, d, iu, ia, sb)
            oz = ((blk * d.T + U(t)) * d.S + s0) * d.W
            for l in range(n):
                buf[t2 + l] = buf[oh + l] * inp.h0b[oz + l]
                gr.gh0b[oz + l] = buf[oh + l] * buf[t1 + l]
            _grad_w(buf, t2, buf, t1, i, gi, blk, s0, sb, inp, gr, d)


@njit(inline="always")
def _backward_up(buf, q, ot, gi, ga, a, b, blk, s0, sb, inp, lay, gin, gr, d, out):
    # H = up(x), then roots first G = down(dL/dh) written over H, dL/dw[v] = H[v] G[p]
    L, n = d.L, sb * d.W
    oH, oW = U(0), q
    t0, t2, tl = ot, ot + U(2) * L, ot + U(6) * L
    _up(buf, oH, oW, ga, a, b, blk, s0, sb, inp, lay, d, False, out)
    for i in range(a, b):
        li = U(i - ga) * L
        oh = oH + li
        _grad_h(buf, t0, buf, oh, i, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl, True)
        if i > a:
            op = oH + U(lay.ppos[i] - ga) * L  # the parent's row already holds G
            for l in range(n):
                gp = buf[op + l]
                buf[t2 + l] = buf[oh + l] * gp
                buf[oh + l] = buf[t0 + l] + buf[oW + li + l] * gp
            _grad_w(buf, t2, buf, oW + li, i, gi, blk, s0, sb, inp, gr, d)
        else:
            for l in range(n):
                buf[oh + l] = buf[t0 + l]
        _grad_x(buf, oh, i, blk, s0, sb, inp, gr, d, buf, tl)


@njit(inline="always")
def _backward_both(buf, q, ot, gi, ga, a, b, blk, s0, sb, inp, lay, gin, gr, d, out):
    # Buffers: up(x), w, the bracket Br_x that out_x multiplies (out_x = w Br_x), dL/dh
    # turned into up(dL/dh) in place, out of dL/dh. Passes: up(x); roots first Br_x, h and
    # dL/dh; up(dL/dh); roots first out_g, dL/dx and dL/dw = up_x Br_g + up_g Br_x.
    L, n = d.L, sb * d.W
    oUx, oW, oBx, oUg, oOg = U(0), q, U(2) * q, U(3) * q, U(4) * q
    t0, t1, t2, t3, t4, t5 = (ot, ot + L, ot + U(2) * L, ot + U(3) * L, ot + U(4) * L,
                              ot + U(5) * L)
    tl = ot + U(6) * L
    _up(buf, oUx, oW, ga, a, b, blk, s0, sb, inp, lay, d, False, out)
    la = U(a - ga) * L
    _grad_h(buf, oUg + la, buf, oUx + la, a, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl,
            True)
    for i in range(a, b):
        k0, k1 = lay.child_ptr[i], min(lay.child_ptr[i + 1], b)
        if k0 >= k1:
            continue
        li = U(i - ga) * L
        iu, ib, ia = _offsets(d, blk, i, s0)
        _x(buf, t2, inp, d, iu, ib, sb)
        if i > a:  # out_x[p] + x[p], as the forward pass forms it
            for l in range(n):
                buf[t2 + l] = buf[oW + li + l] * buf[oBx + li + l] + buf[t2 + l]
        _fill(buf, t0, n, 0)
        for k in range(k1 - 1, k0 - 1, -1):
            lk = U(k - ga) * L
            for l in range(n):
                buf[oUg + lk + l] = buf[t0 + l]
                buf[t0 + l] += buf[oW + lk + l] * buf[oUx + lk + l]
        _fill(buf, t1, n, 0)
        for k in range(k0, k1):
            lk = U(k - ga) * L
            for l in range(n):
                wk = buf[oW + lk + l]
                br = buf[t2 + l] + (buf[t1 + l] + buf[oUg + lk + l])
                buf[t1 + l] += wk * buf[oUx + lk + l]
                buf[oBx + lk + l] = br
                buf[t3 + l] = buf[oUx + lk + l] + wk * br
            _grad_h(buf, oUg + lk, buf, t3, k, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl,
                    True)
    for i in range(b - 1, a - 1, -1):  # up(dL/dh) in place
        li = U(i - ga) * L
        for k in range(lay.child_ptr[i], min(lay.child_ptr[i + 1], b)):
            lk = U(k - ga) * L
            for l in range(n):
                buf[oUg + li + l] += buf[oW + lk + l] * buf[oUg + lk + l]
    _fill(buf, oOg + la, n, 0)
    _grad_x(buf, oUg + la, a, blk, s0, sb, inp, gr, d, buf, tl)
    for i in range(a, b):
        k0, k1 = lay.child_ptr[i], min(lay.child_ptr[i + 1], b)
        if k0 >= k1:
            continue
        li = U(i - ga) * L
        if i > a:  # h[p] as the forward pass formed it, then dL/dh[p]
            for l in range(n):
                buf[t5 + l] = buf[oUx + li + l] + buf[oW + li + l] * buf[oBx + li + l]
        else:
            for l in range(n):
                buf[t5 + l] = buf[oUx + li + l]
        _grad_h(buf, t2, buf, t5, i, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl, False)
        for l in range(n):  # out_g[p] + g[p]
            buf[t2 + l] = buf[oOg + li + l] + buf[t2 + l]
        _fill(buf, t0, n, 0)
        for k in range(k1 - 1, k0 - 1, -1):
            lk = U(k - ga) * L
            for l in range(n):
                buf[oOg + lk + l] = buf[t0 + l]
                buf[t0 + l] += buf[oW + lk + l] * buf[oUg + lk + l]
        _fill(buf, t1, n, 0)
        for k in range(k0, k1):
            lk = U(k - ga) * L
            for l in range(n):
                wk = buf[oW + lk + l]
                ugk = buf[oUg + lk + l]
                brg = buf[t2 + l] + (buf[t1 + l] + buf[oOg + lk + l])
                buf[t1 + l] += wk * ugk
                ogk = wk * brg
                buf[oOg + lk + l] = ogk
                buf[t3 + l] = buf[oUx + lk + l] * brg + ugk * buf[oBx + lk + l]
                buf[t4 + l] = ugk + ogk
            _grad_w(buf, t3, buf, oW + lk, k, gi, blk, s0, sb, inp, gr, d)
            _grad_x(buf, t4, k, blk, s0, sb, inp, gr, d, buf, tl)


# ---------------------------------------------------------------------------- drivers
@njit(cache=True)
def _forward_item(buf, gi, blk, inp, lay, out, d):
    q = d.maxn * d.L
    ga = lay.tree_ptr[lay.groups[gi]]
    for t in range(lay.groups[gi], lay.groups[gi + 1]):
        a, b = lay.tree_ptr[t], lay.tree_ptr[t + 1]
        for s0 in range(U(0), d.S, d.Sb):
            sb = min(d.Sb, d.S - s0)
            if d.mode == 2:
                _down(buf, U(0), ga, a, b, t, blk, s0, sb, inp, lay, d, True, out)
            elif d.mode == 1:
                _up(buf, U(0), q, ga, a, b, blk, s0, sb, inp, lay, d, True, out)
            else:
                _up(buf, U(0), q, ga, a, b, blk, s0, sb, inp, lay, d, False, out)
                _out(buf, U(0), q, U(2) * q, U(_NUM_BUFFERS) * q, ga, a, b, blk, s0, sb, inp,
                     lay, d, out)


@njit(cache=True, parallel=True)
def _forward_kernel(ub, dxb, deb, ab, bp, cp, gb, h0b, counts, ppos, child_ptr, tree_ptr,
                    groups, srow, snext, y1b, meanb, m2b, statesb, scratch, dims):
    d = _dims(dims)
    nthreads = scratch.shape[0]
    nitems = (groups.shape[0] - 1) * dims[4]
    for th in prange(nthreads):
        inp = _Inputs(ub, dxb, deb, ab, bp, cp, gb, h0b, counts)
        lay = _Layout(ppos, child_ptr, tree_ptr, groups, srow, snext)
        out = _Outputs(y1b, meanb, m2b, statesb)
        for j in range(th, nitems, nthreads):
            gi = j // dims[4]
            _forward_item(scratch[th], gi, U(j - gi * dims[4]), inp, lay, out, d)


@njit(cache=True)
def _backward_item(buf, gi, blk, inp, lay, gin, gr, d, out):
    q = d.maxn * d.L
    ot = U(_NUM_BUFFERS) * q
    ga = lay.tree_ptr[lay.groups[gi]]
    for t in range(lay.groups[gi], lay.groups[gi + 1]):
        a, b = lay.tree_ptr[t], lay.tree_ptr[t + 1]
        for s0 in range(U(0), d.S, d.Sb):
            sb = min(d.Sb, d.S - s0)
            if d.mode == 2:
                _backward_down(buf, q, ot, gi, ga, a, b, t, blk, s0, sb, inp, lay, gin, gr, d,
                               out)
            elif d.mode == 1:
                _backward_up(buf, q, ot, gi, ga, a, b, blk, s0, sb, inp, lay, gin, gr, d, out)
            else:
                _backward_both(buf, q, ot, gi, ga, a, b, blk, s0, sb, inp, lay, gin, gr, d,
                               out)


@njit(cache=True, parallel=True)
def _backward_kernel(ub, dxb, deb, ab, bp, cp, gb, h0b, counts, ppos, child_ptr, tree_ptr,
                     groups, srow, snext, gy1b, gmeanb, gm2b, gstatesb, meanb, gxb, gdeb, gbp,
                     gcp, gap, ggp, gh0b, scratch, dims):
    d = _dims(dims)
    nthreads = scratch.shape[0]
    nitems = (groups.shape[0] - 1) * dims[4]
    for th in prange(nthreads):
        inp = _Inputs(ub, dxb, deb, ab, bp, cp, gb, h0b, counts)
        lay = _Layout(ppos, child_ptr, tree_ptr, groups, srow, snext)
        gin = _GradIn(gy1b, gmeanb, gm2b, gstatesb, meanb)
        gr = _Grads(gxb, gdeb, gbp, gcp, gap, ggp, gh0b)
        out = _Outputs(gxb[:1], gxb[:1], gxb[:1], gxb[:1])  # never written: no read-out
        for j in range(th, nitems, nthreads):
            gi = j // dims[4]
            _backward_item(scratch[th], gi, U(j - gi * dims[4]), inp, lay, gin, gr, d, out)


# ---------------------------------------------------------------------------- layout copies
@njit(cache=True, parallel=True)
def _to_blocks(src, order, nblk, W, dst):
    # dst[blk, i, dd] = src[order[i], blk * W + dd], zero past the last channel
    n, c = src.shape
    for i in prange(n):
        v = order[i]
        for blk in range(nblk):
            o = (blk * n + i) * W
            for dd in range(W):
                ch = blk * W + dd
                dst[o + dd] = src[v, ch] if ch < c else 0


@njit(cache=True, parallel=True)
def _from_blocks(src, order, nblk, W, dst):
    # dst[order[i], blk * W + dd] = src[blk, i, dd] for the real channels
    n, c = dst.shape
    for i in prange(n):
        v = order[i]
        for blk in range(nblk):
            o = (blk * n + i) * W
            for dd in range(min(W, c - blk * W)):
                dst[v, blk * W + dd] = src[o + dd]


@njit(cache=True, parallel=True)
def _gather_rows(src, order, dst):
    n, s = src.shape
    for i in prange(n):
        v = order[i]
        for j in range(s):
            dst[i * s + j] = src[v, j]


@njit(cache=True, parallel=True)
def _sum_blocks_to_rows(src, order, nblk, dst):
    # dst[order[i], s] = sum over blocks, in ascending order, of src[blk, i, s]
    n, s = dst.shape
    for i in prange(n):
        v = order[i]
        for j in range(s):
            acc = src[i * s + j]
            for blk in range(1, nblk):
                acc += src[(blk * n + i) * s + j]
            dst[v, j] = acc


@njit(cache=True, parallel=True)
def _positions(parent, order, ppos):
    n = order.shape[0]
    pos = np.empty(n, np.int64)
    for i in prange(n):
        pos[order[i]] = i
    for i in prange(n):
        p = parent[order[i]]
        ppos[i] = pos[p] if p >= 0 else -1


# ---------------------------------------------------------------------------- host side
def _np(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().contiguous().numpy()


def _params_to_blocks(p: np.ndarray, nblk: int, W: int, lead=()) -> np.ndarray:
    """``[*lead, D, S]`` -> flat ``[nblk, *lead, S, W]``, padded with zero channels."""
    d, s = p.shape[-2:]
    pad = np.zeros(lead + (nblk * W, s), p.dtype)
    pad[..., :d, :] = p
    pad = pad.reshape(lead + (nblk, W, s))
    axes = (len(lead),) + tuple(range(len(lead))) + (len(lead) + 2, len(lead) + 1)
    return np.ascontiguousarray(pad.transpose(axes)).reshape(-1)


def _params_from_blocks(p: np.ndarray, d: int, s: int, nblk: int, W: int, lead=()) -> np.ndarray:
    """Inverse of :func:`_params_to_blocks`: ``[nblk, *lead, S, W]`` -> ``[*lead, D, S]``."""
    p = p.reshape((nblk,) + lead + (s, W))
    k = len(lead)
    axes = tuple(range(1, k + 1)) + (0, k + 2, k + 1)
    return np.ascontiguousarray(p.transpose(axes).reshape(lead + (nblk * W, s))[..., :d, :])


def _groups(tree_ptr: np.ndarray, n: int) -> np.ndarray:
    """Whole trees grouped into work items of about ``max(_GROUP_MIN, n / _GROUPS_PER_RUN)``
    vertices (a fixed rule: the split, hence every sum, does not depend on the threads)."""
    target = max(_GROUP_MIN, -(-n // _GROUPS_PER_RUN))
    cuts = np.searchsorted(tree_ptr, np.arange(0, n, target), side="left")
    return np.unique(np.concatenate((cuts, [tree_ptr.shape[0] - 1]))).astype(np.int64)


class _Run:
    """Everything the kernels of one call share: positions, blocks, groups, scratch."""

    def __init__(self, u, dx, de, A, B, C, gamma, h0, srow, snext, parent, order, child_ptr,
                 tree_ptr, direction, moments, grad_states=False):
        if direction not in _MODES:
            raise ValueError(f"direction must be one of {tuple(_MODES)}, got {direction!r}")
        n, dch = u.shape
        s = A.shape[1]
        dtype = np.dtype(np.float64 if u.dtype == torch.float64 else np.float32)
        self.n, self.d, self.s, self.dtype = n, dch, s, dtype
        self.W = W = _LINE // dtype.itemsize
        self.nblk = nblk = -(-dch // W)
        self.sb = sb = max(1, min(s, _MAX_LANES // W))
        self.order = _np(order)
        self.ppos = np.empty(n, np.int64)
        _positions(_np(parent), self.order, self.ppos)
        tp = _np(tree_ptr)
        self.tree_ptr = tp
        self.child_ptr = _np(child_ptr)
        self.groups = _groups(tp, n)
        gsize = np.diff(tp[self.groups])
        self.maxn = int(gsize.max())
        self.num_trees = tp.shape[0] - 1
        self.num_states = num_states = snext.shape[0]
        self.ub, self.dxb, self.deb = (self.blocks(x) for x in (u, dx, de))
        self.ab = _params_to_blocks(_np(A), nblk, W)
        self.gb = (_params_to_blocks(_np(gamma), nblk, W) if gamma is not None
                   else np.zeros(1, dtype))
        self.h0b = (_params_to_blocks(_np(h0), nblk, W, (self.num_trees,)) if h0 is not None
                    else np.zeros(1, dtype))
        self.bp = np.empty(n * s, dtype)
        _gather_rows(_np(B), self.order, self.bp)
        self.cp = np.empty(n * s, dtype)
        _gather_rows(_np(C), self.order, self.cp)
        self.counts = np.arange(1, s + 1, dtype=dtype)
        self.srow = np.full(n, -1, np.int64)
        self.snext = np.full(max(num_states, 1), -1, np.int64)
        if num_states:
            self.srow = _np(srow)[self.order]
            self.snext = _np(snext)
        nitems = (self.groups.shape[0] - 1) * nblk
        threads = max(1, min(get_num_threads(), nitems))
        L = sb * W
        self.scratch = np.empty((threads, (_NUM_BUFFERS * self.maxn + _NUM_TEMPS) * L), dtype)
        self.dims = np.array([n, s, W, sb, nblk, self.num_trees, num_states, self.maxn,
                              _MODES[direction], gamma is not None, h0 is not None, moments,
                              grad_states], np.int64)

    def blocks(self, x: torch.Tensor) -> np.ndarray:
        out = np.empty(self.nblk * self.n * self.W, self.dtype)
        _to_blocks(_np(x), self.order, self.nblk, self.W, out)
        return out

    def unblock(self, xb: np.ndarray) -> torch.Tensor:
        out = np.empty((self.n, self.d), self.dtype)
        _from_blocks(xb, self.order, self.nblk, self.W, out)
        return torch.from_numpy(out)

    def zeros(self) -> np.ndarray:
        return np.zeros(self.nblk * self.n * self.W, self.dtype)

    def layout(self):
        return (self.counts, self.ppos, self.child_ptr, self.tree_ptr, self.groups, self.srow,
                self.snext)

    def inputs(self):
        return self.ub, self.dxb, self.deb, self.ab, self.bp, self.cp, self.gb, self.h0b


def _check(u, A):
    if u.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the numba kernels take float32 or float64, got {u.dtype}")
    if u.device.type != "cpu":
        raise ValueError(f"the numba kernels run on CPU tensors, got {u.device}")


def forward(u, dx, de, A, B, C, gamma, h0, srow, snext, parent, order, child_ptr, tree_ptr,
            direction: str, moments: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, m2, states)`` of the fused scan (see the module docstring).

    ``u, dx, de [N, D]``, ``B, C [N, S]``, ``A [D, S]``, ``gamma [D, S]`` or ``None``,
    ``h0 [T, D, S]`` or ``None`` (direction ``"down"``), all float32 or all float64.
    ``srow [N]`` is the first row of ``states [K, D, S]`` that each vertex's states go to
    (``-1``: none) and ``snext [K]`` the next row of the same vertex (``-1``: none).
    ``mean`` and ``m2`` are empty unless ``moments``.
    """
    _check(u, A)
    run = _Run(u, dx, de, A, B, C, gamma, h0, srow, snext, parent, order, child_ptr, tree_ptr,
               direction, moments)
    n, d, s, num_states = run.n, run.d, run.s, run.num_states
    y1b = run.zeros()
    meanb = run.zeros() if moments else np.zeros(1, run.dtype)
    m2b = run.zeros() if moments else np.zeros(1, run.dtype)
    statesb = np.zeros(max(1, run.nblk * num_states * s * run.W), run.dtype)
    if n and d and s:
        counts, ppos, child_ptr, tree_ptr, groups, srow_p, snext_n = run.layout()
        _forward_kernel(*run.inputs(), counts, ppos, child_ptr, tree_ptr, groups, srow_p,
                        snext_n, y1b, meanb, m2b, statesb, run.scratch, run.dims)
    y = run.unblock(y1b)
    empty = torch.zeros(0, dtype=y.dtype)
    mean = run.unblock(meanb) if moments else empty
    m2 = run.unblock(m2b) if moments else empty
    states = torch.from_numpy(_params_from_blocks(statesb[:run.nblk * num_states * s * run.W],
                                                  d, s, run.nblk, run.W, (num_states,)))
    return y, mean, m2, states


def backward(gy, gmean, gm2, gstates, u, dx, de, A, B, C, gamma, h0, mean, srow, snext, parent,
             order, child_ptr, tree_ptr, direction: str, moments: bool):
    """Gradients of :func:`forward`'s outputs, recomputing the states.

    Returns ``(sum_s dL/dx B [N, D], dL/dde [N, D], dL/dB [N, S], dL/dC [N, S], dL/dA [D, S],
    dL/dgamma [D, S] or None, dL/dh0 [T, D, S] or None)``; the caller forms
    ``dL/du = (sum_s dL/dx B) dx`` and ``dL/ddx = (sum_s dL/dx B) u``.
    """
    _check(u, A)
    num_states = snext.shape[0]
    grad_states = num_states > 0 and gstates is not None
    run = _Run(u, dx, de, A, B, C, gamma, h0, srow, snext, parent, order, child_ptr, tree_ptr,
               direction, moments, grad_states)
    n, d, s, nblk, W, dt = run.n, run.d, run.s, run.nblk, run.W, run.dtype
    one = np.zeros(1, dt)
    gy1b = run.blocks(gy)
    gmeanb = run.blocks(gmean) if moments else one
    gm2b = run.blocks(gm2) if moments else one
    meanb = run.blocks(mean) if moments else one
    gstatesb = (_params_to_blocks(_np(gstates), nblk, W, (num_states,)) if grad_states
                else one)
    ngroups = run.groups.shape[0] - 1
    gxb, gdeb = run.zeros(), run.zeros()
    gbp = np.zeros(nblk * n * s, dt)
    gcp = np.zeros(nblk * n * s, dt)
    gap = np.zeros(ngroups * nblk * s * W, dt)
    ggp = np.zeros(ngroups * nblk * s * W if gamma is not None else 1, dt)
    gh0b = np.zeros(nblk * run.num_trees * s * W if h0 is not None else 1, dt)
    if n and d and s:
        counts, ppos, child_ptr, tree_ptr, groups, srow_p, snext_n = run.layout()
        _backward_kernel(*run.inputs(), counts, ppos, child_ptr, tree_ptr, groups, srow_p,
                         snext_n, gy1b, gmeanb, gm2b, gstatesb, meanb, gxb, gdeb, gbp, gcp,
                         gap, ggp, gh0b, run.scratch, run.dims)
    gxB = run.unblock(gxb)
    gde = run.unblock(gdeb)
    gB = np.empty((n, s), dt)
    _sum_blocks_to_rows(gbp, run.order, nblk, gB)
    gC = np.empty((n, s), dt)
    _sum_blocks_to_rows(gcp, run.order, nblk, gC)

    def over_groups(p):  # [ngroups, nblk, S, W] summed over the groups in ascending order
        p = p.reshape(max(ngroups, 1), nblk * s * W) if ngroups else np.zeros((1, nblk * s * W), dt)
        acc = p[0].copy()
        for k in range(1, p.shape[0]):
            acc += p[k]
        return torch.from_numpy(_params_from_blocks(acc, d, s, nblk, W))

    gA = over_groups(gap)
    gg = over_groups(ggp) if gamma is not None else None
    gh0 = (torch.from_numpy(_params_from_blocks(gh0b, d, s, nblk, W, (run.num_trees,)))
           if h0 is not None else None)
    return gxB, gde, torch.from_numpy(gB), torch.from_numpy(gC), gA, gg, gh0
