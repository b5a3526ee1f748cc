"""Tree topologies: candidate edges, edge costs, minimum spanning forests, rooting.

Everything here runs without autograd; a :class:`Topology` turns features into a
:class:`~treessm.Tree` that the tree-scan operators consume. One function per way of
making a tree:

* :meth:`treessm.Tree.from_parent` -- from a parent array;
* :func:`tree_from_edges` -- from the edges of a forest (rooted by :func:`root_forest`);
* :func:`chain_tree` -- chains (sequences, raster scans);
* :class:`CausalSequenceTopology` -- each token below the most similar of the few before it;
* a :class:`Topology` -- the minimum spanning forest of candidate edges weighted by feature
  distance (:class:`GridTopology`, :class:`SequenceTopology`, :class:`GraphTopology`),
  built on the CPU (:func:`~treessm.topology.rooting.spanning_tree_on_cpu`), on the
  features' device (:func:`~treessm.topology.euler_tour.spanning_tree_on_device`) or, for
  image grids on CUDA, by fused kernels (:mod:`treessm.topology.cuda_grid`).

:func:`tree_partition` cuts a graph into parts along a spanning forest, for mini-batches.
"""
from .base import Topology
from .graph import GraphTopology
from .grid import GridTopology
from .mst import minimum_spanning_tree
from .partition import tree_partition
from .prepared_graph import PreparedGraph, prepare_graph
from .rooting import root_forest, tree_from_edges
from .sequence import CausalSequenceTopology, GrootLTopology, SequenceTopology, chain_tree

__all__ = [
    "Topology",
    "GridTopology",
    "SequenceTopology",
    "CausalSequenceTopology",
    "GrootLTopology",
    "GraphTopology",
    "PreparedGraph",
    "prepare_graph",
    "minimum_spanning_tree",
    "root_forest",
    "tree_from_edges",
    "chain_tree",
    "tree_partition",
]
