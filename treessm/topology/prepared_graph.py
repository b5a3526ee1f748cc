r"""A graph prepared once for tree layers: its undirected simple form and neighbour operator.

A tree layer reads a graph as undirected and simple (directions, repeated edges and
self-loops do not matter) and needs two things from it in every call: the candidate edges
of its spanning forest (each undirected edge once) and the symmetric adjacency that averages
each vertex's neighbours. Both depend only on ``edge_index`` (and ``edge_weight``), not on
the features, so they are computed once per graph (:func:`prepare_graph`) and reused by
every layer and every step that sees the same graph:

* explicitly -- pass the :class:`PreparedGraph` where ``edge_index`` goes;
* automatically -- :func:`prepare_graph` keeps the last few results keyed by the
  ``edge_index`` tensor itself (its identity and its version counter, which every in-place
  change advances), so the layers of one model, and the steps of full-batch training, share
  one preparation;
* in a dataset pipeline -- :class:`treessm.transforms.PrepareGraph` stores each graph's
  undirected simple form as an :class:`~torch_geometric.EdgeIndex` marked undirected and
  sorted, which batches keep and from which the preparation needs no sort.

``edge_index`` may be a ``[2, E]`` tensor, an :class:`~torch_geometric.EdgeIndex`, or a
sparse adjacency (``torch.sparse`` or torch-sparse's ``SparseTensor``, e.g. the ``adj_t`` of
:class:`torch_geometric.transforms.ToSparseTensor`), whose values are the edge weights.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch_geometric.utils import is_sparse, remove_self_loops, to_edge_index, to_undirected

from .._checks import check_bool, check_edge_index, check_int
from ..ops.sparse import square_csr

__all__ = ["PreparedGraph", "prepare_graph", "as_edge_index", "TensorKeyedCache", "REDUCES"]

REDUCES = ("mean", "min", "max", "sum")


def as_edge_index(edge_index, edge_weight: Optional[Tensor] = None
                  ) -> Tuple[Tensor, Optional[Tensor], bool]:
    """``(edge_index, edge_weight, prepared)`` of any of PyG's adjacency formats: a plain
    ``[2, E]`` tensor, an :class:`~torch_geometric.EdgeIndex` (``prepared`` when it is
    marked undirected and sorted by row) or a sparse adjacency, whose stored values become
    ``edge_weight`` unless one is given.

    Raises:
        TypeError: when ``edge_index`` is none of these.
    """
    from torch_geometric import EdgeIndex

    if isinstance(edge_index, EdgeIndex):
        prepared = bool(edge_index.is_undirected and edge_index.is_sorted_by_row)
        return edge_index.as_tensor(), edge_weight, prepared
    if is_sparse(edge_index):
        dims = edge_index.dim() if callable(getattr(edge_index, "dim", None)) else 2
        if dims != 2 or edge_index.size(0) != edge_index.size(1):
            raise ValueError(f"edge_index as a sparse adjacency must be a square [N, N] "
                             f"matrix with one value per edge, got size "
                             f"{list(edge_index.size())}")
        ei, values = to_edge_index(edge_index)
        if edge_weight is None and values is not None and values.dim() == 1:
            edge_weight = values
        return ei, edge_weight, False
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"edge_index must be a torch.Tensor of shape [2, E], an EdgeIndex, a "
                        f"sparse adjacency or a PreparedGraph, got {type(edge_index).__name__}")
    return edge_index, edge_weight, False


def _check_edge_values(value: Optional[Tensor], num_edges: int, device, name: str,
                       scalar: bool) -> Optional[Tensor]:
    if value is None:
        return None
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    shape = "[E]" if scalar else "[E] or [E, F]"
    if value.dim() not in ((1,) if scalar else (1, 2)) or value.shape[0] != num_edges:
        raise ValueError(f"{name} must have shape {shape} with E = {num_edges}, got "
                         f"{list(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} must be on the device of edge_index ({device}), got "
                         f"{value.device}")
    return value


class PreparedGraph:
    r"""The undirected simple form of a graph over ``num_nodes`` vertices, computed once
    (:func:`prepare_graph`) and passed to tree layers in place of ``edge_index``.

    Attributes:
        num_nodes (int): :math:`N`.
        edge_index (LongTensor [2, M]): each undirected edge once, as ``row < col``, in
            ascending ``(row, col)`` order, without self-loops: the candidate edges of a
            spanning forest.
        edge_weight (Tensor [M] or None): the weight of each of those edges (repeated copies
            averaged).
        edge_attr (Tensor [M] or [M, F] or None): their features (repeated copies reduced
            by the ``reduce`` given to :func:`prepare_graph`).
        adjacency (Tensor): the symmetric adjacency :math:`W` as a sparse CSR ``[N, N]``
            tensor (entries the edge weights, ones without), float32.
        degree (Tensor [N]): :math:`W \mathbf{1}`, float32.

    The neighbour mean of features ``u [N, C]`` is :math:`D^{-1} W u` with
    :math:`D = \mathrm{diag}(\mathrm{degree})` (zero rows for isolated vertices).

    Args:
        fields: the attributes above, as :func:`prepare_graph` computes them (build one
            with :func:`prepare_graph`, not by hand).

    Shapes:
        - **edge_index:** :math:`(2, M)` for :math:`M` undirected edges
        - **edge_weight:** :math:`(M)`; **edge_attr:** :math:`(M)` or :math:`(M, F)`
        - **adjacency:** :math:`(N, N)`; **degree:** :math:`(N)`

    Raises:
        ValueError: when a layer is given a prepared graph over another number of vertices
            than its features have rows.

    Example:
        >>> graph = prepare_graph(torch.tensor([[0, 1, 2], [1, 0, 1]]))
        >>> graph.num_nodes, graph.edge_index.tolist(), graph.degree.tolist()
        (3, [[0, 1], [1, 2]], [1.0, 2.0, 1.0])
    """

    __slots__ = ("num_nodes", "edge_index", "edge_weight", "edge_attr", "adjacency", "degree",
                 "_by_dtype", "__weakref__")

    def __init__(self, num_nodes: int, edge_index: Tensor, edge_weight: Optional[Tensor],
                 edge_attr: Optional[Tensor], adjacency: Tensor, degree: Tensor):
        self.num_nodes = num_nodes
        self.edge_index, self.edge_weight, self.edge_attr = edge_index, edge_weight, edge_attr
        self.adjacency, self.degree = adjacency, degree
        self._by_dtype = {}

    @property
    def device(self) -> torch.device:
        return self.edge_index.device

    @property
    def num_edges(self) -> int:
        """Undirected edges :math:`M`."""
        return self.edge_index.shape[1]

    def operator(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``(adjacency, 1 / degree)`` in ``dtype`` (isolated vertices: ``1 / degree`` is
        0), made once per dtype."""
        op = self._by_dtype.get(dtype)
        if op is None:
            adj = self.adjacency
            if adj.dtype != dtype:
                adj = square_csr(adj.crow_indices(), adj.col_indices(), adj.values().to(dtype),
                           self.num_nodes)
            deg = self.degree.to(dtype)
            inv = torch.where(deg > 0, 1.0 / deg.clamp(min=torch.finfo(dtype).tiny),
                              torch.zeros_like(deg))
            op = self._by_dtype[dtype] = (adj, inv)
        return op

    def to(self, device, non_blocking: bool = False) -> "PreparedGraph":
        """The same graph on ``device``."""
        device = torch.device(device)
        if device == self.device:
            return self
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PreparedGraph(self.num_nodes, mv(self.edge_index), mv(self.edge_weight),
                             mv(self.edge_attr), self.adjacency.to(device),
                             mv(self.degree))

    def check(self, x: Tensor, name: str = "x") -> None:
        """Raise a :class:`ValueError` unless the graph is over the rows of ``x``, on its
        device."""
        if x.shape[0] != self.num_nodes:
            raise ValueError(f"the prepared graph has {self.num_nodes} vertices but {name} has "
                             f"{x.shape[0]} rows; prepare the graph of these features")
        if x.device != self.device:
            raise ValueError(f"the prepared graph is on {self.device} but {name} is on "
                             f"{x.device}; move it with graph.to(device)")

    def __reduce__(self):
        # a sparse CSR tensor does not pickle: store its index arrays and rebuild it
        adj = self.adjacency
        return (_rebuild_prepared_graph,
                (self.num_nodes, self.edge_index, self.edge_weight, self.edge_attr,
                 adj.crow_indices(), adj.col_indices(), adj.values(), self.degree))

    def __repr__(self) -> str:
        extra = "".join(f", {k}=[{', '.join(map(str, getattr(self, k).shape))}]"
                        for k in ("edge_weight", "edge_attr") if getattr(self, k) is not None)
        return (f"PreparedGraph(num_nodes={self.num_nodes}, num_edges={self.num_edges}"
                f"{extra})")


def _rebuild_prepared_graph(num_nodes, edge_index, edge_weight, edge_attr, crow, col, values,
                            degree) -> PreparedGraph:
    return PreparedGraph(num_nodes, edge_index, edge_weight, edge_attr,
                         square_csr(crow, col, values, num_nodes), degree)


def _already_simple(edge_index: Tensor, num_nodes: int) -> bool:
    """Whether a symmetric ``edge_index`` is strictly ascending in ``(row, col)`` (sorted
    and without repeats) and free of self-loops: then it is its own undirected simple form."""
    row, col = edge_index
    if edge_index.shape[1] == 0:
        return True
    key = row * num_nodes + col
    return not bool((row == col).any()) and bool((key[1:] > key[:-1]).all())


def _prepare(edge_index: Tensor, num_nodes: int, edge_weight: Optional[Tensor],
             edge_attr: Optional[Tensor], reduce: str, symmetric_sorted: bool
             ) -> PreparedGraph:
    device = edge_index.device
    if not (symmetric_sorted and _already_simple(edge_index, num_nodes)):
        ei, w = remove_self_loops(edge_index, edge_weight)
        attr = None
        if edge_attr is not None:
            ei_a, attr = remove_self_loops(edge_index, edge_attr)
            _, attr = to_undirected(ei_a, attr.float() if not attr.is_floating_point() else attr,
                                    num_nodes=num_nodes, reduce=reduce)
        if w is not None:
            ei, w = to_undirected(ei, w, num_nodes=num_nodes, reduce="mean")
        else:
            ei = to_undirected(ei, num_nodes=num_nodes)
        edge_index, edge_weight, edge_attr = ei, w, attr
    # edge_index: symmetric, ascending (row, col), no self-loops or repeats
    row, col = edge_index
    values = (torch.ones(row.shape[0], device=device) if edge_weight is None
              else edge_weight.detach().float())
    crow = torch._convert_indices_from_coo_to_csr(row, num_nodes)
    adjacency = square_csr(crow, col, values, num_nodes)
    degree = torch.zeros(num_nodes, device=device).index_add_(0, row, values)
    once = row < col
    return PreparedGraph(num_nodes, edge_index[:, once],
                         None if edge_weight is None else edge_weight[once],
                         None if edge_attr is None else edge_attr[once], adjacency, degree)


class TensorKeyedCache:
    """The last few values derived from tensors, keyed by the identity and version counter
    of those tensors (plus hashable ``extra`` keys); an entry goes when its first tensor is
    freed. A tensor changed in place (its version counter advances) or another tensor with
    the same contents is never served the value: only the same, unchanged tensor is.

    Args:
        size (int): values kept at most, the least recently used ones dropped first.
            (default: ``8``)
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(tensors, extra) -> tuple:
        return extra + tuple(
            (None, None) if t is None else (id(t), getattr(t, "_version", 0)) for t in tensors)

    def get(self, tensors: tuple, extra: tuple = ()):
        """The value kept for ``tensors`` (a tuple of tensors or ``None``) and ``extra`` (a
        tuple of hashable values), else ``None``."""
        key = self._key(tensors, extra)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            refs, value = entry
            # ids are reused once a tensor is freed: the weak references say it is the same
            if any((r is None) != (t is None) or (r is not None and r() is not t)
                   for r, t in zip(refs, tensors)):
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, tensors: tuple, extra: tuple, value) -> None:
        """Keep ``value`` for ``tensors`` and ``extra``."""
        key = self._key(tensors, extra)

        def drop(_ref, key=key, cache=weakref.ref(self)):
            c = cache()
            if c is not None:
                with c._lock:
                    c._entries.pop(key, None)

        try:
            refs = tuple(None if t is None else weakref.ref(t, drop if i == 0 else None)
                         for i, t in enumerate(tensors))
        except TypeError:  # a tensor type without weak references: not cached
            return
        with self._lock:
            self._entries[key] = (refs, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE = TensorKeyedCache()


def prepare_graph(edge_index, num_nodes: Optional[int] = None,
                  edge_weight: Optional[Tensor] = None, edge_attr: Optional[Tensor] = None,
                  reduce: str = "mean", cache: bool = True) -> PreparedGraph:
    r"""The undirected simple form of a graph and its neighbour-averaging operator, computed
    once for every tree layer and step that sees the graph.

    Directions, repeated edges and self-loops are dropped; the weight of an undirected edge
    is the mean of its copies' ``edge_weight`` (both directions included), its features the
    ``reduce`` of their ``edge_attr``. No gradient flows into ``edge_weight``.

    Args:
        edge_index (LongTensor [2, E], EdgeIndex or sparse adjacency): the graph; a sparse
            adjacency's values are its edge weights.
        num_nodes (int, optional): :math:`N`; by default ``edge_index.max() + 1`` (the
            sparse size of an ``EdgeIndex`` or sparse adjacency when it has one).
            (default: ``None``)
        edge_weight (Tensor [E], optional): positive, finite edge weights. (default:
            ``None``)
        edge_attr (Tensor [E] or [E, F], optional): edge features. (default: ``None``)
        reduce (str): how repeated copies' ``edge_attr`` combine: ``"mean"``, ``"min"``,
            ``"max"`` or ``"sum"``. (default: ``"mean"``)
        cache (bool): reuse (and keep) the result for the same ``edge_index``,
            ``edge_weight`` and ``edge_attr`` tensors, unchanged since (their version
            counters); a mutation that bypasses the counter (writes through ``.data`` or a
            NumPy view) is not seen, so prepare such graphs with ``cache=False``.
            (default: ``True``)

    Returns:
        :class:`PreparedGraph`

    Shapes:
        - **input:** edge indices :math:`(2, E)`, edge weights :math:`(E)` (optional), edge
          features :math:`(E)` or :math:`(E, F)` (optional)
        - **output:** a graph of :math:`M \le E` undirected edges (see
          :class:`PreparedGraph`)

    Raises:
        TypeError, ValueError: on an ``edge_index``, ``edge_weight`` or ``edge_attr`` of the
            wrong type, shape, dtype or device, vertex ids outside ``[0, num_nodes)``, or
            edge weights that are not positive and finite.

    Example:
        >>> graph = prepare_graph(torch.tensor([[0, 1, 1], [1, 0, 2]]), num_nodes=4)
        >>> graph.edge_index
        tensor([[0, 1],
                [1, 2]])
    """
    if not isinstance(reduce, str) or reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    cache = check_bool(cache, "cache")
    if isinstance(edge_index, PreparedGraph):
        if num_nodes is not None and num_nodes != edge_index.num_nodes:
            raise ValueError(f"num_nodes is {num_nodes} but the prepared graph has "
                             f"{edge_index.num_nodes} vertices")
        if edge_weight is not None or edge_attr is not None:
            raise ValueError("edge_weight and edge_attr cannot be added to a PreparedGraph; "
                             "pass them when preparing it")
        return edge_index
    source = edge_index
    size = getattr(edge_index, "sparse_size", None)  # an EdgeIndex's, when it knows it
    if callable(size):
        size = size(0) if isinstance(size(0), int) else None
    elif is_sparse(edge_index):
        size = int(edge_index.size(0))
    if num_nodes is None:
        num_nodes = size
    elif size is not None and check_int(num_nodes, "num_nodes", 0) != size:
        raise ValueError(f"edge_index is an adjacency over {size} vertices, but num_nodes "
                         f"(the rows of the features) is {int(num_nodes)}")
    ei, weight, symmetric_sorted = as_edge_index(edge_index, edge_weight)
    if num_nodes is None:
        if not isinstance(ei, Tensor) or ei.dim() != 2:
            raise ValueError("edge_index must have shape [2, E]")
        num_nodes = int(ei.max()) + 1 if ei.numel() else 0
    num_nodes = check_int(num_nodes, "num_nodes", 0)
    keys = (source, edge_weight, edge_attr)
    if cache:
        hit = _CACHE.get(keys, (num_nodes, reduce))
        if hit is not None:
            return hit
    ei = check_edge_index(ei, num_nodes)
    if isinstance(weight, Tensor) and not weight.is_floating_point():
        raise TypeError(f"edge_weight must be a floating-point tensor, got {weight.dtype} (a "
                        f"batch vector goes by keyword: batch=...)")
    weight = _check_edge_values(weight, ei.shape[1], ei.device, "edge_weight", scalar=True)
    if weight is not None:
        if weight.numel() and not bool(((weight > 0) & torch.isfinite(weight)).all()):
            raise ValueError("edge_weight must be positive and finite")
    edge_attr = _check_edge_values(edge_attr, ei.shape[1], ei.device, "edge_attr", scalar=False)
    with torch.no_grad():
        graph = _prepare(ei, num_nodes, None if weight is None else weight.detach(),
                         None if edge_attr is None else edge_attr.detach(), reduce,
                         symmetric_sorted)
    if cache:
        _CACHE.put(keys, (num_nodes, reduce), graph)
    return graph
