r"""The depth-first walk of a forest that the fused CUDA selective scan follows.

:func:`walk_plan` lays each tree out as a depth-first walk that visits every vertex before
its children and its *heavy* child (the largest subtree, the first in breadth-first order
on ties) after its other children. A scan that walks it keeps one state in registers and a
stack for the rest: a vertex's parent is the previous vertex (when it is its parent's first
child) or the stack's top (its other children), a vertex with two or more children pushes
its state, and its last child, the heavy one, pops it. Every vertex under an entry of the
stack sits in a light subtree, at most half of its parent's, so the stack never holds more
than :math:`\lfloor \log_2 n \rfloor` entries for a tree of :math:`n` vertices.

The walk is cut into segments of ``segment`` positions, each tree's starting at its first
position; at each segment start the backward restores the previous vertex's state and the
stack from *checkpoint slots* (one plus the stack's depth there), numbered in walk order.

The plan is computed with tensor operations and two integer tree sums
(:mod:`treessm.ops.heavy`) on the tree's device and cached in ``tree.plan_cache``; the
host reads two numbers once (the slot count, and whether every tree is a chain). For a
forest built on a GPU (no level count on the host: a causal tree, built anew in every
forward) it reads nothing: the slot count is then the bound :func:`slot_bound` from
host-side sizes (the backward's checkpoints take that many slots, of which the walk uses
its own count), so the build can run inside a caller's CUDA graph, and for forests of at
most :data:`~treessm.ops.recorded.RECORDED_PLAN_MAX_NODES` vertices it is recorded in a
CUDA graph once per set of sizes and replayed for later forests of those sizes
(:mod:`treessm.ops.recorded`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..tree import Tree
from .heavy import heavy_children, root_path_sums
from .recorded import RECORDED_PLAN_MAX_NODES, RECORDED_PLANS, Recordings

__all__ = ["WalkPlan", "walk_plan", "slot_bound", "ROOT", "FIRST", "LAST", "PUSH", "MAX_STACK"]

#: Flags of a walk position (low four bits of ``rec[:, 2]``; the stack depth before the
#: position is ``rec[:, 2] >> 4``): a root; a first child (its parent is the previous
#: position); a last child of a vertex with two or more children (pops the stack); a
#: vertex with two or more children (pushes its state).
ROOT, FIRST, LAST, PUSH = 1, 2, 4, 8
#: Stack entries of the CUDA kernels (a tree below 2^31 vertices needs at most 30).
MAX_STACK = 32
_RECORDINGS = Recordings(RECORDED_PLANS)


class WalkPlan(NamedTuple):
    """The walk of a forest (on its device, int32).

    Attributes:
        rec (IntTensor [N, 4]): per walk position the vertex, its parent (``-1`` at a
            root), its flags with the stack depth before it (``flags | depth << 4``) and,
            at the first position of a segment, its first checkpoint slot (else ``-1``).
        tree_ptr (IntTensor [T + 1]): tree ``t`` spans walk positions
            ``[tree_ptr[t], tree_ptr[t + 1])`` (its breadth-first range).
        num_slots (int): checkpoint slots of all segments (or an upper bound on them,
            :func:`slot_bound`; the slots past the last used are never written).
        segment (int): positions of a segment.
        chains (bool): every tree is a chain (no vertex has two children), known on the
            host: read with the slot count, so ``False`` where the count is a bound.
    """

    rec: Tensor
    tree_ptr: Tensor
    num_slots: int
    segment: int
    chains: bool = False


def slot_bound(num_nodes: int, num_trees: int, largest: int, segment: int) -> int:
    r"""An upper bound on the checkpoint slots of a forest's walk, from host-side sizes: at
    most :math:`T + \lfloor (N - T) / \mathrm{segment} \rfloor` segments (tree ``t``
    has :math:`\lceil n_t / \mathrm{segment} \rceil`), each starting with at most
    :math:`1 + \lfloor \log_2 n \rfloor` slots for trees of at most ``largest = n``
    vertices (the stack holds the ancestors whose light subtrees hold the position, each
    at most half of the one above).

    Example:
        >>> slot_bound(8192, 4, 2048, 32)  # 4 sequences of 2,048 tokens
        3108
    """
    if num_nodes == 0:
        return 0
    segments = num_trees + (num_nodes - num_trees) // segment
    return segments * max(int(largest).bit_length(), 1)


@torch.compiler.disable  # reads a number on the host; runs eagerly under torch.compile
def walk_plan(tree: Tree, segment: int) -> WalkPlan:
    """The :class:`WalkPlan` of ``tree`` with segments of ``segment`` positions, built once
    per segment length and cached."""
    key = ("walk", segment)
    cached = tree.plan_cache.get(key)
    if cached is not None:
        return cached
    n = tree.num_nodes
    if n >= 2 ** 31:
        raise ValueError(f"the walk plan holds int32 positions; the tree has {n} vertices")
    if tree.num_trees == n:
        plan = _isolated_plan(tree, segment)
    else:
        plan = _replayed(tree, segment)
        if plan is None:  # bounded where the tree was built on a GPU: nothing read back
            plan = _plan(tree, segment,
                         bounded=tree.num_levels is None and tree.device.type == "cuda")
    tree.plan_cache[key] = plan
    return plan


def _replayed(tree: Tree, segment: int) -> Optional[WalkPlan]:
    """The plan of a forest built on the device from a recorded build of its sizes (the
    slot count bounded), or ``None`` where none is kept (not on CUDA, a level count known
    on the host, too large, the caller compiling or capturing, a failed recording)."""
    n = tree.num_nodes
    if tree.num_levels is not None or not 0 < n <= RECORDED_PLAN_MAX_NODES:
        return None
    key = (tree.device, n, tree.num_trees, tree.max_tree_size, segment)
    return _RECORDINGS.replay_layout(key, lambda t: _plan(t, segment, bounded=True), tree)


def _isolated_plan(tree: Tree, segment: int) -> WalkPlan:
    # a forest of isolated vertices (the new tokens of a generation step): each is a root
    # at its own breadth-first position and starts a segment with one slot; no scan and
    # no host read
    n, dev = tree.num_nodes, tree.device
    pos = torch.arange(n, dtype=torch.int32, device=dev)
    rec = torch.stack([tree.order.int(), torch.full_like(pos, -1), torch.full_like(pos, ROOT),
                       pos], 1)
    return WalkPlan(rec, tree.tree_ptr.int(), n, segment, True)


def _plan(tree: Tree, segment: int, bounded: bool = False) -> WalkPlan:
    # bounded: the slot count is slot_bound's (nothing read on the host), else the walk's
    n, dev = tree.num_nodes, tree.device
    parent = tree.parent
    long = dict(dtype=torch.long, device=dev)
    size, bfs, heavy, biggest, heavy_bfs, earlier = heavy_children(tree)
    par = torch.where(parent >= 0, parent, n)  # roots point at a spare slot n
    nonroot = parent >= 0
    nchild = torch.zeros(n + 1, **long).index_add_(0, par, torch.ones(n, **long))
    # offset of v among its siblings in walk order: the light ones in breadth-first order,
    # then the heavy one
    after_heavy = heavy_bfs[par] < bfs
    offset = torch.where(heavy, size[parent.clamp(min=0)] - 1 - size,
                         earlier - torch.where(after_heavy, biggest[par], 0))
    offset = torch.where(nonroot, offset, 0)
    # walk position: parent's + 1 + offset, a root at its tree's start (a down scan)
    step = torch.where(nonroot, 1 + offset, bfs.to(torch.float64))
    pos = root_path_sums(step, tree)
    flags = (torch.where(nonroot, 0, ROOT) + torch.where(nonroot & (offset == 0), FIRST, 0)
             + torch.where(heavy & (nchild[par] >= 2), LAST, 0)
             + torch.where(nchild[:n] >= 2, PUSH, 0))
    at = torch.empty(n, **long)
    at[pos] = torch.arange(n, **long)  # the vertex at each walk position
    flags_at = flags[at]
    change = (flags_at & PUSH > 0).long() - (flags_at & LAST > 0).long()
    depth = torch.cumsum(change, 0) - change  # stack depth before each position
    tree_of = torch.repeat_interleave(torch.arange(tree.num_trees, **long),
                                      tree.tree_ptr.diff(), output_size=n)
    starts = (torch.arange(n, **long) - tree.tree_ptr[tree_of]) % segment == 0
    slots = torch.where(starts, 1 + depth, 0)
    first_slot = torch.where(starts, torch.cumsum(slots, 0) - slots, -1)
    if bounded:
        largest = n if tree.max_tree_size is None else tree.max_tree_size
        num_slots = slot_bound(n, tree.num_trees, largest, segment)
        chains = False
    elif n:  # one read: the slot count, and the most children of a vertex
        num_slots, most = torch.stack([slots.sum(), nchild[:n].max()]).tolist()
        chains = most <= 1
    else:
        num_slots, chains = 0, False
    rec = torch.stack([at, parent[at], flags_at | (depth << 4), first_slot], 1).int()
    return WalkPlan(rec.contiguous(), tree.tree_ptr.int(), int(num_slots), segment, chains)
