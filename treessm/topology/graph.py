r"""General graphs: the minimum spanning forest of a graph's own edges (PyG conventions).

``edge_index`` is read the way PyTorch Geometric writes it: directed pairs, an undirected
edge usually listed in both directions. The candidate graph is its undirected, coalesced
form (:func:`torch_geometric.utils.to_undirected` after
:func:`~torch_geometric.utils.remove_self_loops`), each undirected edge once, in ascending
``(row, col)`` order (:func:`~treessm.topology.prepared_graph.prepare_graph`, computed once
per graph); a batch of graphs (``batch``, sorted, as PyG's loaders make it) gives every graph
its own contiguous block, so the CPU solves graphs in parallel.
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._checks import INDEX_TYPES, all_finite, check_features, values_readable
from ..tree import Tree
from .base import Topology
from .distance import Distance, check_distance
from .prepared_graph import PreparedGraph, prepare_graph

__all__ = ["GraphTopology", "check_graph"]


def check_graph(x: Tensor, edge_index, batch: Optional[Tensor] = None,
                edge_attr: Optional[Tensor] = None, name: str = "x",
                edge_weight: Optional[Tensor] = None, reduce: str = "mean"
                ) -> Tuple[PreparedGraph, Optional[Tensor]]:
    """Validate a PyG graph at a public boundary and return its :class:`PreparedGraph`
    (:func:`prepare_graph`, cached for the same tensors) and ``batch`` as int64.

    ``edge_index`` may be a ``[2, E]`` tensor, an ``EdgeIndex``, a sparse adjacency or a
    :class:`PreparedGraph` of the rows of ``x``.

    Raises:
        TypeError: on arguments that are not tensors or have the wrong dtype.
        ValueError: on wrong shapes or devices, vertex ids outside ``[0, N)``, a prepared
            graph of another size or device, a ``batch`` of the wrong length, unsorted or
            with edges between examples, and non-finite features.
    """
    check_features(x, 2, name=name, shape="[N, C]")
    n = x.shape[0]
    device = getattr(edge_index, "device", None)  # before its ids are read on the host
    if isinstance(device, torch.device) and device != x.device:
        raise ValueError(f"edge_index must be on the device of {name} ({x.device}), got "
                         f"{device}")
    if isinstance(edge_index, PreparedGraph):
        if edge_weight is not None or edge_attr is not None:
            raise ValueError("edge_weight and edge_attr belong in prepare_graph(...) when "
                             "edge_index is a PreparedGraph")
        graph = edge_index
        graph.check(x, name)
    else:
        graph = prepare_graph(edge_index, n, edge_weight, edge_attr, reduce)
        if graph.device != x.device:
            raise ValueError(f"edge_index must be on the device of {name} ({x.device}), got "
                             f"{graph.device}")
    if n and values_readable(x) and not all_finite(x):
        raise ValueError(f"{name} must be finite, got NaN or infinite features")
    if batch is not None:
        if not isinstance(batch, Tensor):
            raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
        if batch.dtype not in INDEX_TYPES:
            raise TypeError(f"batch must be an integer tensor, got {batch.dtype}")
        if batch.dim() != 1 or batch.shape[0] != n:
            raise ValueError(f"batch must have shape [{n}] (one entry per row of {name}), got "
                             f"{list(batch.shape)}")
        if batch.device != x.device:
            raise ValueError(f"batch must be on the device of {name} ({x.device}), got "
                             f"{batch.device}")
        batch = batch.long()
        if n and values_readable(batch):
            if int(batch[0]) < 0:
                raise ValueError("batch must hold non-negative example ids")
            if n > 1 and bool((batch[1:] < batch[:-1]).any()):
                raise ValueError("batch must be sorted (non-decreasing), as PyG's loaders make "
                                 "it: every example a contiguous block of vertices")
        ei = graph.edge_index
        if ei.shape[1] and values_readable(batch) and bool((batch[ei[0]] != batch[ei[1]]).any()):
            raise ValueError("edge_index joins vertices of different examples (batch); a "
                             "tree may not span examples")
    return graph, batch


def _takes_edge_attr(distance) -> bool:
    if not callable(distance):
        return False
    try:
        params = inspect.signature(distance).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in positional)


class GraphTopology(Topology):
    r"""Minimum spanning forest of a graph's own edges, weighted by feature distance.

    .. math::
        T = \mathrm{MSF}\big(G,\ c(u, v) = d(x_u, x_v)\big)

    over the undirected simple graph :math:`G` of ``edge_index`` (directions, repeats and
    self-loops do not matter). Every connected component becomes one tree, rooted at its
    lowest vertex id; an isolated vertex is a tree of its own, and a batch of graphs
    (PyG's ``batch``) gives at least one tree per graph. Equal costs go to the edge that
    comes first in ``(row, col)`` order, so the tree depends on the vertex numbering only
    through ties: with distinct costs, renumbering the vertices renumbers the tree.

    Args:
        distance (str or callable): ``"cosine"`` (:math:`\exp(-\cos(x_u, x_v))`), ``"l2"``,
            ``"edge_attr"`` (the scalar ``edge_attr`` itself is the cost; of repeated copies
            of an edge the cheapest counts), ``f(x_u [E, C], x_v [E, C]) -> [E]``, or
            ``f(x_u, x_v, edge_attr [E, F]) -> [E]`` (repeated copies' attributes
            averaged). (default: ``"cosine"``)

    Shapes:
        - **input:** node features :math:`(N, C)`, edge indices :math:`(2, E)`, batch
          vector :math:`(N)` (optional), edge features :math:`(E)` or :math:`(E, F)`
          (optional)
        - **output:** a :class:`~treessm.Tree` over :math:`N` vertices, ``batch`` set
          (zeros when not given)

    Returns:
        Called as ``topology(x, edge_index, batch=None, edge_attr=None, edge_weight=None)``,
        the :class:`~treessm.Tree` of the graph's minimum spanning forest.

    Raises:
        TypeError, ValueError: on malformed features or edges (:func:`treessm.prepare_graph`),
            an edge joining two graphs of ``batch``, or ``distance="edge_attr"`` without a
            scalar ``edge_attr``.

    Example:
        >>> edge_index = torch.tensor([[0, 1, 2, 0], [1, 2, 3, 3]])   # a 4-cycle
        >>> tree = GraphTopology()(torch.randn(4, 8), edge_index)
        >>> tree.num_trees, int((tree.parent >= 0).sum())              # 3 of the 4 edges
        (1, 3)
    """

    def __init__(self, distance: Distance = "cosine"):
        if distance == "edge_attr":
            super().__init__("cosine")
            self.distance = "edge_attr"
        else:
            super().__init__(check_distance(distance))

    @property
    def reduce(self) -> str:
        """How repeated copies of an edge combine their ``edge_attr``: the cheapest copy
        counts for ``distance="edge_attr"``, else their mean."""
        return "min" if self.distance == "edge_attr" else "mean"

    @torch.compiler.disable
    def __call__(self, x: Tensor, edge_index, batch: Optional[Tensor] = None,
                 edge_attr: Optional[Tensor] = None, edge_weight: Optional[Tensor] = None
                 ) -> Tree:
        graph, batch = check_graph(x, edge_index, batch, edge_attr, edge_weight=edge_weight,
                                   reduce=self.reduce)
        return self.forest(x, graph, batch)

    @torch.compiler.disable
    @torch.no_grad()
    def forest(self, x: Tensor, graph: PreparedGraph, batch: Optional[Tensor] = None) -> Tree:
        """The tree of validated features ``x`` over a :class:`PreparedGraph` (whose
        ``edge_attr`` was reduced by :attr:`reduce`): what :meth:`__call__` runs after
        preparing the graph, for callers that prepare it once for several uses.

        With ``edge_weight`` the cost of an edge is its distance divided by its weight, so
        that of two equally distant edges the heavier one is taken first."""
        n = x.shape[0]
        feat = x.detach().flatten(1)
        ei, attr = graph.edge_index, graph.edge_attr
        if self.distance == "edge_attr":
            if attr is None or (attr.dim() == 2 and attr.shape[1] != 1):
                raise ValueError("distance='edge_attr' needs a scalar edge_attr [E] or "
                                 f"[E, 1], got {None if attr is None else list(attr.shape)}")
            cost = attr.reshape(-1)
        elif _takes_edge_attr(self.distance):
            if attr is None:
                raise ValueError("this distance takes edge_attr, but none was given")
            cost = self.distance(feat[ei[0]], feat[ei[1]], attr)
        else:
            cost = self.edge_cost(feat, ei)
        if not isinstance(cost, Tensor) or cost.shape != (ei.shape[1],):
            got = list(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__
            raise ValueError(f"edge costs must be a tensor of shape [{ei.shape[1]}], got "
                             f"{got}")
        if not cost.is_floating_point():
            cost = cost.float()
        if graph.edge_weight is not None:
            cost = cost / graph.edge_weight.to(cost.dtype)
        if values_readable(cost) and not all_finite(cost):
            raise ValueError("edge costs must be finite, got NaN or infinite values (from the "
                             "features, edge_attr or the distance)")
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=x.device)
        return self._build(ei, cost, n, None, batch)

    def candidate_edges(self, x: Tensor, edge_index, batch: Optional[Tensor] = None
                        ) -> Tuple[Tensor, Optional[Tensor], int]:
        """The undirected simple graph of ``edge_index``, validated."""
        graph, batch = check_graph(x, edge_index, batch)
        return graph.edge_index, batch, x.shape[0]

    def extra_repr(self) -> str:
        if self.distance == "edge_attr":
            return "distance='edge_attr'"
        return super().extra_repr()
