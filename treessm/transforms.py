"""PyG transforms that prepare graphs for tree layers in a dataset pipeline."""
from __future__ import annotations

from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform, RemoveSelfLoops, ToUndirected

__all__ = ["PrepareGraph"]


class PrepareGraph(BaseTransform):
    r"""Store each graph's undirected simple form, so that tree layers
    (:class:`~treessm.nn.TreeSSMConv`, :class:`~treessm.GraphTopology`) take it as it is.

    Removes self-loops, adds the reverse of every edge and merges repeated edges
    (:class:`~torch_geometric.transforms.RemoveSelfLoops`, then
    :class:`~torch_geometric.transforms.ToUndirected` with ``reduce``, which also merges
    every edge attribute such as ``edge_weight`` and ``edge_attr``), and stores
    ``edge_index`` as an :class:`~torch_geometric.EdgeIndex` marked undirected and sorted by
    row. PyG's batches keep those marks, so a layer prepares a batch
    (:func:`treessm.prepare_graph`) with a few linear passes instead of a sort. Message-
    passing layers read the same ``edge_index`` (they see both directions, as after
    ``ToUndirected``).

    Use it as ``pre_transform`` (stored once with the processed dataset) or ``transform``
    (every time a graph is loaded); it helps mini-batch training, where every batch is a new
    graph. For one graph trained on in full, the layers' cache already prepares it once.

    Args:
        reduce (str): how repeated copies of an edge combine their attributes
            (``"mean"``, ``"add"``, ``"min"``, ``"max"``, ...). (default: ``"mean"``)

    Shapes:
        - **input:** a :class:`~torch_geometric.data.Data` with ``edge_index``
          :math:`(2, E)` (and edge attributes :math:`(E, *)`)
        - **output:** the same graph with ``edge_index`` :math:`(2, E')`, each undirected
          edge in both directions once, and its attributes merged

    Returns:
        Calling the transform returns the graph (changed in place, as PyG's transforms do).

    Raises:
        ValueError: on an unknown ``reduce``, or a graph without ``edge_index``.

    Example:
        >>> from torch_geometric.data import Data
        >>> data = Data(edge_index=torch.tensor([[0, 1, 1, 2], [1, 0, 2, 2]]), num_nodes=3)
        >>> data = PrepareGraph()(data)              # the self-loop dropped, 1-2 made mutual
        >>> data.edge_index.tolist(), data.edge_index.is_undirected
        ([[0, 1, 1, 2], [1, 0, 2, 1]], True)

        In a dataset pipeline, ``TUDataset(root, "MUTAG", pre_transform=PrepareGraph())``.
    """

    def __init__(self, reduce: str = "mean"):
        self.reduce = reduce
        self._steps = (RemoveSelfLoops(), ToUndirected(reduce=reduce))

    def forward(self, data: Data) -> Data:
        from torch_geometric import EdgeIndex

        for step in self._steps:
            data = step(data)
        for store in data.edge_stores:
            if "edge_index" not in store or store.is_bipartite():
                continue
            n = store.size(0)
            store.edge_index = EdgeIndex(store.edge_index, sparse_size=(n, n),
                                         sort_order="row", is_undirected=True)
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(reduce={self.reduce!r})"
