r"""Scan plans and schedules: what the compiled scan kernels read besides the data, and
how they are launched. Every decision about how a scan runs on a GPU is taken here.

A :class:`~treessm.Tree` holds its breadth-first layout; the kernels need more, derived
from it once per tree and cached in ``tree.plan_cache`` (shared by every channel count,
layer, direction and the backward):

* the **heavy-path layout** (:class:`PathPlan`): every vertex with children marks its
  *heavy* child (the one with the largest subtree, the first in breadth-first order on
  ties); the heavy edges cut the forest into vertex-disjoint *paths* running down from a
  *head* (a root or a light child). A path's *phase* is the number of light edges above
  its head; along any root-to-leaf walk the subtree size at least halves at every light
  edge, so a tree of ``n`` vertices has at most :math:`\lfloor \log_2 n \rfloor + 1`
  phases. Positions run tree by tree, phase by phase, path by path, each path a
  contiguous run from its head down;
* the **phase-major layout** (:class:`PhasePlan`): the same positions re-ordered phase by
  phase across the whole forest, so each phase is one contiguous run.

Along a path every recurrence is one affine step per vertex, whose composition is
associative: a phase is one segmented parallel scan, and a scan takes a few block-wide
steps per phase instead of one per vertex or level. Three **schedules** run the scans
(``docs/cuda.md``):

* ``"trees"`` -- one thread block per (tree, channel slice) runs every phase of its tree,
  in chunks; nothing to synchronise with the host, for forests of many trees (images,
  sentences, batches of graphs);
* ``"phases"`` -- each phase of the whole forest is split into chunks over the device,
  joined by a carry pass, for forests with a large tree (one graph); its layout is built
  once per tree with one read of the phase sizes by the host;
* ``"tiles"`` -- the tiled layout of :mod:`treessm.ops.tiles`: each tile of the forest
  scanned in as many block-wide steps as it has light levels, the tiles joined along the
  boundary tree; for large bushy trees (the spanning tree of a graph), its layout built
  on the device without a host read;
* ``"columns"`` -- one thread per (tree, channel) runs the recurrences vertex by vertex in
  breadth-first order, its tree's values in a column of shared memory (:class:`ColumnPlan`,
  the tree's own layout): no block-wide step at all, for forests of small trees (the
  later stages of an image network, a tiny tree).

:func:`choose_schedule` picks one from host-side sizes (never asking the device), and
:func:`launch_config` the launch parameters, with the measured defaults below.
:func:`scan_plan` returns the small named object (:class:`ScanPlan`) that the CUDA
operators take. Builders that compute a level plan on the way (the fused CUDA grid-tree
kernel) hand it over with :func:`attach_level_plan`: the layout is built from it.
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..tree import Tree
from .tiles import TILE, tile_plan

__all__ = ["SCHEDULES", "MAX_PHASES", "LevelPlan", "PathPlan", "PhasePlan", "ColumnPlan",
           "Launch", "ScanPlan", "level_groups", "level_plan", "attach_level_plan", "path_plan",
           "phase_plan", "column_plan", "choose_schedule", "launch_config", "scan_plan"]

SCHEDULES = ("trees", "phases", "tiles", "columns")
MAX_PHASES = 32  # phases of a tree below 2**31 vertices

# A forest whose largest tree has more vertices than this takes the "phases" schedule: one
# block walking a tree that large would leave the rest of the device idle. Measured on an
# H200 (one random tree, C=64, float32, both, forward / backward): 4,096 vertices 0.131 /
# 0.193 ms against 0.175 / 0.294 ms for one block per tree; 2^16: 0.41 / 0.60 against 2.6 /
# 4.5 ms (docs/cuda.md).
PHASES_MIN_TREE_SIZE = 1 << 12
# A forest of more trees than this takes the "phases" schedule too: one block per tree and
# channel slice would launch a block for every few vertices, each paying a whole chunk step
# (latency, not work). Measured on an H200: GrootV-T's stage scans over forests of isolated
# pixels (401,408 trees at batch 128) under "trees" ran the network at 474 img/s (fp32
# inference) against 1,804 img/s with the real image trees.
PHASES_MIN_TREES = 1 << 14
# A forest of trees larger than PHASES_MIN_TREE_SIZE still takes "trees" when its trees
# give at least TREES_MIN_BLOCKS blocks (one per tree and slice of SCAN_ROW_BYTES of
# channels) and none has more than TREES_MAX_TREE_SIZE vertices: the blocks then fill the
# device and each walks its own tree. Measured on an H200 (tree_scan_schedules_gpu_h200.json,
# both, forward / backward GPU ms, trees against phases and tiles): 32 grid trees of
# 224x224, C=64 (256 blocks), 2.23 / 4.92 against 5.86 / 11.24 and 4.54 / 9.53; one tree of
# 4,096 vertices, C=64 (8 blocks), 0.32 / 0.55 against phases 0.13 / 0.20.
TREES_MIN_BLOCKS = 256
TREES_MAX_TREE_SIZE = 1 << 16
# A forest that would take "phases" takes "tiles" instead when it has at least this many
# vertices and is not known to be chain-like (chain-like: its breadth-first levels, where
# the host knows them, more than a quarter of its vertices). Measured on an H200 (C=64,
# float32, both, forward / backward GPU ms, phases against tiles,
# tree_scan_schedules_gpu_h200.json): one random recursive tree of 2^20 vertices 4.29 / 8.22
# against 2.59 / 5.49, of 2^18: 0.98 / 1.95 against 0.78 / 1.62 (on an H100,
# tree_scan_schedules_gpu_h100.json: 1.09 / 2.21 against 0.76 / 1.62; of 2^17 0.58 / 1.11
# against 0.60 / 1.24, so the bound is 2^18; a tree rebuilt for every call pays the tiled
# plan's first build, 17 ms against the phase plan's 8 ms at 2^18); 4 grid trees of 512x512
# 3.97 / 7.64 against 2.90 / 6.08; 32 of 224x224 6.03 / 11.47 against 4.49 / 9.43; a chain
# of 10^6 2.62 / 4.81 against 3.26 / 6.82. A tree built on the device (a graph layer's
# spanning forest) has no host-side level count; such trees are bushy far more often than
# chains, and a chain under "tiles" loses less (25%) than a bushy tree gains (40%).
# Below this size a forest built on the device takes "tiles" too when one of its trees is
# larger than PHASES_MIN_TREE_SIZE: the layers build such a forest in every forward, so its
# plan is built for one forward and backward, and the tiled plan is replayed from a CUDA
# graph (treessm.ops.tiles) where the phase plan reads its phase sizes on the host. Measured
# on an H200, TreeSSMConv(64, 64), forward / forward+backward wall ms, "phases" against
# "tiles": 10^4 vertices 5.32 / 8.99 against 4.00 / 7.18; 10^5 14.78 / 25.32 against 8.38 /
# 17.92 (plans at 10^5: phase 6.34 ms, tiled 8.16 eager, 2.41 replayed). A tree that is
# scanned many times (its plan cached) scans faster under "phases" at these sizes (one tree
# of 2^16 vertices, C=64: 0.36 / 0.62 against 0.52 / 1.07 ms GPU).
TILES_MIN_NODES = 1 << 18
# ... and when a position's row of channels takes at least this many bytes: the tiled
# kernels give a row's channels to the lanes of a 128-byte row and read the tile's plan once
# per row, so narrower rows leave lanes idle and read the plan for little data. Measured on
# an H200: TreeSSMConv(64, 64) at 10^7 vertices scans its expansion in blocks of one inner
# channel (16-byte rows); under "tiles" its forward took 2,155 ms against 1,163 under
# "phases", while at 10^6 (256-byte rows) "tiles" took it from 87.1 to 79.6 ms.
TILES_MIN_ROW_BYTES = 128
# The CUDA plan kernel gives each tree one block: fine up to grid-sized trees; larger trees
# take the tensor construction below, which spreads over the whole device.
PLAN_KERNEL_MAX_TREE_SIZE = 1 << 16
_INT32_LIMIT = 2 ** 31 - 1
# Launch parameters of the grid-tree kernel (treessm.topology.cuda_grid): threads per image
# block (0: about one per two pixels, 64 to 1024) and the widest breadth-first level one warp
# walks without a block barrier; of the grid-cost kernel: lanes per pixel (0: the power of
# two that leaves the fewest lanes idle for the row length).
GRID_TREE_THREADS = 0
GRID_TREE_SOLO = 64
GRID_COSTS_GROUP = 0
# A forest of at most PHASES_MIN_TREES trees, none larger than this, takes "columns" when
# the host knows its largest tree: a thread per (tree, channel) keeps up to four values per
# vertex of its tree in shared memory (the backward of "both") and walks it without a
# block-wide step, but one vertex after another. Measured on an H200 (both, float32,
# forward / backward GPU ms, "trees" against "columns"): a tree of 64 vertices, C=4, 0.035
# / 0.051 against 0.024 / 0.029; 32 grid trees of 7x7, C=1280, 0.108 / 0.185 against 0.028
# / 0.068; of 10x10, C=640, 0.095 / 0.177 against 0.043 / 0.133; but of 14x14, C=640,
# 0.145 / 0.267 against 0.138 / 0.418 (docs/cuda.md).
COLUMNS_MAX_TREE_SIZE = 128
# Scan blocks: bytes of channels per position (two threads of 16 bytes for float32), and
# position lanes (each takes 4 consecutive positions of a phase): 128 for the "phases"
# schedule; under "trees", at least 16 and one per 128 vertices of the largest tree. Small
# blocks keep more of them resident to hide the latency of each chunk's loads: measured on
# an H200 (32 grid trees, both, forward / backward ms), 56x56 C=160: 0.45 / 1.17 at 32 lanes
# against 0.54 / 1.31 at 128; 28x28 C=320: 0.23 / 0.59 at 16 against 0.40 / 0.95; 7x7
# C=1280: 0.11 / 0.23 at 16 against 0.74 / 1.57 (docs/cuda.md).
SCAN_ROW_BYTES = 32
SCAN_MAX_LANES = 128
SCAN_MIN_LANES = 16


class LevelPlan(NamedTuple):
    """Level plan of a forest (on its device, int64).

    Attributes:
        level_pos (LongTensor [L + 1]): first position in ``order`` of every breadth-first
            level, levels tree by tree, then ``N``.
        tree_level_ptr (LongTensor [T + 1]): the levels of tree ``t`` are
            ``[tree_level_ptr[t], tree_level_ptr[t + 1])``.
        parent_pos (LongTensor [N]): position of each position's parent, ``-1`` at roots.
        parent_at_pos (LongTensor [N]): parent vertex of each position, ``-1`` at roots.
    """

    level_pos: Tensor
    tree_level_ptr: Tensor
    parent_pos: Tensor
    parent_at_pos: Tensor


class PathPlan(NamedTuple):
    """Heavy-path plan of a forest (on its device, int32).

    Layout (*position* ``k``: vertices re-ordered tree by tree, phase by phase, within a
    phase by head position, each path head first, so tree ``t`` keeps its breadth-first
    range ``[start_t, end_t)``; the heavy child of a vertex with children is the next
    position):

    Attributes:
        rec (IntTensor [N + 1, 4]): per position the vertex, the position of its parent
            (``-1`` at roots), and the range ``[start, end)`` of its light children in
            ``light``; row ``N`` is ``[-1, -1, N, N]``.
        light (IntTensor [N]): positions of light children, grouped by parent, in
            breadth-first order; tree ``t`` fills ``[start_t, start_t + paths_t - 1)``, the
            rest holds ``-1``.
        slot (IntTensor [N]): where each light child stands in ``light`` (``-1`` for a
            root or a heavy child).
        path_ptr (IntTensor [N + 1]): tree ``t`` numbers its paths ``start_t, start_t + 1,
            ...``; path ``j`` spans positions ``[path_ptr[j], path_ptr[j + 1])``; unused
            numbers hold ``end_t``.
        phase_path (IntTensor [T, MAX_PHASES + 1]): the paths of phase ``p`` of tree ``t``
            are ``[phase_path[t, p], phase_path[t, p + 1])``.
    """

    rec: Tensor
    light: Tensor
    slot: Tensor
    path_ptr: Tensor
    phase_path: Tensor


class PhasePlan(NamedTuple):
    """Phase-major layout of a forest: the :class:`PathPlan` positions re-ordered phase by
    phase across all trees (within a phase, tree by tree, path by path).

    Attributes:
        rec (IntTensor [N + 1, 4]): as :attr:`PathPlan.rec`, in the new positions.
        light (IntTensor [N]): as :attr:`PathPlan.light`, in the new positions (entries
            packed from 0).
        slot (IntTensor [N]): as :attr:`PathPlan.slot`.
        phase_ptr (IntTensor [MAX_PHASES + 1]): phase ``p`` holds the positions
            ``[phase_ptr[p], phase_ptr[p + 1])``.
        phase_ptr_host (LongTensor [MAX_PHASES + 1], on the CPU): the same, for launches.
    """

    rec: Tensor
    light: Tensor
    slot: Tensor
    phase_ptr: Tensor
    phase_ptr_host: Tensor


class ColumnPlan(NamedTuple):
    """The breadth-first layout of a forest as the ``"columns"`` kernels read it (int32 on
    its device; every parent before its children, a vertex's children consecutive).

    Attributes:
        order (IntTensor [N]): vertex at each position (:attr:`treessm.Tree.order`).
        parent (IntTensor [N]): position of each position's parent, ``-1`` at roots.
        tree_ptr (IntTensor [T + 1]): tree ``t`` holds the positions
            ``[tree_ptr[t], tree_ptr[t + 1])``.
        largest_host (LongTensor [1], on the CPU): the largest tree's size, which sizes
            the kernels' shared memory.
        unused (IntTensor [0]): empty (the scan operators take five plan tensors).
    """

    order: Tensor
    parent: Tensor
    tree_ptr: Tensor
    largest_host: Tensor
    unused: Tensor


class Launch(NamedTuple):
    """Launch parameters of the CUDA scan kernels; results do not depend on them.

    Attributes:
        row_bytes (int): bytes of channels one block handles per position (one or two
            threads of up to 16 bytes each).
        lanes (int): position lanes of a block, a multiple of 16 up to 128; a block scans
            ``4 * lanes`` positions of a phase at a time.
    """

    row_bytes: int
    lanes: int = SCAN_MAX_LANES


class ScanPlan(NamedTuple):
    """What a CUDA scan operator takes besides the data: the schedule, its plan tensors
    (the five of :class:`PathPlan` for ``"trees"``, of :class:`PhasePlan` for
    ``"phases"`` and of :class:`ColumnPlan` for ``"columns"``; the twenty of
    :class:`~treessm.ops.tiles.TilePlan` from ``vertex`` on and its tile size,
    :meth:`~treessm.ops.tiles.TilePlan.op_tensors` of tiles of
    :data:`~treessm.ops.tiles.TILE` positions, for ``"tiles"``) and the launch
    parameters for ``channels`` channels of ``dtype``."""

    schedule: str
    tensors: Tuple[Tensor, ...]
    launch: Launch


# ---------------------------------------------------------------------------- level plans
def level_groups(tree: Tree) -> Tuple[Tensor, List[int]]:
    """Level-major grouping for the torch reference backend: vertices sorted by depth (ties
    by their position in ``order``) and a Python list with the start of each depth."""
    cached = tree.plan_cache.get("groups")
    if cached is None:
        order, depth = tree.order, tree.depth
        if order.shape[0] == 0:
            cached = (order, [0])
        else:
            perm = torch.sort(depth[order], stable=True).indices
            counts = torch.bincount(depth)
            cached = (order[perm], [0] + torch.cumsum(counts, 0).tolist())
        tree.plan_cache["groups"] = cached
    return cached


def level_plan(tree: Tree) -> LevelPlan:
    """The level plan of ``tree``, computed on its device without a host synchronisation
    and cached."""
    cached = tree.plan_cache.get("levels")
    if cached is not None:
        return cached
    n, dev = tree.num_nodes, tree.device
    if n == 0:
        z = torch.zeros(1, dtype=torch.long, device=dev)
        e = torch.zeros(0, dtype=torch.long, device=dev)
        plan = LevelPlan(z, z.clone(), e, e.clone())
    else:
        d = tree.depth[tree.order]
        is_start = torch.ones(n, dtype=torch.bool, device=dev)
        is_start[1:] = d[1:] != d[:-1]
        # a one-vertex tree after another: depth 0 twice. index_fill_ takes the value as a
        # scalar; an indexed assignment copies it to the device and waits for the copy
        is_start.index_fill_(0, tree.tree_ptr[:-1], True)
        level_id = torch.cumsum(is_start, 0) - 1
        level_pos = torch.searchsorted(level_id, torch.arange(n + 1, device=dev))
        tree_level_ptr = torch.cat([level_id[tree.tree_ptr[:-1]], level_id[-1:] + 1])
        pos_of = torch.empty_like(tree.order)
        pos_of[tree.order] = torch.arange(n, device=dev)
        pp = tree.parent[tree.order]
        parent_pos = torch.where(pp >= 0, pos_of[pp.clamp(min=0)], pp)
        plan = LevelPlan(level_pos, tree_level_ptr, parent_pos, pp)
    tree.plan_cache["levels"] = plan
    return plan


def attach_level_plan(tree: Tree, level_pos: Tensor, tree_level_ptr: Tensor,
                      parent_pos: Tensor) -> None:
    """Hand a level plan that a builder computed with the tree to the plan cache, so the
    scan does not recompute it. The tensors must equal what :func:`level_plan` computes
    (the grid-tree kernel's tests check that they do)."""
    tree.plan_cache["levels"] = LevelPlan(level_pos, tree_level_ptr, parent_pos,
                                          tree.parent[tree.order])


# ---------------------------------------------------------------------------- path plans
def path_plan(tree: Tree) -> PathPlan:
    """The heavy-path plan of ``tree`` (see :class:`PathPlan`), built on its device without
    a host synchronisation and cached: by the CUDA plan kernel (one block per tree) for
    CUDA forests of trees up to :data:`PLAN_KERNEL_MAX_TREE_SIZE` vertices, by tensor
    operations otherwise (the CPU, traced graphs, larger trees)."""
    cached = tree.plan_cache.get("paths")
    if cached is not None:
        return cached
    n = tree.num_nodes
    if n >= _INT32_LIMIT:
        raise ValueError(f"the path plan indexes positions with 32 bits; got {n} vertices")
    parent_pos = level_plan(tree).parent_pos
    args = (tree.order, tree.child_ptr, tree.tree_ptr, tree.depth, parent_pos)
    if n and _use_plan_kernel(tree):
        plan = PathPlan(*torch.ops.treessm.cuda_path_plan(*args))
    else:
        plan = PathPlan(*path_plan_tensors(*args))
    tree.plan_cache["paths"] = plan
    return plan


def _use_plan_kernel(tree: Tree) -> bool:
    if not tree.device.type == "cuda" or torch.compiler.is_compiling():
        return False
    if tree.max_tree_size is None or tree.max_tree_size > PLAN_KERNEL_MAX_TREE_SIZE:
        return False
    from ..typing import cuda_extension_loaded

    return cuda_extension_loaded()


def path_plan_tensors(order: Tensor, child_ptr: Tensor, tree_ptr: Tensor, depth: Tensor,
                      parent_pos: Tensor) -> List[Tensor]:
    """:class:`PathPlan` tensors of a breadth-first layout, by tensor operations (pointer
    doubling for subtree sizes and path heads, stable sorts for the layout); the CUDA plan
    kernel builds the same tensors."""
    dev = order.device
    n = int(order.shape[0])
    T = int(tree_ptr.shape[0]) - 1
    i32 = torch.int32
    if n == 0:
        return [torch.tensor([[-1, -1, 0, 0]], dtype=i32, device=dev),
                torch.zeros(0, dtype=i32, device=dev), torch.zeros(0, dtype=i32, device=dev),
                torch.zeros(1, dtype=i32, device=dev),
                torch.zeros(max(T, 0), MAX_PHASES + 1, dtype=i32, device=dev)]
    rounds = max(1, n.bit_length())  # doubling rounds that cover chains of n steps
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
    for _ in range(rounds):
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
    for _ in range(rounds):
        phase = phase + phase[up]
        up = up[up]
        head = head[head]
    d = depth[order]
    along = d - d[head]                                                 # steps below the head

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
    slot = torch.full((n,), -1, dtype=torch.long, device=dev)
    filled = light >= 0
    slot[light[filled]] = m[filled]
    ppos_k = parent_pos[perm]
    rec = torch.empty(n + 1, 4, dtype=torch.long, device=dev)
    rec[:n, 0] = order[perm]
    rec[:n, 1] = torch.where(ppos_k >= 0, kidx[ppos_k.clamp(min=0)], ppos_k)
    rec[:n, 2] = light_start
    rec[:n, 3] = light_start + cnt
    rec[n] = torch.tensor([-1, -1, n, n], device=dev)
    return [rec.to(i32), light.to(i32), slot.to(i32), path_ptr.to(i32), phase_path.to(i32)]


def phase_plan(tree: Tree) -> PhasePlan:
    """The phase-major layout of ``tree`` (see :class:`PhasePlan`), built from its
    :func:`path_plan` by tensor operations and cached; the host reads the phase sizes once."""
    cached = tree.plan_cache.get("phases")
    if cached is not None:
        return cached
    pp = path_plan(tree)
    rec, light = pp.rec.long(), pp.light.long()
    n, dev = tree.num_nodes, tree.device
    T = pp.phase_path.shape[0]
    # phase of every position: tree t's phase p spans [bounds[t, p], bounds[t, p + 1]);
    # int32 and only the non-empty (tree, phase) pairs: a forest of many small trees keeps
    # a few bytes per tree and phase, not a long per tree and phase for each temporary
    bounds = pp.path_ptr.index_select(0, pp.phase_path.view(-1)).view(T, MAX_PHASES + 1)
    counts = (bounds[:, 1:] - bounds[:, :-1]).reshape(-1)
    del bounds
    filled = counts.nonzero().view(-1)
    phase = torch.repeat_interleave(filled % MAX_PHASES, counts[filled], output_size=n)
    del counts, filled
    perm = torch.sort(phase, stable=True).indices                          # new -> old
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n, device=dev)
    old = rec[:n][perm]
    nlight = old[:, 3] - old[:, 2]
    start = torch.cumsum(nlight, 0) - nlight
    owner = torch.repeat_interleave(torch.arange(n, device=dev), nlight)
    m = torch.arange(owner.shape[0], device=dev)
    moved = inv[light[old[owner, 2] + m - start[owner]]]  # the light entries, new positions
    new_light = torch.full((n,), -1, dtype=torch.long, device=dev)
    new_light.index_copy_(0, m, moved)  # (a slice of n would ask a traced size to equal m's)
    new_slot = torch.full((n,), -1, dtype=torch.long, device=dev)
    new_slot[moved] = m
    new_rec = torch.empty(n + 1, 4, dtype=torch.long, device=dev)
    new_rec[:n, 0] = old[:, 0]
    new_rec[:n, 1] = torch.where(old[:, 1] >= 0, inv[old[:, 1].clamp(min=0)], old[:, 1])
    new_rec[:n, 2] = start
    new_rec[:n, 3] = start + nlight
    new_rec[n] = torch.tensor([-1, -1, n, n], device=dev)
    size = torch.bincount(phase, minlength=MAX_PHASES)
    phase_ptr = torch.cat([size.new_zeros(1), torch.cumsum(size, 0)])
    i32 = torch.int32
    plan = PhasePlan(new_rec.to(i32), new_light.to(i32), new_slot.to(i32), phase_ptr.to(i32),
                     phase_ptr.cpu())
    tree.plan_cache["phases"] = plan
    return plan


def column_plan(tree: Tree) -> ColumnPlan:
    """The :class:`ColumnPlan` of ``tree``, cached; the host reads the largest tree's size
    unless the tree knows it."""
    cached = tree.plan_cache.get("columns")
    if cached is not None:
        return cached
    i32 = torch.int32
    largest = tree.max_tree_size
    if largest is None:
        largest = int(torch.diff(tree.tree_ptr).max()) if tree.num_trees else 0
    plan = ColumnPlan(tree.order.to(i32), level_plan(tree).parent_pos.to(i32),
                      tree.tree_ptr.to(i32), torch.tensor([largest], dtype=torch.long),
                      torch.zeros(0, dtype=i32, device=tree.device))
    tree.plan_cache["columns"] = plan
    return plan


# ---------------------------------------------------------------------------- schedules
def choose_schedule(tree: Tree, schedule: Optional[str] = None,
                    row_bytes: Optional[int] = None) -> str:
    """The CUDA scan schedule for ``tree``: ``schedule`` itself when given, else (``None``
    or ``"auto"``) ``"phases"`` when the largest tree has more than
    :data:`PHASES_MIN_TREE_SIZE` vertices or the forest more than :data:`PHASES_MIN_TREES`
    trees, unless the channels are known (``row_bytes``, the bytes of one position's
    channels) and its trees, none larger than :data:`TREES_MAX_TREE_SIZE`, give at least
    :data:`TREES_MIN_BLOCKS` blocks of :data:`SCAN_ROW_BYTES`; ``"trees"`` otherwise; and
    ``"tiles"`` instead of ``"phases"`` for a forest of
    at least :data:`TILES_MIN_NODES` vertices unless its level count is known and more
    than a quarter of them (chain-like), or of any size for a forest built on the device (no
    level count on the host) with a tree of more than :data:`PHASES_MIN_TREE_SIZE`
    vertices, when the bytes of one position's channels (``row_bytes``, where given) are at
    least :data:`TILES_MIN_ROW_BYTES`; and ``"columns"`` instead of ``"trees"`` when the
    host knows the largest tree (``tree.max_tree_size``) and it has at most
    :data:`COLUMNS_MAX_TREE_SIZE` vertices. Only host-side
    sizes are read (``tree.num_nodes``, ``tree.num_trees``, ``tree.num_levels`` and
    ``tree.max_tree_size``, else the number of vertices, which bounds it)."""
    if schedule is not None and schedule != "auto":
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be None, 'auto' or one of {SCHEDULES}, got "
                             f"{schedule!r}")
        return schedule
    largest = tree.max_tree_size if tree.max_tree_size is not None else tree.num_nodes
    filled = (row_bytes is not None and largest <= TREES_MAX_TREE_SIZE
              and tree.num_trees <= PHASES_MIN_TREES
              and tree.num_trees * -(-row_bytes // SCAN_ROW_BYTES) >= TREES_MIN_BLOCKS)
    if (largest > PHASES_MIN_TREE_SIZE or tree.num_trees > PHASES_MIN_TREES) and not filled:
        built_on_device = tree.num_levels is None
        bushy = built_on_device or 4 * tree.num_levels <= tree.num_nodes
        wide = row_bytes is None or row_bytes >= TILES_MIN_ROW_BYTES
        large = tree.num_nodes >= TILES_MIN_NODES or (built_on_device
                                                       and largest > PHASES_MIN_TREE_SIZE)
        if large and bushy and wide:
            return "tiles"
        return "phases"
    if tree.max_tree_size is not None and tree.max_tree_size <= COLUMNS_MAX_TREE_SIZE:
        return "columns"
    return "trees"


@functools.lru_cache(maxsize=None)
def device_limits(index: int) -> Tuple[int, int, int]:
    """``(multiprocessors, shared memory per multiprocessor, opt-in shared memory per
    block)`` of CUDA device ``index``, asked once."""
    return tuple(torch.ops.treessm.cuda_device_limits(index))


@functools.lru_cache(maxsize=256)
def launch_config(schedule: str, elem_size: int, largest_tree: Optional[int] = None) -> Launch:
    """Measured default launch parameters (``docs/cuda.md`` has the measurements): a block
    takes :data:`SCAN_ROW_BYTES` of channels per position; under ``"trees"``, one lane per
    128 vertices of ``largest_tree`` (a power of two from :data:`SCAN_MIN_LANES` to
    :data:`SCAN_MAX_LANES`; the most when the size is unknown); ``"tiles"`` reads none of
    them (its tile size is the layout's, :data:`~treessm.ops.tiles.TILE`). Results do not
    depend on them."""
    lanes = SCAN_MAX_LANES
    if schedule == "trees" and largest_tree is not None:
        lanes = SCAN_MIN_LANES
        while lanes < SCAN_MAX_LANES and 128 * lanes < largest_tree:
            lanes *= 2
    return Launch(SCAN_ROW_BYTES, lanes)


def scan_plan(tree: Tree, channels: int, dtype: torch.dtype,
              schedule: Optional[str] = None) -> ScanPlan:
    """Everything a CUDA scan over ``tree`` with ``channels`` channels of ``dtype`` needs
    besides the data, cached on the tree: a layer's forward and backward, and every call
    after the first, pay one dictionary look-up (channel counts that take the same
    schedule share it)."""
    schedule_ = choose_schedule(tree, schedule, channels * dtype.itemsize)
    key = ("scan", dtype, schedule_)
    cached = tree.plan_cache.get(key)
    if cached is not None:
        return cached
    if tree.num_nodes >= _INT32_LIMIT:
        raise ValueError(f"the CUDA scan indexes vertices with 32 bits; got {tree.num_nodes} "
                         "vertices")
    if schedule_ == "trees":
        tensors = tuple(path_plan(tree))
    elif schedule_ == "phases":
        tensors = tuple(phase_plan(tree))
    elif schedule_ == "columns":
        tensors = tuple(column_plan(tree))
    else:
        tensors = tuple(tile_plan(tree, TILE).op_tensors())
    launch = launch_config(schedule_, dtype.itemsize, tree.max_tree_size)
    plan = ScanPlan(schedule_, tensors, launch)
    tree.plan_cache[key] = plan
    return plan
