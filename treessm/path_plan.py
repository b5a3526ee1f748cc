"""Heavy-path plan of a forest, for the path-schedule CUDA scan.

Every vertex with children marks its *heavy* child: the child with the largest subtree (the
first such child in breadth-first order on ties). The heavy edges cut the forest into
vertex-disjoint *paths* running down from a *head* (a root or a light child) through heavy
children. A path's *phase* is the number of light edges above its head: phase 0 holds one
path per tree (the one through its root), and the parent of a phase-``p`` head lies on a
phase ``p - 1`` path. Along any root-to-leaf walk the subtree size at least halves at every
light edge, so a tree of ``n`` vertices has at most ``floor(log2 n) + 1`` phases.

A scan over the plan walks paths one after another instead of levels: a root-first pass
takes the phases in increasing order, a leaf-first pass in decreasing order, and the paths
of one phase are independent. The running value is handed from a vertex to the next one on
its path directly; only a head receives (root-first) or hands on (leaf-first) a value
across paths.

Everything is computed with tensor operations on the forest's device, without a host
synchronisation (pointer doubling for subtree sizes and path heads, stable sorts for the
layout), so the plan can be built inside a captured or compiled region.

Layout (*path index* ``k``: positions re-ordered tree by tree, phase by phase, within a
phase by head position; each path head first, so tree ``t`` keeps its breadth-first range
``[start_t, end_t)``):

- ``rec`` (int32 ``[N + 1, 4]``): per path index ``k`` the vertex, the path index of its
  parent (``-1`` at roots), the path index of its first light child (``-1`` if none) and
  where its light children start in ``light`` (they end where those of ``k + 1`` start; the
  last index of a tree is a leaf).
- ``light`` (int32 ``[N]``): path indices of light children, grouped by parent, in
  breadth-first order; tree ``t`` fills ``[start_t, start_t + paths_t - 1)``, the rest
  holds ``-1``.
- ``path_ptr`` (int32 ``[N + 1]``): tree ``t`` numbers its paths ``start_t, start_t + 1,
  ...``; path ``j`` spans path indices ``[path_ptr[j], path_ptr[j + 1])``; unused numbers
  hold ``end_t``.
- ``phase_path`` (int32 ``[T, MAX_PHASES + 1]``): the paths of phase ``p`` of tree ``t`` are
  ``[phase_path[t, p], phase_path[t, p + 1])``.

The CUDA kernel behind ``torch.ops.treessm.cuda_path_plan`` builds the same tensors.
"""
from __future__ import annotations

import torch

__all__ = ["MAX_PHASES", "path_plan"]

MAX_PHASES = 32  # phases of a tree below 2**31 vertices


def _use_kernel(order: torch.Tensor, n: int) -> bool:
    """The CUDA kernel builds the plan for CUDA forests once the extension is loaded (the
    tensor operations below serve the CPU, traced graphs and very large forests)."""
    if not order.is_cuda or n >= 2 ** 30 or torch.compiler.is_compiling():
        return False
    from . import _extension

    return _extension.is_loaded() and hasattr(torch.ops.treessm, "cuda_path_plan")


def _rounds(n: int) -> int:
    """Doubling rounds that cover chains of up to ``n`` steps."""
    return max(1, int(n).bit_length())


def path_plan(order: torch.Tensor, child_ptr: torch.Tensor, tree_ptr: torch.Tensor,
              depth: torch.Tensor, parent_pos: torch.Tensor):
    """Heavy-path plan (see the module docstring) from a forest's breadth-first layout.

    Args:
        order, child_ptr, tree_ptr, depth: the :class:`treessm.Tree` tensors.
        parent_pos (LongTensor [N]): position in ``order`` of each position's parent, ``-1``
            at roots (from :meth:`treessm.Tree.scan_plan`).

    Returns:
        ``[rec, light, path_ptr, phase_path]`` (int32 tensors on the forest's device).
    """
    dev = order.device
    n = int(order.shape[0])
    T = int(tree_ptr.shape[0]) - 1
    i32 = torch.int32
    if n == 0:
        return [torch.tensor([[-1, -1, -1, 0]], dtype=i32, device=dev),
                torch.zeros(0, dtype=i32, device=dev), torch.zeros(1, dtype=i32, device=dev),
                torch.zeros(max(T, 0), MAX_PHASES + 1, dtype=i32, device=dev)]
    if n >= 2 ** 31 - 1:
        raise ValueError(f"the path plan indexes positions with 32 bits; got {n} vertices")
    if _use_kernel(order, n):
        return list(torch.ops.treessm.cuda_path_plan(order, child_ptr, tree_ptr, depth,
                                                      parent_pos))
    K = _rounds(n)
    pos = torch.arange(n, device=dev)
    tree = torch.searchsorted(tree_ptr, pos, right=True) - 1          # tree of each position
    tree_end = tree_ptr[1:][tree]

    # Subtree sizes. The descendants of position i at distance j form the position range
    # [C^j(i), C^j(i + 1)) with C = child_ptr (children of consecutive positions are
    # consecutive), so size(i) = F(i + 1) - F(i) with F(a) = sum_j C^j(a). Tree t works on
    # the indices a + t, a in [start_t, end_t], where end_t is a fixed point of C.
    ext = n + T
    ext_start = tree_ptr[:-1] + torch.arange(T, device=dev)            # tree t: index start_t + t
    a_idx = torch.arange(ext, device=dev)
    a_tree = torch.searchsorted(ext_start, a_idx, right=True) - 1
    a_val = a_idx - a_tree                                              # position of each index
    a_end = tree_ptr[1:][a_tree]
    nxt = torch.where(a_val < a_end, child_ptr[a_val.clamp(max=n - 1)].clamp(max=n), a_end)
    nxt = torch.minimum(nxt, a_end) + a_tree
    F = a_val.clone()
    M = nxt
    for _ in range(K):
        F = F + F[M]
        M = M[M]
    size = F[pos + tree + 1] - F[pos + tree]

    # Heavy child of every position with children: largest subtree, first on ties.
    has_parent = parent_pos >= 0
    pp = parent_pos.clamp(min=0)
    best = torch.zeros(n, dtype=size.dtype, device=dev)
    best.scatter_reduce_(0, pp[has_parent], size[has_parent], reduce="amax")
    cand = has_parent & (size == best[pp])
    heavy = torch.full((n,), n, dtype=torch.long, device=dev)
    heavy.scatter_reduce_(0, pp[cand], pos[cand], reduce="amin")
    is_heavy = has_parent & (heavy[pp] == pos)
    is_light = has_parent & ~is_heavy

    # Phase (light edges above) and path head, by pointer doubling towards the root.
    up = torch.where(has_parent, parent_pos, pos)
    phase = is_light.long()
    head = torch.where(is_heavy, parent_pos, pos)
    for _ in range(K):
        phase = phase + phase[up]
        up = up[up]
        head = head[head]
    d = depth[order]
    along = d - d[head]                                                 # steps below the head
    length = torch.zeros(n, dtype=torch.long, device=dev)
    length.scatter_reduce_(0, head, along + 1, reduce="amax")
    plen = length[head]

    # Layout: tree, phase, head position, depth along the path.
    perm = pos
    for key in (along, head, phase, tree):
        perm = perm[torch.sort(key[perm], stable=True).indices]
    kidx = torch.empty_like(perm)
    kidx[perm] = pos
    ts = tree_ptr[:-1]
    # paths: tree t numbers its paths from start_t (at most one per vertex)
    is_head = along[perm] == 0
    heads = torch.cumsum(is_head.long(), 0)
    heads_before = torch.cat([heads.new_zeros(1), heads])[ts]           # per tree
    path_j = ts[tree] + heads - 1 - heads_before[tree]                 # at head path indices
    path_ptr = torch.cat([tree_end, tree_end.new_full((1,), n)])        # unused ids: tree end
    path_ptr[path_j[is_head]] = pos[is_head]
    phase_k = phase[perm]
    counts = torch.zeros(T * (MAX_PHASES + 1), dtype=torch.long, device=dev)
    counts.index_add_(0, (tree * (MAX_PHASES + 1) + phase_k)[is_head], torch.ones_like(pos)[is_head])
    counts = counts.reshape(T, MAX_PHASES + 1)
    phase_path = ts[:, None] + torch.cumsum(counts, 1) - counts
    # light children in breadth-first order, grouped by their parent's path index; tree t's
    # entries from start_t (a tree has one light child fewer than paths)
    ppar_pos = torch.where(has_parent, kidx[pp], -1)                      # by position
    lkey = torch.where(is_light, ppar_pos, torch.full_like(ppar_pos, n))
    srt = torch.sort(lkey, stable=True)
    nlight = (counts.sum(1) - 1).clamp(min=0)
    light_before = torch.cumsum(nlight, 0) - nlight
    m = torch.arange(n, device=dev)
    valid = srt.values < n
    owner = tree[srt.values.clamp(max=n - 1)]                           # tree of the parent
    light = torch.full((n,), -1, dtype=torch.long, device=dev)
    dest = torch.where(valid, ts[owner] + m - light_before[owner], m)
    light[dest[valid]] = kidx[srt.indices[valid]]
    # first entry of each path index k: ts + light entries of the tree's smaller indices
    cnt = torch.zeros(n, dtype=torch.long, device=dev)
    cnt.index_add_(0, ppar_pos[is_light], torch.ones_like(pos)[is_light])
    ex = torch.cumsum(cnt, 0) - cnt
    light_start = ts[tree] + ex - light_before[tree]                    # tree of k == tree of pos k
    first_light = torch.full((n,), -1, dtype=torch.long, device=dev)
    has_light = cnt > 0
    first_light[has_light] = light[light_start[has_light]]
    ppos_k = parent_pos[perm]
    rec = torch.empty(n + 1, 4, dtype=torch.long, device=dev)
    rec[:n, 0] = order[perm]
    rec[:n, 1] = torch.where(ppos_k >= 0, kidx[ppos_k.clamp(min=0)], ppos_k)
    rec[:n, 2] = first_light
    rec[:n, 3] = light_start
    rec[n] = torch.tensor([-1, -1, -1, n], device=dev)
    return [rec.to(i32), light.to(i32), path_ptr.to(i32), phase_path.to(i32)]
