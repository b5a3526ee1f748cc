r"""Graph models for node and graph classification: an encoder, a stack of blocks
(:class:`~treessm.nn.TreeGPSConv` by default), optional pooling and a head."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import Linear
from torch_geometric.nn.resolver import aggregation_resolver

from .._checks import check_choice, check_int, check_number
from ..nn.tree_gps import TreeGPSConv

__all__ = ["GraphNet", "LocalGlobalNet", "node_classifier", "graph_classifier", "POOLS"]

POOLS = ("mean", "sum", "max")


class GraphNet(nn.Module):
    r"""Encoder, ``num_layers`` blocks, optional pooling and a head.

    .. math::
        h^{(0)} = \mathrm{Enc}(\mathrm{Dropout}(x)), \quad
        h^{(l)} = \mathrm{Block}_l(h^{(l-1)}, G), \quad
        y = \mathrm{Head}(\mathrm{Dropout}(\mathrm{Pool}(h^{(L)})))

    Every block is called as ``block(h, edge_index, batch=batch)`` (plus
    ``edge_attr=edge_attr`` when edge features are given), the convention of
    :class:`~treessm.nn.TreeGPSConv` and PyG's :class:`~torch_geometric.nn.conv.GPSConv`.
    Without pooling the model classifies nodes (head: one linear layer), with pooling
    graphs (head: a two-layer MLP).

    Args:
        in_channels (int): input features (``-1``: inferred on the first call).
        hidden_channels (int): width of the blocks.
        out_channels (int): classes.
        num_layers (int): blocks.
        block (callable): ``block(hidden_channels) -> Module``.
            (default: :class:`~treessm.nn.TreeGPSConv` with its defaults)
        pool (str, optional): ``"mean"``, ``"sum"`` or ``"max"`` over each graph of
            ``batch``; ``None`` for node outputs. (default: ``None``)
        encoder (torch.nn.Module, optional): maps ``x`` to ``hidden_channels``, e.g. an
            embedding of categorical features. (default: a linear layer)
        dropout (float): dropout on the input features and before the head. (default:
            ``0.0``)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F)`, edge indices
          :math:`(2, |\mathcal{E}|)`, edge features (optional), batch vector
          :math:`(|\mathcal{V}|)` (optional; needed for pooling over several graphs)
        - **output:** :math:`(|\mathcal{V}|, \mathrm{out})`, or :math:`(B, \mathrm{out})`
          with pooling

    Returns:
        Called as ``model(x, edge_index, edge_attr=None, batch=None)``, the logits per node
        or, with pooling, per graph.

    Raises:
        ValueError: on a ``pool`` other than ``"mean"``, ``"sum"``, ``"max"`` or ``None``,
            or sizes that are not positive ints; the blocks check their inputs.

    Example:
        >>> model = GraphNet(8, 32, 3, num_layers=2, pool="mean")
        >>> x, edge_index = torch.randn(6, 8), torch.tensor([[0, 1, 3, 4], [1, 2, 4, 5]])
        >>> batch = torch.tensor([0, 0, 0, 1, 1, 1])                # two graphs
        >>> model(x, edge_index, batch=batch).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int,
                 num_layers: int, block: Optional[Callable[[int], nn.Module]] = None,
                 pool: Optional[str] = None, encoder: Optional[nn.Module] = None,
                 dropout: float = 0.0):
        super().__init__()
        hidden_channels = check_int(hidden_channels, "hidden_channels", 1)
        out_channels = check_int(out_channels, "out_channels", 1)
        num_layers = check_int(num_layers, "num_layers", 0)
        self.pool = None if pool is None else check_choice(pool, "pool", POOLS)
        self.dropout = check_number(dropout, "dropout", 0.0, 1.0, high_open=True)
        self.encoder = encoder if encoder is not None else Linear(in_channels, hidden_channels)
        block = block or TreeGPSConv
        self.blocks = nn.ModuleList(block(hidden_channels) for _ in range(num_layers))
        self.readout = None if pool is None else aggregation_resolver(pool)
        self.head = (nn.Linear(hidden_channels, out_channels) if pool is None else
                     nn.Sequential(nn.Linear(hidden_channels, hidden_channels), nn.ReLU(),
                                   nn.Linear(hidden_channels, out_channels)))

    def reset_parameters(self):
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, x: Tensor, edge_index, edge_attr: Optional[Tensor] = None,
                batch: Optional[Tensor] = None) -> Tensor:
        h = self.encoder(feature_dropout(x, self.dropout, self.training))
        extra = {} if edge_attr is None else {"edge_attr": edge_attr}
        for block in self.blocks:
            h = block(h, edge_index, batch=batch, **extra)
        if self.readout is not None:
            h = self.readout(h, batch)
        return self.head(F.dropout(h, self.dropout, self.training))


class LocalGlobalNet(nn.Module):
    r"""Two message-passing layers with a global mixer between them: the shape of the
    two-layer GCN of Kipf & Welling (2017), the recipe that citation graphs reward, with a
    GPS-style global branch added to the hidden layer.

    .. math::
        h = \mathrm{Conv}_1(\mathrm{Dropout}(x), G), \quad
        h \leftarrow h + \mathrm{Dropout}_g(\mathrm{Mixer}(h, G)), \quad
        y = \mathrm{Conv}_2(\mathrm{Dropout}(\mathrm{act}(h)), G)

    With ``mixer=None`` this is the two-layer GCN (GAT, GIN, ... with other convs). The
    mixer is called as ``mixer(h, edge_index, batch=batch)``: a
    :class:`~treessm.nn.TreeSSMConv` of ``hidden_channels`` in and out (the default),
    whose output projection starts at zero, so the global branch starts silent and the
    model starts as the plain two-layer network; give its parameters their own weight decay
    (:meth:`parameter_groups`) to let it contribute only what the labels pay for
    (``docs/graphs.md`` measures both on Cora).

    Args:
        in_channels (int): input features (``-1``: inferred on the first call where the
            convolutions are lazy).
        hidden_channels (int): width of the hidden layer.
        out_channels (int): classes.
        conv (callable): ``conv(in_channels, out_channels) -> Module`` called as
            ``conv(x, edge_index)``, for both layers. (default: :class:`~torch_geometric.nn.
            GCNConv`)
        mixer (torch.nn.Module or str, optional): the global mixer, ``"tree"`` for
            ``TreeSSMConv(hidden, hidden, d_state, d_inner=hidden)``, a module, or
            ``None``. (default: ``"tree"``)
        d_state (int): state size of the default mixer. (default: ``4``)
        dropout (float): on the input features and on the hidden layer. (default: ``0.5``)
        mixer_dropout (float): on the mixer's output. (default: ``0.5``)
        act (str or Callable): activation of the hidden layer. (default: ``"relu"``)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F)` (dense, or sparse COO: the
          dropout then touches the stored entries only), edge indices
          :math:`(2, |\mathcal{E}|)`, batch vector :math:`(|\mathcal{V}|)` (optional)
        - **output:** logits :math:`(|\mathcal{V}|, \mathrm{out})`

    Returns:
        Called as ``model(x, edge_index, edge_attr=None, batch=None)`` (``edge_attr`` is
        ignored), the logits per node.

    Raises:
        ValueError, TypeError: on sizes that are not positive ints, a dropout outside
            ``[0, 1)`` or a mixer that is neither a module, ``"tree"`` nor ``None``.

    Example:
        >>> model = LocalGlobalNet(8, 16, 3)
        >>> x, edge_index = torch.randn(6, 8), torch.tensor([[0, 1, 3, 4], [1, 2, 4, 5]])
        >>> model(x, edge_index).shape
        torch.Size([6, 3])
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int,
                 conv: Optional[Callable[[int, int], nn.Module]] = None,
                 mixer: Union[nn.Module, str, None] = "tree", d_state: int = 4,
                 dropout: float = 0.5, mixer_dropout: float = 0.5,
                 act: Union[str, Callable] = "relu"):
        super().__init__()
        from torch_geometric.nn import GCNConv
        from torch_geometric.nn.resolver import activation_resolver

        from ..nn.tree_ssm_conv import TreeSSMConv

        hidden_channels = check_int(hidden_channels, "hidden_channels", 1)
        out_channels = check_int(out_channels, "out_channels", 1)
        self.dropout = check_number(dropout, "dropout", 0.0, 1.0, high_open=True)
        self.mixer_dropout = check_number(mixer_dropout, "mixer_dropout", 0.0, 1.0,
                                          high_open=True)
        conv = conv or GCNConv
        self.conv1 = conv(in_channels, hidden_channels)
        self.conv2 = conv(hidden_channels, out_channels)
        if isinstance(mixer, str):
            if mixer != "tree":
                raise ValueError(f"mixer must be 'tree', a torch.nn.Module or None, got "
                                 f"{mixer!r}")
            mixer = TreeSSMConv(hidden_channels, hidden_channels, d_state=d_state,
                                d_inner=hidden_channels)
        elif mixer is not None and not isinstance(mixer, nn.Module):
            raise TypeError(f"mixer must be 'tree', a torch.nn.Module or None, got "
                            f"{type(mixer).__name__}")
        self.mixer = mixer
        self.act = activation_resolver(act)
        self.reset_parameters()

    def reset_parameters(self):
        """Reset both layers and the mixer, and zero the mixer's output projection."""
        for module in (self.conv1, self.conv2, self.mixer):
            if module is not None and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        weight = getattr(getattr(self.mixer, "out_proj", None), "weight", None)
        if isinstance(weight, nn.Parameter) and not isinstance(
                weight, nn.parameter.UninitializedParameter):
            nn.init.zeros_(weight)

    def parameter_groups(self, weight_decay: float = 5e-4,
                         mixer_weight_decay: float = 0.0) -> list:
        """Optimiser parameter groups: ``weight_decay`` on the first layer (as the GCN
        recipe), ``mixer_weight_decay`` on the mixer, none on the rest."""
        first = list(self.conv1.parameters())
        mixer = list(self.mixer.parameters()) if self.mixer is not None else []
        taken = {id(p) for p in first + mixer}
        rest = [p for p in self.parameters() if id(p) not in taken]
        groups = [dict(params=first, weight_decay=weight_decay),
                  dict(params=rest, weight_decay=0.0)]
        if mixer:
            groups.append(dict(params=mixer, weight_decay=mixer_weight_decay))
        return groups

    def forward(self, x: Tensor, edge_index, edge_attr: Optional[Tensor] = None,
                batch: Optional[Tensor] = None) -> Tensor:
        h = self.conv1(feature_dropout(x, self.dropout, self.training), edge_index)
        if self.mixer is not None:
            g = self.mixer(h, edge_index, batch=batch)
            h = h + F.dropout(g, self.mixer_dropout, self.training)
        h = F.dropout(self.act(h), self.dropout, self.training)
        return self.conv2(h, edge_index)


def feature_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout on input features: on the stored values of a sparse COO ``x`` (an entry that
    is not stored is zero either way, so the result is the dense dropout's, at the cost of
    the stored entries), none on integer ``x`` (categories)."""
    if not x.is_floating_point() or p == 0.0 or not training:
        return x
    if x.layout == torch.sparse_coo:
        x = x.coalesce()
        return torch.sparse_coo_tensor(x.indices(), F.dropout(x.values(), p, True), x.shape,
                                       is_coalesced=True, check_invariants=False)
    return F.dropout(x, p, True)


def _tree_blocks(conv, d_state, d_inner, dropout, norm, edge_dim, mixer_kwargs):
    def block(channels: int) -> TreeGPSConv:
        return TreeGPSConv(channels, conv=conv, d_state=d_state, d_inner=d_inner,
                           dropout=dropout, norm=norm, edge_dim=edge_dim,
                           mixer_kwargs=mixer_kwargs)
    return block


def node_classifier(in_channels: int, num_classes: int, hidden_channels: int = 64,
                    num_layers: int = 2, conv: Union[str, None] = "gcn", d_state: int = 4,
                    d_inner: Optional[int] = None, dropout: float = 0.5,
                    block_dropout: float = 0.0, norm: Optional[str] = "batch_norm",
                    edge_dim: Optional[int] = None, mixer_kwargs: Optional[dict] = None,
                    encoder: Optional[nn.Module] = None) -> GraphNet:
    r"""A node classifier of :class:`~treessm.nn.TreeGPSConv` blocks (:class:`GraphNet`).

    Args:
        in_channels (int): input features (``-1``: lazy).
        num_classes (int): classes.
        hidden_channels (int): width. (default: ``64``)
        num_layers (int): blocks. (default: ``2``)
        conv (str, optional): local layer of each block (:func:`~treessm.nn.local_conv`;
            ``None``: the tree scan alone). (default: ``"gcn"``)
        d_state (int), d_inner (int, optional): the tree scan's state size and inner width.
            (default: ``4``, ``hidden_channels``)
        dropout (float): on the input features and before the head. (default: ``0.5``)
        block_dropout (float): inside the blocks. (default: ``0.0``)
        norm (str, optional): the blocks' normalisation. (default: ``"batch_norm"``)
        edge_dim (int, optional): edge-feature width for GAT/GINE. (default: ``None``)
        mixer_kwargs (dict, optional): further :class:`~treessm.nn.TreeSSMConv` arguments.
            (default: ``None``)
        encoder (torch.nn.Module, optional): replaces the linear encoder. (default:
            ``None``)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F)`, edge indices
          :math:`(2, |\mathcal{E}|)`
        - **output:** logits :math:`(|\mathcal{V}|, \mathrm{num\_classes})`

    Returns:
        :class:`GraphNet`

    Raises:
        ValueError, TypeError: on arguments outside their ranges (as :class:`GraphNet`,
            :class:`~treessm.nn.TreeGPSConv` and :func:`~treessm.nn.local_conv` check them).

    Example:
        >>> from torch_geometric.datasets import KarateClub
        >>> data = KarateClub()[0]
        >>> model = node_classifier(data.num_features, 4)
        >>> model(data.x, data.edge_index).shape
        torch.Size([34, 4])
    """
    return GraphNet(in_channels, hidden_channels, num_classes, num_layers,
                    _tree_blocks(conv, d_state, d_inner, block_dropout, norm, edge_dim,
                                 mixer_kwargs), encoder=encoder, dropout=dropout)


def graph_classifier(in_channels: int, num_classes: int, hidden_channels: int = 64,
                     num_layers: int = 4, conv: Union[str, None] = "gin", pool: str = "mean",
                     d_state: int = 4, d_inner: Optional[int] = None, dropout: float = 0.0,
                     block_dropout: float = 0.0, norm: Optional[str] = "batch_norm",
                     edge_dim: Optional[int] = None, mixer_kwargs: Optional[dict] = None,
                     encoder: Optional[nn.Module] = None) -> GraphNet:
    r"""A graph classifier of :class:`~treessm.nn.TreeGPSConv` blocks, pooled per graph
    (:class:`GraphNet`).

    Args:
        in_channels, num_classes, hidden_channels: as :func:`node_classifier`, and so are
            the arguments not listed here.
        num_layers (int): blocks. (default: ``4``)
        conv (str, optional): local layer of each block. (default: ``"gin"``)
        pool (str): ``"mean"``, ``"sum"`` or ``"max"`` over each graph. (default:
            ``"mean"``)

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F)`, edge indices
          :math:`(2, |\mathcal{E}|)`, batch vector :math:`(|\mathcal{V}|)`
        - **output:** logits :math:`(B, \mathrm{num\_classes})` for :math:`B` graphs

    Returns:
        :class:`GraphNet`

    Raises:
        ValueError, TypeError: as :func:`node_classifier`, and on an unknown ``pool``.

    Example:
        >>> from torch_geometric.data import Batch, Data
        >>> ring = Data(x=torch.randn(4, 7), edge_index=torch.tensor([[0, 1, 2, 3],
        ...                                                          [1, 2, 3, 0]]))
        >>> batch = Batch.from_data_list([ring, ring, ring])
        >>> model = graph_classifier(7, 2)
        >>> model(batch.x, batch.edge_index, batch=batch.batch).shape
        torch.Size([3, 2])
    """
    return GraphNet(in_channels, hidden_channels, num_classes, num_layers,
                    _tree_blocks(conv, d_state, d_inner, block_dropout, norm, edge_dim,
                                 mixer_kwargs), pool=pool, encoder=encoder, dropout=dropout)
