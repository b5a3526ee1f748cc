r"""TreeGPSConv: a local message-passing layer and a tree scan over the whole graph, in one
block (the GPS recipe of Rampášek et al., 2022, with :class:`TreeSSMConv` as its global
mixer in place of attention).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.resolver import activation_resolver, normalization_resolver

from .._checks import check_bool, check_int, check_number
from .tree_ssm_conv import TreeSSMConv

__all__ = ["TreeGPSConv", "local_conv", "LOCAL_CONVS"]

LOCAL_CONVS = ("gcn", "sage", "gat", "gin", "gine", "gatv2")


def local_conv(name: str, channels: int, edge_dim: Optional[int] = None,
               heads: int = 4) -> nn.Module:
    r"""A PyG message-passing layer of ``channels`` in and out by name.

    ``"gcn"`` (:class:`~torch_geometric.nn.GCNConv`), ``"sage"``
    (:class:`~torch_geometric.nn.SAGEConv`, mean), ``"gat"`` / ``"gatv2"`` (``heads``
    concatenated heads of ``channels // heads``), ``"gin"`` (:class:`~torch_geometric.nn.
    GINConv` with a two-layer MLP) and ``"gine"`` (:class:`~torch_geometric.nn.GINEConv`,
    edge features of ``edge_dim``). GAT and GINE read ``edge_attr`` when ``edge_dim`` is
    given.

    Args:
        name (str): ``"gcn"``, ``"sage"``, ``"gat"``, ``"gatv2"``, ``"gin"`` or ``"gine"``.
        channels (int): input and output channels.
        edge_dim (int, optional): edge-feature width, for GAT and GINE. (default: ``None``)
        heads (int): attention heads of GAT. (default: ``4``)

    Shapes:
        - **input, output:** those of the PyG layer, :math:`(|\mathcal{V}|, C)` features

    Returns:
        :class:`torch.nn.Module`: the PyG layer.

    Raises:
        ValueError: on an unknown name, or ``channels`` not divisible by ``heads`` for GAT.

    Example:
        >>> local_conv("gcn", 16)
        GCNConv(16, 16)
    """
    from torch_geometric.nn import GATConv, GATv2Conv, GCNConv, GINConv, GINEConv, SAGEConv

    if name not in LOCAL_CONVS:
        raise ValueError(f"conv must be one of {LOCAL_CONVS} or a module, got {name!r}")
    if name == "gcn":
        return GCNConv(channels, channels)
    if name == "sage":
        return SAGEConv(channels, channels)
    if name in ("gat", "gatv2"):
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        cls = GATConv if name == "gat" else GATv2Conv
        return cls(channels, channels // heads, heads=heads, edge_dim=edge_dim)
    mlp = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, channels))
    if name == "gin":
        return GINConv(mlp)
    return GINEConv(mlp, edge_dim=edge_dim)


def _takes_batch(module: Optional[nn.Module]) -> bool:
    return module is not None and "batch" in inspect.signature(module.forward).parameters


class TreeGPSConv(nn.Module):
    r"""A graph block that mixes each vertex with its neighbours (a local message-passing
    layer) and with its whole connected component (a :class:`TreeSSMConv` scan over a
    spanning tree), with residual connections, normalisation, dropout and a feed-forward
    part, as PyG's :class:`~torch_geometric.nn.conv.GPSConv` arranges them:

    .. math::
        h_{\mathrm{local}} &= \mathrm{N}_1\big(x + \mathrm{Dropout}(\mathrm{Conv}(x, G))
            \big), \qquad
        h_{\mathrm{global}} = \mathrm{N}_2\big(x + \mathrm{Dropout}(
            \mathrm{TreeSSMConv}(x, G))\big)

        h &= h_{\mathrm{local}} + h_{\mathrm{global}}, \qquad
        y = \mathrm{N}_3\big(h + \mathrm{MLP}(h)\big)

    The global mixer costs :math:`O(|\mathcal{V}| + |\mathcal{E}|)` per layer where
    GPSConv's attention costs :math:`O(|\mathcal{V}|^2)` per graph, and needs no node
    ordering or positional encoding: every vertex reaches every vertex of its component
    through the tree that the layer builds from its own features (``docs/graphs.md``).

    Args:
        channels (int): input and output channels.
        conv (str or torch.nn.Module, optional): the local layer, called as
            ``conv(x, edge_index)`` or ``conv(x, edge_index, edge_attr)``: a PyG
            message-passing layer of ``channels`` in and out, a name for
            :func:`local_conv` (``"gcn"``, ``"sage"``, ``"gat"``, ``"gatv2"``, ``"gin"``,
            ``"gine"``), or ``None`` for the global mixer alone. (default: ``"gcn"``)
        d_state (int): state size of the tree scan. (default: ``4``)
        d_inner (int, optional): inner width of the tree scan. (default: ``channels``)
        dropout (float): dropout of the two branches and the feed-forward part.
            (default: ``0.0``)
        act (str or Callable): activation of the feed-forward part. (default: ``"relu"``)
        act_kwargs (dict, optional): its arguments. (default: ``None``)
        norm (str or Callable, optional): normalisation after each residual sum
            (:func:`torch_geometric.nn.resolver.normalization_resolver`: ``"batch_norm"``,
            ``"layer_norm"``, ``"graph_norm"``, ...; one that takes ``batch`` receives it).
            (default: ``"batch_norm"``)
        norm_kwargs (dict, optional): its arguments. (default: ``None``)
        edge_dim (int, optional): edge-feature width for ``conv="gat"``/``"gine"``.
            (default: ``None``)
        ffn (bool): include the feed-forward part (without it,
            :math:`y = h`). (default: ``True``)
        mixer_kwargs (dict, optional): further arguments of the :class:`TreeSSMConv`
            (``distance``, ``dt_rank``, ...). (default: ``None``)
        topology (callable, optional): the tree mixer's topology (see
            :class:`TreeSSMConv`). (default: ``None``, the graph's own edges)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, C)`, edge indices
          :math:`(2, |\mathcal{E}|)` (or any adjacency :class:`TreeSSMConv` takes, when
          the local layer takes it too), edge features for the local layer :math:`(|
          \mathcal{E}|)` or :math:`(|\mathcal{E}|, D)` (optional), batch vector
          :math:`(|\mathcal{V}|)` (optional, by keyword)
        - **output:** node features :math:`(|\mathcal{V}|, C)`

    Example:
        >>> block = TreeGPSConv(64, conv="gcn", dropout=0.1)
        >>> x, edge_index = torch.randn(5, 64), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
        >>> block(x, edge_index).shape
        torch.Size([5, 64])
    """

    def __init__(self, channels: int, conv: Union[str, nn.Module, None] = "gcn",
                 d_state: int = 4, d_inner: Optional[int] = None, dropout: float = 0.0,
                 act: Union[str, Any] = "relu", act_kwargs: Optional[Dict[str, Any]] = None,
                 norm: Union[str, Any, None] = "batch_norm",
                 norm_kwargs: Optional[Dict[str, Any]] = None, edge_dim: Optional[int] = None,
                 ffn: bool = True, mixer_kwargs: Optional[Dict[str, Any]] = None,
                 topology: Optional[Callable[..., Any]] = None):
        super().__init__()
        self.channels = check_int(channels, "channels", 1)
        self.dropout = check_number(dropout, "dropout", 0.0, 1.0, high_open=True)
        if isinstance(conv, str):
            conv = local_conv(conv, channels, edge_dim)
        elif conv is not None and not isinstance(conv, nn.Module):
            raise TypeError(f"conv must be a name, a torch.nn.Module or None, got "
                            f"{type(conv).__name__}")
        self.conv = conv
        mixer_kwargs = dict(mixer_kwargs or {})
        if topology is not None:
            if "topology" in mixer_kwargs:
                raise ValueError("give topology once, as an argument or in mixer_kwargs")
            mixer_kwargs["topology"] = topology
        self.mixer = TreeSSMConv(channels, channels, d_state=d_state,
                                 d_inner=channels if d_inner is None else d_inner,
                                 **mixer_kwargs)
        self.mlp = nn.Sequential(
            nn.Linear(channels, 2 * channels),
            activation_resolver(act, **(act_kwargs or {})),
            nn.Dropout(dropout),
            nn.Linear(2 * channels, channels),
            nn.Dropout(dropout),
        ) if check_bool(ffn, "ffn") else None
        norm_kwargs = norm_kwargs or {}
        self.norm1 = (normalization_resolver(norm, channels, **norm_kwargs)
                      if conv is not None else None)
        self.norm2 = normalization_resolver(norm, channels, **norm_kwargs)
        self.norm3 = (normalization_resolver(norm, channels, **norm_kwargs)
                      if self.mlp is not None else None)
        self.norm_with_batch = _takes_batch(self.norm2)
        self.reset_parameters()

    def reset_parameters(self):
        """Reset the local layer, the mixer (:meth:`TreeSSMConv.reset_parameters`), the
        feed-forward part and the norms."""
        for module in (self.conv, self.mixer, self.norm1, self.norm2, self.norm3):
            if module is not None and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for layer in self.mlp or ():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def _norm(self, norm: Optional[nn.Module], h: Tensor, batch: Optional[Tensor]) -> Tensor:
        if norm is None:
            return h
        return norm(h, batch=batch) if self.norm_with_batch else norm(h)

    def forward(self, x: Tensor, edge_index, edge_attr: Optional[Tensor] = None, *,
                batch: Optional[Tensor] = None) -> Tensor:
        """Apply the block.

        Args:
            x (Tensor [N, channels]): node features.
            edge_index (LongTensor [2, E] or another adjacency): the graph.
            edge_attr (Tensor [E] or [E, D], optional): edge features, passed to the local
                layer as its third argument (``edge_weight`` for GCNConv, ``edge_attr`` for
                GATConv and GINEConv); the tree mixer reads only the graph. (default:
                ``None``)
            batch (LongTensor [N], optional): graph of each node, sorted. (default: ``None``)

        Returns:
            Tensor [N, channels]: the new node features.

        Raises:
            TypeError, ValueError: on malformed inputs (as :class:`TreeSSMConv` and the
                local layer check them).
        """
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.channels:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [N, {self.channels}], got {shape}")
        out = self._norm(self.norm2, x + F.dropout(self.mixer(x, edge_index, batch=batch),
                                                   self.dropout, self.training), batch)
        if self.conv is not None:
            h = self.conv(x, edge_index) if edge_attr is None else self.conv(x, edge_index,
                                                                              edge_attr)
            out = out + self._norm(self.norm1, x + F.dropout(h, self.dropout, self.training),
                                   batch)
        if self.mlp is None:
            return out
        return self._norm(self.norm3, out + self.mlp(out), batch)

    def extra_repr(self) -> str:
        return f"{self.channels}, dropout={self.dropout}"
