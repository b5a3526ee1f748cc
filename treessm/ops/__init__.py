"""Tree-scan operators: dispatcher, autograd, plans and backends."""
from . import cuda, plan, reference
from .tree_scan import BACKENDS, DIRECTIONS, available_backends, tree_scan

__all__ = ["tree_scan", "DIRECTIONS", "BACKENDS", "available_backends", "cuda", "plan",
           "reference"]
