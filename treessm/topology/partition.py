"""Cutting a graph into connected-leaning parts along a spanning forest, for mini-batches.

PyG's :class:`~torch_geometric.loader.ClusterData` partitions a graph with METIS, which
needs ``pyg-lib`` or ``torch-sparse``; :class:`~torch_geometric.loader.RandomNodeLoader`
needs neither but keeps only about ``1 / num_parts`` of the edges in a part.
:func:`tree_partition` needs neither either: it cuts the depth-first order of a spanning
forest into ranges, so every part holds whole subtrees (and ancestors of its last vertex)
and the graph's edges among their vertices (``docs/graphs.md``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import check_int
from ..ops.tiles import heavy_first_preorder
from .boruvka import check_device_edge_index
from .mst import minimum_spanning_tree
from .rooting import tree_from_edges

__all__ = ["tree_partition"]


def tree_partition(edge_index: Tensor, num_nodes: int, num_parts: int, *,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    r"""The part of each vertex: ``num_parts`` pieces of nearly equal size (they differ by at
    most one vertex), each a range of the depth-first order of a spanning forest of the
    graph.

    The forest is the minimum spanning forest under random edge costs (drawn from
    ``generator``), each tree laid out in depth-first preorder, its largest child first, and
    the trees one after another; part :math:`k` takes the positions
    :math:`[\lceil kN/P \rceil, \lceil (k+1)N/P \rceil)`. A range of a depth-first order
    holds whole subtrees and some ancestors of its last vertex, so its vertices lie close
    together in the forest, and the graph's edges among them come with it: on a graph of random
    communities (10 edges a vertex) 20 parts keep about a quarter of the edges, where random
    parts keep a twentieth.

    Args:
        edge_index (LongTensor [2, E]): edges, in either or both directions.
        num_nodes (int): number of vertices ``N``.
        num_parts (int): number of parts ``P``, from 1 to ``max(N, 1)``.
        generator (torch.Generator, optional): draws the random edge costs, on the CPU.
            (default: ``None``, torch's global generator)

    Returns:
        LongTensor [N] on the device of ``edge_index``: the part of each vertex, in
        ``[0, P)``; every part is non-empty when :math:`P \le N`.

    Raises:
        TypeError, ValueError: on a malformed ``edge_index``, ids outside ``[0, N)``, a
            ``num_parts`` that is not an int in ``[1, max(N, 1)]``, or a ``generator`` that
            is not a CPU generator.

    Shapes:
        - **input:** edge indices :math:`(2, E)`
        - **output:** part of each vertex :math:`(N)`

    Example:
        >>> edge_index = torch.tensor([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]])   # a path
        >>> tree_partition(edge_index, 6, 3)
        tensor([0, 0, 1, 1, 2, 2])

        Mini-batches of a PyG graph ``data``, one part each:

        >>> from torch_geometric.loader import DataLoader
        >>> part = tree_partition(data.edge_index, data.num_nodes, 20)  # doctest: +SKIP
        >>> parts = [data.subgraph(part == k) for k in range(20)]       # doctest: +SKIP
        >>> loader = DataLoader(parts, batch_size=1, shuffle=True)      # doctest: +SKIP
    """
    edge_index, num_nodes = check_device_edge_index(edge_index, num_nodes)
    num_parts = check_int(num_parts, "num_parts", 1)
    if num_parts > max(num_nodes, 1):
        raise ValueError(f"num_parts must be at most the number of vertices ({num_nodes}), "
                         f"got {num_parts}")
    if generator is not None and (not isinstance(generator, torch.Generator)
                                  or generator.device.type != "cpu"):
        got = (f"one on {generator.device}" if isinstance(generator, torch.Generator)
               else f"{type(generator).__name__}")
        raise TypeError(f"generator must be None or a CPU torch.Generator, got {got}")
    device = edge_index.device
    cost = torch.rand(edge_index.shape[1], generator=generator).to(device)
    forest = minimum_spanning_tree(edge_index, cost, num_nodes)
    tree = tree_from_edges(edge_index[:, forest], num_nodes)
    position = heavy_first_preorder(tree)[0]
    return torch.div(position * num_parts, max(num_nodes, 1), rounding_mode="floor")
