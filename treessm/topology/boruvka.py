r"""Minimum spanning forests on the features' own device, free of host synchronisation.

A tree-SSM layer rebuilds its tree from its own features in every forward pass. When the
features live on a GPU, copying costs to the host for a CPU minimum spanning tree and
copying the tree back stalls the device twice per layer. :func:`spanning_forest` computes
the forest with plain tensor operations whose shapes and trip counts depend only on the
input *sizes*, never on their values; :mod:`treessm.topology.euler_tour` roots and lays it
out the same way.

**Borůvka's algorithm with a fixed number of rounds.** Edge ``e`` gets the integer key
``(c(e), e)`` packed into an int64 (an order-preserving integer image of the float cost in
the high half, the index in the low half), so keys are distinct and the forest is the
unique one under that total order, the one Kruskal's algorithm picks. Each round, every
component picks its lightest outgoing edge (:func:`lightest_edges`), hooks onto the
component at its other end (of two components picking the same edge, the lower id stays
the root) and pointer jumping flattens the labels. A component still growing at round
``k`` has at least ``2^k`` vertices, so :math:`\lceil \log_2 S \rceil` rounds finish
(``S`` the largest tree), and at round ``k`` a hook tree joins at most :math:`S / 2^k`
components, which bounds the jumps of that round. On a GPU one operator of the CUDA
extension runs all rounds (``torch.ops.treessm.cuda_boruvka``: three launches per round --
selection, hooking, and every label walked to its hook tree's root -- and the rounds after
the components stop growing return at once), with the same forest and labels.

Inputs are only checked for values (ids in range) on CPU tensors: such checks need the
device's answer, so on a GPU out-of-range ids are the caller's responsibility.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import check_edge_index, check_index_range, check_int
from ..ops.pointer_jump import extension_kernels

__all__ = ["spanning_forest", "edge_keys", "lightest_edges", "boruvka", "boruvka_compacting",
           "check_device_edge_index", "check_cost", "check_vertices", "check_max_tree_size",
           "ceil_log2"]

_LOW = 0xFFFFFFFF  # low half of an int64 key: the edge index
# High half of "no outgoing edge": above every real key, whose high half is at most
# +inf's 0x7F800000 or a rank below 2^31 - 1.
_NO_EDGE = 0x7FFFFFFF << 32
_SMALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def ceil_log2(x: int) -> int:
    """Smallest ``k >= 0`` with ``2^k >= x``."""
    return max(int(x) - 1, 0).bit_length()


# ---------------------------------------------------------------------------- input checks
def check_device_edge_index(edge_index, num_nodes) -> Tuple[Tensor, int]:
    """``(edge_index as int64, num_nodes)``, checked without waiting for the device: the
    ids' range is read only on the CPU."""
    num_nodes = check_int(num_nodes, "num_nodes", 0)
    edge_index = check_edge_index(edge_index, num_nodes,
                                  check_range=isinstance(edge_index, Tensor)
                                  and edge_index.device.type == "cpu")
    if edge_index.shape[1] >= 2 ** 31:
        raise ValueError(f"edge_index holds {edge_index.shape[1]} edges; at most 2^31 - 1 are "
                         "supported")
    return edge_index, num_nodes


def check_cost(cost, num_edges: int, device) -> Tensor:
    if not isinstance(cost, Tensor):
        raise TypeError(f"cost must be a 1-D tensor, got {type(cost).__name__}")
    if cost.dtype == torch.bool or cost.is_complex():
        raise TypeError(f"cost must be a real tensor, got dtype {cost.dtype}")
    if cost.dim() != 1 or cost.shape[0] != num_edges:
        raise ValueError(f"cost must have shape [{num_edges}] (one value per edge), got "
                         f"{list(cost.shape)}")
    if cost.device != device:
        raise ValueError(f"cost must be on the device of edge_index ({device}), got {cost.device}")
    return cost.detach()


def check_vertices(t, name: str, num_nodes: int, device, length: Optional[int] = None):
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a 1-D LongTensor or None, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have one entry per vertex ({length}), got {t.shape[0]}")
    t = t.to(device=device, dtype=torch.long)
    if name == "roots" and t.device.type == "cpu":  # reading ids waits for a device
        check_index_range(t, name, num_nodes)
    return t


def check_max_tree_size(max_tree_size, num_nodes: int) -> int:
    if max_tree_size is None:
        return max(num_nodes, 1)
    return min(check_int(max_tree_size, "max_tree_size", 1), max(num_nodes, 1))


# ---------------------------------------------------------------------------- spanning forest
def edge_keys(cost: Tensor) -> Tensor:
    """Distinct int64 keys ordered like ``(cost, edge index)``."""
    num_edges = cost.shape[0]
    index = torch.arange(num_edges, device=cost.device)
    if cost.dtype in _SMALL_FLOATS:
        # IEEE bits order like the value for non-negative floats and in reverse for negative
        # ones: flipping all but the sign bit of negatives gives an order-preserving int32.
        # Adding +0.0 first turns -0.0 into +0.0, which compares equal to it.
        bits = (cost.float() + 0.0).view(torch.int32)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        return (ordered.long() << 32) | index
    # float64 and integer costs do not fit 32 bits: use the rank in a stable sort instead,
    # which already breaks ties by edge index.
    perm = torch.sort(cost, stable=True).indices
    rank = torch.empty_like(perm).scatter_(0, perm, index)
    return (rank << 32) | index


def lightest_edges(edge_index: Tensor, key: Tensor, comp: Tensor, sentinel: int) -> Tensor:
    """``best [N]``: for every component label ``c``, the least key of an edge between
    component ``c`` and another one, ``sentinel`` where none leaves it (the tensor version
    of the CUDA operator's selection step)."""
    ends = comp[edge_index]  # [2, E] component of each endpoint
    inner = torch.where(ends[0] != ends[1], key, sentinel)
    best = torch.full_like(comp, sentinel)
    best.scatter_reduce_(0, ends[0], inner, "amin")
    best.scatter_reduce_(0, ends[1], inner, "amin")
    return best


def _hooked_labels(hook: Tensor, comp: Tensor, jumps: Optional[int]) -> Tensor:
    """Each vertex's label after the components hooked onto each other: the root of its
    label's tree in the forest ``hook`` (``hook[r] == r`` at a root), by pointer jumping,
    ``jumps`` fixed rounds, or (``None``) until nothing moves, which waits for the device at
    every round."""
    comp = hook[comp]
    if jumps is not None:
        for _ in range(jumps):
            comp = comp[comp]
        return comp
    while True:
        nxt = comp[comp]
        if torch.equal(nxt, comp):  # waits for the device
            return comp
        comp = nxt


def boruvka(edge_index: Tensor, key: Tensor, num_nodes: int, max_size: int):
    """Forest mask ``[E]`` and a component label per vertex (a vertex id of the component)."""
    device = key.device
    num_edges = key.shape[0]
    if extension_kernels(key):
        return torch.ops.treessm.cuda_boruvka(edge_index.contiguous(), key.contiguous(),
                                              num_nodes, ceil_log2(max_size),
                                              _NO_EDGE | num_edges)
    ar = torch.arange(num_nodes, device=device)
    comp = ar
    chosen = torch.zeros(num_edges + 1, dtype=torch.bool, device=device)
    if num_edges == 0 or num_nodes <= 1:
        return chosen[:num_edges], comp
    # Edge E is a self-loop, never chosen, and "no outgoing edge" decodes to it, so
    # components without an edge need no special case below.
    no_edge = _NO_EDGE | num_edges
    edge_index = torch.cat([edge_index, edge_index.new_zeros(2, 1)], 1)
    key = torch.cat([key, key.new_full((1,), no_edge)])
    for k in range(ceil_log2(max_size)):
        edge = lightest_edges(edge_index, key, comp, no_edge) & _LOW
        chosen.index_fill_(0, edge, True)  # index E collects the components without an edge
        # One endpoint of the chosen edge is the component c itself, so XOR-ing c out of
        # both leaves the other one; the self-loop E has equal ends and leaves c in place.
        picked = comp[edge_index.index_select(1, edge)]
        hook = picked[0] ^ picked[1] ^ ar
        # Keys are distinct, so the only cycles of the choice graph are pairs that picked the
        # same edge. Pointing every component at the lower of its target and its target's
        # target roots each pair at its lower id and keeps every other component in its
        # merged group, no deeper than before.
        hook = torch.minimum(hook, hook[hook])
        # a hook tree of round k joins at most max_size >> k components, so its depth is at
        # most that less one; the first step along it needs no jump
        comp = _hooked_labels(hook, comp, ceil_log2((max_size >> k) - 1))
    return chosen[:num_edges], comp


def boruvka_compacting(edge_index: Tensor, key: Tensor, num_nodes: int):
    r""":func:`boruvka` for when the host may wait for the device: the same forest and labels,
    but every round first drops the edges inside one component, and rounds and pointer
    jumps stop as soon as nothing is left to do. On a large graph the work then shrinks
    with the number of edges still between components, instead of staying that of the
    first round for :math:`\lceil \log_2 N \rceil` rounds. With the CUDA operator this is
    :func:`boruvka` itself: its rounds after the last merge cost a launch each and nothing
    waits."""
    device = key.device
    num_edges = key.shape[0]
    if extension_kernels(key):
        return boruvka(edge_index, key, num_nodes, num_nodes)
    ar = torch.arange(num_nodes, device=device)
    comp = ar
    chosen = torch.zeros(num_edges, dtype=torch.bool, device=device)
    if num_edges == 0 or num_nodes <= 1:
        return chosen, comp
    sentinel = _NO_EDGE | num_edges
    live, live_key = edge_index, key
    while True:
        ends = comp[live]
        cross = (ends[0] != ends[1]).nonzero().squeeze(1)  # waits for the device
        if cross.numel() == 0:
            break
        if cross.numel() < live.shape[1]:
            live, live_key = live[:, cross], live_key[cross]
        best = lightest_edges(live, live_key, comp, sentinel)
        has = best != sentinel
        edge = (best & _LOW).clamp(max=num_edges - 1)
        chosen[edge[has]] = True
        picked = comp[edge_index[:, edge]]
        hook = torch.where(has, picked[0] ^ picked[1] ^ ar, ar)
        hook = torch.minimum(hook, hook[hook])  # see boruvka
        comp = _hooked_labels(hook, comp, None)
    return chosen, comp


@torch.no_grad()
def spanning_forest(edge_index: Tensor, cost: Tensor, num_nodes: int, *,
                    max_tree_size: Optional[int] = None) -> Tensor:
    r"""Minimum spanning forest of an undirected graph, computed on the input's device.

    Edges are compared by the total order :math:`(c_e, e)`: by cost, ties to the lower edge
    index, so the forest is unique and equals the one Kruskal's algorithm picks when it
    scans the edges sorted by ``(cost, index)``. Self-loops are never chosen; parallel
    edges are allowed (the first of equal cost wins). The loop counts depend only on
    ``num_nodes`` and ``max_tree_size``, never on the data, and nothing synchronises with
    the host.

    Args:
        edge_index (LongTensor [2, E]): candidate edges (either direction).
        cost (Tensor [E]): edge costs, floating point or integer, not NaN; float16,
            bfloat16 and float32 are keyed directly, other dtypes through a stable sort.
        num_nodes (int): number of vertices ``N``.
        max_tree_size (int, optional): an upper bound on the number of vertices of any
            connected component (e.g. ``H * W`` for a batch of grids). It sets the number of
            rounds, :math:`\lceil \log_2 S \rceil`; a bound that is too small gives a wrong
            forest. (default: ``num_nodes``)

    Returns:
        BoolTensor [E]: ``True`` for the edges of the forest.

    Shapes:
        - **input:** edge indices :math:`(2, E)`, edge costs :math:`(E)`
        - **output:** edge mask :math:`(E)`
    """
    edge_index, num_nodes = check_device_edge_index(edge_index, num_nodes)
    cost = check_cost(cost, edge_index.shape[1], edge_index.device)
    size = check_max_tree_size(max_tree_size, num_nodes)
    return boruvka(edge_index, edge_keys(cost), num_nodes, size)[0]
