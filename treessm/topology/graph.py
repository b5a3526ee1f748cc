"""General graphs: the minimum spanning forest of the given edges (PyG layout)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..tree import Tree
from .base import Topology, check_features
from .distance import Distance
from .mst import check_edge_index

__all__ = ["GraphTopology"]


class GraphTopology(Topology):
    r"""Minimum spanning forest of a graph's own edges, weighted by feature distance.

    The candidate edges are ``edge_index`` as given (directed duplicates such as PyG's
    two copies of an undirected edge are fine: only the cheaper, then earlier, copy can be
    chosen). Every connected component becomes one tree rooted at its lowest vertex id,
    so a batch of graphs (``batch``, PyG's convention) gives at least one tree per graph.

    Args:
        distance (str or callable): ``"cosine"``, ``"l2"`` or ``f(feat_u, feat_v) -> [E]``.
            (default: ``"cosine"``)

    Shapes:
        - **input:** node features :math:`(N, C)`, edge indices :math:`(2, E)`, batch
          vector :math:`(N)` (optional)
        - **output:** a :class:`~treessm.Tree` over :math:`N` vertices, ``batch`` set
          (zeros when not given)
    """

    def __init__(self, distance: Distance = "cosine"):
        super().__init__(distance)

    def __call__(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None) -> Tree:
        return super().__call__(x, edge_index, batch)

    def candidate_edges(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None
                        ) -> Tuple[Tensor, Optional[Tensor], int]:
        """The given edges, validated."""
        check_features(x, 2, name="x", shape="[N, C]")
        num_nodes = x.shape[0]
        check_edge_index(edge_index, num_nodes)
        if edge_index.device != x.device:
            raise ValueError(f"edge_index must be on the device of x ({x.device}), got "
                             f"{edge_index.device}")
        if batch is not None:
            if not isinstance(batch, Tensor):
                raise TypeError(f"batch must be a torch.Tensor, got {type(batch).__name__}")
            if batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool:
                raise TypeError(f"batch must be an integer tensor, got {batch.dtype}")
            if batch.dim() != 1 or batch.shape[0] != num_nodes:
                raise ValueError(f"batch must have shape [{num_nodes}], got {list(batch.shape)}")
            if batch.device != x.device:
                raise ValueError(f"batch must be on the device of x ({x.device}), got "
                                 f"{batch.device}")
            batch = batch.long()
            if num_nodes and int(batch.min()) < 0:
                raise ValueError("batch must hold non-negative example ids")
            if edge_index.shape[1] and bool((batch[edge_index[0]] != batch[edge_index[1]]).any()):
                raise ValueError("edge_index joins vertices of different examples (batch); a "
                                 "tree may not span examples")
        return edge_index.long(), batch, num_nodes
