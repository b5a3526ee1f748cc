"""Numba CPU kernels of the fused selective tree scan (:mod:`treessm.ops.selective_scan`).

Per vertex ``v``, inner channel ``d`` and state ``s``, with ``x = dx * u * B`` and edge
weights ``w = exp(de * A[d, s])``, the forward kernel computes

* ``y[v, d] = sum_s C[v, s] g[d, s] h[v, d, s]``, ``h[:, d, s]`` the tree scan of ``x``
  (``g``, the read-out weight, is 1 when absent);
* optionally the mean ``mu[v]`` and the sum of squared deviations ``m2[v]`` of all the
  ``D * S`` states of a vertex, from which the caller normalises them (each chunk of states
  of a block of channels gives its own mean and sum of squared deviations, its lanes added
  in a fixed order; the chunks, then the blocks, are combined by Chan's formula in
  ascending order);
* ``h`` at requested vertices;

and the backward kernel the gradients of all of it, recomputing the states, without ever
holding ``h`` for all vertices and states at once. The step ``de`` of the edge
``(v, parent(v))`` is the child's ``dx[v]`` (rule ``"child"``), the mean
``(dx[v] + dx[p]) / 2`` (``"mean"``) or a given tensor (``"given"``).

Layout. The inputs are first copied into *breadth-first position order* and cut into blocks
of ``W`` channels (a multiple of 128 bytes: 32 float32 or 16 float64), the last one padded
with inert channels (``u = dx = de = A = 0``); where one array in that layout would exceed
``_BATCH_BYTES``, the blocks are taken a batch at a time (as many as threads), so that the
copies and the results in block layout hold one batch. A work item is one block of
channels over one group of whole trees; inside it the states are taken in chunks of ``Sb``,
and for each chunk the passes below run over the group's trees with the ``Sb * W`` lanes of
a vertex as the vectorised inner loop. Each thread owns a scratch buffer of rows of
``Sb * W`` lanes, reused from item to item and kept within a memory budget of about one
``[N, D]`` array (``Sb`` shrinks for large trees): one row per vertex of the group in the
forward pass (``w`` is formed again where it is needed rather than stored), up to five in
the backward, plus two per child of the largest family for the sibling sums of ``both``.
That and arrays of ``[N, D]`` or ``[N, S]`` entries are all the kernels allocate.

Passes (``docs/concepts.md``), over breadth-first positions, roots first or leaves first:

* ``down``: ``h[v] = x[v] + w[v] h[p]`` (and ``x[r] + w[r] h0`` at a root with an incoming
  state); backward: ``G = up(dL/dh)`` leaves first, ``dL/dw[v] = G[v] h[p]``;
* ``up``: ``h[v] = x[v] + sum_c w[c] h[c]``; backward: ``G = down(dL/dh)``,
  ``dL/dw[v] = h[v] G[p]``;
* ``both``: ``up``, then ``out[v] = w[v] (out[p] + x[p] + sum of w[s] up[s] over v's
  siblings s)`` with the sibling sums formed from prefix and suffix sums over the parent's
  children (never a total minus one's own term), ``h = up + out``; in the forward pass a
  vertex's row holds ``up`` until its family is done, then ``out + x``; backward (self-adjoint):
  the same two passes over ``dL/dh``, and ``dL/dw[v] = up_x[v] Br_g[v] + up_g[v] Br_x[v]``
  with ``Br`` the bracket that ``out[v]`` multiplies by ``w[v]``.

Every sum runs in a fixed order, every output element is written by one work item, and the
split into work items does not depend on the number of threads: results are bitwise
reproducible run to run, with any number of threads (multiply-adds may be fused, so two
machines can differ in the last bit). Reductions over channels (the gradients of ``B``
and ``C``, the moments) add the lanes of a block in a fixed pairwise tree and the blocks in
ascending order; reductions over vertices (``A``, ``g``) run in position order inside a
group of trees and over the groups in ascending order.
"""
from __future__ import annotations

import math
from collections import namedtuple
from typing import Optional, Tuple

import numpy as np
import torch
from llvmlite import ir
from numba import get_num_threads, njit, types
from numba.extending import intrinsic, overload

from . import cpu_arrays
from .chunks import on_slots

__all__ = ["forward", "backward", "normalised_readout", "normalised_readout_backward",
           "EDGE_RULES"]

#: How the step of the edge (v, parent(v)) is formed.
EDGE_RULES = ("child", "mean", "given")
_MODES = {"both": 0, "up": 1, "down": 2}
_BLOCK_BYTES = 128  # channels per base block: 32 float32 or 16 float64 (see _lanes)
_MIN_BLOCK = 16  # fewest channels a block: the lane sums take groups of 16
_MAX_LANES = 128  # most states x channels of a block held per vertex and buffer row
# Scratch per thread: at most max(_SCRATCH_MIN, bytes of one [N, D] array); narrower blocks
# and smaller chunks of states (down to one) keep a large tree within it. 32 MiB holds the
# backward's five rows of 128 lanes (32 channels by 4 states) for 10^4 vertices:
# TreeSSMConv(64, 64)'s training step there, one thread, medians of 7 in alternating
# processes, 131.5 / 139.7 ms at 16 MiB (16 channels by 4 states) against 123.1 / 120.6 ms
# (at 3,000 and 30,000 vertices the lanes, and the times, are the same either way).
_SCRATCH_MIN = 32 << 20
# and a sixteenth more: the temporaries and the rows of a family of children besides the
# rows of the vertices
_BUDGET_SLACK = 1 / 16
_GROUP_MIN = 1024  # vertices: smallest group of whole trees made one work item
# Bytes of one array in block layout ([blocks, N, W]) up to which the kernels take all the
# blocks of channels at once; past it, as many blocks at a time as threads, so that the
# inputs, results and gradients in block layout hold that many blocks, not all of them
# (TreeSSMConv(64, 64)'s backward at 10^6 vertices: 8 blocks of 16 channels, 512 MB an
# array; 128 MB in batches of two).
_BATCH_BYTES = 64 << 20
# States (vertices x channels x states) a thread takes at least: with fewer, fewer threads
# share the work items. TreeSSMConv(64, 64)'s training step (512 states a vertex), one
# process alternating one and two threads for the kernels (torch on two): one thread took
# 4.21 against 4.49 ms at 100 vertices, 7.34 against 8.21 at 400, 10.03 against 10.69 at
# 800, 20.6 against 21.4 at 2,000; two took 37.2 against 41.1 ms at 4,000 and 103 against 117
# at 10^4 (between 2,000 and 4,000 the runs disagreed). Two threads share from 3,907 vertices.
_STATES_PER_THREAD = 10 ** 6
_GROUPS_PER_RUN = 64  # aim: this many groups when the forest has many trees
_NUM_TEMPS = 8  # lane rows of temporaries after the buffers
_BUFFERS = {  # buffer rows per vertex: (forward, backward) by direction
    "both": (1, 5), "up": (1, 2), "down": (1, 2)}

U = np.uint64


# ---------------------------------------------------------------------------- exp
_LN2_HI = 0.693115234375  # 2839 / 4096: k * _LN2_HI is exact for |k| <= 127
_LN2_LO = math.log(2) - _LN2_HI


@intrinsic
def _int_bits_as_f32(typingctx, i):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _opaque(typingctx, x):
    """``x``, with its origin hidden from the optimiser. A lane loop whose rows are offset
    by a vertex's index would otherwise have its run-time overlap checks widened to the
    whole loop over vertices, where they fail (the rows of all vertices share one buffer),
    and the loop would run unvectorised; behind this, each lane loop checks its own rows."""
    sig = x(x)

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(signature.args[0])
        return builder.asm(ir.FunctionType(ty, [ty]), "", "=r,0", [args[0]],
                           side_effect=False)

    return sig, codegen


@njit(inline="always")
def _exp_f32(x):
    # exp(x) = 2^k exp(r) with k = round(x / ln 2), r = x - k ln 2 (ln 2 in two parts, so
    # r is exact) and exp(r), |r| <= ln(2) / 2, by its Taylor polynomial of degree 7
    # (truncation below 3e-9 relative): within about one ulp of exp. Straight-line code,
    # so the loops over lanes vectorise (numba's math.exp does not). Below -87.33 (where
    # float32 turns subnormal) the result is 0, above 88.72 infinity.
    k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = (x - k * np.float32(_LN2_HI)) - k * np.float32(_LN2_LO)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    e = (p * r) * r + r + np.float32(1.0)
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
_Dims = namedtuple("_Dims", "N S W Sb L nblk T K maxn mode edge_mode has_gamma has_h0 "
                            "moments has_gstates maxdeg D")
# consts: [1/2, D * S]
_Inputs = namedtuple("_Inputs", "ub dxb deb ab bp cp gb h0b consts")
_Layout = namedtuple("_Layout", "ppos child_ptr tree_ptr groups srow snext")
_Outputs = namedtuple("_Outputs", "y1b meanb m2b statesb")
_GradIn = namedtuple("_GradIn", "gy1b gmu gm2 gstatesb mu")
_Grads = namedtuple("_Grads", "gxb gdeb gbp gcp gap ggp gh0b")


@njit(inline="always")
def _dims(dims):
    return _Dims(U(dims[0]), U(dims[1]), U(dims[2]), U(dims[3]), U(dims[2] * dims[3]),
                 U(dims[4]), U(dims[5]), U(dims[6]), U(dims[7]), dims[8], dims[9],
                 dims[10] != 0, dims[11] != 0, dims[12] != 0, dims[13] != 0, U(dims[14]),
                 U(dims[15]))


# ---------------------------------------------------------------------------- lane helpers
# Offsets are unsigned: signed indices make numba test each for wrap-around, which keeps
# the lane loops from vectorising. A vertex's chunk holds ``sb * W`` lanes, state-major
# (lane ``sl * W + dd`` is state ``s0 + sl`` of channel ``blk * W + dd``); its row in a
# buffer starts at ``(position - first position of the group) * L``.

@njit(inline="always")
def _offsets(d, lay, blk, i, a, s0):
    """Start of position i's channel block, of its parent's (its own at a root), of its
    states' row and of the chunk's lanes of A and g."""
    iu = (blk * d.N + U(i)) * d.W
    ip = (blk * d.N + U(lay.ppos[i])) * d.W if i > a else iu
    return iu, ip, U(i) * d.S, (blk * d.S) * d.W + s0 * d.W


@njit(inline="always")
def _edge_steps(buf, inp, d, iu, ip):
    """The step of the edge ``(v, parent(v))`` in each of the ``W`` lanes, into the last
    ``W`` entries of ``buf``; returns their offset. The rule is chosen outside the lane
    loops, which a branch inside would keep from vectorising."""
    W = d.W
    te = U(buf.shape[0]) - W
    if d.edge_mode == 0:
        for dd in range(W):
            buf[te + dd] = inp.dxb[iu + dd]
    elif d.edge_mode == 1:
        half = inp.consts[0]
        for dd in range(W):
            buf[te + dd] = half * (inp.dxb[iu + dd] + inp.dxb[ip + dd])
    else:
        for dd in range(W):
            buf[te + dd] = inp.deb[iu + dd]
    return te


@njit(inline="always")
def _x(dst, do, inp, d, iu, ib, s0, sb):
    # x = (dx u) B
    W = d.W
    for sl in range(sb):
        bs = inp.bp[ib + s0 + sl]
        o = do + sl * W
        for dd in range(W):
            dst[o + dd] = inp.dxb[iu + dd] * inp.ub[iu + dd] * bs


@njit(inline="always")
def _w(dst, do, inp, d, iu, ip, ia, sb):
    # w = exp(de A)
    W = d.W
    te = _edge_steps(dst, inp, d, iu, ip)
    for sl in range(sb):
        o = sl * W
        for dd in range(W):
            dst[do + o + dd] = _exp(dst[te + dd] * inp.ab[ia + o + dd])


@njit(inline="always")
def _fill(dst, do, n, value):
    for l in range(n):
        dst[do + l] = value


@njit(inline="always")
def _sum16(t, o):
    # t[o:o + 16] added by a pairwise tree (straight-line code: no loop to run unvectorised)
    s0, s1 = t[o] + t[o + 8], t[o + 1] + t[o + 9]
    s2, s3 = t[o + 2] + t[o + 10], t[o + 3] + t[o + 11]
    s4, s5 = t[o + 4] + t[o + 12], t[o + 5] + t[o + 13]
    s6, s7 = t[o + 6] + t[o + 14], t[o + 7] + t[o + 15]
    s0, s1, s2, s3 = s0 + s4, s1 + s5, s2 + s6, s3 + s7
    return (s0 + s2) + (s1 + s3)


@njit(inline="always")
def _lane_sum(t, to, W):
    # the W lanes of t[to:] added in a fixed order (overwrites them): groups of p lanes, p
    # the largest power of two dividing W (16 or more: W is a multiple of 16), folded onto
    # the first one after the other, then a pairwise tree over p
    p = W & (~W + U(1))
    for j in range(U(1), W // p):
        for l in range(p):
            t[to + l] += t[to + j * p + l]
    half = p >> U(1)
    while half >= U(16):
        for l in range(half):
            t[to + l] += t[to + half + l]
        half >>= U(1)
    return _sum16(t, to)


@njit(inline="always")
def _brackets(buf, oU, oW, oBr, base, tmp, ga, k0, k1, L, n):
    """For the children ``k0 <= k < k1`` of a vertex, ``Br[k] = base + (prefix + suffix)``
    of ``w U`` over k's siblings, into the rows of ``oBr``: the suffix sums are parked there
    on the way back, the prefix sums added on the way forward."""
    _fill(buf, tmp, n, 0)
    for k in range(k1 - 1, k0 - 1, -1):
        k = _opaque(k)
        lk = U(k - ga) * L
        for l in range(n):
            buf[oBr + lk + l] = buf[tmp + l]
            buf[tmp + l] += buf[oW + lk + l] * buf[oU + lk + l]
    _fill(buf, tmp, n, 0)
    for k in range(k0, k1):
        k = _opaque(k)
        lk = U(k - ga) * L
        for l in range(n):
            wu = buf[oW + lk + l] * buf[oU + lk + l]
            buf[oBr + lk + l] = buf[base + l] + (buf[tmp + l] + buf[oBr + lk + l])
            buf[tmp + l] += wu


def _cast(like, x):  # typed by the overload below
    return x


@overload(_cast)
def _cast_overload(like, x):
    to = np.dtype(str(like.dtype)).type
    return lambda like, x: to(x)


@njit(inline="always")
def _chunk_moments(h, oh, i, blk, s0, sb, out, d):
    """Fold the chunk's states ``h[oh:]`` of position ``i`` into the mean and the sum of
    squared deviations of the block's states (real channels only): the chunk's own two,
    from its lanes summed in a fixed order, then combined with the earlier chunks' by
    Chan's formula. The partial sums go to the third and the second row from the end of
    ``h``, temporaries that no forward pass uses."""
    W = d.W
    t1 = U(h.shape[0]) - U(3) * d.L
    t2 = U(h.shape[0]) - U(2) * d.L
    real = min(W, d.D - blk * W)
    for dd in range(W):
        h[t1 + dd] = h[oh + dd]
    for sl in range(U(1), sb):
        o = oh + sl * W
        for dd in range(W):
            h[t1 + dd] += h[o + dd]
    nb = _cast(h, sb * real)
    m = _lane_sum(h, t1, W) / nb
    _fill(h, t2, W, 0)
    for sl in range(sb):
        o = oh + sl * W
        for dd in range(real):
            dev = h[o + dd] - m
            h[t2 + dd] += dev * dev
    m2 = _lane_sum(h, t2, W)
    k = blk * d.N + U(i)
    if s0 == U(0):
        out.meanb[k] = m
        out.m2b[k] = m2
    else:
        na = _cast(h, s0 * real)
        delta = m - out.meanb[k]
        out.meanb[k] += delta * (nb / (na + nb))
        out.m2b[k] += m2 + delta * delta * (na * nb / (na + nb))


@njit(inline="always")
def _emit(h, oh, i, a, blk, s0, sb, inp, lay, out, d):
    """Read the states ``h[oh:]`` of position ``i`` out: y, moments, requested states."""
    W = d.W
    iu, ip, ib, ia = _offsets(d, lay, blk, i, a, s0)
    for sl in range(sb):
        c = inp.cp[ib + s0 + sl]
        o = sl * W
        if s0 + sl == 0:  # the row's sum starts at its first state (nothing zeroes y1b)
            _fill(out.y1b, iu, W, 0)
        if d.has_gamma:
            for dd in range(W):
                out.y1b[iu + dd] += c * inp.gb[ia + o + dd] * h[oh + o + dd]
        else:
            for dd in range(W):
                out.y1b[iu + dd] += c * h[oh + o + dd]
    if d.moments:
        _chunk_moments(h, oh, i, blk, s0, sb, out, d)
    r = lay.srow[i]
    while r >= 0:
        os = ((blk * d.K + U(r)) * d.S + s0) * W
        for l in range(sb * W):
            out.statesb[os + l] = h[oh + l]
        r = lay.snext[r]


# ---------------------------------------------------------------------------- passes
# The passes and the per-item drivers allocate nothing and are compiled without numba's
# reference counting (``_nrt=False``): with it, every array taken out of an argument tuple
# or handed to an inlined helper was counted with an atomic operation, dozens of times per
# vertex, which took more time than the arithmetic of 128 lanes.
@njit(cache=True, fastmath={"contract"}, _nrt=False)
def _up(buf, oH, oW, ga, a, b, blk, s0, sb, inp, lay, d, emit, out):
    """Leaves first: ``H = up(x)`` in buffer ``oH``, each non-root's ``w`` in ``oW``."""
    L, n = d.L, sb * d.W
    for i in range(b - 1, a - 1, -1):
        i = _opaque(i)
        iu, ip, ib, ia = _offsets(d, lay, blk, i, a, s0)
        oh = oH + U(i - ga) * L
        _x(buf, oh, inp, d, iu, ib, s0, sb)
        for k in range(lay.child_ptr[i], min(lay.child_ptr[i + 1], b)):
            k = _opaque(k)
            lk = U(k - ga) * L
            for l in range(n):
                buf[oh + l] += buf[oW + lk + l] * buf[oH + lk + l]
        if emit:
            _emit(buf, oh, i, a, blk, s0, sb, inp, lay, out, d)
        if i > a:
            _w(buf, oW + U(i - ga) * L, inp, d, iu, ip, ia, sb)


@njit(cache=True, fastmath={"contract"}, _nrt=False)
def _down(buf, oH, ga, a, b, t, blk, s0, sb, inp, lay, d, emit, out):
    """Roots first: ``H = down(x)`` in buffer ``oH``; an incoming state ``h0[t]`` enters the
    root through the root's own edge weight."""
    L, W = d.L, d.W
    for i in range(a, b):
        i = _opaque(i)
        iu, ip, ib, ia = _offsets(d, lay, blk, i, a, s0)
        oh = oH + U(i - ga) * L
        _x(buf, oh, inp, d, iu, ib, s0, sb)
        if i > a:
            op = oH + U(lay.ppos[i] - ga) * L
            te = _edge_steps(buf, inp, d, iu, ip)
            for sl in range(sb):
                o = sl * W
                for dd in range(W):
                    buf[oh + o + dd] += (_exp(buf[te + dd] * inp.ab[ia + o + dd])
                                         * buf[op + o + dd])
        elif d.has_h0:
            oz = ((blk * d.T + U(t)) * d.S + s0) * W
            te = _edge_steps(buf, inp, d, iu, ip)
            for sl in range(sb):
                o = sl * W
                for dd in range(W):
                    buf[oh + o + dd] += (_exp(buf[te + dd] * inp.ab[ia + o + dd])
                                         * inp.h0b[oz + o + dd])
        if emit:
            _emit(buf, oh, i, a, blk, s0, sb, inp, lay, out, d)


@njit(cache=True, fastmath={"contract"}, _nrt=False)
def _up_pull(buf, oH, tw, ga, a, b, blk, s0, sb, inp, lay, d, emit, out):
    """Leaves first: ``H = up(x)`` in buffer ``oH``, one row per vertex: each child's ``w``
    is formed (in the temporary row ``tw``) as the child is added to its parent."""
    L, n = d.L, sb * d.W
    for i in range(b - 1, a - 1, -1):
        i = _opaque(i)
        iu, ip, ib, ia = _offsets(d, lay, blk, i, a, s0)
        oh = oH + U(i - ga) * L
        _x(buf, oh, inp, d, iu, ib, s0, sb)
        for k in range(lay.child_ptr[i], min(lay.child_ptr[i + 1], b)):
            k = _opaque(k)
            ku, kp, kb, ka = _offsets(d, lay, blk, k, a, s0)
            _w(buf, tw, inp, d, ku, kp, ka, sb)
            ok = oH + U(k - ga) * L
            for l in range(n):
                buf[oh + l] += buf[tw + l] * buf[ok + l]
        if emit:
            _emit(buf, oh, i, a, blk, s0, sb, inp, lay, out, d)


@njit(cache=True, fastmath={"contract"}, _nrt=False)
def _out(buf, oR, oF, ot, ga, a, b, blk, s0, sb, inp, lay, d, out):
    """Roots first, after :func:`_up_pull`, in the same rows: ``h = up + out`` read out,
    ``out[v] = w[v] Br[v]``, ``Br[v] = out[p] + x[p] + (w up summed over v's siblings)``.
    A vertex's row holds ``up`` until its family is done (its siblings' brackets read it),
    then ``out + x``, where its own children's brackets start. The sibling sums come from
    prefix and suffix sums over the family; ``oF`` holds two rows per child of the largest
    family (the child's ``w`` and its suffix sum, then its ``out``)."""
    L, n = d.L, sb * d.W
    tacc, th = ot, ot + L
    ra = oR + U(a - ga) * L
    _emit(buf, ra, a, a, blk, s0, sb, inp, lay, out, d)
    iu, ip, ib, ia = _offsets(d, lay, blk, a, a, s0)
    _x(buf, ra, inp, d, iu, ib, s0, sb)  # out[root] + x[root], out[root] = 0
    for i in range(a, b):
        i = _opaque(i)
        k0, k1 = lay.child_ptr[i], min(lay.child_ptr[i + 1], b)
        if k0 >= k1:
            continue
        base = oR + U(i - ga) * L
        _fill(buf, tacc, n, 0)
        for k in range(k1 - 1, k0 - 1, -1):  # w and the suffix sums
            k = _opaque(k)
            ow = oF + U(k - k0) * (U(2) * L)
            osf = ow + L
            ku, kp, kb, ka = _offsets(d, lay, blk, k, a, s0)
            _w(buf, ow, inp, d, ku, kp, ka, sb)
            ok = oR + U(k - ga) * L
            for l in range(n):
                buf[osf + l] = buf[tacc + l]
                buf[tacc + l] += buf[ow + l] * buf[ok + l]
        _fill(buf, tacc, n, 0)
        for k in range(k0, k1):  # the prefix sums, out, h
            k = _opaque(k)
            ow = oF + U(k - k0) * (U(2) * L)
            osf = ow + L
            ok = oR + U(k - ga) * L
            for l in range(n):
                wk = buf[ow + l]
                uk = buf[ok + l]
                o = wk * (buf[base + l] + (buf[tacc + l] + buf[osf + l]))
                buf[tacc + l] += wk * uk
                buf[th + l] = uk + o
                buf[osf + l] = o
            _emit(buf, th, k, a, blk, s0, sb, inp, lay, out, d)
            if lay.child_ptr[k] < min(lay.child_ptr[k + 1], b):  # a parent: out + x
                ku, kp, kb, ka = _offsets(d, lay, blk, k, a, s0)
                _x(buf, ok, inp, d, ku, kb, s0, sb)
                for l in range(n):
                    buf[ok + l] = buf[osf + l] + buf[ok + l]


# ---------------------------------------------------------------------------- gradient helpers
@njit(inline="always")
def _grad_h(dst, do, h, oh, i, a, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl, readout):
    """``dL/dh`` of position ``i`` into ``dst[do:]`` given its states ``h[oh:]``; with
    ``readout`` also the gradients of ``C`` and ``g`` (read-out weight) it owes."""
    W = d.W
    iu, ip, ib, ia = _offsets(d, lay, blk, i, a, s0)
    for sl in range(sb):
        c = inp.cp[ib + s0 + sl]
        o = sl * W
        if d.has_gamma:
            for dd in range(W):
                dst[do + o + dd] = gin.gy1b[iu + dd] * c * inp.gb[ia + o + dd]
        else:
            for dd in range(W):
                dst[do + o + dd] = gin.gy1b[iu + dd] * c
    if d.moments:  # mu = sum h / (D S), m2 = sum (h - mu)^2
        gmu = gin.gmu[i] / inp.consts[1]
        g2 = gin.gm2[i] + gin.gm2[i]
        mu = gin.mu[i]
        for l in range(sb * W):
            dst[do + l] += gmu + g2 * (h[oh + l] - mu)
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
            c = inp.cp[ib + s0 + sl]
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
def _grad_x(G, og, i, a, blk, s0, sb, inp, lay, gr, d, buf, tl):
    """Accumulate what ``dL/dx = G[og:]`` at position ``i`` owes: ``sum_s G B`` (from which
    the gradients of ``u`` and ``dx`` follow) and the gradient of ``B``."""
    W = d.W
    iu, ip, ib, ia = _offsets(d, lay, blk, i, a, s0)
    for sl in range(sb):
        bs = inp.bp[ib + s0 + sl]
        o = og + sl * W
        if s0 + sl == 0:  # the row's sum starts at its first state (nothing zeroes gxb)
            _fill(gr.gxb, iu, W, 0)
        for dd in range(W):
            g = G[o + dd]
            gr.gxb[iu + dd] += g * bs
            buf[tl + dd] = g * (inp.dxb[iu + dd] * inp.ub[iu + dd])
        gr.gbp[(blk * d.N + U(i)) * d.S + s0 + sl] = _lane_sum(buf, tl, W)


@njit(inline="always")
def _grad_w(gw, ogw, w, ow, i, a, gi, blk, s0, sb, inp, lay, gr, d, buf, tl):
    """Accumulate what ``dL/dw = gw[ogw:]`` of position ``i``'s edge owes to its step and
    to ``A`` (``dw = w A dde + w de dA``); the step's gradient goes where the step came
    from (both ends in halves under the rule ``"mean"``)."""
    W = d.W
    iu, ip, ib, ia = _offsets(d, lay, blk, i, a, s0)
    og = ((U(gi) * d.nblk + blk) * d.S + s0) * W
    te = _edge_steps(buf, inp, d, iu, ip)
    _fill(buf, tl, W, 0)
    for sl in range(sb):
        o = sl * W
        for dd in range(W):
            tw = gw[ogw + o + dd] * w[ow + o + dd]
            buf[tl + dd] += tw * inp.ab[ia + o + dd]
            gr.gap[og + o + dd] += tw * buf[te + dd]
    if d.edge_mode == 1:
        for dd in range(W):
            half = inp.consts[0] * buf[tl + dd]
            gr.gdeb[iu + dd] += half
            gr.gdeb[ip + dd] += half
    else:
        for dd in range(W):
            gr.gdeb[iu + dd] += buf[tl + dd]


# ---------------------------------------------------------------------------- backward passes
@njit(cache=True, fastmath={"contract"}, _nrt=False)
def _backward_down(buf, q, ot, gi, ga, a, b, t, blk, s0, sb, inp, lay, gin, gr, d, out):
    # H = down(x), then leaves first G = up(dL/dh) written over H, dL/dw[v] = G[v] H[p]
    L, n = d.L, sb * d.W
    oH, oW = U(0), q
    t0, t1, t2, tl = ot, ot + L, ot + U(2) * L, ot + U(6) * L
    _down(buf, oH, ga, a, b, t, blk, s0, sb, inp, lay, d, False, out)
    for i in range(b - 1, a - 1, -1):
        i = _opaque(i)
        iu, ip, ib, ia = _offsets(d, lay, blk, i, a, s0)
        li = U(i - ga) * L
        oh = oH + li
        _grad_h(buf, t0, buf, oh, i, a, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl, True)
        for l in range(n):
            buf[oh + l] = buf[t0 + l]
        for k in range(lay.child_ptr[i], min(lay.child_ptr[i + 1], b)):
            k = _opaque(k)
            lk = U(k - ga) * L
            for l in range(n):
                buf[oh + l] += buf[oW + lk + l] * buf[oH + lk + l]
        _grad_x(buf, oh, i, a, blk, s0, sb, inp, lay, gr, d, buf, tl)
        if i > a:
            _w(buf, oW + li, inp, d, iu, ip, ia, sb)
            op = oH + U(lay.ppos[i] - ga) * L  # the parent's row still holds H
            for l in range(n):
                buf[t2 + l] = buf[oh + l] * buf[op + l]
            _grad_w(buf, t2, buf, oW + li, i, a, gi, blk, s0, sb, inp, lay, gr, d, buf, tl)
        elif d.has_h0:
            _w(buf, t1, inp, d, iu, ip, ia, sb)
            oz = ((blk * d.T + U(t)) * d.S + s0) * d.W
            for l in range(n):
                buf[t2 + l] = buf[oh + l] * inp.h0b[oz + l]
                gr.gh0b[oz + l] = buf[oh + l] * buf[t1 + l]
            _grad_w(buf, t2, buf, t1, i, a, gi, blk, s0, sb, inp, lay, gr, d, buf, tl)


@njit(cache=True, fastmath={"contract"}, _nrt=False)
def _backward_up(buf, q, ot, gi, ga, a, b, blk, s0, sb, inp, lay, gin, gr, d, out):
    # H = up(x), then roots first G = down(dL/dh) written over H, dL/dw[v] = H[v] G[p]
    L, n = d.L, sb * d.W
    oH, oW = U(0), q
    t0, t2, tl = ot, ot + U(2) * L, ot + U(6) * L
    _up(buf, oH, oW, ga, a, b, blk, s0, sb, inp, lay, d, False, out)
    for i in range(a, b):
        i = _opaque(i)
        li = U(i - ga) * L
        oh = oH + li
        _grad_h(buf, t0, buf, oh, i, a, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl, True)
        if i > a:
            op = oH + U(lay.ppos[i] - ga) * L  # the parent's row already holds G
            for l in range(n):
                gp = buf[op + l]
                buf[t2 + l] = buf[oh + l] * gp
                buf[oh + l] = buf[t0 + l] + buf[oW + li + l] * gp
            _grad_w(buf, t2, buf, oW + li, i, a, gi, blk, s0, sb, inp, lay, gr, d, buf, tl)
        else:
            for l in range(n):
                buf[oh + l] = buf[t0 + l]
        _grad_x(buf, oh, i, a, blk, s0, sb, inp, lay, gr, d, buf, tl)


@njit(cache=True, fastmath={"contract"}, _nrt=False)
def _backward_both(buf, q, ot, gi, ga, a, b, blk, s0, sb, inp, lay, gin, gr, d, out):
    # Buffers: up(x), w, the bracket Br_x that out_x multiplies (out_x = w Br_x), dL/dh
    # turned into up(dL/dh) in place, out of dL/dh. Passes: up(x); roots first Br_x, h and
    # dL/dh; up(dL/dh); roots first out_g, dL/dx and dL/dw = up_x Br_g + up_g Br_x.
    L, n = d.L, sb * d.W
    oUx, oW, oBx, oUg, oOg = U(0), q, U(2) * q, U(3) * q, U(4) * q
    t0, t2, t3, t4, t5 = ot, ot + U(2) * L, ot + U(3) * L, ot + U(4) * L, ot + U(5) * L
    tl = ot + U(6) * L
    _up(buf, oUx, oW, ga, a, b, blk, s0, sb, inp, lay, d, False, out)
    la = U(a - ga) * L
    _grad_h(buf, oUg + la, buf, oUx + la, a, a, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl,
            True)
    for i in range(a, b):
        i = _opaque(i)
        k0, k1 = lay.child_ptr[i], min(lay.child_ptr[i + 1], b)
        if k0 >= k1:
            continue
        li = U(i - ga) * L
        iu, ip, ib, ia = _offsets(d, lay, blk, i, a, s0)
        _x(buf, t2, inp, d, iu, ib, s0, sb)
        if i > a:  # out_x[p] + x[p], as the forward pass forms it
            for l in range(n):
                buf[t2 + l] = buf[oW + li + l] * buf[oBx + li + l] + buf[t2 + l]
        _brackets(buf, oUx, oW, oBx, t2, t0, ga, k0, k1, L, n)
        for k in range(k0, k1):
            k = _opaque(k)
            lk = U(k - ga) * L
            for l in range(n):
                buf[t3 + l] = buf[oUx + lk + l] + buf[oW + lk + l] * buf[oBx + lk + l]
            _grad_h(buf, oUg + lk, buf, t3, k, a, gi, blk, s0, sb, inp, lay, gin, gr, d, buf,
                    tl, True)
    for i in range(b - 1, a - 1, -1):  # up(dL/dh) in place
        i = _opaque(i)
        li = U(i - ga) * L
        for k in range(lay.child_ptr[i], min(lay.child_ptr[i + 1], b)):
            k = _opaque(k)
            lk = U(k - ga) * L
            for l in range(n):
                buf[oUg + li + l] += buf[oW + lk + l] * buf[oUg + lk + l]
    _fill(buf, oOg + la, n, 0)
    _grad_x(buf, oUg + la, a, a, blk, s0, sb, inp, lay, gr, d, buf, tl)
    for i in range(a, b):
        i = _opaque(i)
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
        _grad_h(buf, t2, buf, t5, i, a, gi, blk, s0, sb, inp, lay, gin, gr, d, buf, tl, False)
        for l in range(n):  # out_g[p] + g[p]
            buf[t2 + l] = buf[oOg + li + l] + buf[t2 + l]
        _brackets(buf, oUg, oW, oOg, t2, t0, ga, k0, k1, L, n)
        for k in range(k0, k1):
            k = _opaque(k)
            lk = U(k - ga) * L
            for l in range(n):
                wk = buf[oW + lk + l]
                ugk = buf[oUg + lk + l]
                brg = buf[oOg + lk + l]
                ogk = wk * brg
                buf[oOg + lk + l] = ogk
                buf[t3 + l] = buf[oUx + lk + l] * brg + ugk * buf[oBx + lk + l]
                buf[t4 + l] = ugk + ogk
            _grad_w(buf, t3, buf, oW + lk, k, a, gi, blk, s0, sb, inp, lay, gr, d, buf, tl)
            _grad_x(buf, t4, k, a, blk, s0, sb, inp, lay, gr, d, buf, tl)


# ---------------------------------------------------------------------------- drivers
@njit(cache=True, fastmath={"contract"}, _nrt=False)
def _forward_item(buf, gi, blk, inp, lay, out, d):
    # rows: one per vertex of the group, then two per child of the largest family
    # (direction "both"), then the temporaries
    q = d.maxn * d.L
    ot = q + U(2) * d.maxdeg * d.L if d.mode == 0 else q
    ga = lay.tree_ptr[lay.groups[gi]]
    for t in range(lay.groups[gi], lay.groups[gi + 1]):
        a, b = lay.tree_ptr[t], lay.tree_ptr[t + 1]
        for s0 in range(U(0), d.S, d.Sb):
            sb = min(d.Sb, d.S - s0)
            if d.mode == 2:
                _down(buf, U(0), ga, a, b, t, blk, s0, sb, inp, lay, d, True, out)
            elif d.mode == 1:
                _up_pull(buf, U(0), ot, ga, a, b, blk, s0, sb, inp, lay, d, True, out)
            else:
                _up_pull(buf, U(0), ot, ga, a, b, blk, s0, sb, inp, lay, d, False, out)
                _out(buf, U(0), q, ot, ga, a, b, blk, s0, sb, inp, lay, d, out)


@njit(cache=True, nogil=True)
def _forward_worker(th, ub, dxb, deb, ab, bp, cp, gb, h0b, consts, ppos, child_ptr,
                    tree_ptr, groups, srow, snext, y1b, meanb, m2b, statesb, scratch, dims):
    # the work items th, th + threads, ... (threads = rows of scratch), without the GIL
    d = _dims(dims)
    inp = _Inputs(ub, dxb, deb, ab, bp, cp, gb, h0b, consts)
    lay = _Layout(ppos, child_ptr, tree_ptr, groups, srow, snext)
    out = _Outputs(y1b, meanb, m2b, statesb)
    for j in range(th, (groups.shape[0] - 1) * dims[4], scratch.shape[0]):
        gi = j // dims[4]
        _forward_item(scratch[th], gi, U(j - gi * dims[4]), inp, lay, out, d)


@njit(cache=True, fastmath={"contract"}, _nrt=False)
def _backward_item(buf, gi, blk, inp, lay, gin, gr, d, out):
    q = d.maxn * d.L
    ot = (U(5) if d.mode == 0 else U(2)) * q  # after the rows of _BUFFERS
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


@njit(cache=True, nogil=True)
def _backward_worker(th, ub, dxb, deb, ab, bp, cp, gb, h0b, consts, ppos, child_ptr,
                     tree_ptr, groups, srow, snext, gy1b, gmu, gm2, gstatesb, mu, gxb, gdeb,
                     gbp, gcp, gap, ggp, gh0b, scratch, dims):
    d = _dims(dims)
    inp = _Inputs(ub, dxb, deb, ab, bp, cp, gb, h0b, consts)
    lay = _Layout(ppos, child_ptr, tree_ptr, groups, srow, snext)
    gin = _GradIn(gy1b, gmu, gm2, gstatesb, mu)
    gr = _Grads(gxb, gdeb, gbp, gcp, gap, ggp, gh0b)
    out = _Outputs(gxb[:1], gxb[:1], gxb[:1], gxb[:1])  # never written: no read-out
    for j in range(th, (groups.shape[0] - 1) * dims[4], scratch.shape[0]):
        gi = j // dims[4]
        _backward_item(scratch[th], gi, U(j - gi * dims[4]), inp, lay, gin, gr, d, out)


# ---------------------------------------------------------------------------- layout copies
# Each runs over positions [i0, i1) without the GIL; :func:`_over_positions` splits the
# positions among threads.

@njit(cache=True, nogil=True)
def _rows_to_positions(i0, i1, x, order, xp):
    # xp[i] = x[order[i]] for rows of a few entries (B, C)
    s = x.shape[1]
    for i in range(i0, i1):
        v = order[i]
        for j in range(s):
            xp[i * s + j] = x[v, j]


@njit(cache=True, nogil=True)
def _rows_to_blocks(i0, i1, x, order, b0, nb, W, xb):
    # xb[blk, i, dd] = x[order[i], (b0 + blk) * W + dd] for the nb blocks from b0, zero past
    # the last channel (flat, unsigned offsets and no branch inside the lane loops: they
    # vectorise)
    n, c = U(x.shape[0]), U(x.shape[1])
    xf = x.reshape(-1)
    Wu = U(W)
    for i in range(i0, i1):
        src = U(order[i]) * c
        for blk in range(U(nb)):
            o = (blk * n + U(i)) * Wu
            c0 = (U(b0) + blk) * Wu
            m = min(Wu, c - c0)
            for dd in range(m):
                xb[o + dd] = xf[src + c0 + dd]
            for dd in range(m, Wu):
                xb[o + dd] = 0


@njit(cache=True, nogil=True)
def _from_blocks(i0, i1, src, order, b0, nb, W, dst):
    # dst[order[i], (b0 + blk) * W + dd] = src[blk, i, dd] for the real channels of the nb
    # blocks from b0
    n, c = U(dst.shape[0]), U(dst.shape[1])
    df = dst.reshape(-1)
    Wu = U(W)
    for i in range(i0, i1):
        row = U(order[i]) * c
        for blk in range(U(nb)):
            o = (blk * n + U(i)) * Wu
            c0 = (U(b0) + blk) * Wu
            for dd in range(min(Wu, c - c0)):
                df[row + c0 + dd] = src[o + dd]


@njit(cache=True, nogil=True)
def _input_grads(i0, i1, gxb, gdeb, ub, dxb, order, b0, nb, W, edge_on_dx, gu, gdx, gde):
    # gu = (sum_s G B) dx, gdx = (sum_s G B) u (+ the edge steps' gradient when they are
    # formed from dx), gde = the given edge steps' gradient, for the nb blocks from b0; back
    # in vertex order (flat, unsigned offsets, the rule's branch outside the lane loops)
    n, c = U(gu.shape[0]), U(gu.shape[1])
    guf, gdxf, gdef = gu.reshape(-1), gdx.reshape(-1), gde.reshape(-1)
    Wu = U(W)
    for i in range(i0, i1):
        row = U(order[i]) * c
        for blk in range(U(nb)):
            o = (blk * n + U(i)) * Wu
            c0 = (U(b0) + blk) * Wu
            r = row + c0
            m = min(Wu, c - c0)
            for dd in range(m):
                guf[r + dd] = gxb[o + dd] * dxb[o + dd]
            if edge_on_dx:
                for dd in range(m):
                    gdxf[r + dd] = gxb[o + dd] * ub[o + dd] + gdeb[o + dd]
            else:
                for dd in range(m):
                    gdxf[r + dd] = gxb[o + dd] * ub[o + dd]
                    gdef[r + dd] = gdeb[o + dd]


@njit(cache=True, nogil=True)
def _moments(i0, i1, meanb, m2b, order, states, mu, m2):
    # Chan's combination of the blocks' (mean, m2) over ``states[blk]`` states each into the
    # vertex's (mean, m2) over all its states, the blocks in ascending order
    n = order.shape[0]
    for i in range(i0, i1):
        m = meanb[i]
        q = m2b[i]
        na = states[0]
        for blk in range(1, states.shape[0]):
            nb = states[blk]
            delta = meanb[blk * n + i] - m
            nab = na + nb
            m += delta * (nb / nab)
            q += m2b[blk * n + i] + delta * delta * (na * nb / nab)
            na = nab
        v = order[i]
        mu[v] = m
        m2[v] = q


@njit(cache=True, nogil=True)
def _add_blocks_to_rows(i0, i1, src, order, nb, first, dst):
    # dst[order[i], s] = (0 for the first batch of blocks, else itself) + the sum over the
    # batch's nb blocks, in ascending order, of src[blk, i, s]: over the batches in turn,
    # the blocks are added in the order of one sum over all of them
    n, s = dst.shape
    for i in range(i0, i1):
        v = order[i]
        for j in range(s):
            acc = src[i * s + j]
            if not first:
                acc = dst[v, j] + acc
            for blk in range(1, nb):
                acc += src[(blk * n + i) * s + j]
            dst[v, j] = acc


@njit(inline="always")
def _row_products(C, v, pT, has_p, acc):
    # acc[j] = sum_k C[v, k] pT[k, j], with pT all ones when absent
    acc[:] = 0
    for k in range(C.shape[1]):
        c = C[v, k]
        if has_p:
            for j in range(acc.shape[0]):
                acc[j] += c * pT[k, j]
        else:
            for j in range(acc.shape[0]):
                acc[j] += c


@njit(cache=True, nogil=True, fastmath={"contract"})
def _readout_rows(i0, i1, y1, mu, m2, C, gT, bT, u, D, eps, count, has_g, has_b, has_d, y):
    # y[v] = rstd (y1[v] - mu[v] C[v] g^T) + C[v] b^T + D u[v] in one pass over the rows
    d = y1.shape[1]
    cg = np.empty(d, y1.dtype)
    cb = np.zeros(d, y1.dtype)
    for v in range(i0, i1):
        r = 1 / math.sqrt(m2[v] / count + eps)
        m = mu[v]
        _row_products(C, v, gT, has_g, cg)
        if has_b:
            _row_products(C, v, bT, True, cb)
        if has_d:
            for j in range(d):
                y[v, j] = r * (y1[v, j] - m * cg[j]) + cb[j] + D[j] * u[v, j]
        else:
            for j in range(d):
                y[v, j] = r * (y1[v, j] - m * cg[j]) + cb[j]


@njit(cache=True, nogil=True, fastmath={"contract", "reassoc"}, error_model="numpy")
def _dot(a, b, n):
    # sum of a[j] b[j] over j < n, reassociated by LLVM's vectoriser: partial sums in vector
    # registers, then a fixed tree; one order for every call, run and thread count of the
    # compiled code. (Sixteen partial sums in an array, in an order of our own, kept each
    # one in memory between steps: the read-out's backward took 72 ms at [10^5, 128] with
    # them, 41 ms with this.)
    acc = _cast(a, 0)
    for j in range(n):
        acc += a[j] * b[j]
    return acc


@njit(cache=True, nogil=True, fastmath={"contract"})
def _readout_grad_rows(c0, c1, rows, gy, y1, mu, m2, C, gT, bT, u, D, eps, count, has_g, has_b,
                       has_d, g_y1, g_mu, g_m2, g_C, g_u, pw, pb, pd):
    # the derivative of _readout_rows over the row chunks [c0, c1) of ``rows`` rows each;
    # the sums over vertices (weight, bias, skip) per chunk, in row order; the sums over
    # channels by :func:`_dot` (rows of d entries, flat and unsigned: the loops vectorise)
    n, d = y1.shape
    s = C.shape[1]
    du = U(d)
    gyf, y1f, guf, gy1f, uf = (gy.reshape(-1), y1.reshape(-1), g_u.reshape(-1),
                               g_y1.reshape(-1), u.reshape(-1))
    cg = np.empty(d, y1.dtype)
    gcg = np.empty(d, y1.dtype)
    dev = np.empty(d, y1.dtype)
    ones = np.ones(d, y1.dtype)
    for c in range(c0, c1):
        # this chunk's partial sums (the one-entry placeholder of an absent parameter)
        pwc = pw[c if has_g else 0].reshape(-1)
        pbc = pb[c if has_b else 0].reshape(-1)
        pdc = pd[c if has_d else 0]
        for v in range(c * rows, min((c + 1) * rows, n)):
            r = 1 / math.sqrt(m2[v] / count + eps)
            m = mu[v]
            _row_products(C, v, gT, has_g, cg)
            o = U(v) * du
            for j in range(du):
                g = gyf[o + j]
                gr = g * r
                gy1f[o + j] = gr
                dev[j] = y1f[o + j] - m * cg[j]
                gcg[j] = -(gr * m)
            g_m2[v] = _dot(gyf[o:], dev, du) * (-0.5 / count) * (r * r * r)
            g_mu[v] = -r * _dot(gyf[o:], cg, du)
            for k in range(s):
                ck = C[v, k]
                ok = U(k) * du
                if has_g:
                    acc = _dot(gcg, gT[k], du)
                    for j in range(du):
                        pwc[ok + j] += gcg[j] * ck
                else:
                    acc = _dot(gcg, ones, du)
                if has_b:
                    acc += _dot(gyf[o:], bT[k], du)
                    for j in range(du):
                        pbc[ok + j] += gyf[o + j] * ck
                g_C[v, k] = acc
            if has_d:
                for j in range(du):
                    guf[o + j] = gyf[o + j] * D[j]
                    pdc[j] += gyf[o + j] * uf[o + j]


# ---------------------------------------------------------------------------- threads
def _threads() -> int:
    return max(1, get_num_threads())


def _over_positions(fn, n: int, *args) -> None:
    """``fn(i0, i1, *args)`` over ``[0, n)`` cut into one range per thread (of at least
    4,096 positions: fewer run on the calling thread, without the work sharing's costs)."""
    threads = max(1, min(_threads(), n // 4096))
    if threads == 1:
        fn(0, n, *args)
        return
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    on_slots(lambda th: fn(bounds[th], bounds[th + 1], *args), threads)


# ---------------------------------------------------------------------------- host side
def _np(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().contiguous().numpy()


def _params_to_blocks(p: np.ndarray, nblk: int, W: int, lead=()) -> np.ndarray:
    """``[*lead, D, S]`` -> flat ``[nblk, *lead, S, W]``, padded with zero channels."""
    d, s = p.shape[-2:]
    pad = np.zeros(lead + (nblk * W, s), p.dtype)
    pad[..., :d, :] = p
    pad = pad.reshape(lead + (nblk, W, s))
    k = len(lead)
    axes = (k,) + tuple(range(k)) + (k + 2, k + 1)
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


def _lanes(s: int, d: int, itemsize: int, rows: int, budget: int):
    """``(Sb, W, nblk)``: states per chunk, channels per block and blocks, for up to
    ``_MAX_LANES`` lanes per vertex (states first: the per-channel arrays are then read
    fewer times), within ``budget`` bytes of scratch per thread (narrower blocks first,
    then fewer states per chunk, down to one state of one base block).

    Where the budget cuts the states of a base block into smaller chunks, blocks of half
    the channels (down to ``_MIN_BLOCK``) take twice the states in the same lanes: the
    per-channel work of the backward (the edge steps, the gradients of ``u`` and ``dx``)
    is then done for fewer chunks. ``TreeSSMConv(64, 64)``'s backward at 10^5 vertices (128
    channels, 4 states; one state a chunk of 32 channels within the budget): 478 / 558 ms
    -> 428 / 444 ms in chunks of two states of 16 channels, the training step 1.86 / 1.96
    -> 1.81 / 1.80 s (one thread, processes in turn). Below the lane cap (more than 4
    states in float32, as GrootL's 16) the blocks stay whole: 16 channels by 8 states made
    its chain's backward slower."""
    base = _BLOCK_BYTES // itemsize
    blocks = max(1, -(-d // base))
    sb = most = max(1, min(s, _MAX_LANES // base))
    k = max(1, min(blocks, _MAX_LANES // (base * sb)))

    def fits():
        return rows * sb * base * k * itemsize <= budget

    while not fits() and k > 1:
        k -= 1
    while not fits() and sb > 1:
        sb -= 1
    while sb < most and base // 2 >= _MIN_BLOCK and (base // 2) % _MIN_BLOCK == 0:
        base, sb = base // 2, min(most, 2 * sb)
        blocks = max(1, -(-d // base))
    nblk = -(-blocks // k)
    k = -(-blocks // nblk)  # the same number of blocks, as even as they come
    return sb, base * k, nblk


def _of_blocks(p: np.ndarray, b0: int, nb: int, per_block: int) -> np.ndarray:
    """The ``nb`` blocks from ``b0`` of a flat array laid out block-major with
    ``per_block`` entries a block (a placeholder of one entry stays itself)."""
    return p if p.shape[0] == 1 else p[b0 * per_block:(b0 + nb) * per_block]


def _check(u: torch.Tensor, direction: str, edge_rule: str) -> None:
    if u.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the numba kernels take float32 or float64, got {u.dtype}")
    if u.device.type != "cpu":
        raise ValueError(f"the numba kernels run on CPU tensors, got {u.device}")
    if direction not in _MODES:
        raise ValueError(f"direction must be one of {tuple(_MODES)}, got {direction!r}")
    if edge_rule not in EDGE_RULES:
        raise ValueError(f"edge_rule must be one of {EDGE_RULES}, got {edge_rule!r}")


class _Run:
    """What the kernels of one call share: positions, blocks, work items, scratch."""

    def __init__(self, u, dx, de, A, B, C, gamma, h0, srow, snext, parent, order, child_ptr,
                 tree_ptr, direction, edge_rule, moments, backward, grad_states=False):
        _check(u, direction, edge_rule)
        n, dch = u.shape
        s = A.shape[1]
        dt = np.dtype(np.float64 if u.dtype == torch.float64 else np.float32)
        self.n, self.d, self.s, self.dtype = n, dch, s, dt
        self.order = _np(order)
        pos = np.empty(n, np.int64)
        pos[self.order] = np.arange(n)
        up = _np(parent)[self.order]
        self.ppos = np.where(up >= 0, pos[np.maximum(up, 0)], -1)
        self.tree_ptr = tp = _np(tree_ptr)
        self.child_ptr = _np(child_ptr)
        self.groups = _groups(tp, n)
        self.maxn = int(np.diff(tp[self.groups]).max()) if n else 0
        self.num_trees = tp.shape[0] - 1
        self.num_states = k = snext.shape[0]
        self.maxdeg = int(np.bincount(self.ppos[self.ppos >= 0], minlength=1).max()) if n else 0
        rows = _BUFFERS[direction][1 if backward else 0] * self.maxn + _NUM_TEMPS
        if direction == "both" and not backward:  # each family's w and suffix sums
            rows += 2 * self.maxdeg
        budget = max(_SCRATCH_MIN, n * dch * dt.itemsize) * (1 + _BUDGET_SLACK)
        self.sb, self.W, self.nblk = _lanes(s, dch, dt.itemsize, rows, budget)
        sb, W, nblk = self.sb, self.W, self.nblk
        given = edge_rule == "given"
        nitems = (self.groups.shape[0] - 1) * nblk
        threads = max(1, min(_threads(), nitems, n * dch * s // _STATES_PER_THREAD))
        self.per_batch = (nblk if nblk * n * W * dt.itemsize <= _BATCH_BYTES
                          else min(nblk, threads))
        self.u, self.dx, self.de = _np(u), _np(dx), _np(de) if given else None
        self.ub, self.dxb = self.workspace("u"), self.workspace("dx")
        self.deb = self.workspace("de") if given else np.zeros(1, dt)
        self.bp, self.cp = self.workspace("B", n * s), self.workspace("C", n * s)
        if n:
            _over_positions(_rows_to_positions, n, _np(B), self.order, self.bp)
            _over_positions(_rows_to_positions, n, _np(C), self.order, self.cp)
        self.ab = _params_to_blocks(_np(A), nblk, W)
        self.gb = (_params_to_blocks(_np(gamma), nblk, W) if gamma is not None
                   else np.zeros(1, dt))
        self.h0b = (_params_to_blocks(_np(h0), nblk, W, (self.num_trees,)) if h0 is not None
                    else np.zeros(1, dt))
        self.consts = np.array([0.5, dch * s], dt)
        self.srow = _np(srow)[self.order] if k else np.full(n, -1, np.int64)
        self.snext = _np(snext) if k else np.full(1, -1, np.int64)
        self.scratch = self.workspace("scratch", threads * rows * sb * W).reshape(
            threads, rows * sb * W)
        self.dims = np.array([n, s, W, sb, nblk, self.num_trees, k, self.maxn,
                              _MODES[direction], EDGE_RULES.index(edge_rule), gamma is not None,
                              h0 is not None, moments, grad_states, self.maxdeg, dch], np.int64)

    def workspace(self, name: str, size: Optional[int] = None, zero: bool = False
                  ) -> np.ndarray:
        """The internal array ``name`` of this call (:func:`cpu_arrays.workspace`) of ``size``
        entries, by default one per block of a batch, position and channel of a block
        (``[per_batch, N, W]``)."""
        if size is None:
            size = self.per_batch * self.n * self.W
        return cpu_arrays.workspace("selective_scan." + name, size, self.dtype, zero=zero)

    def batches(self):
        """``(b0, nb)``: the blocks of channels the kernels take at a time, from block ``b0``
        (all of them where their arrays are small, else as many as threads)."""
        for b0 in range(0, self.nblk, self.per_batch):
            yield b0, min(self.per_batch, self.nblk - b0)

    def to_blocks(self, x: np.ndarray, b0: int, nb: int, out: np.ndarray) -> np.ndarray:
        """The ``nb`` blocks from ``b0`` of ``x [N, D]`` by position, in ``out``."""
        if self.n:
            _over_positions(_rows_to_blocks, self.n, x, self.order, b0, nb, self.W, out)
        return out

    def kernel_args(self, b0: int, nb: int):
        """The inputs of the kernels for the ``nb`` blocks from ``b0`` (``u``, the steps
        and the parameters of those blocks) and their ``dims``."""
        self.to_blocks(self.u, b0, nb, self.ub)
        self.to_blocks(self.dx, b0, nb, self.dxb)
        if self.de is not None:
            self.to_blocks(self.de, b0, nb, self.deb)
        sw = self.s * self.W
        params = [_of_blocks(p, b0, nb, per) for p, per in
                  ((self.ab, sw), (self.gb, sw), (self.h0b, self.num_trees * sw))]
        dims = self.dims.copy()
        dims[4], dims[15] = nb, self.d - b0 * self.W  # blocks, channels from b0 on
        return (self.ub, self.dxb, self.deb, params[0], self.bp, self.cp, params[1],
                params[2], self.consts, self.ppos, self.child_ptr, self.tree_ptr, self.groups,
                self.srow, self.snext), dims


def forward(u, dx, de, A, B, C, gamma, h0, srow, snext, parent, order, child_ptr, tree_ptr,
            direction: str, edge_rule: str, moments: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mu, m2, states)`` of the fused scan (see the module docstring).

    ``u, dx [N, D]`` and ``de [N, D]`` (rule ``"given"``; else unused), ``B, C [N, S]``,
    ``A [D, S]``, ``gamma [D, S]`` or ``None``, ``h0 [T, D, S]`` or ``None`` (direction
    ``"down"``), all float32 or all float64. ``srow [N]`` is the first row of
    ``states [K, D, S]`` each vertex's states go to (``-1``: none) and ``snext [K]`` the next
    row of the same vertex (``-1``: none). ``mu, m2 [N]`` are empty unless ``moments``.
    """
    run = _Run(u, dx, de, A, B, C, gamma, h0, srow, snext, parent, order, child_ptr, tree_ptr,
               direction, edge_rule, moments, backward=False)
    n, d, s, k, nblk, W, dt = run.n, run.d, run.s, run.num_states, run.nblk, run.W, run.dtype
    y1b = run.workspace("y1")
    meanb = run.workspace("mean", nblk * n, zero=True) if moments else np.zeros(1, dt)
    m2b = run.workspace("m2", nblk * n, zero=True) if moments else np.zeros(1, dt)
    statesb = np.zeros(max(1, nblk * k * s * W), dt)
    y = cpu_arrays.empty((n, d), dt)
    if n and d and s:
        for b0, nb in run.batches():
            args, dims = run.kernel_args(b0, nb)
            on_slots(_forward_worker, run.scratch.shape[0], *args, y1b,
                     _of_blocks(meanb, b0, nb, n), _of_blocks(m2b, b0, nb, n),
                     _of_blocks(statesb, b0, nb, k * s * W), run.scratch, dims)
            _over_positions(_from_blocks, n, y1b, run.order, b0, nb, W, y)
    elif n:
        y.fill(0)
    mu = np.zeros(n if moments else 0, dt)
    m2 = np.zeros(n if moments else 0, dt)
    if moments and n and d and s:
        block_states = (np.minimum(W, d - W * np.arange(nblk)) * s).astype(dt)
        _over_positions(_moments, n, meanb, m2b, run.order, block_states, mu, m2)
    states = _params_from_blocks(statesb[:nblk * k * s * W], d, s, nblk, W, (k,))
    return (torch.from_numpy(y), torch.from_numpy(mu), torch.from_numpy(m2),
            torch.from_numpy(states))


def normalised_readout(y1, mu, m2, C, gamma, beta, u, D, eps: float) -> torch.Tensor:
    r"""``y = rstd (y1 - mu C g^T) + C b^T + D u`` per vertex, ``rstd = (m2 / (D S) +
    eps)^{-1/2}``: the read-out of the normalised states from :func:`forward`'s ``y1``,
    ``mu``, ``m2`` (``g`` is ``gamma``, 1 when absent; ``b`` is ``beta``, 0 when absent;
    no skip when ``D`` is ``None``), in one pass over the rows."""
    n, d = y1.shape
    s = C.shape[1]
    dt = _np(y1).dtype
    y = cpu_arrays.empty((n, d), dt)
    if n:
        none = np.zeros((1, 1), dt)
        gT = np.ascontiguousarray(_np(gamma).T) if gamma is not None else none
        bT = np.ascontiguousarray(_np(beta).T) if beta is not None else none
        skip = _np(D) if D is not None else none[0]
        _over_positions(_readout_rows, n, _np(y1), _np(mu), _np(m2), _np(C), gT, bT, _np(u),
                        skip, dt.type(eps), dt.type(d * s), gamma is not None,
                        beta is not None, D is not None, y)
    return torch.from_numpy(y)


def normalised_readout_backward(gy, y1, mu, m2, C, gamma, beta, u, D, eps: float):
    """Gradients of :func:`normalised_readout` with respect to ``y1, mu, m2, C, gamma,
    beta, u, D`` (``None`` for an absent argument): one pass over the rows; the sums over
    vertices run over fixed chunks of rows, each in row order, then over the chunks in
    order (the same bits with any number of threads)."""
    n, d = y1.shape
    s = C.shape[1]
    dt = _np(y1).dtype
    none = np.zeros((1, 1), dt)
    rows = cpu_arrays.CHUNK_ROWS
    chunks = -(-n // rows)
    g_y1 = cpu_arrays.empty((n, d), dt)  # every row written by _readout_grad_rows
    g_u = cpu_arrays.empty((n, d) if D is not None else (0, d), dt)
    g_mu, g_m2, g_C = np.zeros(n, dt), np.zeros(n, dt), np.zeros((n, s), dt)
    pw = np.zeros((chunks, s, d) if gamma is not None else (1, 1, 1), dt)
    pb = np.zeros((chunks, s, d) if beta is not None else (1, 1, 1), dt)
    pd = np.zeros((chunks, d) if D is not None else (1, 1), dt)
    if n:
        gT = np.ascontiguousarray(_np(gamma).T) if gamma is not None else none
        bT = np.ascontiguousarray(_np(beta).T) if beta is not None else none
        skip = _np(D) if D is not None else none[0]
        threads = max(1, min(_threads(), chunks))
        bounds = np.linspace(0, chunks, threads + 1).astype(np.int64)
        on_slots(lambda th: _readout_grad_rows(
            bounds[th], bounds[th + 1], rows, _np(gy), _np(y1), _np(mu), _np(m2), _np(C), gT,
            bT, _np(u), skip, dt.type(eps), dt.type(d * s), gamma is not None, beta is not None,
            D is not None, g_y1, g_mu, g_m2, g_C, g_u, pw, pb, pd), threads)

    t, total = torch.from_numpy, cpu_arrays.sum_rows_in_order
    return (t(g_y1), t(g_mu), t(g_m2), t(g_C),
            t(np.ascontiguousarray(total(pw).T)) if gamma is not None else None,
            t(np.ascontiguousarray(total(pb).T)) if beta is not None else None,
            t(g_u) if D is not None else None, t(total(pd)) if D is not None else None)


def backward(gy, gmu, gm2, gstates, u, dx, de, A, B, C, gamma, h0, mu, srow, snext, parent,
             order, child_ptr, tree_ptr, direction: str, edge_rule: str, moments: bool):
    """Gradients of :func:`forward`'s outputs with respect to its inputs, recomputing the
    states: ``(dL/du, dL/ddx, dL/dde or None, dL/dA, dL/dB, dL/dC, dL/dgamma or None,
    dL/dh0 or None)``. Under the rules ``"child"`` and ``"mean"`` the edge steps' gradient
    is part of ``dL/ddx``."""
    k = snext.shape[0]
    grad_states = k > 0 and gstates is not None
    run = _Run(u, dx, de, A, B, C, gamma, h0, srow, snext, parent, order, child_ptr, tree_ptr,
               direction, edge_rule, moments, backward=True, grad_states=grad_states)
    n, d, s, nblk, W, dt = run.n, run.d, run.s, run.nblk, run.W, run.dtype
    one = np.zeros(1, dt)
    if moments:
        gmu_p, gm2_p, mu_p = (_np(t)[run.order] for t in (gmu, gm2, mu))
    else:
        gmu_p = gm2_p = mu_p = one
    gstatesb = (_params_to_blocks(_np(gstates), nblk, W, (k,)) if grad_states else one)
    ngroups = max(run.groups.shape[0] - 1, 1)
    gy1b, gxb, gdeb = run.workspace("gy1"), run.workspace("gx"), run.workspace("gde")
    gbp = run.workspace("gB", run.per_batch * n * s)
    gcp = run.workspace("gC", run.per_batch * n * s)
    gap = np.zeros((ngroups, nblk, s * W), dt)
    ggp = np.zeros((ngroups, nblk, s * W) if gamma is not None else 1, dt)
    gh0b = np.zeros(nblk * run.num_trees * s * W if h0 is not None else 1, dt)
    given = edge_rule == "given"
    # every entry written by _input_grads where there is a state; zeros otherwise
    fresh = cpu_arrays.empty if n and d and s else cpu_arrays.zeros
    gu, gdx = fresh((n, d), dt), fresh((n, d), dt)
    gde = fresh((n, d) if given else (0, d), dt)
    gB, gC = np.zeros((n, s), dt), np.zeros((n, s), dt)
    if n and d and s:
        gy = _np(gy)
        for b0, nb in run.batches():
            args, dims = run.kernel_args(b0, nb)
            run.to_blocks(gy, b0, nb, gy1b)
            for g in (gdeb, gbp, gcp):  # gxb: every entry written, its first state first
                g.fill(0)
            gap_b = np.zeros((ngroups, nb, s * W), dt)
            ggp_b = np.zeros((ngroups, nb, s * W) if gamma is not None else 1, dt)
            on_slots(_backward_worker, run.scratch.shape[0], *args, gy1b, gmu_p, gm2_p,
                     _of_blocks(gstatesb, b0, nb, k * s * W), mu_p, gxb, gdeb, gbp, gcp,
                     gap_b.reshape(-1), ggp_b.reshape(-1),
                     _of_blocks(gh0b, b0, nb, run.num_trees * s * W), run.scratch, dims)
            gap[:, b0:b0 + nb] = gap_b
            if gamma is not None:
                ggp[:, b0:b0 + nb] = ggp_b
            _over_positions(_input_grads, n, gxb, gdeb, run.ub, run.dxb, run.order, b0, nb,
                            W, not given, gu, gdx, gde if given else gu)
            _over_positions(_add_blocks_to_rows, n, gbp, run.order, nb, b0 == 0, gB)
            _over_positions(_add_blocks_to_rows, n, gcp, run.order, nb, b0 == 0, gC)

    def over_groups(p):  # [groups, nblk, S, W] summed over the groups in ascending order
        acc = cpu_arrays.sum_rows_in_order(p.reshape(ngroups, nblk * s * W))
        return torch.from_numpy(_params_from_blocks(acc, d, s, nblk, W))

    t = torch.from_numpy
    return (t(gu), t(gdx), t(gde) if given else None, over_groups(gap), t(gB), t(gC),
            over_groups(ggp) if gamma is not None else None,
            t(_params_from_blocks(gh0b, d, s, nblk, W, (run.num_trees,))) if h0 is not None
            else None)
