"""Tree-scan operators: dispatcher, autograd and backends."""
from . import cuda, reference
from .tree_scan import BACKENDS, DIRECTIONS, available_backends, tree_scan

__all__ = ["tree_scan", "DIRECTIONS", "BACKENDS", "available_backends", "cuda", "reference"]
