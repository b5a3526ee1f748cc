"""The heavy children of a forest, shared by the layouts that order each tree depth-first
(:mod:`treessm.ops.walk`, heavy child last; :mod:`treessm.ops.tiles`, heavy child first).

Every vertex with children marks its *heavy* child: the one with the largest subtree, the
first in breadth-first order on ties. :func:`heavy_children` computes it with one tree scan
(subtree sizes, float64, exact below :math:`2^{53}`) and tensor operations on the tree's
device, with what both layouts place children by: the sizes of each vertex's earlier
siblings in breadth-first order.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import Tree
from .tree_scan import tree_scan

__all__ = ["HeavyChildren", "heavy_children", "root_path_sums"]


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
    ones = torch.ones(n, 1, dtype=torch.float64, device=dev)
    size = tree_scan(ones, ones, tree, "up")[:, 0]  # exact: integers below 2^53
    bfs = torch.empty(n, **long).scatter_(0, order, torch.arange(n, **long))
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


def root_path_sums(values: Tensor, tree: Tree) -> Tensor:
    """Sums of ``values`` (float64 ``[N, K]`` of integers, by vertex) over each vertex's
    root path, itself included, as int64 (a ``"down"`` tree scan with unit weights; exact
    below :math:`2^{53}`)."""
    return tree_scan(values, torch.ones_like(values), tree, "down").round().long()
