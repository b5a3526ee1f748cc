r"""TreeSSMConv: a selective tree state-space block for PyTorch Geometric pipelines.

Every vertex sees every vertex of its connected component in one layer, through the
minimum spanning forest of the graph under the layer's own feature distances, at linear
cost (``docs/graphs.md``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import scatter

from .._checks import check_bool, check_choice, check_int, check_int_or_auto, check_number
from ..topology import GraphTopology
from ..topology.distance import Distance
from ..topology.graph import check_graph
from ..tree import Tree
from .tree_ssm import SelectiveTreeSSM

__all__ = ["TreeSSMConv"]

TREE_FEATURES = ("inner", "input")


class TreeSSMConv(SelectiveTreeSSM):
    r"""Selective state-space block over the minimum spanning forest of a graph.

    For node features :math:`x_v` the block computes

    .. math::
        u_v, z_v &= W_{in} x_v, \qquad
        u_v \leftarrow \mathrm{SiLU}\Big(a \odot u_v + b \odot
            \tfrac{1}{|\mathcal{N}(v)|}\textstyle\sum_{w \in \mathcal{N}(v)} u_w\Big)

        T &= \mathrm{MSF}\big(G,\ c(v, w) = d(u_v, u_w)\big), \qquad
        \Delta_v = \mathrm{softplus}(W_\Delta W_r u_v + b_\Delta), \quad
        B_v = W_B u_v, \quad C_v = W_C u_v

        h_v &= \sum_{w \in T(v)} \Big(\prod_{e \in \mathrm{path}_T(w, v)}
            \exp(\Delta_e A)\Big)\, \Delta_w B_w u_w, \qquad
        \Delta_e = \tfrac{1}{2}(\Delta_{e_1} + \Delta_{e_2})

        y_v &= W_{out}\big(\mathrm{LN}(C_v \cdot \mathrm{LN}_h(h_v) + D \odot u_v)
            \odot \mathrm{SiLU}(z_v)\big)

    per inner channel and state, where :math:`T(v)` is the tree of :math:`v`'s connected
    component (the ``"both"`` tree scan, ``docs/concepts.md``), rebuilt in every forward pass
    without gradient, and the step of a tree edge is the mean of its two ends' steps. Both
    the scan and the edge steps are symmetric in the two ends of an edge, so the result does
    not depend on which vertex roots a tree: renumbering the vertices permutes the output
    rows and changes nothing else (whenever the edge costs are distinct; equal costs are
    broken by edge order). A batch of graphs gives the rows its graphs give one by one.

    The graph is read as undirected and simple: edge directions, repeated edges and
    self-loops do not change the result. The neighbourhood mean (``local_mixing``) is the
    graph form of GrootV's depthwise convolution; it uses
    :func:`torch_geometric.utils.scatter`, which takes torch-scatter when it is installed.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        d_state (int): state size :math:`N` per inner channel; the block's memory traffic
            grows with ``d_inner * d_state`` per vertex. (default: ``4``)
        expand (float): ``d_inner = int(expand * in_channels)``. (default: ``2.0``)
        dt_rank (int or str): rank of the :math:`\Delta` projection; ``"auto"`` is
            :math:`\lceil \mathrm{in\_channels} / 16 \rceil`. (default: ``"auto"``)
        distance (str or callable): edge cost of the spanning forest, ``"cosine"``,
            ``"l2"``, ``"edge_attr"`` or a callable (see :class:`~treessm.GraphTopology`).
            (default: ``"cosine"``)
        tree_features (str): features the costs are computed from: ``"inner"`` (:math:`u`,
            the block's own features after projection and mixing, as GrootV builds its
            trees) or ``"input"`` (:math:`x`). (default: ``"inner"``)
        local_mixing (bool): mix each vertex with the mean of its neighbours before the scan.
            (default: ``True``)
        dt_min (float), dt_max (float), dt_init_floor (float): initial :math:`\Delta`
            log-uniform in ``[dt_min, dt_max]``, at least ``dt_init_floor``. (default:
            ``0.001``, ``0.1``, ``1e-4``)
        backend (str, optional): :func:`treessm.tree_scan` backend. (default: ``None``)
        bias (bool): learn biases in the input and output projections. (default: ``True``)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})`, edge indices
          :math:`(2, |\mathcal{E}|)`, batch vector :math:`(|\mathcal{V}|)` (optional), edge
          features :math:`(|\mathcal{E}|)` or :math:`(|\mathcal{E}|, D)` (optional, for the
          distance)
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})`
    """

    def __init__(self, in_channels: int, out_channels: int, d_state: int = 4,
                 expand: float = 2.0, dt_rank: Union[int, str] = "auto",
                 distance: Distance = "cosine", tree_features: str = "inner",
                 local_mixing: bool = True, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, backend: Optional[str] = None, bias: bool = True):
        super().__init__()
        in_channels = check_int(in_channels, "in_channels", 1)
        out_channels = check_int(out_channels, "out_channels", 1)
        d_state = check_int(d_state, "d_state", 1)
        expand = check_number(expand, "expand", 0, low_open=True)
        if int(expand * in_channels) < 1:
            raise ValueError(f"expand must be positive with int(expand * in_channels) >= 1, "
                             f"got {expand!r}")
        dt_rank = check_int_or_auto(dt_rank, "dt_rank", math.ceil(in_channels / 16))
        tree_features = check_choice(tree_features, "tree_features", TREE_FEATURES)
        local_mixing = check_bool(local_mixing, "local_mixing")
        bias = check_bool(bias, "bias")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.tree_features = tree_features
        self.topology = GraphTopology(distance)
        d_inner = int(expand * in_channels)
        self.in_proj = nn.Linear(in_channels, 2 * d_inner, bias=bias)
        if local_mixing:
            self.self_weight = nn.Parameter(torch.empty(d_inner))
            self.neighbour_weight = nn.Parameter(torch.empty(d_inner))
        else:
            self.register_parameter("self_weight", None)
            self.register_parameter("neighbour_weight", None)
        self._build_ssm(d_inner, d_state, dt_rank, dt_min, dt_max, dt_init_floor, backend)
        self.out_proj = nn.Linear(d_inner, out_channels, bias=bias)
        self.reset_parameters()

    def reset_parameters(self):
        r"""Projections truncated normal (std 0.02) with zero biases, the local mixing as
        :math:`u \leftarrow \tfrac12 u + \tfrac12 \bar u`, and Mamba's :math:`\Delta`,
        :math:`A`, :math:`D` (:meth:`~SelectiveTreeSSM.reset_ssm_parameters`)."""
        for lin in (self.in_proj, self.out_proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.self_weight is not None:
            nn.init.constant_(self.self_weight, 0.5)
            nn.init.constant_(self.neighbour_weight, 0.5)
        self.x_proj.reset_parameters()
        self.reset_ssm_parameters()

    # ------------------------------------------------------------------ pieces
    def edge_delta(self, delta: Tensor, tree: Optional[Tree]) -> Tensor:
        """The mean of the steps of each tree edge's two ends, in the child's row: symmetric,
        so the scan does not depend on the roots."""
        if tree is None:
            return delta
        parent = tree.parent.clamp(min=0)
        return 0.5 * (delta + delta[parent])

    def project_in(self, x: Tensor, edges: Tensor) -> Tuple[Tensor, Tensor]:
        """Inner features ``u`` (projection, neighbourhood mixing, SiLU) and the gate ``z``,
        both ``[N, d_inner]``; ``edges``: each undirected edge once
        (:meth:`GraphTopology.undirected_edges`)."""
        u, z = self.in_proj(x).chunk(2, dim=-1)
        if self.self_weight is not None:
            src = torch.cat([edges[0], edges[1]])
            dst = torch.cat([edges[1], edges[0]])
            mean = scatter(u[src], dst, dim=0, dim_size=u.shape[0], reduce="mean")
            u = self.self_weight * u + self.neighbour_weight * mean
        return F.silu(u), z

    @torch.no_grad()
    def scan_tree(self, x: Tensor, u: Tensor, edges: Tensor, batch: Optional[Tensor],
                  edge_attr: Optional[Tensor]) -> Tree:
        """The spanning forest the scan runs on (no gradient flows through it), from the
        undirected ``edges`` and their reduced ``edge_attr``."""
        feat = u if self.tree_features == "inner" else x
        return self.topology.forest(feat.detach().float(), edges, batch, edge_attr)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None,
                edge_attr: Optional[Tensor] = None, return_tree: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Tree]]:
        """Apply the block to a graph or a PyG batch of graphs.

        Args:
            x (Tensor [N, in_channels]): node features.
            edge_index (LongTensor [2, E]): edges (either or both directions).
            batch (LongTensor [N], optional): graph of each node, sorted. (default: ``None``)
            edge_attr (Tensor [E] or [E, D], optional): edge features, for a distance that
                reads them. (default: ``None``)
            return_tree (bool): also return the spanning forest that was used.
                (default: ``False``)
        """
        edge_index, batch, edge_attr = check_graph(x, edge_index, batch, edge_attr)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x must have in_channels = {self.in_channels} columns, got "
                             f"{x.shape[1]}")
        reduce = "min" if self.topology.distance == "edge_attr" else "mean"
        with torch.no_grad():  # directions, repeats and self-loops do not matter
            edges, edge_attr = GraphTopology.undirected_edges(edge_index, x.shape[0], edge_attr,
                                                              reduce)
        u, z = self.project_in(x, edges)
        tree = self.scan_tree(x, u, edges, batch, edge_attr)
        y = self.project_out(self.selective_scan(u, tree), z)
        return (y, tree) if return_tree else y

    def __repr__(self) -> str:
        # PyG's convention for graph layers (GCNConv(16, 32)); parameters: named_parameters()
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"d_state={self.d_state})")
