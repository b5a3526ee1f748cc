"""Torch reference of the tree scan: level-synchronous, vectorised, any device.

Each pass walks the breadth-first levels of the forest (all trees at once) and
updates every vertex of a level with one gather/scatter, so the Python loop runs
``depth + 1`` times whatever ``N`` and ``C`` are. It needs no compilation and is
the fallback of every other backend. The recurrences and gradients are those of
``docs/concepts.md``:

* ``up[v] = x[v] + sum_c w[c] up[c]`` (leaves first), ``down[v] = x[v] + w[v] down[p]``
  (roots first); they are adjoint: dL/dx of one is the other applied to dL/dh;
* ``both = up + out``, where ``out[v] = w[v] br[v]`` collects the part of the tree outside
  v's subtree through the *bracket* ``br[v] = out[p] + x[p] + sum over the siblings s of
  v of w[s] up[s]``; sibling sums are formed from prefix and suffix sums, never as a total
  minus the vertex's own share, so nothing cancels whatever the weights; ``both`` is
  self-adjoint;
* for the edge (e, p(e)): ``down``: ``gw[e] = up(g)[e] h[p]``; ``up``:
  ``gw[e] = h[e] down(g)[p]``; ``both``: ``gw[e] = up(x)[e] br_g[e] + up(g)[e] br_x[e]``.

Weights of roots are never read, and their gradients are zero.
"""
from __future__ import annotations

import torch

__all__ = ["scan_up", "scan_down", "scan_both", "outside", "forward", "backward"]


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


def _sibling_sums(values, par):
    """For each entry of a level (siblings contiguous, as breadth-first order keeps them),
    the sum of ``values`` over its siblings, itself excluded: an exclusive prefix plus an
    exclusive suffix sum inside each sibling group, on a zero-padded [groups, width] grid."""
    n = par.shape[0]
    start = torch.ones(n, dtype=torch.bool, device=par.device)
    start[1:] = par[1:] != par[:-1]
    group = torch.cumsum(start, 0) - 1
    first = torch.nonzero(start).squeeze(1)
    rank = torch.arange(n, device=par.device) - first[group]
    width = int(rank.max()) + 1
    grid = values.new_zeros((int(group[-1]) + 1, width + 1) + values.shape[1:])
    grid[group, rank + 1] = values
    before = torch.cumsum(grid, 1)[:, :-1]                      # sum of ranks < r
    after = torch.flip(torch.cumsum(torch.flip(grid, (1,)), 1), (1,))[:, 1:]  # ranks > r ...
    after = torch.cat([after[:, 1:], torch.zeros_like(after[:, :1])], 1)      # ... shifted
    return before[group, rank] + after[group, rank]


def outside(x, w, up, parent, level_order, level_ptr):
    """``(out, br)``: the contribution to each vertex from outside its subtree and the
    bracket that ``out`` multiplies by the vertex's weight (zero at roots)."""
    out = torch.zeros_like(x)
    br = torch.zeros_like(x)
    for d in range(1, len(level_ptr) - 1):
        idx = _level(level_order, level_ptr, d)
        par = parent[idx]
        b = (out[par] + x[par]) + _sibling_sums(w[idx] * up[idx], par)
        br[idx] = b
        out[idx] = w[idx] * b
    return out, br


def scan_both(x, w, parent, level_order, level_ptr, up=None):
    if up is None:
        up = scan_up(x, w, parent, level_order, level_ptr)
    return up + outside(x, w, up, parent, level_order, level_ptr)[0]


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
    nonroot = (parent >= 0).view(-1, *([1] * (x.dim() - 1)))
    p = parent.clamp(min=0)
    if direction == "up":
        gx = scan_down(gc, wc, parent, lo, lp)
        gw = hc * gx[p] if need_w else None
    elif direction == "down":
        gx = scan_up(gc, wc, parent, lo, lp)
        gw = gx * hc[p] if need_w else None
    else:
        G = scan_up(gc, wc, parent, lo, lp)
        out_g, br_g = outside(gc, wc, G, parent, lo, lp)
        gx = G + out_g
        if need_w:
            U = scan_up(xc, wc, parent, lo, lp)
            br_x = outside(xc, wc, U, parent, lo, lp)[1]
            gw = U * br_g + G * br_x
        else:
            gw = None
    if gw is not None:  # roots: zero, also where their unused weights are not finite
        gw = torch.where(nonroot, gw, torch.zeros((), dtype=ct, device=gw.device))
    gx = gx.to(x.dtype) if need_x else None
    gw = gw.to(w.dtype) if gw is not None else None
    return gx, gw
