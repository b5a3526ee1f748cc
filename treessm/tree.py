"""Rooted forests: the data structure every tree-scan backend reads.

A :class:`Tree` stores, on one device, a forest over ``N`` vertices as a parent array and
its breadth-first layout:

* ``order`` -- a breadth-first order of the forest, tree by tree: the trees appear in the
  order of their roots (ascending vertex id), and inside a tree vertices appear by
  non-decreasing depth, each parent before its children.
* ``child_ptr`` -- CSR over *positions* in ``order``: the children of vertex ``order[i]``
  are ``order[child_ptr[i]:min(child_ptr[i + 1], end)]`` where ``end`` is the end of i's
  tree (``tree_ptr``); breadth-first search enqueues the children of one vertex together,
  so they are contiguous. The clip matters only at the last position of a tree, a leaf,
  whose unclipped range would hold the next tree's root.
* ``tree_ptr`` -- positions in ``order`` where each tree starts (``[T + 1]``).
* ``depth`` -- distance of each vertex from its root.

The edge ``(v, parent(v))`` is labelled by its child ``v`` (``docs/concepts.md``). Building
trees from features or edges is the job of :mod:`treessm.topology`; the plans that the
compiled scan kernels derive from the layout are made and cached by
:mod:`treessm.ops.plan`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit

__all__ = ["Tree"]


@njit(cache=True)
def _bfs_forest(parent):
    """Breadth-first layout of a forest given by ``parent`` (-1 at roots).

    Returns order, child_ptr (by position), depth, tree_ptr and the number of vertices
    reached from a root (less than N exactly when ``parent`` has a cycle).
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


def _as_index_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            a = np.asarray(t)
        except Exception as exc:
            raise TypeError(f"{name} must be a 1-D integer tensor, got {type(t).__name__}") from exc
        if a.size == 0 and a.dtype == np.float64:  # an empty list holds no floats
            a = a.astype(np.int64)
        try:
            t = torch.as_tensor(a)
        except Exception as exc:
            raise TypeError(f"{name} must be a 1-D integer tensor, got {type(t).__name__}") from exc
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(t.shape)}")
    return t.long()


def layout_sizes(depth: np.ndarray, order: np.ndarray, tree_ptr: np.ndarray):
    """``(num_levels, max_tree_size)`` of a breadth-first layout held on the host: the
    breadth-first levels of all trees together, and the vertices of the largest tree."""
    if order.shape[0] == 0:
        return 0, 0
    starts = tree_ptr[:-1]
    levels = int(np.maximum.reduceat(depth[order], starts).sum()) + starts.shape[0]
    return levels, int(np.diff(tree_ptr).max())


class Tree:
    r"""A rooted forest on one device, laid out breadth-first.

    Build one with :meth:`from_parent` (validated), with a builder of
    :mod:`treessm.topology`, or from a :class:`~treessm.Topology`.

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
        num_levels (int or None): breadth-first levels of all trees together, when known on
            the host (``None`` when only the device knows it).
        max_tree_size (int or None): vertices of the largest tree, when known on the host.
        plan_cache (dict): plans derived from the layout for the scan kernels, filled and
            read by :mod:`treessm.ops.plan` (device-specific: :meth:`to` starts it empty).

    Args:
        parent, order, child_ptr, tree_ptr, depth, batch: the arrays above, trusted as
            given (the constructor checks nothing; :meth:`from_parent` validates and lays
            out a parent array).
        num_levels (int, optional): see above. (default: ``None``)
        max_tree_size (int, optional): see above. (default: ``None``)

    Shapes:
        - **parent, order, depth, batch:** :math:`(N)`
        - **child_ptr:** :math:`(N + 1)`; **tree_ptr:** :math:`(T + 1)` for :math:`T` trees

    Raises:
        TypeError, ValueError: from :meth:`from_parent`, on a parent array that is not an
            integer forest over ``N`` vertices; the constructor itself trusts its input.

    Example:
        >>> tree = Tree.from_parent([-1, 0, 0, 1, -1])       # two trees: 0-{1-3, 2} and 4
        >>> tree.num_nodes, tree.num_trees, tree.roots.tolist()
        (5, 2, [0, 4])
        >>> tree.depth.tolist()
        [0, 1, 1, 2, 0]
    """

    __slots__ = ("parent", "order", "child_ptr", "tree_ptr", "depth", "batch", "num_nodes",
                 "num_trees", "num_levels", "max_tree_size", "plan_cache")

    def __init__(self, parent: torch.Tensor, order: torch.Tensor, child_ptr: torch.Tensor,
                 tree_ptr: torch.Tensor, depth: torch.Tensor, batch: Optional[torch.Tensor] = None,
                 *, num_levels: Optional[int] = None, max_tree_size: Optional[int] = None):
        # Trusted constructor: no validation. Use Tree.from_parent for user input.
        self.parent = parent
        self.order = order
        self.child_ptr = child_ptr
        self.tree_ptr = tree_ptr
        self.depth = depth
        self.batch = batch
        self.num_nodes = int(parent.shape[0])
        self.num_trees = int(tree_ptr.shape[0]) - 1
        self.num_levels = num_levels
        self.max_tree_size = max_tree_size
        self.plan_cache = {}

    @classmethod
    def from_parent(cls, parent, batch=None, validate: bool = True) -> "Tree":
        """Build a forest from a parent array (``-1`` marks a root).

        Args:
            parent (LongTensor [N]): parent vertex of each vertex, or -1.
            batch (LongTensor [N], optional): example id of each vertex; a parent must lie in
                the same example as its child. (default: ``None``)
            validate (bool): check that every parent lies in its child's example. Parent
                ids outside ``[-1, N)`` and cycles are reported either way: the layout
                cannot be built without those checks. (default: ``True``)

        Raises:
            TypeError: if ``parent`` or ``batch`` is not an integer sequence or tensor.
            ValueError: on out-of-range parents, cycles or a parent in another example.

        Example:
            >>> Tree.from_parent(torch.tensor([-1, 0, 0, 1])).order
            tensor([0, 1, 2, 3])
        """
        parent = _as_index_tensor(parent, "parent")
        device = parent.device
        n = parent.shape[0]
        if batch is not None:
            batch = _as_index_tensor(batch, "batch").to(device)
            if batch.shape[0] != n:
                raise ValueError(f"batch must have one entry per vertex ({n}), got {batch.shape[0]}")
        p = parent.detach().cpu().numpy().astype(np.int64, copy=False)
        # always: the compiled layout below indexes by these ids
        if n > 0 and (p.min() < -1 or p.max() >= n):
            bad = int(np.flatnonzero((p < -1) | (p >= n))[0])
            raise ValueError(f"parent must hold vertex ids in [0, {n}) or -1 for a root; "
                             f"parent[{bad}] = {int(p[bad])}")
        if validate and n > 0:
            if batch is not None:
                b = batch.cpu().numpy()
                has = p >= 0
                mism = np.flatnonzero(has & (b[np.where(has, p, 0)] != b))
                if mism.size:
                    v = int(mism[0])
                    raise ValueError(f"parent[{v}] = {int(p[v])} lies in example {int(b[p[v]])} but "
                                     f"vertex {v} in example {int(b[v])}: a tree may not span examples")
        order, child_ptr, depth, tree_ptr, reached = _bfs_forest(p)
        if reached != n:
            raise ValueError(f"parent does not describe a forest: {n - reached} of {n} vertices "
                             "lie on or below a cycle (every vertex must reach a root, parent -1)")
        levels, largest = layout_sizes(depth, order, tree_ptr)
        mk = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        return cls(parent.contiguous(), mk(order), mk(child_ptr), mk(tree_ptr), mk(depth), batch,
                   num_levels=levels, max_tree_size=largest)

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
        """Depth of the deepest vertex (asks the device)."""
        return int(self.depth.max()) if self.num_nodes else 0

    def to(self, device, non_blocking: bool = False) -> "Tree":
        """The same forest on ``device`` (this tree itself when it is already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Tree(mv(self.parent), mv(self.order), mv(self.child_ptr), mv(self.tree_ptr),
                    mv(self.depth), mv(self.batch), num_levels=self.num_levels,
                    max_tree_size=self.max_tree_size)

    def cpu(self) -> "Tree":
        return self.to("cpu")

    def cuda(self, device=None) -> "Tree":
        return self.to("cuda" if device is None else device)

    def __repr__(self) -> str:
        return (f"Tree(num_nodes={self.num_nodes}, num_trees={self.num_trees}, "
                f"device={self.device})")
