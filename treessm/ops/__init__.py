"""Tree-scan operators: dispatcher, autograd, plans and backends."""
from . import cuda, plan, reference
from .cpu_arrays import release_workspace, workspace_bytes
from .selective_scan import selective_tree_scan, selective_tree_scan_ref
from .tree_scan import BACKENDS, DIRECTIONS, available_backends, tree_scan

__all__ = ["tree_scan", "DIRECTIONS", "BACKENDS", "available_backends", "cuda", "plan",
           "reference", "selective_tree_scan", "selective_tree_scan_ref", "release_workspace",
           "workspace_bytes"]
