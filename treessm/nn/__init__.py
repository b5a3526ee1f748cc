"""Neural-network layers built on the tree scan."""
from .layers import DropPath, LayerNorm2d, Mlp, drop_path
from .tree_ssm import TreeSSM, raster_tree

__all__ = ["TreeSSM", "raster_tree", "DropPath", "drop_path", "LayerNorm2d", "Mlp"]
