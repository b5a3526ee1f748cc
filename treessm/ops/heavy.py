r"""The heavy children of a forest, shared by the layouts that order each tree depth-first
(:mod:`treessm.ops.walk`, heavy child last; :mod:`treessm.ops.tiles`, heavy child first).

Every vertex with children marks its *heavy* child: the one with the largest subtree, the
first in breadth-first order on ties. :func:`heavy_children` computes it from the subtree
sizes and tensor operations on the tree's device, with what both layouts place children by:
the sizes of each vertex's earlier siblings in breadth-first order.

Subtree sizes and root-path sums are integer sums over a vertex's descendants or
ancestors. On the CPU they are tree scans (compiled, linear). On other devices they are
computed by *pointer jumping* (:mod:`treessm.ops.pointer_jump`): :math:`\lceil \log_2 n
\rceil` rounds of one gather each for trees of at most ``n`` vertices, whatever their depth,
without atomics, independent of the tree-scan kernels (which are laid out with these sums),
exact and deterministic (integer sums). A root-path sum jumps along the parent pointers
(:func:`root_path_sums`). A subtree size is read off the tree's *Euler tour*, the list of
its edges as a depth-first walk crosses them, down into each child's subtree and back up:
ranking the tour (the edges from each one to the tour's end) gives each vertex's down and
up crossings, between which lie twice its subtree's edges (:func:`subtree_sizes`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import Tree
from . import cpu
from .pointer_jump import pointer_jump

__all__ = ["HeavyChildren", "heavy_children", "subtree_sizes", "root_path_sums"]


class HeavyChildren(NamedTuple):
    """Per vertex of a forest of ``N`` vertices (on its device).

    Attributes:
        size (Tensor [N], float64): subtree size.
        bfs (LongTensor [N]): breadth-first position.
        heavy (BoolTensor [N]): whether the vertex is its parent's heavy child (``False``
            at roots).
        largest (Tensor [N + 1], float64): the largest subtree among each vertex's children
            (0 without children); entry ``N`` collects the roots.
        heavy_bfs (LongTensor [N + 1]): the breadth-first position of each vertex's heavy
            child (``N`` without children); entry ``N`` collects the roots.
        earlier (Tensor [N], float64): the sizes of the vertex's siblings before it in
            breadth-first order, summed.
    """

    size: Tensor
    bfs: Tensor
    heavy: Tensor
    largest: Tensor
    heavy_bfs: Tensor
    earlier: Tensor


def heavy_children(tree: Tree) -> HeavyChildren:
    """The :class:`HeavyChildren` of ``tree`` (not cached: the layouts that use it are)."""
    n, dev = tree.num_nodes, tree.device
    parent, order = tree.parent, tree.order
    long = dict(dtype=torch.long, device=dev)
    bfs = torch.empty(n, **long).scatter_(0, order, torch.arange(n, **long))
    size = subtree_sizes(tree, bfs).double()
    nonroot = parent >= 0
    par = torch.where(nonroot, parent, n)  # roots point at a spare slot n
    largest = torch.zeros(n + 1, dtype=torch.float64, device=dev).scatter_reduce(
        0, par, size, "amax", include_self=True)
    candidate = torch.where(size == largest[par], bfs, n)
    heavy_bfs = torch.full((n + 1,), n, **long).scatter_reduce(0, par, candidate, "amin")
    heavy = nonroot & (bfs == heavy_bfs[par])
    # siblings are contiguous in breadth-first order
    size_bfs = size[order]
    before_bfs = torch.cumsum(size_bfs, 0) - size_bfs
    first_sibling = tree.child_ptr[bfs[parent.clamp(min=0)]].clamp(max=max(n - 1, 0))
    earlier = before_bfs[bfs] - before_bfs[first_sibling]
    return HeavyChildren(size, bfs, heavy, largest, heavy_bfs, earlier)


def _rounds(tree: Tree, length: int = 1) -> int:
    """Pointer-jumping rounds that cover a list of ``length`` times the vertices of the
    largest tree (the level count bounds a root path where the host knows it, else the
    largest tree's size, else the forest's)."""
    if length == 1 and tree.num_levels is not None:
        return max(int(tree.num_levels - 1).bit_length(), 0)
    largest = tree.num_nodes if tree.max_tree_size is None else tree.max_tree_size
    return max(int(length * largest - 1).bit_length(), 0)


def _cpu_scan(values: Tensor, tree: Tree, direction: str) -> Tensor:
    """A tree scan of integer ``values [N]`` with unit weights by the compiled CPU kernels
    (float64, exact below :math:`2^{53}`), as int64."""
    v = values.double().reshape(-1, 1).contiguous()
    h = cpu.forward(v, torch.ones_like(v), tree.order, tree.child_ptr, tree.tree_ptr,
                    direction)
    return h[:, 0].round().long()


def _by_cpu_scan(tree: Tree) -> bool:
    """Whether the sums run on the numba scan (eager, on the CPU) rather than by jumping."""
    return tree.device.type == "cpu" and not torch.compiler.is_compiling()


def subtree_sizes(tree: Tree, bfs: Tensor) -> Tensor:
    """The number of vertices in each vertex's subtree (int64 ``[N]``); ``bfs`` is each
    vertex's breadth-first position (the inverse of ``tree.order``).

    Off the CPU: the Euler tour of each tree as a list over ``2N + 1`` slots, slot ``v``
    the edge down into ``v`` and slot ``N + v`` the edge back up (both empty at a root),
    slot ``2N`` its end. After the edge down into ``v`` comes the edge into its first child,
    or, at a leaf, the edge back up; after the edge up from ``v`` comes the edge down into
    its next sibling, or the edge up from its parent, or, below a root, the end. Ranked by
    pointer jumping, the edge down into ``v`` lies ``2 size(v) - 1`` edges before the edge
    up, and a root's tour holds ``2 (size - 1)`` edges.
    """
    n, dev = tree.num_nodes, tree.device
    if _by_cpu_scan(tree):
        return _cpu_scan(torch.ones(n, dtype=torch.long), tree, "up")
    parent, order, child_ptr = tree.parent, tree.order, tree.child_ptr
    vertex = torch.arange(n, device=dev)
    last = max(n - 1, 0)
    nonroot = parent >= 0
    par = parent.clamp(min=0)
    # children and siblings are contiguous in breadth-first order: whether the vertex
    # where v's children would start, or the next one, is a child of v's or its sibling
    first = child_ptr[bfs]
    first_child = order[first.clamp(max=last)]
    has_child = (first < n) & (parent[first_child] == vertex)
    next_sibling = order[(bfs + 1).clamp(max=last)]
    has_sibling = (bfs + 1 < n) & (parent[next_sibling] == parent) & nonroot
    end = 2 * n
    after_down = torch.where(has_child, first_child, n + vertex)
    after_up = torch.where(has_sibling, next_sibling,
                           torch.where(parent[par] >= 0, n + par, end))
    succ = torch.cat([torch.where(nonroot, after_down, end),
                      torch.where(nonroot, after_up, end), vertex.new_full((1,), end)])
    edge = nonroot.long()
    rank = pointer_jump(succ, torch.cat([edge, edge, edge.new_zeros(1)]),
                        _rounds(tree, length=2), torch.add)
    below = (rank[vertex] - rank[n + vertex] + 1) // 2
    tour = torch.where(has_child, rank[first_child], 0)
    return torch.where(nonroot, below, tour // 2 + 1)


def root_path_sums(values: Tensor, tree: Tree) -> Tensor:
    """Sums of ``values`` (``[N]`` of integers below :math:`2^{53}`, by vertex) over each
    vertex's root path, itself included, as int64: a ``"down"`` tree scan with unit weights
    on the CPU, pointer jumping along the parents elsewhere and under
    :func:`torch.compile` (a root's parent is an end slot holding 0)."""
    if _by_cpu_scan(tree):
        return _cpu_scan(values, tree, "down")
    n = tree.num_nodes
    parent = tree.parent
    succ = torch.cat([torch.where(parent >= 0, parent, n), parent.new_full((1,), n)])
    value = torch.cat([values.long(), values.new_zeros(1, dtype=torch.long)])
    return pointer_jump(succ, value, _rounds(tree), torch.add)[:n]
