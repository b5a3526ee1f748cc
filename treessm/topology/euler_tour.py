r"""Rooting and laying out spanning forests on the device (the Euler tour technique).

Continues :mod:`treessm.topology.boruvka`: the forest's directed edges, sorted by
``(source, target)``, give every vertex a cyclic adjacency list; following ``(u -> v)`` by
``(v -> next neighbour of v after u)`` walks each tree once, and cutting that cycle at the
root's first edge turns it into a list. List ranking by pointer jumping
(:math:`\lceil \log_2 2S \rceil` rounds) gives every directed edge its tour position: an
edge precedes its reverse exactly when it points away from the root, which gives
``parent``; the gap between the two is twice the subtree size. Depth and the preorder
index (children visited in ascending id) are sums over the root path, i.e. prefix sums
along the tour: one ``cumsum`` over tour positions. Sorting vertices by ``(root id, depth,
preorder index)`` reproduces the breadth-first order of :meth:`treessm.Tree.from_parent`
exactly: within one depth, preorder keeps the children of one vertex together, in
ascending id, and in the order of their parents.

Every function here is decorated with :func:`torch.no_grad` (no gradient flows through
tree construction). :func:`spanning_tree_on_device` with ``num_trees`` given issues no host
synchronisation, so it can be captured::

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tree = spanning_tree_on_device(edge_index, cost, n, roots, batch, num_trees=B,
                                       max_tree_size=H * W)
    ...                     # refill cost in place (cost.copy_(new_cost)), then
    g.replay()              # tree's tensors now hold the new tree

For capture, ``roots`` and ``batch`` must already live on the device (moving them there
would copy from the host).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_index_range, check_int
from ..tree import Tree
from .boruvka import (boruvka, boruvka_compacting, ceil_log2, check_cost,
                      check_device_edge_index, check_max_tree_size, check_vertices, edge_keys)
from ..ops.pointer_jump import pointer_jump
from ..ops.spare import SPARE_SLOTS, kept_or_spare, scatter_reduce_runs
from .layout import empty_forest

__all__ = ["parent_from_forest", "spanning_tree_on_device", "forest_on_device"]


# ---------------------------------------------------------------------------- Euler tours
def _compact(edge_index: Tensor, mask: Tensor, num_nodes: int) -> Tensor:
    """The masked edges moved to the front of a ``[2, N]`` buffer (``N`` pads the rest).

    A forest has fewer than ``N`` edges, so the buffer size is known without counting.
    Slot ``j`` finds the ``(j + 1)``-th masked edge by a binary search in the running count
    of masked edges: no scatter, whose unmasked elements (most of a graph's edges) would
    all have to go somewhere.
    """
    num_edges = mask.shape[0]
    if num_edges == 0:
        return torch.full((2, num_nodes), num_nodes, dtype=torch.long, device=mask.device)
    count = torch.cumsum(mask, 0)
    edge = torch.searchsorted(count, torch.arange(1, num_nodes + 1, device=mask.device))
    found = edge < num_edges
    return torch.where(found, edge_index.index_select(1, edge.clamp(max=num_edges - 1)),
                       num_nodes)


class _Slots:
    """The ``2N`` directed copies of a compacted forest, sorted by ``(source, target)``.

    Padding copies have source and target ``N`` and sort last; there are at least two.
    """

    def __init__(self, forest: Tensor, num_nodes: int):
        n = num_nodes
        device = forest.device
        m = 2 * n
        stride = n + 1
        src = torch.cat([forest[0], forest[1]])
        dst = torch.cat([forest[1], forest[0]])
        key = torch.sort(src * stride + dst).values
        s = torch.div(key, stride, rounding_mode="floor")
        t = key - s * stride
        self.src, self.dst = s, t
        self.valid = s < n
        # the reverse copy (v -> u) of each (u -> v), and where each vertex's list starts
        self.twin = torch.searchsorted(key, t * stride + s)
        self.first = torch.searchsorted(key, torch.arange(n + 1, device=device) * stride)
        j = torch.arange(m, device=device)
        self.last = torch.cat([s[1:] != s[:-1], torch.ones(1, dtype=torch.bool, device=device)])
        # next copy of the same source, cyclically
        self.next = torch.where(self.last, self.first[s], j + 1)
        self.degree = self.first[1:] - self.first[:-1]
        self.n, self.m = n, m


def _tour_rounds(max_size: int) -> int:
    return ceil_log2(2 * (max_size - 1)) if max_size > 1 else 0


def _preferred_root_key(roots: Optional[Tensor], num_nodes: int, device) -> Tensor:
    """``v`` for a listed root, ``v + N`` for any other vertex: the minimum over a component
    is its lowest listed root, else its lowest vertex."""
    key = torch.arange(num_nodes, device=device) + num_nodes
    if roots is not None and roots.numel():
        key.scatter_reduce_(0, roots, roots, "amin")
    return key


def _roots_from_labels(comp: Tensor, roots: Optional[Tensor], num_nodes: int) -> Tensor:
    key = _preferred_root_key(roots, num_nodes, comp.device)
    best = scatter_reduce_runs(comp, key, num_nodes, 2 * num_nodes, "amin")
    return torch.remainder(best[comp], num_nodes)


def _roots_from_tours(slots: _Slots, roots: Optional[Tensor], max_size: int) -> Tensor:
    # Uncut, every tree's tour is a cycle through all its directed edges; doubling the
    # stride of a running minimum covers a whole cycle in ceil(log2(length)) rounds.
    n = slots.n
    key = _preferred_root_key(roots, n, slots.src.device)
    key_ext = torch.cat([key, key.new_full((1,), 2 * n)])
    cyc = pointer_jump(slots.next[slots.twin], key_ext[slots.src], _tour_rounds(max_size),
                        torch.minimum)
    low = torch.where(slots.degree > 0, cyc[slots.first[:n]], key)
    return torch.remainder(low, n)


def _rank_tour(slots: _Slots, is_root: Tensor, max_size: int):
    """Tour ranks of every directed copy and the parent array, for the roots ``is_root``.

    Returns ``rank`` (``[2N + 1]``: copies from each one to the end of its tree's tour),
    the rank of each copy's reverse, ``down`` (the copy points away from the root),
    ``up`` (each vertex's copy towards its parent, ``-1`` at roots) and ``parent``.
    """
    n, m = slots.n, slots.m
    device = is_root.device
    s, t, twin = slots.src, slots.dst, slots.twin
    is_root_ext = torch.cat([is_root, torch.ones(1, dtype=torch.bool, device=device)])
    # cut each tree's cycle where it would re-enter the root's first edge
    nxt = torch.where(slots.last & is_root_ext[s], m, slots.next)
    succ = torch.cat([nxt[twin], nxt.new_full((1,), m)])
    weight = torch.cat([slots.valid.long(), succ.new_zeros(1)])
    rank = pointer_jump(succ, weight, _tour_rounds(max_size), torch.add)
    r_twin = rank[twin]
    down = rank[:m] > r_twin  # the copy comes first in the tour
    up = _up_copies(slots, slots.valid & ~down)
    parent = torch.where(up >= 0, t[up.clamp(min=0)], -1)
    return rank, r_twin, down, up, parent


def _up_copies(slots: _Slots, is_up: Tensor) -> Tensor:
    """The copy of each vertex towards its parent (``-1`` at roots and isolated vertices).

    A vertex has at most one such copy among its own, which lie together from
    ``first[v]``; so the sum over them of ``1 + (offset in the list)`` is that copy's offset
    plus one, or 0. One prefix sum and two gathers, where a scatter of the ``N`` up copies
    would send the other ``N`` copies somewhere (a few spare slots, whose atomics queue).
    """
    first = slots.first
    j = torch.arange(slots.m, device=is_up.device)
    local = torch.where(is_up, j - first[slots.src.clamp(max=slots.n - 1)] + 1, 0)
    total = F.pad(torch.cumsum(local, 0), (1, 0))
    found = total[first[1:]] - total[first[:-1]]
    return torch.where(found > 0, first[:-1] + found - 1, -1)


def _rooted_layout(slots: _Slots, root: Tensor, max_size: int, num_trees: Optional[int],
                   batch: Optional[Tensor], known_size: Optional[int]) -> Tree:
    n, m = slots.n, slots.m
    device = root.device
    s, twin, first = slots.src, slots.twin, slots.first
    is_root = root == torch.arange(n, device=device)
    rank, r_twin, down, up, parent = _rank_tour(slots, is_root, max_size)
    r_own = rank[:m]

    # Global tour positions: tours laid end to end in ascending root id.
    tour_len = torch.where(slots.degree > 0, rank[first[:n]], 0)
    tour_end = torch.cumsum(torch.where(is_root, tour_len, 0), 0)
    tour_end = torch.cat([tour_end, tour_end.new_full((1,), m)])
    root_ext = torch.cat([root, root.new_full((1,), n)])
    pos = tour_end[root_ext[s]] - r_own  # padding copies: rank 0, position m (dropped)

    # Preorder index with children in ascending id: pre(c) = pre(p) + 1 + (sizes of the
    # siblings of c below it). Pack (depth, preorder) into one integer per down copy and sum
    # it along the root path as a prefix sum over the tour (the up copy cancels it).
    bits = max(max_size - 1, 1).bit_length()
    size = torch.where(down, (r_own - r_twin + 1) >> 1, 0)  # subtree size of the child
    before = torch.cumsum(size, 0) - size
    offset = before - before[first[s]]
    step = torch.where(down, offset + ((1 << bits) + 1), 0)
    step = step - step[twin]
    # slot m stays 0: the padding copies read it back; the spares lie past it
    placed = torch.zeros(m + 1 + SPARE_SLOTS, dtype=torch.long, device=device)
    placed.scatter_reduce_(0, kept_or_spare(pos, pos < m, m + 1), step, "amax",
                           include_self=False)
    path_sum = torch.cumsum(placed[:m + 1], 0)
    # a vertex's (depth, preorder) is the path sum at the copy into it: its up copy's twin
    # (roots: (0, 0))
    into = twin[up.clamp(min=0)]
    packed = torch.where(up >= 0, path_sum[pos[into]], 0)
    depth = packed >> bits

    if (n - 1).bit_length() + 2 * bits <= 62:
        order = torch.sort((root << (2 * bits)) | packed).indices
    else:  # the key would overflow: sort by (depth, preorder), then stably by root
        order = torch.sort(packed).indices
        order = order[torch.sort(root[order], stable=True).indices]

    # child_ptr as Tree.from_parent's breadth-first search fills it: the queue tail when a
    # position is dequeued, i.e. the children of all earlier positions plus the roots so far.
    root_flag = is_root.long()
    root_pos = root_flag[order]
    grow = (slots.degree - 1 + 2 * root_flag)[order]  # children + root flag
    child_ptr = F.pad(torch.cumsum(grow, 0), (1, 0))
    child_ptr[:n] += root_pos

    counting = num_trees is None
    if counting:
        num_trees = int(is_root.sum())
    tree_of = (torch.cumsum(is_root, 0) - 1)[root]
    tree_ptr = torch.searchsorted(tree_of[order],
                                  torch.arange(num_trees + 1, device=device))
    # no level count, even where the host waited to count the trees: a build with the
    # count given (every later build of a graph layer) has none, and the scan's schedule
    # and plans follow these host-side sizes, so the first forward must see the same
    return Tree(parent, order, child_ptr, tree_ptr, depth, batch, max_tree_size=known_size)


@torch.no_grad()
def parent_from_forest(edge_index: Tensor, mask: Tensor, num_nodes: int,
                       roots: Optional[Tensor] = None, *,
                       max_tree_size: Optional[int] = None) -> Tensor:
    r"""Root a forest given as a subset of edges, on the input's device.

    Each tree is rooted at the lowest vertex of ``roots`` it contains, or at its lowest
    vertex id when it contains none. Loop counts depend only on sizes.

    Args:
        edge_index (LongTensor [2, E]): candidate edges.
        mask (BoolTensor [E]): the edges of the forest, e.g. from :func:`spanning_forest`.
            They must form a forest (no cycle, no self-loop, no repeated edge); this is not
            checked.
        num_nodes (int): number of vertices ``N``.
        roots (LongTensor [R], optional): preferred roots. (default: ``None``)
        max_tree_size (int, optional): an upper bound on the number of vertices of a tree;
            too small a bound gives a wrong result. (default: ``num_nodes``)

    Returns:
        LongTensor [N]: the parent of each vertex, ``-1`` at roots.
    """
    edge_index, num_nodes = check_device_edge_index(edge_index, num_nodes)
    device = edge_index.device
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError("mask must be a BoolTensor [E]")
    if mask.shape != (edge_index.shape[1],):
        raise ValueError(f"mask must have shape [{edge_index.shape[1]}], got {list(mask.shape)}")
    mask = mask.to(device)
    roots = check_vertices(roots, "roots", num_nodes, device)
    size = check_max_tree_size(max_tree_size, num_nodes)
    if num_nodes == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    slots = _Slots(_compact(edge_index, mask, num_nodes), num_nodes)
    root = _roots_from_tours(slots, roots, size)
    is_root = root == torch.arange(num_nodes, device=device)
    return _rank_tour(slots, is_root, size)[4]


@torch.no_grad()
def spanning_tree_on_device(edge_index: Tensor, cost: Tensor, num_nodes: int,
                            roots: Optional[Tensor] = None, batch: Optional[Tensor] = None,
                            num_trees: Optional[int] = None, *,
                            max_tree_size: Optional[int] = None) -> Tree:
    r"""Minimum spanning forest, rooted and planned, entirely on the input's device.

    The forest is that of :func:`spanning_forest`; each tree is rooted at the lowest vertex
    of ``roots`` it contains, or at its lowest vertex id when it contains none (an isolated
    vertex is a tree of its own). The result is identical, tensor for tensor, to
    ``Tree.from_parent(parent, batch)`` for the same parent array, but no step of it waits
    for the device: with ``num_trees`` given the whole call can be captured in a CUDA
    graph (see the module documentation).

    Args:
        edge_index (LongTensor [2, E]): candidate edges (either direction).
        cost (Tensor [E]): edge costs (lower is preferred), not NaN.
        num_nodes (int): number of vertices ``N``.
        roots (LongTensor [R], optional): preferred roots, typically one per example.
            (default: ``None``)
        batch (LongTensor [N], optional): example of each vertex, stored in the tree.
            (default: ``None``)
        num_trees (int, optional): the number of trees of the result, when the caller knows
            it (``B`` for a batch of ``B`` connected grids); it sizes ``tree_ptr`` without
            asking the device. A wrong value gives a wrong ``tree_ptr``. When ``None`` the
            host waits for the device: the forest is then found by Borůvka rounds that drop
            the edges inside components and stop when none are left (less work on large
            graphs), and the tree records its largest tree. A tree built here records no
            level count either way, so that its scans take the same schedule and plans
            whether or not the trees were counted.
            (default: ``None``)
        max_tree_size (int, optional): an upper bound on the number of vertices of a tree,
            e.g. ``H * W``; it sets the fixed number of rounds, and too small a bound gives a
            wrong tree. (default: ``num_nodes``)

    Returns:
        Tree: the rooted minimum spanning forest with its breadth-first plan.

    Shapes:
        - **input:** edge indices :math:`(2, E)`, edge costs :math:`(E)`, roots :math:`(R)`,
          batch vector :math:`(N)`
        - **output:** a :class:`~treessm.Tree` over :math:`N` vertices
    """
    edge_index, num_nodes = check_device_edge_index(edge_index, num_nodes)
    device = edge_index.device
    cost = check_cost(cost, edge_index.shape[1], device)
    roots = check_vertices(roots, "roots", num_nodes, device)
    batch = check_vertices(batch, "batch", num_nodes, device, length=num_nodes)
    if num_trees is not None:
        num_trees = check_int(num_trees, "num_trees", 0)
        if num_trees > num_nodes or (num_nodes > 0 and num_trees == 0):
            raise ValueError(f"num_trees must lie in [1, {num_nodes}] for {num_nodes} vertices, "
                             f"got {num_trees}")
    size = check_max_tree_size(max_tree_size, num_nodes)
    if num_nodes == 0:
        return empty_forest(device, batch=batch is not None)
    if num_trees is None:
        # counting the trees waits for the device anyway, so the forest is found by the
        # compacting Borůvka and the tour takes the rounds the largest tree needs
        chosen, comp = boruvka_compacting(edge_index, edge_keys(cost), num_nodes)
        root = _roots_from_labels(comp, roots, num_nodes)
        size = known = int(torch.bincount(root, minlength=num_nodes).max())
    else:
        chosen, comp = boruvka(edge_index, edge_keys(cost), num_nodes, size)
        root = _roots_from_labels(comp, roots, num_nodes)
        known = None if max_tree_size is None else size
    slots = _Slots(_compact(edge_index, chosen, num_nodes), num_nodes)
    return _rooted_layout(slots, root, size, num_trees, batch, known)


@torch.no_grad()
def forest_on_device(edge_index: Tensor, root: Tensor, num_trees: int,
                     batch: Optional[Tensor] = None, *,
                     max_tree_size: Optional[int] = None) -> Tree:
    r"""The :class:`~treessm.Tree` of a forest whose edges and roots are known, laid out on
    the input's device without a host synchronisation (no spanning-forest search: every
    edge is a tree edge).

    The result is identical, tensor for tensor, to ``Tree.from_parent(parent, batch)`` for
    the forest rooted at ``root``.

    Args:
        edge_index (LongTensor [2, F]): the forest's edges (either direction), each once;
            they must form a forest over the vertices (not checked).
        root (LongTensor [N]): the root of each vertex's tree (a root is its own).
        num_trees (int): the number of trees (of distinct roots); it sizes ``tree_ptr``.
        batch (LongTensor [N], optional): example of each vertex, stored in the tree.
            (default: ``None``)
        max_tree_size (int, optional): an upper bound on the vertices of a tree; too small
            a bound gives a wrong tree. (default: ``N``)

    Example:
        >>> edges = torch.tensor([[1, 2, 4], [0, 0, 3]])       # 0 - {1, 2} and 3 - 4
        >>> tree = forest_on_device(edges, torch.tensor([0, 0, 0, 3, 3]), 2)
        >>> tree.parent.tolist(), tree.order.tolist()
        ([-1, 0, 0, -1, 3], [0, 1, 2, 3, 4])
    """
    if not isinstance(root, Tensor) or root.dim() != 1:
        got = list(root.shape) if isinstance(root, Tensor) else type(root).__name__
        raise TypeError(f"root must be a 1-D LongTensor (one root per vertex), got {got}")
    edge_index, num_nodes = check_device_edge_index(edge_index, root.shape[0])
    device = edge_index.device
    root = check_vertices(root, "root", num_nodes, device, length=num_nodes)
    if device.type == "cpu":  # reading ids waits for a device
        check_index_range(root, "root", num_nodes)
    batch = check_vertices(batch, "batch", num_nodes, device, length=num_nodes)
    num_trees = check_int(num_trees, "num_trees", 0)
    size = check_max_tree_size(max_tree_size, num_nodes)
    if num_nodes == 0:
        return empty_forest(device, batch=batch is not None)
    keep = torch.ones(edge_index.shape[1], dtype=torch.bool, device=device)
    slots = _Slots(_compact(edge_index, keep, num_nodes), num_nodes)
    return _rooted_layout(slots, root, size, num_trees, batch, max_tree_size)
