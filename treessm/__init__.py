"""treessm: tree-topology state space models on any graph."""
from .tree import Tree
from .ops import tree_scan
from .topology import (GraphTopology, GridTopology, PreparedGraph, SequenceTopology, Topology,
                       minimum_spanning_tree, prepare_graph)

__version__ = "0.1.0"

__all__ = ["Tree", "tree_scan", "minimum_spanning_tree", "Topology", "GridTopology",
           "SequenceTopology", "GraphTopology", "PreparedGraph", "prepare_graph", "__version__"]

from . import nn, models, transforms  # noqa: E402,F401  (layers and backbones, built on the names above)
