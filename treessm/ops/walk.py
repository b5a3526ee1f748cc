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
host reads two numbers once (the slot count and the deepest stack).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import Tree
from .heavy import heavy_children, root_path_sums

__all__ = ["WalkPlan", "walk_plan", "ROOT", "FIRST", "LAST", "PUSH", "MAX_STACK"]

#: Flags of a walk position (low four bits of ``rec[:, 2]``; the stack depth before the
#: position is ``rec[:, 2] >> 4``): a root; a first child (its parent is the previous
#: position); a last child of a vertex with two or more children (pops the stack); a
#: vertex with two or more children (pushes its state).
ROOT, FIRST, LAST, PUSH = 1, 2, 4, 8
#: Stack entries of the CUDA kernels (a tree below 2^31 vertices needs at most 30).
MAX_STACK = 32


class WalkPlan(NamedTuple):
    """The walk of a forest (on its device, int32).

    Attributes:
        rec (IntTensor [N, 4]): per walk position the vertex, its parent (``-1`` at a
            root), its flags with the stack depth before it (``flags | depth << 4``) and,
            at the first position of a segment, its first checkpoint slot (else ``-1``).
        tree_ptr (IntTensor [T + 1]): tree ``t`` spans walk positions
            ``[tree_ptr[t], tree_ptr[t + 1])`` (its breadth-first range).
        num_slots (int): checkpoint slots of all segments.
        segment (int): positions of a segment.
    """

    rec: Tensor
    tree_ptr: Tensor
    num_slots: int
    segment: int


@torch.compiler.disable  # reads two numbers on the host; runs eagerly under torch.compile
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
    plan = _isolated_plan(tree, segment) if tree.num_trees == n else _plan(tree, segment)
    tree.plan_cache[key] = plan
    return plan


def _isolated_plan(tree: Tree, segment: int) -> WalkPlan:
    # a forest of isolated vertices (the new tokens of a generation step): each is a root
    # at its own breadth-first position and starts a segment with one slot; no scan and
    # no host read
    n, dev = tree.num_nodes, tree.device
    pos = torch.arange(n, dtype=torch.int32, device=dev)
    rec = torch.stack([tree.order.int(), torch.full_like(pos, -1), torch.full_like(pos, ROOT),
                       pos], 1)
    return WalkPlan(rec, tree.tree_ptr.int(), n, segment)


def _plan(tree: Tree, segment: int) -> WalkPlan:
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
    pos = root_path_sums(step[:, None], tree)[:, 0]
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
    num_slots, deepest = (torch.stack([slots.sum(), depth.max()]).tolist() if n else (0, 0))
    if deepest >= MAX_STACK:  # impossible below 2^31 vertices; a guard on the layout
        raise AssertionError(f"walk stack of depth {deepest} exceeds {MAX_STACK}")
    rec = torch.stack([at, parent[at], flags_at | (depth << 4), first_slot], 1).int()
    return WalkPlan(rec.contiguous(), tree.tree_ptr.int(), int(num_slots), segment)
