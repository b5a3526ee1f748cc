"""Rooting undirected forests and building trees from edges on the CPU.

A component containing a preferred root is rooted there, any other component at its
lowest vertex id; the breadth-first layout comes from :mod:`treessm.topology.layout`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .._checks import check_edge_index, check_int
from ..tree import Tree
from ..ops.chunks import run_chunks
from .layout import NO_MASK, NO_OFFSETS, Layout, _build_chunk, check_status, layout_forest
from .mst import check_segment_sizes, segments, weight_bits

__all__ = ["root_forest", "tree_from_edges", "forest_tree_on_cpu", "spanning_tree_on_cpu",
           "root_flags"]


def root_flags(roots, num_nodes: int) -> np.ndarray:
    """Boolean flag per vertex marking the preferred roots (validated)."""
    pref = np.zeros(num_nodes, np.bool_)
    if roots is None:
        return pref
    if isinstance(roots, torch.Tensor):
        if roots.is_floating_point() or roots.is_complex() or roots.dtype == torch.bool:
            raise TypeError(f"roots must hold integer vertex ids, got dtype {roots.dtype}")
        r = roots.detach().cpu().reshape(-1).to(torch.int64).numpy()
    else:
        r = np.asarray(roots)
        if r.size and not np.issubdtype(r.dtype, np.integer):
            raise TypeError(f"roots must hold integer vertex ids, got {r.dtype}")
        r = r.reshape(-1).astype(np.int64)
    if r.size and (r.min() < 0 or r.max() >= num_nodes):
        bad = int(r.min()) if r.min() < 0 else int(r.max())
        raise ValueError(f"roots must hold vertex ids in [0, {num_nodes}), found {bad}")
    pref[r] = True
    return pref


# ---------------------------------------------------------------------------- public API
def root_forest(edge_index: torch.Tensor, num_nodes: int,
                roots: Optional[Union[torch.Tensor, Sequence[int]]] = None) -> torch.Tensor:
    r"""Parent array of an undirected forest, each component rooted at a chosen vertex.

    A component containing a vertex of ``roots`` is rooted there; any other component at
    its lowest vertex id. An edge may be listed in one or both directions and repeated
    (PyG's undirected convention); repeats count once.

    Args:
        edge_index (LongTensor [2, E]): edges of the forest.
        num_nodes (int): number of vertices ``N``.
        roots (LongTensor or sequence of int, optional): preferred roots, at most one per
            component. (default: ``None``)

    Returns:
        LongTensor [N] on the device of ``edge_index``: the parent of each vertex, ``-1``
        at the roots.

    Raises:
        ValueError: if the edges contain a cycle (a self-loop included), if two roots lie
            in one component, or on out-of-range ids.

    Shapes:
        - **input:** edge indices :math:`(2, E)`
        - **output:** parent vector :math:`(N)`

    Example:
        >>> root_forest(torch.tensor([[0, 1, 3], [1, 2, 4]]), 5, roots=[2]).tolist()
        [1, 2, -1, -1, 3]
    """
    num_nodes = check_int(num_nodes, "num_nodes", 0)
    check_edge_index(edge_index, num_nodes)
    pref = root_flags(roots, num_nodes)
    ei = edge_index.detach().cpu().to(torch.int64).numpy()
    lo = np.minimum(ei[0], ei[1])
    hi = np.maximum(ei[0], ei[1])
    if np.any(lo == hi):
        v = int(lo[np.flatnonzero(lo == hi)[0]])
        raise ValueError(f"edge_index must describe a forest, but it holds the self-loop "
                         f"({v}, {v})")
    stride = max(num_nodes, 1)
    key = np.unique(lo * stride + hi)
    src = key // stride
    dst = key % stride
    sel = np.ones(key.shape[0], np.bool_)
    node_ptr = np.array([0, num_nodes], np.int64)
    edge_ptr = np.array([0, key.shape[0]], np.int64)
    out = layout_forest(src, dst, sel, pref, node_ptr, edge_ptr)
    if out.status.shape[0]:
        check_status(out.status.max())
    return torch.from_numpy(out.parent).to(edge_index.device)


def tree_from_edges(edge_index: torch.Tensor, num_nodes: int,
                    roots: Optional[Union[torch.Tensor, Sequence[int]]] = None,
                    batch: Optional[torch.Tensor] = None) -> Tree:
    """The :class:`~treessm.Tree` of an undirected forest given by its edges, rooted by
    :func:`root_forest`'s rule (``Tree.from_parent(root_forest(...), batch)``).

    Args:
        edge_index (LongTensor [2, E]): edges of the forest, in either or both directions.
        num_nodes (int): number of vertices ``N``.
        roots (LongTensor or sequence of int, optional): preferred roots, at most one per
            component. (default: ``None``)
        batch (LongTensor [N], optional): example of each vertex, stored in the tree.
            (default: ``None``)

    Returns:
        :class:`~treessm.Tree`, laid out breadth-first.

    Raises:
        ValueError: as :func:`root_forest`.

    Shapes:
        - **input:** edge indices :math:`(2, E)`, batch vector :math:`(N)` (optional)
        - **output:** a :class:`~treessm.Tree` over :math:`N` vertices

    Example:
        >>> tree = tree_from_edges(torch.tensor([[0, 0], [1, 2]]), 4)   # 0-{1, 2} and 3
        >>> tree.num_trees, tree.parent.tolist()
        (2, [-1, 0, 0, -1])
    """
    parent = root_forest(edge_index, num_nodes, roots)
    return Tree.from_parent(parent, batch=batch)


def forest_tree_on_cpu(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, num_nodes: int,
                       roots=None, batch: Optional[torch.Tensor] = None,
                       node_ptr: Optional[np.ndarray] = None,
                       edge_ptr: Optional[np.ndarray] = None,
                       offsets: Optional[np.ndarray] = None, device="cpu") -> Tree:
    """Trusted fast path: the :class:`Tree` of the forest that ``mask`` selects from the
    int64 arrays ``src``/``dst`` (no repeated edges), rooted by :func:`root_forest`'s rule.

    ``node_ptr``/``edge_ptr`` (from :func:`treessm.topology.mst.segments`) let examples be
    laid out in parallel and ``offsets`` (:func:`~treessm.topology.layout.lattice_offsets`)
    enables the lattice layout; the result equals ``tree_from_edges(...)``.
    """
    if node_ptr is None:
        b = None if batch is None else batch.detach().cpu().to(torch.int64).numpy()
        node_ptr, edge_ptr = segments(num_nodes, src, dst, b)
    pref = root_flags(roots, num_nodes)
    return layout_forest(src, dst, mask, pref, node_ptr, edge_ptr, offsets).tree(
        node_ptr, batch, device)


def spanning_tree_on_cpu(src: np.ndarray, dst: np.ndarray, cost: torch.Tensor, num_nodes: int,
                         roots=None, batch: Optional[torch.Tensor] = None,
                         node_ptr: Optional[np.ndarray] = None,
                         edge_ptr: Optional[np.ndarray] = None,
                         offsets: Optional[np.ndarray] = None, device="cpu") -> Tree:
    """Trusted fast path: minimum spanning forest of the CPU ``cost`` over the candidate
    edges ``src``/``dst`` (int64 arrays), rooted and laid out as a :class:`Tree`.

    Equals ``forest_tree_on_cpu(src, dst, minimum_spanning_tree(...), ...)``; each example is
    solved and laid out in one pass while its data is in cache.
    """
    if node_ptr is None:
        b = None if batch is None else batch.detach().cpu().to(torch.int64).numpy()
        node_ptr, edge_ptr = segments(num_nodes, src, dst, b)
    check_segment_sizes(node_ptr, edge_ptr)
    pref = root_flags(roots, num_nodes)
    bits, nbits = weight_bits(cost)
    num_seg = node_ptr.shape[0] - 1
    out = Layout(num_nodes, num_seg)
    run_chunks(_build_chunk, num_seg, src, dst, bits, nbits, pref, node_ptr, edge_ptr,
               NO_OFFSETS if offsets is None else offsets, NO_MASK, *out.outputs())
    return out.tree(node_ptr, batch, device)
