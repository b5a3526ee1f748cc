"""Rooted forests: the data structure every tree-scan backend reads.

A :class:`Tree` stores, on one device, a forest over ``N`` vertices as a parent
array plus the traversal plan the backends need:

* ``order`` -- a breadth-first order of the forest, tree by tree: the trees appear
  in the order of their roots (ascending vertex id), and inside a tree vertices
  appear by non-decreasing depth, each parent before its children.
* ``child_ptr`` -- CSR over *positions* in ``order``: the children of vertex
  ``order[i]`` are ``order[child_ptr[i]:min(child_ptr[i + 1], end)]`` where ``end`` is
  the end of i's tree (``tree_ptr``); breadth-first search enqueues the children of one
  vertex together, so they are contiguous. The clip matters only at the last position
  of a tree, a leaf, whose unclipped range would hold the next tree's root.
* ``tree_ptr`` -- positions in ``order`` where each tree starts (``[T + 1]``).
* ``depth`` -- distance of each vertex from its root.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

try:
    from numba import njit

    HAS_NUMBA = True
except ImportError:  # pragma: no cover - GPU-only environments may lack numba
    HAS_NUMBA = False

    def njit(*args, **kwargs):
        return (lambda f: f) if not args or not callable(args[0]) else args[0]

__all__ = ["Tree"]


@njit(cache=True)
def _bfs_forest(parent):
    """Breadth-first order of a forest given by ``parent`` (-1 at roots).

    Returns order, child_ptr (by position), depth, tree_ptr and the number of
    vertices reached from a root (less than N exactly when ``parent`` has a cycle).
    """
    n = parent.shape[0]
    count = np.zeros(n + 1, np.int64)
    num_roots = 0
    for v in range(n):
        p = parent[v]
        if p >= 0:
            count[p + 1] += 1
        else:
            num_roots += 1
    for v in range(n):
        count[v + 1] += count[v]
    fill = count[:n].copy()
    children = np.empty(n - num_roots, np.int64)
    for v in range(n):  # ascending v, so the children of a vertex stay sorted by id
        p = parent[v]
        if p >= 0:
            children[fill[p]] = v
            fill[p] += 1

    order = np.empty(n, np.int64)
    child_ptr = np.empty(n + 1, np.int64)
    depth = np.zeros(n, np.int64)
    tree_ptr = np.empty(num_roots + 1, np.int64)
    head = 0
    tail = 0
    t = 0
    for r in range(n):
        if parent[r] >= 0:
            continue
        tree_ptr[t] = tail
        t += 1
        order[tail] = r
        tail += 1
        while head < tail:
            v = order[head]
            child_ptr[head] = tail
            for k in range(count[v], count[v + 1]):
                c = children[k]
                order[tail] = c
                depth[c] = depth[v] + 1
                tail += 1
            head += 1
    tree_ptr[num_roots] = tail
    child_ptr[tail:] = tail
    return order, child_ptr, depth, tree_ptr, tail


def _bfs_forest_vectorised(parent):
    """Same result as ``_bfs_forest`` without numba: one vectorised step per depth."""
    n = parent.shape[0]
    has = parent >= 0
    kids = np.flatnonzero(has)
    kids = kids[np.argsort(parent[kids], kind="stable")]  # grouped by parent, ids ascending
    start = np.zeros(n + 1, np.int64)
    np.add.at(start, parent[kids] + 1, 1)
    np.cumsum(start, out=start)
    roots = np.flatnonzero(~has)
    depth = np.zeros(n, np.int64)
    levels, frontier, d = [roots], roots, 0
    while frontier.size:
        counts = start[frontier + 1] - start[frontier]
        first = np.repeat(start[frontier] - np.cumsum(counts) + counts, counts)
        nxt = kids[first + np.arange(counts.sum())] if counts.sum() else kids[:0]
        d += 1
        depth[nxt] = d
        levels.append(nxt)
        frontier = nxt
    level_major = np.concatenate(levels)
    reached = level_major.size
    tree_id = np.empty(n, np.int64)
    tree_id[roots] = np.arange(roots.size)
    for lv in levels[1:]:
        tree_id[lv] = tree_id[parent[lv]]
    order = level_major[np.argsort(tree_id[level_major], kind="stable")] if reached == n else \
        level_major
    tree_ptr = np.searchsorted(tree_id[order], np.arange(roots.size + 1)) if reached == n else \
        np.zeros(roots.size + 1, np.int64)
    pos = np.empty(n, np.int64)
    pos[order] = np.arange(order.size)
    child_ptr = np.empty(n + 1, np.int64)
    if reached == n and n:
        # children of position i start right after the children of the positions before it
        nchild = (start[order + 1] - start[order])
        is_root = ~has[order]
        # a tree's children sequence starts one past its root
        base = np.cumsum(nchild) - nchild + np.cumsum(is_root)
        child_ptr[:n] = base
        child_ptr[n] = n
    return order, child_ptr, depth, tree_ptr.astype(np.int64), reached


def levels_from_tensors(order: torch.Tensor, depth: torch.Tensor):
    """Level-major vertex list and level boundaries (a Python list) of a forest's
    breadth-first ``order`` and ``depth`` (see :meth:`Tree.levels`)."""
    if order.shape[0] == 0:
        return order, [0]
    perm = torch.sort(depth[order], stable=True).indices
    counts = torch.bincount(depth)
    return order[perm], [0] + torch.cumsum(counts, 0).tolist()


def _as_index_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(np.asarray(t))
        except Exception as exc:
            raise TypeError(f"{name} must be a 1-D integer tensor, got {type(t).__name__}") from exc
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(t.shape)}")
    return t.long()


class Tree:
    r"""A rooted forest on one device, with the breadth-first plan the scan kernels use.

    Build one with :meth:`from_parent` (validated) or get one from a
    :class:`~treessm.Topology`.

    Attributes:
        parent (LongTensor [N]): parent of each vertex, ``-1`` at roots.
        order (LongTensor [N]): a breadth-first order, tree by tree (each parent before its
            children).
        child_ptr (LongTensor [N + 1]): children of ``order[i]`` are
            ``order[child_ptr[i]:min(child_ptr[i + 1], end of i's tree)]``.
        tree_ptr (LongTensor [T + 1]): start of each tree in ``order``.
        depth (LongTensor [N]): distance to the root.
        batch (LongTensor [N] or None): example of each vertex (PyG convention).
        num_nodes (int), num_trees (int).
    """

    __slots__ = ("parent", "order", "child_ptr", "tree_ptr", "depth", "batch", "num_nodes",
                 "num_trees", "_levels", "_plan", "_path", "num_levels")

    def __init__(self, parent: torch.Tensor, order: torch.Tensor, child_ptr: torch.Tensor,
                 tree_ptr: torch.Tensor, depth: torch.Tensor, batch: Optional[torch.Tensor] = None,
                 num_levels: Optional[int] = None):
        # Trusted constructor: no validation. Use Tree.from_parent for user input.
        self.parent = parent
        self.order = order
        self.child_ptr = child_ptr
        self.tree_ptr = tree_ptr
        self.depth = depth
        self.batch = batch
        self.num_nodes = int(parent.shape[0])
        self.num_trees = int(tree_ptr.shape[0]) - 1
        self._levels = None
        self._plan = None
        self._path = None
        self.num_levels = num_levels  # breadth-first levels of all trees, when known on the host

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_parent(cls, parent, batch=None, validate: bool = True) -> "Tree":
        """Build a forest from a parent array (``-1`` marks a root).

        Args:
            parent (LongTensor [N]): parent vertex of each vertex, or -1.
            batch (LongTensor [N], optional): example id of each vertex; a parent must lie in
                the same example as its child. (default: ``None``)
            validate (bool): check indices, batch consistency and acyclicity. (default: ``True``)

        Raises:
            ValueError: on out-of-range parents, cycles or a parent in another example.
        """
        parent = _as_index_tensor(parent, "parent")
        device = parent.device
        n = parent.shape[0]
        if batch is not None:
            batch = _as_index_tensor(batch, "batch").to(device)
            if batch.shape[0] != n:
                raise ValueError(f"batch must have one entry per vertex ({n}), got {batch.shape[0]}")
        p = parent.detach().cpu().numpy().astype(np.int64, copy=False)
        if validate and n > 0:
            if p.min() < -1 or p.max() >= n:
                bad = int(np.flatnonzero((p < -1) | (p >= n))[0])
                raise ValueError(f"parent must hold vertex ids in [0, {n}) or -1 for a root; "
                                 f"parent[{bad}] = {int(p[bad])}")
            if batch is not None:
                b = batch.cpu().numpy()
                has = p >= 0
                mism = np.flatnonzero(has & (b[np.where(has, p, 0)] != b))
                if mism.size:
                    v = int(mism[0])
                    raise ValueError(f"parent[{v}] = {int(p[v])} lies in example {int(b[p[v]])} but "
                                     f"vertex {v} in example {int(b[v])}: a tree may not span examples")
        bfs = _bfs_forest if HAS_NUMBA else _bfs_forest_vectorised
        order, child_ptr, depth, tree_ptr, reached = bfs(p)
        if reached != n:
            raise ValueError(f"parent does not describe a forest: {n - reached} of {n} vertices "
                             "lie on or below a cycle (every vertex must reach a root, parent -1)")
        mk = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        levels = 0
        if n > 0:
            levels = int(np.maximum.reduceat(depth[order], tree_ptr[:-1]).sum()) + len(tree_ptr) - 1
        return cls(parent.contiguous(), mk(order),
                   mk(child_ptr), mk(tree_ptr), mk(depth), batch, num_levels=levels)

    @classmethod
    def from_edges(cls, edge_index, num_nodes: int, roots=None, batch=None) -> "Tree":
        """Root the spanning forest given by undirected ``edge_index [2, E]``.

        Each component is rooted at the vertex in ``roots`` that lies in it; without
        ``roots`` (or for a component containing none), at its lowest vertex id.
        Raises ValueError when the edges contain a cycle.
        """
        from .topology.rooting import root_forest  # local import: topology sits above tree

        parent = root_forest(edge_index, num_nodes, roots)
        return cls.from_parent(parent, batch=batch)

    # ------------------------------------------------------------------ utilities
    @property
    def device(self) -> torch.device:
        return self.parent.device

    @property
    def roots(self) -> torch.Tensor:
        """Root vertex of each tree (``[T]``)."""
        return self.order[self.tree_ptr[:-1]]

    @property
    def max_depth(self) -> int:
        return int(self.depth.max()) if self.num_nodes else 0

    def to(self, device, non_blocking: bool = False) -> "Tree":
        device = torch.device(device)
        if device == self.device:
            return self
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Tree(mv(self.parent), mv(self.order), mv(self.child_ptr), mv(self.tree_ptr),
                    mv(self.depth), mv(self.batch), num_levels=self.num_levels)

    def cpu(self) -> "Tree":
        return self.to("cpu")

    def cuda(self, device=None) -> "Tree":
        return self.to("cuda" if device is None else device)

    def levels(self):
        """Level-major grouping for level-synchronous backends.

        Returns ``(level_order, level_ptr)``: vertices sorted by depth (ties by their
        position in ``order``) and a Python list with the start of each depth.
        """
        if self._levels is None:
            self._levels = levels_from_tensors(self.order, self.depth)
        return self._levels

    def scan_plan(self):
        """Level plan for the compiled GPU kernels, computed on the tree's device without a
        host synchronisation and cached.

        Returns ``[level_pos, tree_level_ptr, parent_pos, parent_at_pos]``: the first
        position in ``order`` of every breadth-first level (levels tree by tree, ``[L + 1]``,
        padded with ``N``), the levels of each tree (``[T + 1]``), the position of each
        position's parent and the parent vertex of each position (both ``-1`` at roots).
        """
        if self._plan is not None and len(self._plan) == 3:  # from a builder that made three
            self._plan = self._plan + [self.parent[self.order]]
        if self._plan is None:
            n, dev = self.num_nodes, self.device
            if n == 0:
                z = torch.zeros(1, dtype=torch.long, device=dev)
                e = torch.zeros(0, dtype=torch.long, device=dev)
                self._plan = [z, z.clone(), e, e.clone()]
                return self._plan
            d = self.depth[self.order]
            is_start = torch.ones(n, dtype=torch.bool, device=dev)
            is_start[1:] = d[1:] != d[:-1]
            is_start[self.tree_ptr[:-1]] = True  # a one-vertex tree after another: depth 0 twice
            level_id = torch.cumsum(is_start, 0) - 1
            level_pos = torch.searchsorted(level_id, torch.arange(n + 1, device=dev))
            tree_level_ptr = torch.cat([level_id[self.tree_ptr[:-1]], level_id[-1:] + 1])
            pos_of = torch.empty_like(self.order)
            pos_of[self.order] = torch.arange(n, device=dev)
            pp = self.parent[self.order]
            parent_pos = torch.where(pp >= 0, pos_of[pp.clamp(min=0)], pp)
            self._plan = [level_pos, tree_level_ptr, parent_pos, pp]
        return self._plan

    def path_plan(self):
        """Heavy-path plan for the path-schedule GPU kernels (:mod:`treessm.path_plan`),
        computed on the tree's device without a host synchronisation and cached.

        Returns ``[rec, light, path_ptr, phase_path]`` (int32).
        """
        if self._path is None:
            from .path_plan import path_plan  # local import: a plan for one backend

            self._path = path_plan(self.order, self.child_ptr, self.tree_ptr, self.depth,
                                   self.scan_plan()[2])
        return self._path

    def tensors(self):
        """The tensors a scan kernel needs: parent, order, child_ptr, tree_ptr, depth."""
        return self.parent, self.order, self.child_ptr, self.tree_ptr, self.depth

    def __repr__(self) -> str:
        return (f"Tree(num_nodes={self.num_nodes}, num_trees={self.num_trees}, "
                f"device={self.device})")
