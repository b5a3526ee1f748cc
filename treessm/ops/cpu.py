"""Numba CPU backend of the tree scan: compiled, multi-threaded, exact.

The passes of ``docs/concepts.md`` walk the breadth-first ``order`` of a
:class:`~treessm.Tree` one vertex at a time, tree by tree:

* leaf-first passes walk a tree's positions backwards and *pull* from the children,
  which ``child_ptr`` lists contiguously, so nothing is scattered;
* root-first passes walk forwards and *push* to the children, so a parent's row is
  read once for all of its children.

A vertex's channels form a contiguous row and the innermost loop, which the compiler
vectorises; arithmetic stays in the dtype of the input (float32 or float64), as a GPU
kernel would do it. The rows of consecutive vertices of ``order`` lie at random places
in memory, so the cost is the number of rows touched, and the passes are fused to touch
few: ``up``, ``down`` and their gradients are single passes that produce ``dL/dx`` and
``dL/dw`` together; ``both`` is an up pass writing ``up(x)`` into the output and a
root-first pass adding the part from outside each subtree in place, tree by tree, so the
second pass finds the top of the tree still in cache; that part is formed from each
parent's bracket with prefix and suffix sums over its children (never a total minus a
child's own share, which would cancel for weights above one); the gradient of ``both`` is
one leaf-first pass computing ``up(x)`` and ``up(grad)`` together (held in the two output
buffers) and one root-first pass producing ``dL/dx`` and ``dL/dw`` from both brackets.

Work is split into items ``(group of whole trees, block of channels)`` shared by threads
(:func:`~treessm.ops.chunks.run_chunks`). A forest of many similar trees is split by trees, so each thread owns
every row it touches; a forest dominated by one large tree is split by channels, so a
single chain still keeps every core busy.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import get_num_threads, njit

from . import cpu_arrays
from .chunks import run_chunks

__all__ = ["forward", "backward"]

# Smallest channel block given to one thread when a large tree forces a split by
# channels: narrower blocks would make the threads fight over the same cache lines more
# than they gain; 32 bytes still splits a row of 16 float32 between two threads.
_MIN_BLOCK_BYTES = 32
# A split by trees is used when its largest group exceeds the fair share by at most this.
_MAX_IMBALANCE = 1.25

_MODES = {"both": 0, "up": 1, "down": 2}

# The kernels index flat (1-D) views with unsigned offsets: signed indices make numba
# insert a negative-index wrap-around test per element, which keeps the channel loops
# from being vectorised. ``order[i] * nc + c0`` is the start of a vertex's channel
# block, ``m`` the block width.


# ---------------------------------------------------------------------------- single passes
@njit(cache=True)
def _up(x, w, h, order, child_ptr, a, b, nc, c0, m):
    # h = up(x): h[v] = x[v] + sum over children u of w[u] h[u], leaves first
    for i in range(b - 1, a - 1, -1):
        v = np.uint64(order[i]) * nc + c0
        for c in range(m):
            h[v + c] = x[v + c]
        for k in range(child_ptr[i], min(child_ptr[i + 1], b)):
            u = np.uint64(order[k]) * nc + c0
            for c in range(m):
                h[v + c] += w[u + c] * h[u + c]


@njit(cache=True)
def _down(x, w, h, order, child_ptr, a, b, nc, c0, m):
    # h = down(x): h[u] = x[u] + w[u] h[p(u)], roots first
    r = np.uint64(order[a]) * nc + c0
    for c in range(m):
        h[r + c] = x[r + c]
    for i in range(a, b):
        v = np.uint64(order[i]) * nc + c0
        for k in range(child_ptr[i], min(child_ptr[i + 1], b)):
            u = np.uint64(order[k]) * nc + c0
            for c in range(m):
                h[u + c] = x[u + c] + w[u + c] * h[v + c]


@njit(cache=True)
def _grad_up(g, w, h, gx, gw, order, child_ptr, a, b, nc, c0, m):
    # gx = down(g); gw[u] = h[u] gx[p(u)], roots first
    r = np.uint64(order[a]) * nc + c0
    for c in range(m):
        gx[r + c] = g[r + c]
        gw[r + c] = 0
    for i in range(a, b):
        v = np.uint64(order[i]) * nc + c0
        for k in range(child_ptr[i], min(child_ptr[i + 1], b)):
            u = np.uint64(order[k]) * nc + c0
            for c in range(m):
                gp = gx[v + c]
                gx[u + c] = g[u + c] + w[u + c] * gp
                gw[u + c] = h[u + c] * gp


@njit(cache=True)
def _grad_down(g, w, h, gx, gw, order, child_ptr, a, b, nc, c0, m):
    # gx = up(g); gw[u] = gx[u] h[p(u)], written by the parent while it pulls gx[u]
    r = np.uint64(order[a]) * nc + c0
    for c in range(m):
        gw[r + c] = 0
    for i in range(b - 1, a - 1, -1):
        v = np.uint64(order[i]) * nc + c0
        for c in range(m):
            gx[v + c] = g[v + c]
        for k in range(child_ptr[i], min(child_ptr[i + 1], b)):
            u = np.uint64(order[k]) * nc + c0
            for c in range(m):
                gu = gx[u + c]
                gx[v + c] += w[u + c] * gu
                gw[u + c] = gu * h[v + c]


# ---------------------------------------------------------------------------- two passes
@njit(cache=True)
def _brackets(xs, w, us, os, v, k0, k1, order, nc, c0, m, tail, scale):
    # For the children u of the vertex at row v (positions k0..k1), the bracket
    # os[v] + xs[v] + sum over the siblings s != u of w[s] us[s], written into os[u] (times
    # w[u] when ``scale``: the part from outside u's subtree): an exclusive prefix sum
    # forwards, then the suffix added backwards (``tail`` holds it), so no sibling's share
    # is ever subtracted back out.
    u = np.uint64(order[k0]) * nc + c0
    for c in range(m):
        os[u + c] = os[v + c] + xs[v + c]
    for k in range(k0 + 1, k1):
        p = u
        u = np.uint64(order[k]) * nc + c0
        for c in range(m):
            os[u + c] = os[p + c] + w[p + c] * us[p + c]
    for c in range(m):
        tail[c] = 0
    for k in range(k1 - 1, k0 - 1, -1):
        u = np.uint64(order[k]) * nc + c0
        if scale:
            for c in range(m):
                wu = w[u + c]
                s = wu * us[u + c]
                os[u + c] = wu * (os[u + c] + tail[c])
                tail[c] += s
        else:
            for c in range(m):
                s = w[u + c] * us[u + c]
                os[u + c] = os[u + c] + tail[c]
                tail[c] += s


@njit(cache=True)
def _both_down(x, w, h, o, order, child_ptr, a, b, nc, c0, m, tail):
    # h = up(x) on entry, becomes both(x) = up(x) + out, roots first; o[u] = out[u] =
    # w[u] br[u], the part of the tree outside u's subtree
    r = np.uint64(order[a]) * nc + c0
    for c in range(m):
        o[r + c] = 0
    for i in range(a, b):
        v = np.uint64(order[i]) * nc + c0
        k0 = child_ptr[i]
        k1 = min(child_ptr[i + 1], b)
        if k0 < k1:
            _brackets(x, w, h, o, v, k0, k1, order, nc, c0, m, tail, True)
        for c in range(m):
            h[v + c] = h[v + c] + o[v + c]


@njit(cache=True)
def _grad_both_up(g, x, w, ux, ug, order, child_ptr, a, b, nc, c0, m):
    # ux = up(x) and ug = up(g) in one leaf-first sweep (each weight row read once)
    for i in range(b - 1, a - 1, -1):
        v = np.uint64(order[i]) * nc + c0
        for c in range(m):
            ux[v + c] = x[v + c]
            ug[v + c] = g[v + c]
        for k in range(child_ptr[i], min(child_ptr[i + 1], b)):
            u = np.uint64(order[k]) * nc + c0
            for c in range(m):
                wu = w[u + c]
                ux[v + c] += wu * ux[u + c]
                ug[v + c] += wu * ug[u + c]


@njit(cache=True)
def _grad_both_down(g, x, w, gx, gw, ox, og, order, child_ptr, a, b, nc, c0, m, tail):
    # on entry gx = up(g) and gw = up(x); roots first, gx becomes both(g) and
    # gw[u] = up(x)[u] br_g[u] + up(g)[u] br_x[u]; ox, og hold the outside parts
    r = np.uint64(order[a]) * nc + c0
    for c in range(m):
        ox[r + c] = 0
        og[r + c] = 0
    for i in range(a, b):
        v = np.uint64(order[i]) * nc + c0
        k0 = child_ptr[i]
        k1 = min(child_ptr[i + 1], b)
        if k0 < k1:
            _brackets(x, w, gw, ox, v, k0, k1, order, nc, c0, m, tail, False)
            _brackets(g, w, gx, og, v, k0, k1, order, nc, c0, m, tail, False)
            for k in range(k0, k1):
                u = np.uint64(order[k]) * nc + c0
                for c in range(m):
                    bx = ox[u + c]
                    bg = og[u + c]
                    wu = w[u + c]
                    gw[u + c] = gw[u + c] * bg + gx[u + c] * bx
                    ox[u + c] = wu * bx
                    og[u + c] = wu * bg
        for c in range(m):
            gx[v + c] = gx[v + c] + og[v + c]
    for c in range(m):
        gw[r + c] = 0


# ---------------------------------------------------------------------------- parallel drivers
# Item j covers trees [groups[j // nblk], groups[j // nblk + 1]) and channels
# [blocks[j % nblk], blocks[j % nblk + 1]), swept tree by tree.

@njit(cache=True, nogil=True)
def _forward_kernel(j0, j1, x, w, h, o, nc, order, child_ptr, tree_ptr, groups, blocks, mode):
    nblk = blocks.shape[0] - 1
    for j in range(j0, j1):
        gi = j // nblk
        bi = j - gi * nblk
        c0 = np.uint64(blocks[bi])
        m = np.uint64(blocks[bi + 1] - blocks[bi])
        tail = np.empty(m, h.dtype)
        for t in range(groups[gi], groups[gi + 1]):
            a = tree_ptr[t]
            b = tree_ptr[t + 1]
            if mode == 0:  # the rows of the tree's top are still cached for the second pass
                _up(x, w, h, order, child_ptr, a, b, nc, c0, m)
                _both_down(x, w, h, o, order, child_ptr, a, b, nc, c0, m, tail)
            elif mode == 1:
                _up(x, w, h, order, child_ptr, a, b, nc, c0, m)
            else:
                _down(x, w, h, order, child_ptr, a, b, nc, c0, m)


@njit(cache=True, nogil=True)
def _backward_kernel(j0, j1, g, x, w, h, gx, gw, ox, og, nc, order, child_ptr, tree_ptr, groups,
                     blocks, mode):
    nblk = blocks.shape[0] - 1
    for j in range(j0, j1):
        gi = j // nblk
        bi = j - gi * nblk
        c0 = np.uint64(blocks[bi])
        m = np.uint64(blocks[bi + 1] - blocks[bi])
        tail = np.empty(m, gx.dtype)
        for t in range(groups[gi], groups[gi + 1]):
            a = tree_ptr[t]
            b = tree_ptr[t + 1]
            if mode == 0:  # gw and gx hold up(x) and up(g) between the passes
                _grad_both_up(g, x, w, gw, gx, order, child_ptr, a, b, nc, c0, m)
                _grad_both_down(g, x, w, gx, gw, ox, og, order, child_ptr, a, b, nc, c0, m, tail)
            elif mode == 1:  # gx = down(g)
                _grad_up(g, w, h, gx, gw, order, child_ptr, a, b, nc, c0, m)
            else:  # gx = up(g)
                _grad_down(g, w, h, gx, gw, order, child_ptr, a, b, nc, c0, m)


# ---------------------------------------------------------------------------- planning
def _plan(tree_ptr: np.ndarray, n: int, c: int, itemsize: int):
    """Split the work into (tree group, channel block) items for ``get_num_threads()`` threads.

    Returns ``groups`` (tree indices bounding each group) and ``blocks`` (channel bounds
    of each block).
    """
    threads = get_num_threads()
    num_trees = tree_ptr.shape[0] - 1
    whole = np.array([0, num_trees], dtype=np.int64)
    groups = whole
    if threads > 1 and num_trees > 1:
        # cut at the tree boundaries nearest to equal shares of vertices
        targets = (np.arange(1, threads, dtype=np.int64) * n) // threads
        cuts = np.searchsorted(tree_ptr, targets, side="left")
        groups = np.unique(np.concatenate(([0], cuts, [num_trees]))).astype(np.int64)
        largest = int(np.diff(tree_ptr[groups]).max())
        if largest * threads > _MAX_IMBALANCE * n:  # one tree dominates: split channels
            groups = whole
    nblk = 1
    if threads > 1 and groups.shape[0] == 2:
        nblk = max(1, min(threads, (c * itemsize) // _MIN_BLOCK_BYTES))
    if nblk == 1:
        return groups, np.array([0, c], dtype=np.int64)
    line = max(1, cpu_arrays.LINE // itemsize)
    if c >= nblk * line:  # blocks of whole cache lines
        blocks = np.round(np.linspace(0, c // line, nblk + 1)).astype(np.int64) * line
    else:
        blocks = np.round(np.linspace(0, c, nblk + 1)).astype(np.int64)
    blocks[-1] = c
    return groups, blocks


def _check_direction(direction):
    if direction not in _MODES:
        raise ValueError(f"direction must be one of {tuple(_MODES)}, got {direction!r}")


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy().reshape(-1)


def _index(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy()


def _tensor(a: np.ndarray, n: int, c: int) -> torch.Tensor:
    return torch.from_numpy(a.reshape(n, c))


def forward(x, w, order, child_ptr, tree_ptr, direction):
    """Tree scan ``h`` of ``x [N, C]`` with edge weights ``w [N, C]`` (float32 or float64).

    ``order``, ``child_ptr`` and ``tree_ptr`` are the layout of a :class:`~treessm.Tree`.
    Returns a new tensor.
    """
    _check_direction(direction)
    n, c = x.shape
    xf, wf = _flat(x), _flat(w)
    h = cpu_arrays.empty(n * c, xf.dtype)
    if n == 0 or c == 0:
        return _tensor(h, n, c)
    tp = _index(tree_ptr)
    mode = _MODES[direction]
    groups, blocks = _plan(tp, n, c, xf.itemsize)
    o = cpu_arrays.workspace("tree_scan.outside", n * c, xf.dtype) if mode == 0 else h[:0]
    items = (groups.shape[0] - 1) * (blocks.shape[0] - 1)
    run_chunks(_forward_kernel, items, xf, wf, h, o, np.uint64(c), _index(order),
               _index(child_ptr), tp, groups, blocks, mode)
    return _tensor(h, n, c)


def backward(g, x, w, h, order, child_ptr, tree_ptr, direction):
    """Gradients ``(dL/dx, dL/dw)`` of the tree scan given ``g = dL/dh`` and the output ``h``.

    Weights of roots get a zero gradient (they do not enter the forward pass).
    """
    _check_direction(direction)
    n, c = x.shape
    gf, xf, wf, hf = _flat(g), _flat(x), _flat(w), _flat(h)
    gx, gw = cpu_arrays.empty(n * c, xf.dtype), cpu_arrays.empty(n * c, xf.dtype)
    if n == 0 or c == 0:
        return _tensor(gx, n, c), _tensor(gw, n, c)
    tp = _index(tree_ptr)
    mode = _MODES[direction]
    groups, blocks = _plan(tp, n, c, xf.itemsize)
    ox = cpu_arrays.workspace("tree_scan.outside_x", n * c, xf.dtype) if mode == 0 else gx[:0]
    og = cpu_arrays.workspace("tree_scan.outside_g", n * c, xf.dtype) if mode == 0 else gx[:0]
    items = (groups.shape[0] - 1) * (blocks.shape[0] - 1)
    run_chunks(_backward_kernel, items, gf, xf, wf, hf, gx, gw, ox, og, np.uint64(c),
               _index(order), _index(child_ptr), tp, groups, blocks, mode)
    return _tensor(gx, n, c), _tensor(gw, n, c)
