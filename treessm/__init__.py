"""treessm: tree-topology state space models on any graph."""
from .typing import check_torch_version as _check_torch_version

_check_torch_version()  # an old torch fails here with the release needed, not deep inside

from .tree import Tree  # noqa: E402
from .ops import selective_tree_scan, tree_scan  # noqa: E402
from .topology import (  # noqa: E402
    GraphTopology, GridTopology, PreparedGraph, SequenceTopology, Topology, minimum_spanning_tree,
    prepare_graph)

#: the release of this installation (``CHANGELOG.md`` says what each release brought)
__version__ = "0.1.0"

__all__ = ["Tree", "tree_scan", "selective_tree_scan", "minimum_spanning_tree", "Topology",
           "GridTopology", "SequenceTopology", "GraphTopology", "PreparedGraph", "prepare_graph",
           "__version__"]

from . import nn, models, transforms  # noqa: E402,F401  (layers and backbones, built on the names above)

from .typing import WITH_TIMM as _WITH_TIMM  # noqa: E402

if _WITH_TIMM:  # GrootV in timm's registry whenever timm is installed (never an import error)
    from .integrations import timm as _timm_models  # noqa: E402,F401
