r"""TreeSSMConv: a selective tree state-space block for PyTorch Geometric pipelines.

Every vertex sees every vertex of its connected component in one layer, through the
minimum spanning forest of the graph under the layer's own feature distances, at linear
cost (``docs/graphs.md``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.parameter import is_lazy
from torch_geometric.nn import Linear

from .._checks import check_bool, check_choice, check_int, check_int_or_auto
from ..ops.pointwise import runs_on_kernels, silu_mix
from ..ops.sparse import csr_matmul
from ..topology import GraphTopology
from ..topology.distance import Distance
from ..topology.layout import empty_forest
from ..topology.graph import check_graph
from ..topology.prepared_graph import PreparedGraph
from ..tree import Tree
from .tree_ssm import SelectiveTreeSSM, records_grad

__all__ = ["TreeSSMConv"]

TREE_FEATURES = ("inner", "input")


class ProjectionLinear(Linear):
    """PyG's :class:`~torch_geometric.nn.Linear` (lazy when ``in_channels`` is ``-1``)
    initialised as Mamba's projections: truncated normal weights (std 0.02), zero bias."""

    def reset_parameters(self):
        if self.in_channels > 0:  # a lazy weight is initialised when it is materialised
            nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def first_half(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The weight and bias (or ``None``) of the first half of the output channels."""
        half = self.out_channels // 2
        return self.weight[:half], None if self.bias is None else self.bias[:half]

    def halves(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The first and the second half of the output channels, each in an array of its own
        rather than as strided views of one output (which a later reader would copy); a lazy
        projection's first call, which materialises it, splits one output."""
        if is_lazy(self.weight):
            return self(x).chunk(2, dim=-1)
        w = self.weight.chunk(2)
        b = (None, None) if self.bias is None else self.bias.chunk(2)
        return F.linear(x, w[0], b[0]), F.linear(x, w[1], b[1])


class _NeighbourMean(torch.autograd.Function):
    """:math:`D^{-1} W u` for the symmetric adjacency :math:`W` of a prepared graph; the
    backward is :math:`W D^{-1} g`, the same sparse product (no transpose to build)."""

    @staticmethod
    def forward(ctx, u: Tensor, adjacency: Tensor, inv_degree: Tensor) -> Tensor:
        ctx.adjacency = adjacency
        ctx.save_for_backward(inv_degree)
        return csr_matmul(adjacency, u).mul_(inv_degree.unsqueeze(1))  # no second [N, C] array

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        inv_degree, = ctx.saved_tensors
        scaled = (grad * inv_degree.unsqueeze(1)).contiguous()
        return csr_matmul(ctx.adjacency, scaled), None, None


def _operator_dtype(u: Tensor) -> torch.dtype:
    return u.dtype if u.dtype in (torch.float32, torch.float64) else torch.float32


def neighbour_mean(u: Tensor, graph: PreparedGraph) -> Tensor:
    """The (edge-weighted) mean of each vertex's neighbours in ``graph``, ``u [N, C]``;
    zero for isolated vertices. Computed in float32 for 16-bit ``u``."""
    dtype = _operator_dtype(u)
    adjacency, inv_degree = graph.operator(dtype)
    return _NeighbourMean.apply(u.to(dtype).contiguous(), adjacency, inv_degree).to(u.dtype)


def projected_neighbour_mean(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                             graph: PreparedGraph) -> Tensor:
    r"""The neighbour mean of :math:`u = x W^\top + b`, computed as
    :math:`\bar u = \bar x W^\top + [\deg > 0]\, b`: the mean is linear and the weights of a
    vertex with neighbours sum to one, so the sparse product runs over the channels of
    ``x`` instead of those of ``u`` (an isolated vertex's mean stays zero)."""
    out = F.linear(neighbour_mean(x, graph), weight)
    if bias is not None:
        _, inv_degree = graph.operator(_operator_dtype(x))
        out.addcmul_((inv_degree > 0).to(out.dtype).unsqueeze(1), bias)
    return out


class TreeSSMConv(SelectiveTreeSSM):
    r"""Selective state-space block over the minimum spanning forest of a graph.

    For node features :math:`x_v` the block computes

    .. math::
        u_v, z_v &= W_{in} x_v, \qquad
        u_v \leftarrow \mathrm{SiLU}\Big(a \odot u_v + b \odot
            \tfrac{1}{\sum_{w} \omega_{vw}}\textstyle\sum_{w \in \mathcal{N}(v)}
            \omega_{vw} u_w\Big)

        T &= \mathrm{MSF}\big(G,\ c(v, w) = d(u_v, u_w) / \omega_{vw}\big), \qquad
        \Delta_v = \mathrm{softplus}(W_\Delta W_r u_v + b_\Delta), \quad
        B_v = W_B u_v, \quad C_v = W_C u_v

        h_v &= \sum_{w \in T(v)} \Big(\prod_{e \in \mathrm{path}_T(w, v)}
            \exp(\Delta_e A)\Big)\, \Delta_w B_w u_w, \qquad
        \Delta_e = \tfrac{1}{2}(\Delta_{e_1} + \Delta_{e_2})

        y_v &= W_{out}\big(\mathrm{LN}(C_v \cdot \mathrm{LN}_h(h_v) + D \odot u_v)
            \odot \mathrm{SiLU}(z_v)\big)

    per inner channel and state, where :math:`T(v)` is the tree of :math:`v`'s connected
    component (the ``"both"`` tree scan, ``docs/concepts.md``), rebuilt in every forward pass
    without gradient, the step of a tree edge is the mean of its two ends' steps, and
    :math:`\omega_{vw}` is the edge weight (1 without ``edge_weight``). Both the scan and
    the edge steps are symmetric in the two ends of an edge, so the result does not depend
    on which vertex roots a tree: renumbering the vertices permutes the output rows and
    changes nothing else (whenever the edge costs are distinct; equal costs are broken by
    edge order). A batch of graphs gives the rows its graphs give one by one.

    The graph is read as undirected and simple: edge directions, repeated edges and
    self-loops do not change the result. Its undirected simple form and the neighbourhood
    mean (``local_mixing``, the graph form of GrootV's depthwise convolution) are computed
    once per graph (:func:`treessm.prepare_graph`): pass a :class:`~treessm.PreparedGraph`
    as ``edge_index`` to prepare it yourself; otherwise the preparation is cached for the
    ``edge_index`` tensor, so the layers of a model and the steps of full-batch training
    share it (``docs/graphs.md``).

    Args:
        in_channels (int): input channels, or ``-1`` to infer them from the first input
            (lazy initialisation, as PyG's layers).
        out_channels (int): output channels.
        d_state (int): state size :math:`N` per inner channel; the block's memory traffic
            grows with ``d_inner * d_state`` per vertex. (default: ``4``)
        d_inner (int, optional): inner width of the scan. (default: ``2 * out_channels``)
        dt_rank (int or str): rank of the :math:`\Delta` projection; ``"auto"`` is
            :math:`\lceil d_{inner} / 32 \rceil` (Mamba's :math:`\lceil d_{model} / 16
            \rceil` at its expansion of 2). (default: ``"auto"``)
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
        backend (str, optional): :func:`treessm.selective_tree_scan` backend. (default:
            ``None``)
        bias (bool): learn biases in the input and output projections. (default: ``True``)
        topology (callable, optional): builds the spanning forest instead of
            ``GraphTopology(distance)``: called as ``topology(feat, graph, batch)`` with the
            features ``feat [N, C]`` chosen by ``tree_features``, ``graph`` the
            :class:`~treessm.PreparedGraph` of the input (``graph.edge_index`` holds each
            undirected edge once) and ``batch`` as given; it returns a
            :class:`~treessm.Tree` over the ``N`` vertices, which may use other edges than
            the graph's (``docs/topologies.md`` builds one over k nearest neighbours).
            Give the distance to the topology, not to the layer. (default: ``None``)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})`, edge indices
          :math:`(2, |\mathcal{E}|)` (or an ``EdgeIndex``, a sparse adjacency such as
          ``adj_t``, or a :class:`~treessm.PreparedGraph`), edge weights
          :math:`(|\mathcal{E}|)` (optional), batch vector :math:`(|\mathcal{V}|)`
          (optional), edge features :math:`(|\mathcal{E}|)` or :math:`(|\mathcal{E}|, D)`
          (optional, for the distance)
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})`

    Example:
        >>> conv = TreeSSMConv(-1, 64)
        >>> x, edge_index = torch.randn(5, 16), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
        >>> conv(x, edge_index).shape
        torch.Size([5, 64])
    """

    # symmetric in the two ends of an edge: the scan does not depend on the roots
    edge_step = "mean"

    def __init__(self, in_channels: int, out_channels: int, d_state: int = 4,
                 d_inner: Optional[int] = None, dt_rank: Union[int, str] = "auto",
                 distance: Distance = "cosine", tree_features: str = "inner",
                 local_mixing: bool = True, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, backend: Optional[str] = None, bias: bool = True,
                 topology: Optional[Callable[..., Tree]] = None):
        super().__init__()
        if isinstance(in_channels, bool) or in_channels != -1:  # -1: lazy
            in_channels = check_int(in_channels, "in_channels", 1)
        out_channels = check_int(out_channels, "out_channels", 1)
        d_state = check_int(d_state, "d_state", 1)
        d_inner = 2 * out_channels if d_inner is None else check_int(d_inner, "d_inner", 1)
        dt_rank = check_int_or_auto(dt_rank, "dt_rank", math.ceil(d_inner / 32))
        tree_features = check_choice(tree_features, "tree_features", TREE_FEATURES)
        local_mixing = check_bool(local_mixing, "local_mixing")
        bias = check_bool(bias, "bias")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.tree_features = tree_features
        if topology is None:
            topology = GraphTopology(distance)
        elif not callable(topology):
            raise TypeError(f"topology must be a callable Topology, got "
                            f"{type(topology).__name__}")
        elif distance != "cosine":
            raise ValueError("give the distance to the topology, not to the layer, when a "
                             f"topology is given (got distance={distance!r})")
        self.topology = topology
        self.in_proj = ProjectionLinear(in_channels, 2 * d_inner, bias=bias)
        if local_mixing:
            self.self_weight = nn.Parameter(torch.empty(d_inner))
            self.neighbour_weight = nn.Parameter(torch.empty(d_inner))
        else:
            self.register_parameter("self_weight", None)
            self.register_parameter("neighbour_weight", None)
        self._build_ssm(d_inner, d_state, dt_rank, dt_min, dt_max, dt_init_floor, backend)
        self.out_proj = ProjectionLinear(d_inner, out_channels, bias=bias)
        self.reset_parameters()

    def reset_parameters(self):
        r"""Projections truncated normal (std 0.02) with zero biases, the local mixing as
        :math:`u \leftarrow \tfrac12 u + \tfrac12 \bar u`, and Mamba's :math:`\Delta`,
        :math:`A`, :math:`D` (:meth:`~SelectiveTreeSSM.reset_ssm_parameters`)."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        if self.self_weight is not None:
            nn.init.constant_(self.self_weight, 0.5)
            nn.init.constant_(self.neighbour_weight, 0.5)
        self.x_proj.reset_parameters()
        self.reset_ssm_parameters()

    # ------------------------------------------------------------------ pieces
    def project_in(self, x: Tensor, graph: PreparedGraph) -> Tuple[Tensor, Tensor]:
        """Inner features ``u`` (projection, neighbourhood mixing, SiLU) and the gate ``z``,
        both ``[N, d_inner]``, over a :class:`~treessm.PreparedGraph`."""
        u, z = self.in_proj.halves(x)
        if self.self_weight is None:
            return F.silu(u), z
        if x.shape[1] < u.shape[1]:  # the sparse product over the narrower side
            mixed = projected_neighbour_mean(x, *self.in_proj.first_half(), graph).to(u.dtype)
        else:
            mixed = neighbour_mean(u, graph)
        weights = (self.self_weight, self.neighbour_weight)
        if runs_on_kernels(u, mixed, *weights) or records_grad(u, mixed, *weights):
            # SiLU(a u + b mean(u)) as one operator (on the CPU and CUDA one pass over the
            # rows each way, without the composition's temporaries)
            return silu_mix(u, mixed, *weights), z
        # nothing to differentiate: a u + b mean(u) and the SiLU in the array of the mean
        mixed.mul_(self.neighbour_weight).addcmul_(u, self.self_weight)
        return F.silu(mixed, inplace=True), z

    @torch.no_grad()
    def scan_tree(self, x: Tensor, u: Tensor, graph: PreparedGraph,
                  batch: Optional[Tensor] = None) -> Tree:
        """The spanning forest the scan runs on (no gradient flows through it)."""
        feat = (u if self.tree_features == "inner" else x).detach().float()
        if isinstance(self.topology, GraphTopology):
            return self.topology.forest(feat, graph, batch)
        tree = self.topology(feat, graph, batch)
        if not isinstance(tree, Tree) or tree.num_nodes != x.shape[0]:
            got = f"a Tree over {tree.num_nodes} vertices" if isinstance(tree, Tree) else \
                type(tree).__name__
            raise ValueError(f"topology must return a Tree over the {x.shape[0]} vertices, "
                             f"got {got}")
        return tree

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, edge_index, edge_weight: Optional[Tensor] = None, *,
                batch: Optional[Tensor] = None, edge_attr: Optional[Tensor] = None,
                return_tree: bool = False) -> Union[Tensor, Tuple[Tensor, Tree]]:
        """Apply the block to a graph or a PyG batch of graphs.

        Args:
            x (Tensor [N, in_channels]): node features.
            edge_index (LongTensor [2, E], EdgeIndex, sparse adjacency or PreparedGraph):
                edges (either or both directions); a sparse adjacency's values are edge
                weights.
            edge_weight (Tensor [E], optional): positive edge weights: the neighbour mean is
                weighted by them and the spanning forest prefers heavy edges (cost divided by
                weight). No gradient flows into them. (default: ``None``)
            batch (LongTensor [N], optional): graph of each node, sorted; lets the CPU build
                the trees of a batch's graphs in parallel and checks that no edge joins two
                graphs. (default: ``None``)
            edge_attr (Tensor [E] or [E, D], optional): edge features, for a distance that
                reads them. (default: ``None``)
            return_tree (bool): also return the spanning forest that was used.
                (default: ``False``)

        Returns:
            Tensor [N, out_channels], or ``(Tensor, Tree)`` with ``return_tree``.

        Raises:
            TypeError, ValueError: on malformed inputs (:func:`treessm.prepare_graph`), a
                :class:`~treessm.PreparedGraph` of other vertices, or features of the wrong
                width.
        """
        return_tree = check_bool(return_tree, "return_tree")
        graph, batch = check_graph(x, edge_index, batch, edge_attr, edge_weight=edge_weight,
                                   reduce=getattr(self.topology, "reduce", "mean"))
        expected = self.in_proj.in_channels
        if expected > 0 and x.shape[1] != expected:
            raise ValueError(f"x must have in_channels = {expected} columns, got {x.shape[1]}")
        if x.shape[0] == 0:  # no vertex: an empty output, connected to the parameters
            y = self.out_proj(self.in_proj(x)[:, :self.d_inner])
            return (y, empty_forest(x.device)) if return_tree else y
        u, z = self.project_in(x, graph)
        tree = self.scan_tree(x, u, graph, batch)
        y = self.project_out(self.selective_scan(u, tree), z)
        return (y, tree) if return_tree else y

    def __repr__(self) -> str:
        # PyG's convention for graph layers (GCNConv(16, 32)); parameters: named_parameters()
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"d_state={self.d_state}, d_inner={self.d_inner})")
