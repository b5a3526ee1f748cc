r"""General graphs: the minimum spanning forest of a graph's own edges (PyG conventions).

``edge_index`` is read the way PyTorch Geometric writes it: directed pairs, an undirected
edge usually listed in both directions. The candidate graph is its undirected, coalesced
form (:func:`torch_geometric.utils.to_undirected` after
:func:`~torch_geometric.utils.remove_self_loops`), each undirected edge once, in ascending
``(row, col)`` order; a batch of graphs (``batch``, sorted, as PyG's loaders make it) gives
every graph its own contiguous block, so the CPU solves graphs in parallel.
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch_geometric.utils import remove_self_loops, to_undirected

from ..tree import Tree
from .base import Topology, check_features
from .distance import Distance, check_distance

__all__ = ["GraphTopology", "check_graph"]

_INDEX_TYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_graph(x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None,
                edge_attr: Optional[Tensor] = None, name: str = "x") -> Tuple[Tensor, ...]:
    """Validate a PyG graph at a public boundary and return ``(edge_index, batch,
    edge_attr)`` (``edge_index`` and ``batch`` as int64 on the device of ``x``).

    Raises:
        TypeError: on arguments that are not tensors or have the wrong dtype.
        ValueError: on wrong shapes or devices, vertex ids outside ``[0, N)``, a ``batch``
            of the wrong length, unsorted or with edges between examples, and non-finite
            features.
    """
    check_features(x, 2, name=name, shape="[N, C]")
    n = x.shape[0]
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor of shape [2, E], got "
                        f"{type(edge_index).__name__}")
    if edge_index.dtype not in _INDEX_TYPES:
        raise TypeError(f"edge_index must be an integer tensor (int64), got {edge_index.dtype}")
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
    if edge_index.device != x.device:
        raise ValueError(f"edge_index must be on the device of {name} ({x.device}), got "
                         f"{edge_index.device}")
    edge_index = edge_index.long()
    if edge_index.numel():
        lo, hi = torch.aminmax(edge_index)
        if int(lo) < 0 or int(hi) >= n:
            bad = int(lo) if int(lo) < 0 else int(hi)
            raise ValueError(f"edge_index must hold vertex ids in [0, {n}) ({name} has {n} "
                             f"rows), found {bad}")
    if n and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite, got NaN or infinite features")
    if batch is not None:
        if not isinstance(batch, Tensor):
            raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
        if batch.dtype not in _INDEX_TYPES:
            raise TypeError(f"batch must be an integer tensor, got {batch.dtype}")
        if batch.dim() != 1 or batch.shape[0] != n:
            raise ValueError(f"batch must have shape [{n}] (one entry per row of {name}), got "
                             f"{list(batch.shape)}")
        if batch.device != x.device:
            raise ValueError(f"batch must be on the device of {name} ({x.device}), got "
                             f"{batch.device}")
        batch = batch.long()
        if n:
            if int(batch[0]) < 0:
                raise ValueError("batch must hold non-negative example ids")
            if n > 1 and bool((batch[1:] < batch[:-1]).any()):
                raise ValueError("batch must be sorted (non-decreasing), as PyG's loaders make "
                                 "it: every example a contiguous block of vertices")
        if edge_index.shape[1] and bool((batch[edge_index[0]] != batch[edge_index[1]]).any()):
            raise ValueError("edge_index joins vertices of different examples (batch); a "
                             "tree may not span examples")
    if edge_attr is not None:
        if not isinstance(edge_attr, Tensor):
            raise TypeError(f"edge_attr must be a torch.Tensor, got {type(edge_attr).__name__}")
        if edge_attr.dim() not in (1, 2) or edge_attr.shape[0] != edge_index.shape[1]:
            raise ValueError(f"edge_attr must have shape [E] or [E, F] with E = "
                             f"{edge_index.shape[1]}, got {list(edge_attr.shape)}")
        if edge_attr.device != x.device:
            raise ValueError(f"edge_attr must be on the device of {name} ({x.device}), got "
                             f"{edge_attr.device}")
    return edge_index, batch, edge_attr


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
    """

    def __init__(self, distance: Distance = "cosine"):
        if distance == "edge_attr":
            super().__init__("cosine")
            self.distance = "edge_attr"
        else:
            super().__init__(check_distance(distance))

    def __call__(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None,
                 edge_attr: Optional[Tensor] = None) -> Tree:
        edge_index, batch, edge_attr = check_graph(x, edge_index, batch, edge_attr)
        reduce = "min" if self.distance == "edge_attr" else "mean"
        with torch.no_grad():
            ei, attr = self.undirected_edges(edge_index, x.shape[0], edge_attr, reduce)
        return self.forest(x, ei, batch, attr)

    @torch.no_grad()
    def forest(self, x: Tensor, ei: Tensor, batch: Optional[Tensor] = None,
               attr: Optional[Tensor] = None) -> Tree:
        """The tree of validated inputs whose edges are already those of
        :meth:`undirected_edges` (``attr`` reduced the same way): what :meth:`__call__` runs
        after cleaning the graph, for callers that clean it once for several uses."""
        n = x.shape[0]
        feat = x.detach().reshape(n, -1)
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
        if cost.numel() and not bool(torch.isfinite(cost).all()):
            raise ValueError("edge costs must be finite, got NaN or infinite values (from the "
                             "features, edge_attr or the distance)")
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=x.device)
        return self._build(ei, cost, n, None, batch)

    @staticmethod
    def undirected_edges(edge_index: Tensor, num_nodes: int, edge_attr: Optional[Tensor] = None,
                         reduce: str = "mean"):
        """Each undirected edge of ``edge_index`` once, as ``row < col`` in ascending order,
        without self-loops; repeated copies' ``edge_attr`` reduced by ``reduce``."""
        ei, attr = remove_self_loops(edge_index, edge_attr)
        if attr is None:
            ei = to_undirected(ei, num_nodes=num_nodes)
        else:
            ei, attr = to_undirected(ei, attr.float(), num_nodes=num_nodes, reduce=reduce)
        keep = ei[0] < ei[1]
        return ei[:, keep], None if attr is None else attr[keep]

    def candidate_edges(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None
                        ) -> Tuple[Tensor, Optional[Tensor], int]:
        """The undirected simple graph of ``edge_index``, validated."""
        edge_index, batch, _ = check_graph(x, edge_index, batch)
        return self.undirected_edges(edge_index, x.shape[0])[0], batch, x.shape[0]

    def extra_repr(self) -> str:
        if self.distance == "edge_attr":
            return "distance='edge_attr'"
        return super().extra_repr()
