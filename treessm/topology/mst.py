r"""Minimum spanning forests: Kruskal's algorithm, compiled with numba, on the CPU.

Edges are taken in the strict total order of their keys :math:`(w_e, e)` -- weight
first, edge index second -- so the minimum spanning forest is unique and a tie
always goes to the edge listed first. Weights are ordered through their IEEE bits
(an order-preserving map to unsigned integers, with ``-0.0`` folded onto ``+0.0``)
and a stable least-significant-digit radix sort, so sorting costs three linear
passes (float32 weights) and no comparison of floats.

A batch of independent examples (images, sentences, graphs) is one forest; when
the vertices of each example form a contiguous id range and its edges a contiguous
block (as the candidate edges of every built-in topology do), the examples are
solved in parallel, each with a small sort and a union-find that fit in cache.
The result never depends on the split: Kruskal on the union of disjoint graphs
is Kruskal on each of them.

The examples of a batch are spread over threads by :func:`treessm.ops.chunks.run_chunks`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from numba import njit

from .._checks import INDEX_TYPES, check_edge_index, check_int
from ..ops.chunks import run_chunks

__all__ = ["minimum_spanning_tree"]

_WEIGHT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------- kernels
@njit(cache=True)
def _monotone_key(b, nbits):
    """Unsigned integer with the order of the float whose IEEE bits are ``b``."""
    top = np.uint64(1) << np.uint64(nbits - 1)
    full = (top - np.uint64(1)) | top
    if b == top:  # -0.0 compares equal to +0.0
        b = np.uint64(0)
    if b & top:
        return (~b) & full
    return b | top


@njit(cache=True)
def _is_finite_bits(b, nbits):
    exp_mask = np.uint64(0x7F800000) if nbits == 32 else np.uint64(0x7FF0000000000000)
    return (b & exp_mask) != exp_mask


@njit(cache=True)
def _sorted_edges32(bits, e0, e1, src, dst, n0, packed):
    """Edges ``[e0, e1)`` in ascending (weight, index) order, for 32-bit weights, and
    whether all weights are finite.

    Each edge travels as one 64-bit word: its key in the high half and, in the low half,
    its local index, or with ``packed`` its local endpoints ``u << 16 | v`` (vertex ids
    below 2^16), which saves the Kruskal walk two random reads per edge. A stable LSD
    radix sort on three 11-bit digits of the key keeps equal keys in index order either
    way.
    """
    m = e1 - e0
    words = np.empty(m, np.uint64)
    counts = np.zeros((3, 2048), np.int32)
    digit = np.uint64(2047)
    for k in range(m):
        b = np.uint64(bits[e0 + k])
        if not _is_finite_bits(b, 32):
            return words, False
        key = _monotone_key(b, 32)
        if packed:
            low = (np.uint64(src[e0 + k] - n0) << np.uint64(16)) | np.uint64(dst[e0 + k] - n0)
        else:
            low = np.uint64(k)
        words[k] = (key << np.uint64(32)) | low
        counts[0, np.int64(key & digit)] += 1
        counts[1, np.int64((key >> np.uint64(11)) & digit)] += 1
        counts[2, np.int64(key >> np.uint64(22))] += 1
    if m == 0:
        return words, True
    other = np.empty(m, np.uint64)
    offset = np.empty(2048, np.int64)
    for d in range(3):
        shift = np.uint64(32 + 11 * d)
        if counts[d, np.int64((words[0] >> shift) & digit)] == m:
            continue  # every key has this digit
        run = 0
        for j in range(2048):
            offset[j] = run
            run += counts[d, j]
        for k in range(m):
            w = words[k]
            dig = np.int64((w >> shift) & digit)
            other[offset[dig]] = w
            offset[dig] += 1
        words, other = other, words
    return words, True


@njit(cache=True)
def _sorted_edges64(bits, e0, e1):
    """As :func:`_sorted_edges32` for 64-bit weights (keys and indices in two arrays)."""
    m = e1 - e0
    keys = np.empty(m, np.uint64)
    idx = np.arange(m).astype(np.uint64)
    counts = np.zeros((8, 256), np.int64)
    byte = np.uint64(255)
    for k in range(m):
        b = np.uint64(bits[e0 + k])
        if not _is_finite_bits(b, 64):
            return idx, False
        key = _monotone_key(b, 64)
        keys[k] = key
        for d in range(8):
            counts[d, np.int64((key >> np.uint64(8 * d)) & byte)] += 1
    if m == 0:
        return idx, True
    keys2 = np.empty(m, np.uint64)
    idx2 = np.empty(m, np.uint64)
    offset = np.empty(256, np.int64)
    for d in range(8):
        shift = np.uint64(8 * d)
        if counts[d, np.int64((keys[0] >> shift) & byte)] == m:
            continue
        run = 0
        for j in range(256):
            offset[j] = run
            run += counts[d, j]
        for k in range(m):
            dig = np.int64((keys[k] >> shift) & byte)
            pos = offset[dig]
            offset[dig] = pos + 1
            keys2[pos] = keys[k]
            idx2[pos] = idx[k]
        keys, keys2 = keys2, keys
        idx, idx2 = idx2, idx
    return idx, True


@njit(cache=True)
def find_root(uf, v):
    # path halving: every other vertex on the path is pointed at its grandparent
    while uf[v] != v:
        uf[v] = uf[uf[v]]
        v = uf[v]
    return v


@njit(cache=True)
def kruskal_segment(src, dst, bits, nbits, n0, n1, e0, e1, mask, tree_u, tree_v):
    """Kruskal on vertices ``[n0, n1)`` and edges ``[e0, e1)``.

    Lists the local endpoints of the chosen edges, in the order chosen, in
    ``tree_u/tree_v[n0 : n0 + count]`` and marks them in ``mask`` unless ``mask`` is
    empty. Returns ``count``, or ``-1`` when a weight is not finite.
    """
    n = n1 - n0
    m = e1 - e0
    marking = mask.shape[0] > 0
    # without a mask to fill, the edge index is not needed: carry the endpoints instead
    packed = nbits == 32 and not marking and n <= 65536
    if nbits == 32:
        order, ok = _sorted_edges32(bits, e0, e1, src, dst, n0, packed)
    else:
        order, ok = _sorted_edges64(bits, e0, e1)
    if not ok:
        return -1
    if n <= 1 or m == 0:
        return 0
    if not packed:
        # local endpoints in small arrays: the sorted walk below reads them at random
        local_u = np.empty(m, np.int32)
        local_v = np.empty(m, np.int32)
        for k in range(m):
            local_u[k] = src[e0 + k] - n0
            local_v[k] = dst[e0 + k] - n0
    else:
        local_u = np.empty(0, np.int32)
        local_v = np.empty(0, np.int32)
    uf = np.empty(n, np.int32)
    size = np.ones(n, np.int32)
    for v in range(n):
        uf[v] = v
    low = np.uint64(0xFFFFFFFF)
    half = np.uint64(0xFFFF)
    need = n - 1
    count = 0
    for k in range(m):
        w = order[k]
        if packed:
            u = np.int32((w >> np.uint64(16)) & half)
            v = np.int32(w & half)
            el = 0
        else:
            el = np.int64(w & low)
            u = local_u[el]
            v = local_v[el]
        ru = find_root(uf, u)
        rv = find_root(uf, v)
        if ru == rv:  # a self-loop or an edge closing a cycle
            continue
        if size[ru] < size[rv]:  # union by size keeps the trees shallow
            ru, rv = rv, ru
        uf[rv] = ru
        size[ru] += size[rv]
        if marking:
            mask[e0 + el] = True
        tree_u[n0 + count] = u
        tree_v[n0 + count] = v
        count += 1
        if count == need:  # spanning tree complete: every further edge closes a cycle
            break
    return count


@njit(cache=True, nogil=True)
def _kruskal_chunk(s0, s1, src, dst, bits, nbits, node_ptr, edge_ptr, mask, tree_u, tree_v,
                   bad):
    for s in range(s0, s1):
        c = kruskal_segment(src, dst, bits, nbits, node_ptr[s], node_ptr[s + 1], edge_ptr[s],
                            edge_ptr[s + 1], mask, tree_u, tree_v)
        bad[s] = c < 0


@njit(cache=True)
def _segments_from_batch(batch, src, dst):
    """Example ranges of vertices and edges when ``batch`` allows a split, else empty arrays.

    A split needs a non-decreasing ``batch`` (each example a contiguous vertex range),
    edges that stay inside one example, and edges grouped by example in ascending order.
    The examples present are numbered by their rank, so the cost depends on the number of
    vertices and edges, not on the values of the example ids (which may be huge or skip
    numbers).
    """
    n = batch.shape[0]
    m = src.shape[0]
    none = np.zeros(0, np.int64)
    if n == 0:
        return none, none
    if batch[0] < 0:
        return none, none
    rank = np.empty(n, np.int64)  # rank of each vertex's example among those present
    rank[0] = 0
    for v in range(1, n):
        if batch[v] < batch[v - 1]:
            return none, none
        rank[v] = rank[v - 1] + (batch[v] != batch[v - 1])
    num_seg = rank[n - 1] + 1
    node_ptr = np.zeros(num_seg + 1, np.int64)
    for v in range(n):
        node_ptr[rank[v] + 1] += 1
    for s in range(num_seg):
        node_ptr[s + 1] += node_ptr[s]
    edge_ptr = np.zeros(num_seg + 1, np.int64)
    prev = 0
    for e in range(m):
        b = rank[src[e]]
        if rank[dst[e]] != b or b < prev:
            return none, none
        prev = b
        edge_ptr[b + 1] += 1
    for s in range(num_seg):
        edge_ptr[s + 1] += edge_ptr[s]
    return node_ptr, edge_ptr


# ---------------------------------------------------------------------------- helpers
def segments(num_nodes: int, src: np.ndarray, dst: np.ndarray,
             batch: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(node_ptr, edge_ptr)`` splitting the graph into independently solvable examples.

    Falls back to a single segment when ``batch`` is missing or does not split the graph.
    """
    if batch is not None and batch.shape[0] == num_nodes and num_nodes > 0:
        node_ptr, edge_ptr = _segments_from_batch(batch, src, dst)
        if node_ptr.shape[0]:
            return node_ptr, edge_ptr
    return (np.array([0, num_nodes], np.int64), np.array([0, src.shape[0]], np.int64))


def weight_bits(weight: torch.Tensor) -> Tuple[np.ndarray, int]:
    """IEEE bits of a CPU weight tensor as an unsigned array, and their width.

    Half types are widened to float32, which is exact and keeps their order.
    """
    if weight.dtype == torch.float64:
        return weight.contiguous().numpy().view(np.uint64), 64
    if weight.dtype != torch.float32:
        weight = weight.float()
    return weight.contiguous().numpy().view(np.uint32), 32


#: Vertices, and edges, that one example (segment) may have in the compiled CPU builders,
#: which number an example's vertices and edges with 32 bits.
MAX_SEGMENT = 2 ** 31 - 1


def check_segment_sizes(node_ptr: np.ndarray, edge_ptr: np.ndarray) -> None:
    """Raise a :class:`ValueError` when an example is too large for the CPU builders
    (:data:`MAX_SEGMENT`), rather than let 32-bit ids wrap around."""
    if node_ptr.shape[0] < 2:
        return
    nodes, edges = int(np.diff(node_ptr).max()), int(np.diff(edge_ptr).max())
    if nodes > MAX_SEGMENT or edges > MAX_SEGMENT:
        raise ValueError(f"one example (a connected graph of the batch) has {nodes} vertices "
                         f"and {edges} candidate edges; the CPU tree builders take at most "
                         f"2^31 - 1 of each per example: split the graph into examples "
                         f"(batch) or build on a GPU")


def spanning_forest_mask(src: np.ndarray, dst: np.ndarray, weight: torch.Tensor,
                         node_ptr: np.ndarray, edge_ptr: np.ndarray) -> np.ndarray:
    """Unchecked core: minimum spanning forest mask of int64 ``src``/``dst`` with CPU
    ``weight``, solved per segment. Raises ValueError on non-finite weights or examples
    too large (:func:`check_segment_sizes`)."""
    check_segment_sizes(node_ptr, edge_ptr)
    bits, nbits = weight_bits(weight)
    num_seg = node_ptr.shape[0] - 1
    n = int(node_ptr[-1])
    mask = np.zeros(src.shape[0], np.bool_)
    bad = np.zeros(num_seg, np.bool_)
    run_chunks(_kruskal_chunk, num_seg, src, dst, bits, nbits, node_ptr, edge_ptr, mask,
               np.empty(n, np.int32), np.empty(n, np.int32), bad)
    if bad.any():
        raise ValueError("edge_weight must be finite, got NaN or infinite values")
    return mask


# ---------------------------------------------------------------------------- public API
def minimum_spanning_tree(edge_index: torch.Tensor, edge_weight: torch.Tensor, num_nodes: int,
                          batch: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Minimum spanning forest of an undirected weighted graph.

    Edges are considered in ascending order of the key :math:`(w_e, e)`, so among
    equal weights the lower edge index wins and the forest is unique:

    .. math::
        T = \operatorname*{arg\,min}_{F \text{ spanning forest}} \sum_{e \in F} w_e,
        \qquad \text{ties broken lexicographically by } (w_e, e).

    A disconnected graph gives one tree per connected component. Self-loops are never
    chosen; of parallel edges (in either direction) only the first in key order can be.

    Args:
        edge_index (LongTensor or IntTensor [2, E]): endpoints of each undirected edge.
        edge_weight (Tensor [E]): float16, bfloat16, float32 or float64 weights; must be
            finite.
        num_nodes (int): number of vertices ``N``.
        batch (LongTensor [N], optional): example of each vertex. When every example is a
            contiguous vertex range whose edges form a contiguous block, the examples are
            solved in parallel; the result is the same either way. (default: ``None``)

    Returns:
        BoolTensor [E] on the device of ``edge_index``: ``True`` for the edges of the
        forest (``N`` minus the number of components of them).

    Raises:
        TypeError: if an argument is not a tensor or has an unsupported dtype.
        ValueError: on wrong shapes, vertex ids outside ``[0, N)``, non-finite weights or
            a negative ``num_nodes``.

    Shapes:
        - **input:** edge indices :math:`(2, E)`, edge weights :math:`(E)`
        - **output:** edge mask :math:`(E)`

    Example:
        >>> edge_index = torch.tensor([[0, 1, 0], [1, 2, 2]])   # a triangle
        >>> minimum_spanning_tree(edge_index, torch.tensor([1.0, 2.0, 3.0]), 3)
        tensor([ True,  True, False])
    """
    num_nodes = check_int(num_nodes, "num_nodes", 0)
    check_edge_index(edge_index, num_nodes)
    if not isinstance(edge_weight, torch.Tensor):
        raise TypeError(f"edge_weight must be a torch.Tensor, got {type(edge_weight).__name__}")
    if edge_weight.dtype not in _WEIGHT_TYPES:
        raise TypeError(f"edge_weight must be a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got {edge_weight.dtype}")
    num_edges = edge_index.shape[1]
    if edge_weight.dim() != 1 or edge_weight.shape[0] != num_edges:
        raise ValueError(f"edge_weight must have shape [E] = [{num_edges}], got "
                         f"{list(edge_weight.shape)}")
    if batch is not None:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
        if batch.dtype not in INDEX_TYPES or batch.dim() != 1 or batch.shape[0] != num_nodes:
            raise ValueError(f"batch must be an integer tensor of shape [{num_nodes}], got "
                             f"{batch.dtype} {list(batch.shape)}")
    device = edge_index.device
    with torch.no_grad():
        ei = edge_index.detach().cpu().to(torch.int64).numpy()
        src = np.ascontiguousarray(ei[0])
        dst = np.ascontiguousarray(ei[1])
        b = None if batch is None else batch.detach().cpu().to(torch.int64).numpy()
        node_ptr, edge_ptr = segments(num_nodes, src, dst, b)
        mask = spanning_forest_mask(src, dst, edge_weight.detach().cpu(), node_ptr, edge_ptr)
    return torch.from_numpy(mask).to(device)
