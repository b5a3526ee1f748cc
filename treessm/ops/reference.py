"""Torch reference of the tree scan: level-synchronous, vectorised, any device.

Each pass walks the breadth-first levels of the forest (all trees at once) and
updates every vertex of a level with one gather/scatter, so the Python loop runs
``depth + 1`` times whatever ``N`` and ``C`` are. It needs no compilation and is
the fallback of every other backend. Gradients are written in closed form from the
same passes (``docs/concepts.md``):

* ``up`` and ``down`` are adjoint: dL/dx of one is the other applied to dL/dh;
* ``both`` is self-adjoint;
* for the edge (e, p(e)), with ``U = up(x)``, ``G = up(g)``, ``H = h``:
  ``down``: ``gw[e] = up(g)[e] * h[p]``; ``up``: ``gw[e] = h[e] * down(g)[p]``;
  ``both``: ``gw[e] = U[e] * both(g)[p] + G[e] * H[p] - 2 w[e] U[e] G[e]``.
"""
from __future__ import annotations

import torch

__all__ = ["scan_up", "scan_down", "scan_both", "forward", "backward"]


def _level(level_order, level_ptr, d):
    return level_order[level_ptr[d]:level_ptr[d + 1]]


def scan_up(x, w, parent, level_order, level_ptr):
    h = x.clone()
    for d in range(len(level_ptr) - 2, 0, -1):  # deepest level first; roots receive, never send
        idx = _level(level_order, level_ptr, d)
        h.index_add_(0, parent[idx], w[idx] * h[idx])
    return h


def scan_down(x, w, parent, level_order, level_ptr):
    h = x.clone()
    for d in range(1, len(level_ptr) - 1):
        idx = _level(level_order, level_ptr, d)
        h[idx] = x[idx] + w[idx] * h[parent[idx]]
    return h


def scan_both(x, w, parent, level_order, level_ptr, up=None):
    if up is None:
        up = scan_up(x, w, parent, level_order, level_ptr)
    h = up.clone()
    for d in range(1, len(level_ptr) - 1):
        idx = _level(level_order, level_ptr, d)
        wi = w[idx]
        h[idx] = wi * h[parent[idx]] + (1 - wi * wi) * up[idx]
    return h


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(x, w, parent, levels, direction):
    """h for ``x, w [N, C]``; ``levels = (level_order, level_ptr)`` from
    :func:`treessm.ops.plan.level_groups`."""
    ct = _compute_dtype(x.dtype)
    xc, wc = x.to(ct), w.to(ct)
    lo, lp = levels
    if direction == "up":
        h = scan_up(xc, wc, parent, lo, lp)
    elif direction == "down":
        h = scan_down(xc, wc, parent, lo, lp)
    else:
        h = scan_both(xc, wc, parent, lo, lp)
    return h.to(x.dtype)


def backward(g, x, w, h, parent, levels, direction, need_x=True, need_w=True):
    """(dL/dx, dL/dw) given dL/dh ``g`` and the forward output ``h``."""
    ct = _compute_dtype(x.dtype)
    gc, xc, wc, hc = g.to(ct), x.to(ct), w.to(ct), h.to(ct)
    lo, lp = levels
    nonroot = parent >= 0
    p = parent.clamp(min=0)
    mask = nonroot.view(-1, *([1] * (x.dim() - 1))).to(ct)
    if direction == "up":
        gx = scan_down(gc, wc, parent, lo, lp)
        gw = hc * gx[p] * mask if need_w else None
    elif direction == "down":
        gx = scan_up(gc, wc, parent, lo, lp)
        gw = gx * hc[p] * mask if need_w else None
    else:
        G = scan_up(gc, wc, parent, lo, lp)
        gx = scan_both(gc, wc, parent, lo, lp, up=G)
        if need_w:
            U = scan_up(xc, wc, parent, lo, lp)
            gw = (U * gx[p] + G * hc[p] - 2 * wc * U * G) * mask
        else:
            gw = None
    gx = gx.to(x.dtype) if need_x else None
    gw = gw.to(w.dtype) if gw is not None else None
    return gx, gw
