"""Compiled layouts of rooted forests: from a forest's edges to the arrays of a
:class:`~treessm.Tree`.

Every component of an undirected forest is rooted at a chosen vertex (the one flagged in
``pref`` it contains, else its lowest vertex id) and traversed breadth-first with the
layout of :class:`~treessm.Tree`: trees in ascending root id, inside a tree by depth, the
children of a vertex contiguous and in ascending id. Building that layout straight from
the forest's edges gives exactly what :meth:`Tree.from_parent` computes from the parent
array, without a second pass.

Like :mod:`treessm.topology.mst`, the work is split over examples when each one is a
contiguous vertex range with a contiguous block of edges: its trees then fill the
matching range of ``order`` and examples are laid out in parallel.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

from ..tree import Tree, layout_sizes
from ..ops.chunks import run_chunks
from .mst import check_segment_sizes, find_root, kruskal_segment

__all__ = ["Layout", "layout_segment", "lattice_offsets", "check_status", "NONFINITE",
           "UNSCALED", "NO_MASK", "NO_OFFSETS", "layout_forest", "empty_forest"]

# status codes of the kernels
_OK, _CYCLE, _TWO_ROOTS, NONFINITE = 0, 1, 2, 3
# costs not computed: the features must be scaled first (treessm.topology.distance)
UNSCALED = 4


# Lattice-like candidate graphs (grids, sequences) join vertices whose ids differ by one
# of a few fixed offsets. A vertex's tree neighbours then fit in one byte -- a bit per
# (offset, direction), ordered so that bit order is neighbour-id order -- and the
# children of a vertex are read from tables instead of sorted adjacency lists.
MAX_OFFSETS = 4
_BYTE_COUNT = np.array([bin(b).count("1") for b in range(256)], np.int64)
_BYTE_BITS = np.array([[j for j in range(8) if b >> j & 1] + [0] * (8 - bin(b).count("1"))
                       for b in range(256)], np.int64)


def lattice_offsets(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Sorted distinct ``|dst - src|`` (self-loops aside) when there are at most
    :data:`MAX_OFFSETS` of them, else an empty array (the general layout is used)."""
    diff = np.unique(np.abs(dst - src))
    diff = diff[diff > 0]
    return diff.astype(np.int64) if diff.shape[0] <= MAX_OFFSETS else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------- kernels
@njit(cache=True)
def _layout_lattice(tree_u, tree_v, m, root, n0, n, offsets, parent, order, child_ptr, depth):
    """Breadth-first layout of a spanning tree of a lattice-like segment (see
    :data:`MAX_OFFSETS`), rooted at local ``root``. Returns False, having written
    nothing, when an edge's id difference is not one of ``offsets``."""
    k_off = offsets.shape[0]
    delta = np.empty(2 * k_off, np.int64)
    for j in range(k_off):  # bits 0..K-1: smaller neighbours, farthest first
        delta[j] = -offsets[k_off - 1 - j]
        delta[k_off + j] = offsets[j]
    # offset -> its index, by table: a search loop would branch unpredictably per edge
    which = np.full(offsets[k_off - 1] + 1, -1, np.int64)
    for j in range(k_off):
        which[offsets[j]] = j
    bits = np.zeros(n, np.uint8)
    for k in range(m):
        u = tree_u[n0 + k]
        v = tree_v[n0 + k]
        lo = min(u, v)
        hi = max(u, v)
        j = which[hi - lo] if hi - lo <= offsets[k_off - 1] else -1
        if j < 0:
            return False
        bits[lo] |= np.uint8(1 << (k_off + j))
        bits[hi] |= np.uint8(1 << (k_off - 1 - j))
    order[n0] = n0 + root
    parent[n0 + root] = -1
    depth[n0 + root] = 0
    head = 0
    tail = 1
    last = 2 * k_off - 1
    dv = 0  # depth of the children being appended; a level ends where the next began
    level_end = 0
    while head < tail:
        if head == level_end:
            dv += 1
            level_end = tail
        v = order[n0 + head] - n0
        child_ptr[n0 + head] = n0 + tail
        b = bits[v]
        for t in range(_BYTE_COUNT[b]):
            j = _BYTE_BITS[b, t]
            c = v + delta[j]
            order[n0 + tail] = n0 + c
            parent[n0 + c] = n0 + v
            depth[n0 + c] = dv
            bits[c] &= np.uint8(~(1 << (last - j)) & 255)  # the edge back to v: not a child
            tail += 1
        head += 1
    return True


@njit(cache=True)
def _bfs_tree(adj, adj_ptr, root, n0, n, parent, order, child_ptr, depth, tail):
    """Breadth-first layout of the tree of local vertex ``root``, from local position
    ``tail``, in a forest given by sorted adjacency lists.

    In a tree the children of a vertex are its neighbours except its parent, so no
    visited flags are needed and the append is branch-free. Writes global ids and
    positions (offset ``n0``); returns the new tail.
    """
    head = tail
    order[n0 + tail] = n0 + root
    parent[n0 + root] = -1
    depth[n0 + root] = 0
    tail += 1
    while head < tail:
        v = order[n0 + head] - n0
        pv = parent[n0 + v] - n0  # negative at the root: matches no neighbour
        child_ptr[n0 + head] = n0 + tail
        first = tail
        for k in range(adj_ptr[v], adj_ptr[v + 1]):
            c = adj[k]
            if tail < n:
                order[n0 + tail] = n0 + c
            tail += c != pv
        dv = depth[n0 + v] + 1
        for i in range(first, tail):
            c = order[n0 + i]
            parent[c] = n0 + v
            depth[c] = dv
        head += 1
    return tail


@njit(cache=True)
def _sorted_adjacency(tree_u, tree_v, m, n0, n):
    """CSR adjacency of a forest's ``m`` edges with every list in ascending order.

    The lists are filled twice: once in edge order, then by walking the vertices in
    ascending order and appending each to its neighbours' lists, which sorts them
    without comparisons.
    """
    adj_ptr = np.zeros(n + 1, np.int64)
    for k in range(m):
        adj_ptr[tree_u[n0 + k] + 1] += 1
        adj_ptr[tree_v[n0 + k] + 1] += 1
    for v in range(n):
        adj_ptr[v + 1] += adj_ptr[v]
    fill = adj_ptr[:n].copy()
    first = np.empty(2 * m, np.int32)
    for k in range(m):
        u = tree_u[n0 + k]
        v = tree_v[n0 + k]
        first[fill[u]] = v
        fill[u] += 1
        first[fill[v]] = u
        fill[v] += 1
    fill[:] = adj_ptr[:n]
    adj = np.empty(2 * m, np.int32)
    for x in range(n):
        for k in range(adj_ptr[x], adj_ptr[x + 1]):
            y = first[k]
            adj[fill[y]] = x
            fill[y] += 1
    return adj, adj_ptr


@njit(cache=True)
def _has_cycle(tree_u, tree_v, m, n0, n):
    """Whether ``m`` edges on ``n`` local vertices contain a cycle (self-loops included)."""
    if m > max(n - 1, 0):
        return True
    uf = np.empty(n, np.int32)
    for v in range(n):
        uf[v] = v
    for k in range(m):
        a = find_root(uf, tree_u[n0 + k])
        b = find_root(uf, tree_v[n0 + k])
        if a == b:
            return True
        uf[max(a, b)] = min(a, b)
    return False


@njit(cache=True)
def layout_segment(tree_u, tree_v, m, pref, n0, n, offsets, parent, order, child_ptr, depth,
                   tree_start):
    """Root and lay out the forest on local vertices ``[0, n)`` (global ``n0 + v``) whose
    ``m`` edges are ``tree_u/tree_v[n0 : n0 + m]`` (local ids; must be a forest).

    ``offsets`` (from :func:`lattice_offsets`, possibly empty) enables the lattice
    layout for single trees. Fills positions ``[n0, n0 + n)`` of ``order``/``child_ptr``
    and the tree starts ``tree_start[n0 : n0 + T]``. Returns ``(T, status)``.
    """
    if n == 0:
        return 0, _OK
    npref = 0
    first_pref = -1
    for v in range(n):
        if pref[n0 + v]:
            npref += 1
            if first_pref < 0:
                first_pref = v
    single = m == n - 1 and npref <= 1  # a forest with n - 1 edges is a single tree
    root = first_pref if npref == 1 else 0
    if single and offsets.shape[0] and _layout_lattice(tree_u, tree_v, m, root, n0, n, offsets,
                                                       parent, order, child_ptr, depth):
        tree_start[n0] = n0
        return 1, _OK
    adj, adj_ptr = _sorted_adjacency(tree_u, tree_v, m, n0, n)
    if single:
        _bfs_tree(adj, adj_ptr, root, n0, n, parent, order, child_ptr, depth, 0)
        tree_start[n0] = n0
        return 1, _OK

    # Components in order of their lowest vertex; each picks its root.
    mark = np.zeros(n, np.bool_)
    roots = np.empty(n, np.int64)
    queue = np.empty(n, np.int64)
    num_trees = 0
    for s in range(n):
        if mark[s]:
            continue
        mark[s] = True
        queue[0] = s
        head = 0
        tail = 1
        root = s
        found = 0
        while head < tail:
            v = queue[head]
            head += 1
            if pref[n0 + v]:
                found += 1
                root = v
            for k in range(adj_ptr[v], adj_ptr[v + 1]):
                c = adj[k]
                if not mark[c]:
                    mark[c] = True
                    queue[tail] = c
                    tail += 1
        if found > 1:
            return 0, _TWO_ROOTS
        roots[num_trees] = root
        num_trees += 1
    roots = np.sort(roots[:num_trees])
    tail = 0
    for t in range(num_trees):
        tree_start[n0 + t] = n0 + tail
        tail = _bfs_tree(adj, adj_ptr, roots[t], n0, n, parent, order, child_ptr, depth, tail)
    return num_trees, _OK


@njit(cache=True, nogil=True)
def _compact_segment(src, dst, sel, n0, n, e0, e1, tree_u, tree_v):
    """List the selected edges of one segment as local endpoints in
    ``tree_u/tree_v[n0 : n0 + n]``; returns their number, or -1 when there are ``n`` or
    more (a forest on ``n`` vertices has at most ``n - 1`` edges)."""
    m = 0
    for e in range(e0, e1):
        if sel[e]:
            if m == n:
                return -1
            tree_u[n0 + m] = src[e] - n0
            tree_v[n0 + m] = dst[e] - n0
            m += 1
    return m


@njit(cache=True, nogil=True)
def tree_ptr_of(node_ptr, num_trees, tree_start, n):
    total = num_trees.sum()
    tree_ptr = np.empty(total + 1, np.int64)
    k = 0
    for s in range(node_ptr.shape[0] - 1):
        for t in range(num_trees[s]):
            tree_ptr[k] = tree_start[node_ptr[s] + t]
            k += 1
    tree_ptr[total] = n
    return tree_ptr


@njit(cache=True, nogil=True)
def _layout_chunk(s0, s1, src, dst, sel, pref, node_ptr, edge_ptr, offsets, tree_u, tree_v,
                  parent, order, child_ptr, depth, tree_start, num_trees, status):
    """Layout of the forest of the selected edges, segments ``[s0, s1)``."""
    for s in range(s0, s1):
        n0 = node_ptr[s]
        size = node_ptr[s + 1] - n0
        m = _compact_segment(src, dst, sel, n0, size, edge_ptr[s], edge_ptr[s + 1], tree_u,
                             tree_v)
        if m < 0 or _has_cycle(tree_u, tree_v, m, n0, size):
            status[s] = _CYCLE
            continue
        num_trees[s], status[s] = layout_segment(tree_u, tree_v, m, pref, n0, size, offsets,
                                                 parent, order, child_ptr, depth, tree_start)


@njit(cache=True, nogil=True)
def _build_chunk(s0, s1, src, dst, bits, nbits, pref, node_ptr, edge_ptr, offsets, mask,
                 tree_u, tree_v, parent, order, child_ptr, depth, tree_start, num_trees,
                 status):
    """Minimum spanning forest and its layout, segments ``[s0, s1)``, each in one go (an
    example's data stays in cache)."""
    for s in range(s0, s1):
        n0 = node_ptr[s]
        m = kruskal_segment(src, dst, bits, nbits, n0, node_ptr[s + 1], edge_ptr[s],
                            edge_ptr[s + 1], mask, tree_u, tree_v)
        if m < 0:
            status[s] = NONFINITE
            continue
        num_trees[s], status[s] = layout_segment(tree_u, tree_v, m, pref, n0,
                                                 node_ptr[s + 1] - n0, offsets, parent,
                                                 order, child_ptr, depth, tree_start)


class Layout:
    """Output arrays of a layout over ``n`` vertices in ``num_seg`` segments."""

    def __init__(self, n: int, num_seg: int):
        self.tree_u = np.empty(n, np.int32)  # scratch: the forest's edges, per segment
        self.tree_v = np.empty(n, np.int32)
        self.parent = np.empty(n, np.int64)
        self.order = np.empty(n, np.int64)
        self.child_ptr = np.empty(n + 1, np.int64)
        self.depth = np.empty(n, np.int64)
        self.tree_start = np.empty(n, np.int64)
        self.num_trees = np.zeros(num_seg, np.int64)
        self.status = np.zeros(num_seg, np.int64)

    def outputs(self):
        """The arrays a segment kernel fills, in kernel argument order."""
        return (self.tree_u, self.tree_v, self.parent, self.order, self.child_ptr, self.depth,
                self.tree_start, self.num_trees, self.status)

    def tree(self, node_ptr, batch, device) -> Tree:
        """Check the status and assemble the :class:`Tree` on ``device`` (with its
        host-side sizes)."""
        check_status(self.status.max() if self.status.shape[0] else _OK)
        n = self.parent.shape[0]
        self.child_ptr[n] = n
        tree_ptr = tree_ptr_of(node_ptr, self.num_trees, self.tree_start, n)
        levels, largest = layout_sizes(self.depth, self.order, tree_ptr)
        mk = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        if batch is not None:
            batch = batch.to(device=device, dtype=torch.long)
        return Tree(mk(self.parent), mk(self.order), mk(self.child_ptr), mk(tree_ptr),
                    mk(self.depth), batch, num_levels=levels, max_tree_size=largest)


def check_status(status) -> None:
    if status == _CYCLE:
        raise ValueError("edge_index must describe a forest, but its edges contain a cycle")
    if status == _TWO_ROOTS:
        raise ValueError("roots must hold at most one vertex per connected component, but two "
                         "roots lie in one component")
    if status == NONFINITE:
        raise ValueError("edge costs must be finite, got NaN or infinite values")
    if status != _OK:
        raise RuntimeError(f"the layout kernels reported the unexpected status {status}")


NO_OFFSETS = np.zeros(0, np.int64)
NO_MASK = np.zeros(0, np.bool_)  # the layout needs the chosen edges, not their mask


def empty_forest(device="cpu", batch: bool = True) -> Tree:
    """The forest without vertices (and without trees) on ``device``: what a builder returns
    for a batch with no vertex (``B``, ``H``, ``W``, ``L`` or ``N`` zero), with an empty
    ``batch`` vector, as topologies give their trees one, or none (``batch=False``)."""
    none = torch.zeros(0, dtype=torch.long, device=device)
    ptr = torch.zeros(1, dtype=torch.long, device=device)
    return Tree(none, none.clone(), ptr, ptr.clone(), none.clone(),
                none.clone() if batch else None, num_levels=0, max_tree_size=0)


def layout_forest(src, dst, sel, pref, node_ptr, edge_ptr, offsets=None) -> Layout:
    """Layout of the forest of the edges ``sel`` selects, rooted by the flags ``pref``."""
    check_segment_sizes(node_ptr, edge_ptr)
    num_seg = node_ptr.shape[0] - 1
    out = Layout(pref.shape[0], num_seg)
    run_chunks(_layout_chunk, num_seg, src, dst, sel, pref, node_ptr, edge_ptr,
               NO_OFFSETS if offsets is None else offsets, *out.outputs())
    return out
