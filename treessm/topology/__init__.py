"""Tree topologies: candidate edges, edge costs, minimum spanning forests, rooting.

Everything here runs without autograd; a :class:`Topology` turns features into a
:class:`~treessm.Tree` that the tree-scan operators consume.
"""
from .base import Topology
from .graph import GraphTopology
from .grid import GridTopology
from .mst import minimum_spanning_tree
from .rooting import root_forest
from .sequence import SequenceTopology

__all__ = [
    "Topology",
    "GridTopology",
    "SequenceTopology",
    "GraphTopology",
    "minimum_spanning_tree",
    "root_forest",
]
