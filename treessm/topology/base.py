r"""The :class:`Topology` base class: from features to a rooted spanning forest.

A topology turns the features of a batch (images, sentences, graphs, point clouds)
into a :class:`~treessm.Tree` in four overridable steps:

1. :meth:`Topology.candidate_edges` -- the graph the tree may use, ``(edge_index, batch,
   num_nodes)``;
2. :meth:`Topology.edge_cost` -- a dissimilarity per candidate edge from the features
   (:mod:`treessm.topology.distance`);
3. :meth:`Topology.spanning_tree` -- the minimum spanning forest of those costs
   (:func:`~treessm.minimum_spanning_tree`: ties go to the lower edge index, so the tree
   is unique);
4. :meth:`Topology.roots` -- the preferred root of each example; a component without one
   is rooted at its lowest vertex id.

``__call__`` runs them under ``torch.no_grad`` and lays the forest out breadth-first.
A subclass states its input signature by overriding ``__call__`` (and calling
``super().__call__``) and implements :meth:`candidate_edges` and, if it has a root rule,
:meth:`roots`. See ``docs/topologies.md``.

Tree construction is host code (compiled kernels, data-dependent sizes), so the library's
``__call__`` methods are excluded from :func:`torch.compile` graphs
(:func:`torch.compiler.disable`): a compiled model runs them eagerly between its graphs,
and a model given its tree compiles into one graph.

Features on an accelerator are laid out where they live, by
:func:`treessm.topology.euler_tour.spanning_tree_on_device` (no host round-trip); a
subclass with its own :meth:`Topology.spanning_tree` is solved on the CPU and moved.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..tree import Tree
from .cuda_grid import pair_costs_cuda
from .distance import Distance, check_distance, edge_cost, pair_costs_cpu
from .captured import captured_build
from .euler_tour import spanning_tree_on_device
from .layout import lattice_offsets
from .mst import minimum_spanning_tree, segments
from .prepared_graph import TensorKeyedCache
from .rooting import forest_tree_on_cpu, spanning_tree_on_cpu

__all__ = ["Topology", "Plan", "Candidates", "BoundedCache", "CandidateCache"]


class Plan(NamedTuple):
    """CPU view of a candidate graph: int64 endpoints, the split into examples
    (``node_ptr [S + 1]``, ``edge_ptr [S + 1]``) that lets examples be solved in parallel,
    and the id offsets of a lattice-like graph (:func:`~treessm.topology.rooting.lattice_offsets`;
    ``None`` for general graphs)."""

    src: np.ndarray
    dst: np.ndarray
    node_ptr: np.ndarray
    edge_ptr: np.ndarray
    offsets: Optional[np.ndarray] = None


def make_plan(edge_index: Tensor, batch: Optional[Tensor], num_nodes: int) -> Plan:
    ei = edge_index.detach().to("cpu", torch.int64).numpy()
    src = np.ascontiguousarray(ei[0])
    dst = np.ascontiguousarray(ei[1])
    b = None if batch is None else batch.detach().to("cpu", torch.int64).numpy()
    node_ptr, edge_ptr = segments(num_nodes, src, dst, b)
    return Plan(src, dst, node_ptr, edge_ptr)


# What depends on a candidate graph alone, for candidates that come back as the same tensor
# (a prepared graph's edges, in every layer and step of full-batch training): the CPU plan
# (per ``batch``), and for the device builder the number of trees and the size of the
# largest, which are those of the graph's connected components whatever the costs and
# roots, so that later builds need not ask the device.
_PLANS = TensorKeyedCache()
_DEVICE_HINTS = TensorKeyedCache()


class Candidates:
    """Candidate graph of a batch of equally shaped examples (images of one size, sequences
    of one length), with its CPU plan and what the builders need to know of it.

    Args:
        edges (ndarray [2, E]): int64 candidate edges; example ``b`` owns the vertices
            ``[b * n, (b + 1) * n)`` and the ``b``-th contiguous block of edges.
        num_examples (int): ``B``.
        example_size (int): vertices per example ``n``.
        root (int): local id of every example's root.
        device: device of the tensors.
        shape (tuple): the example grid, e.g. ``(B, H, W)``.
    """

    __slots__ = ("edge_index", "batch", "roots", "root_flags", "plan", "shape", "hints")

    def __init__(self, edges: np.ndarray, num_examples: int, example_size: int, root: int,
                 device, shape: tuple):
        per_example = edges.shape[1] // max(num_examples, 1)
        starts = np.arange(num_examples + 1, dtype=np.int64)
        self.plan = Plan(np.ascontiguousarray(edges[0]), np.ascontiguousarray(edges[1]),
                         starts * example_size, starts * per_example,
                         lattice_offsets(edges[0, :per_example], edges[1, :per_example]))
        self.edge_index = torch.from_numpy(edges).to(device)
        self.batch = torch.arange(num_examples, device=device).repeat_interleave(example_size)
        self.roots = torch.arange(num_examples, device=device) * example_size + root
        self.root_flags = np.zeros(num_examples * example_size, np.bool_)
        self.root_flags[starts[:-1] * example_size + root] = True
        self.shape = shape
        # each example is one tree: the device builder need not count them
        self.hints = (dict(num_trees=num_examples, max_tree_size=example_size)
                      if num_examples * example_size else {})


class BoundedCache:
    """The most recently used values per key: at most ``max_entries`` of them, and at most
    ``max_weight`` of their weights together (a value heavier than that is not kept).

    Safe to share between threads. The values are derived data: a copy or a pickle of the
    cache (of a module holding a topology, for an EMA copy or ``torch.save``) starts empty.

    Args:
        max_entries (int): values kept at most.
        max_weight (int, optional): total weight kept at most, e.g. vertices or edges, so
            that a few very large values do not stay in memory. (default: no bound)
        weigh (callable, optional): the weight of a value. (default: ``0`` for all)
    """

    def __init__(self, max_entries: int, max_weight: Optional[int] = None,
                 weigh: Optional[Callable[[object], int]] = None):
        self.max_entries = max_entries
        self.max_weight = max_weight
        self.weigh = weigh
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()  # key -> (value, weight)
        self._weight = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def weight(self) -> int:
        """Total weight of the values kept."""
        return self._weight

    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in ("max_entries", "max_weight", "weigh")}

    def __setstate__(self, state: dict) -> None:
        BoundedCache.__init__(self, **state)

    def get(self, key: tuple, make: Callable[[], object]):
        """The value kept for ``key``, else ``make()`` (kept unless too heavy)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
        value = make()  # outside the lock: other keys need not wait
        weight = 0 if self.weigh is None else int(self.weigh(value))
        if self.max_weight is not None and weight > self.max_weight:
            return value
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:  # another thread was first
                return entry[0]
            self._entries[key] = (value, weight)
            self._weight += weight
            self._added(value)
            while len(self._entries) > self.max_entries or (
                    self.max_weight is not None and self._weight > self.max_weight):
                _, (old, old_weight) = self._entries.popitem(last=False)
                self._weight -= old_weight
                self._evicted(old)
        return value

    def _added(self, value) -> None:
        """Called, under the lock, for every value kept."""

    def _evicted(self, value) -> None:
        """Called, under the lock, for every value that leaves."""


def _num_edges(candidates: "Candidates") -> int:
    return candidates.edge_index.shape[1]


class CandidateCache(BoundedCache):
    """Candidate graphs (:class:`Candidates`) of a fixed-shape topology, kept per key
    (shape, device): the ``size`` most recently used ones, with at most ``max_edges``
    candidate edges together; :meth:`lookup` finds the entry an ``edge_index`` tensor came
    from, so later steps reuse its CPU plan."""

    def __init__(self, size: int = 16, max_edges: int = 2 ** 25):
        super().__init__(size, max_edges, _num_edges)
        self._by_id = {}

    @property
    def size(self) -> int:
        return self.max_entries

    def __getstate__(self) -> dict:
        return {"size": self.max_entries, "max_edges": self.max_weight}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _added(self, value: Candidates) -> None:
        self._by_id[id(value.edge_index)] = value

    def _evicted(self, value: Candidates) -> None:
        self._by_id.pop(id(value.edge_index), None)

    def lookup(self, edge_index: Tensor) -> Optional[Candidates]:
        with self._lock:
            entry = self._by_id.get(id(edge_index))
        return entry if entry is not None and entry.edge_index is edge_index else None


class Topology:
    r"""Base class of tree topologies: candidate edges, edge costs, minimum spanning
    forest, roots, breadth-first layout.

    .. math::
        T = \mathrm{MSF}\big(G_{\mathrm{cand}},\ c(u, v) = d(x_u, x_v)\big),
        \quad \text{rooted by the root rule}

    Args:
        distance (str or callable): ``"cosine"`` (:math:`\exp(-\cos(x_u, x_v))`), ``"l2"``
            or ``f(feat_u [E, C], feat_v [E, C]) -> cost [E]``. (default: ``"cosine"``)

    The construction is deterministic: the same features give the same tree (costs tie
    -> lower edge index wins) and carries no gradient. A subclass implements
    :meth:`candidate_edges` (and, optionally, :meth:`roots`, :meth:`edge_cost`,
    :meth:`spanning_tree`) and states its input signature by overriding ``__call__``
    (``docs/topologies.md`` works through one for point clouds).

    Shapes:
        - **input:** features whose rows, after flattening the leading dimensions to
          :math:`N` vertices, are compared by ``distance``, plus what
          :meth:`candidate_edges` reads
        - **output:** a :class:`~treessm.Tree` over :math:`N` vertices

    Returns:
        Calling a topology returns the :class:`~treessm.Tree` of the minimum spanning forest
        of its candidate graph, rooted and laid out breadth-first.

    Raises:
        TypeError, ValueError: from ``distance`` (not a known name or a callable), from
            :meth:`candidate_edges` on malformed inputs, when :meth:`edge_cost` returns
            other than one cost per candidate edge, or on non-finite costs.

    Example:
        >>> class Ring(Topology):                      # one cycle over the vertices
        ...     def candidate_edges(self, feat):
        ...         n = feat.shape[0]
        ...         src = torch.arange(n)
        ...         return torch.stack([src, (src + 1) % n]), None, n
        >>> tree = Ring()(torch.randn(6, 4))
        >>> tree.num_nodes, tree.num_trees
        (6, 1)
    """

    def __init__(self, distance: Distance = "cosine"):
        self.distance = check_distance(distance)
        # candidate graphs of fixed-shape inputs, reused across calls
        self._cache = CandidateCache()

    # ------------------------------------------------------------------ steps
    def candidate_edges(self, feat: Tensor, *args, **kwargs
                        ) -> Tuple[Tensor, Optional[Tensor], int]:
        """Validate the inputs and return the candidate graph.

        Returns:
            ``(edge_index [2, E], batch [N] or None, num_nodes)`` on the device of the
            features. Each example's vertices form a contiguous id range and its edges a
            contiguous block where possible, which lets the CPU solve examples in parallel.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement candidate_edges")

    def edge_cost(self, feat: Tensor, edge_index: Tensor) -> Tensor:
        """Cost of each candidate edge from the features ``feat [N, C]`` of its ends."""
        if isinstance(self.distance, str) and feat.device.type == "cpu":
            plan = self._plan(edge_index, None, feat.shape[0])
            return pair_costs_cpu(feat, plan.src, plan.dst, self.distance)
        if isinstance(self.distance, str):
            cost = pair_costs_cuda(feat, edge_index, self.distance)
            if cost is not None:
                return cost
        return edge_cost(feat, edge_index, self.distance)

    def spanning_tree(self, edge_index: Tensor, cost: Tensor, num_nodes: int) -> Tensor:
        """Mask ``[E]`` of the edges of the minimum spanning forest of ``cost``."""
        return minimum_spanning_tree(edge_index, cost, num_nodes)

    def roots(self, feat: Tensor, *args, **kwargs) -> Optional[Tensor]:
        """Preferred root vertex of each example (``LongTensor [B]``), or ``None`` to root
        every component at its lowest vertex id."""
        return None

    # ------------------------------------------------------------------ pipeline
    @torch.compiler.disable
    def __call__(self, feat: Tensor, *args, **kwargs) -> Tree:
        with torch.no_grad():
            edge_index, batch, num_nodes = self.candidate_edges(feat, *args, **kwargs)
            x = feat.detach()
            # vertices first, channels flattened
            x = x.reshape(num_nodes, -1) if x.numel() else x.reshape(num_nodes, 0)
            cost = self.edge_cost(x, edge_index)
            if not isinstance(cost, Tensor) or cost.shape != (edge_index.shape[1],):
                got = list(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__
                raise ValueError(f"edge_cost must return a tensor of shape "
                                 f"[{edge_index.shape[1]}], got {got}")
            roots = self.roots(feat, *args, **kwargs)
            if roots is not None and not isinstance(roots, Tensor):
                roots = torch.as_tensor(roots, dtype=torch.long, device=edge_index.device)
            if batch is None:
                batch = torch.zeros(num_nodes, dtype=torch.long, device=edge_index.device)
            return self._build(edge_index, cost, num_nodes, roots, batch)

    def _plan(self, edge_index: Tensor, batch: Optional[Tensor], num_nodes: int) -> Plan:
        """CPU plan of a candidate graph (cached for the topology's own candidates)."""
        entry = self._cache.lookup(edge_index)
        if entry is not None:
            return entry.plan
        plan = _PLANS.get((edge_index, batch), (num_nodes,))
        if plan is None:
            plan = make_plan(edge_index, batch, num_nodes)
            _PLANS.put((edge_index, batch), (num_nodes,), plan)
        return plan

    def _build(self, edge_index: Tensor, cost: Tensor, num_nodes: int,
               roots: Optional[Tensor], batch: Optional[Tensor]) -> Tree:
        device = edge_index.device
        custom_mst = type(self).spanning_tree is not Topology.spanning_tree
        if device.type != "cpu" and not custom_mst:
            return self._build_on_device(edge_index, cost, num_nodes, roots, batch)
        plan = self._plan(edge_index, batch, num_nodes)
        b = None if batch is None else batch.detach().cpu()
        r = None if roots is None else roots.detach().cpu()
        if custom_mst:
            mask = self.spanning_tree(edge_index, cost, num_nodes)
            mask = mask.detach().to("cpu", torch.bool).numpy()
            tree = forest_tree_on_cpu(plan.src, plan.dst, mask, num_nodes, r, b, plan.node_ptr,
                                      plan.edge_ptr, plan.offsets)
        else:
            if not cost.is_floating_point():
                raise TypeError(f"edge costs must be floating point, got {cost.dtype}")
            try:
                tree = spanning_tree_on_cpu(plan.src, plan.dst, cost.detach().cpu(), num_nodes,
                                            r, b, plan.node_ptr, plan.edge_ptr, plan.offsets)
            except ValueError as exc:
                raise ValueError(f"{exc}; check the features for NaN or infinite values"
                                 ) from None
        return tree.to(device)

    def _build_on_device(self, edge_index: Tensor, cost: Tensor, num_nodes: int,
                         roots: Optional[Tensor], batch: Optional[Tensor]) -> Tree:
        """The tree built where the tensors live, with the candidate graph's size hints
        (so that nothing waits for the device)."""
        entry = self._cache.lookup(edge_index)
        hints = (entry.hints if entry is not None
                 else _DEVICE_HINTS.get((edge_index,), (num_nodes,)))
        if hints is not None:  # sizes known: nothing waits, and small graphs replay
            tree = captured_build(edge_index, cost, num_nodes, roots, batch, hints)
            if tree is not None:
                return tree
        tree = spanning_tree_on_device(edge_index, cost, num_nodes, roots, batch,
                                       **(hints or {}))
        if hints is None and entry is None and num_nodes and tree.max_tree_size is not None:
            _DEVICE_HINTS.put((edge_index,), (num_nodes,),
                              dict(num_trees=tree.num_trees, max_tree_size=tree.max_tree_size))
        return tree

    # ------------------------------------------------------------------ display
    def extra_repr(self) -> str:
        return f"distance={_distance_repr(self.distance)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def _distance_repr(distance) -> str:
    if isinstance(distance, str):
        return repr(distance)
    return getattr(distance, "__name__", type(distance).__name__)
