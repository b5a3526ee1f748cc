r"""The heavy children of a forest, shared by the layouts that order each tree depth-first
(:mod:`treessm.ops.walk`, heavy child last; :mod:`treessm.ops.tiles`, heavy child first).

Every vertex with children marks its *heavy* child: the one with the largest subtree, the
first in breadth-first order on ties. :func:`heavy_children` computes it from the subtree
sizes and tensor operations on the tree's device, with what both layouts place children by:
the sizes of each vertex's earlier siblings in breadth-first order.

Subtree sizes and root-path sums are integer sums over a vertex's descendants or ancestors.
On the CPU they are tree scans (compiled, linear); on other devices they are computed by
*pointer doubling* (:func:`subtree_sums`, :func:`root_path_sums`): with ``anc_k(v)`` the
ancestor :math:`2^k` edges above ``v``, the sums over the :math:`2^{k+1}` nearest ancestors
(or descendants) are those over the :math:`2^k` nearest plus those of ``anc_k(v)`` (of the
vertices whose ``anc_k`` is ``v``). That is :math:`\lceil \log_2 (n) \rceil` dependent steps
of gathers and integer scatter-adds for trees of at most ``n`` vertices, whatever their
depth, independent of the tree-scan kernels (which are laid out with these sums), and exact
and deterministic (integer sums).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import Tree
from . import cpu
from .spare import SPARE_SLOTS, kept_or_spare

__all__ = ["HeavyChildren", "heavy_children", "subtree_sums", "root_path_sums"]


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
    size = subtree_sums(torch.ones(n, 1, **long), tree)[:, 0].double()
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


def _steps(tree: Tree) -> int:
    """Doubling steps that cover every root path: :math:`2^{steps}` exceeds the depth (the
    host's level count bounds it where known, else the largest tree's size)."""
    if tree.num_levels is not None:
        return max(int(tree.num_levels - 1).bit_length(), 0)
    largest = tree.num_nodes if tree.max_tree_size is None else tree.max_tree_size
    return max(int(largest - 1).bit_length(), 0)


def _by_doubling(values: Tensor, tree: Tree, toward_root: bool) -> Tensor:
    """Root-path sums (``toward_root=False``: each vertex sums its ancestors) or subtree
    sums (``True``: each vertex sums its descendants) of int64 ``values [N, K]``."""
    n = tree.num_nodes
    # above a root: a spare row (the vertices of deep trees would all meet in one), itself
    # above nothing but spare rows
    anc = torch.cat([kept_or_spare(tree.parent, tree.parent >= 0, n),
                     torch.arange(n, n + SPARE_SLOTS, device=values.device)])
    zero = values.new_zeros(SPARE_SLOTS, values.shape[1])  # what lies above a root: nothing
    acc = values
    for _ in range(_steps(tree)):
        if toward_root:  # v adds what the vertices 2^k below it hold
            below = values.new_zeros(n + SPARE_SLOTS, values.shape[1])
            below.index_add_(0, anc[:n], acc)
            acc = acc + below[:n]
        else:  # v adds what its ancestor 2^k above it holds
            acc = acc + torch.cat([acc, zero]).index_select(0, anc[:n])
        anc = anc[anc]
    return acc


def _cpu_scan(values: Tensor, tree: Tree, direction: str) -> Tensor:
    """A tree scan of integer ``values`` with unit weights by the compiled CPU kernels
    (float64, exact below :math:`2^{53}`), as int64."""
    v = values.double().contiguous()
    h = cpu.forward(v, torch.ones_like(v), tree.order, tree.child_ptr, tree.tree_ptr,
                    direction)
    return h.round().long()


def _sums_by_cpu_scan(tree: Tree) -> bool:
    """Whether the sums run on the numba scan (eager, on the CPU) rather than by doubling."""
    return tree.device.type == "cpu" and not torch.compiler.is_compiling()


def subtree_sums(values: Tensor, tree: Tree) -> Tensor:
    """Sums of ``values`` (int64 ``[N, K]``, by vertex) over each vertex's subtree, itself
    included, as int64: an ``"up"`` tree scan with unit weights on the CPU, pointer
    doubling elsewhere and under :func:`torch.compile` (which traces it)."""
    if _sums_by_cpu_scan(tree):
        return _cpu_scan(values, tree, "up")
    return _by_doubling(values.long(), tree, toward_root=True)


def root_path_sums(values: Tensor, tree: Tree) -> Tensor:
    """Sums of ``values`` (``[N, K]`` of integers below :math:`2^{53}`, by vertex) over
    each vertex's root path, itself included, as int64: a ``"down"`` tree scan with unit
    weights on the CPU, pointer doubling elsewhere and under :func:`torch.compile`."""
    if _sums_by_cpu_scan(tree):
        return _cpu_scan(values, tree, "down")
    return _by_doubling(values.long(), tree, toward_root=False)
