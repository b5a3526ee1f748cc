"""Neural-network layers built on the tree scan."""
from .grootl import GrootLMixer
from .layers import DropPath, LayerNorm2d, Mlp, NarrowLinear, drop_path
from .selective_ssm import SelectiveSSM
from .tree_ssm import SelectiveTreeSSM, TreeSSM, raster_tree
from .tree_gps import TreeGPSConv, local_conv
from .tree_ssm_conv import TreeSSMConv

__all__ = ["TreeSSM", "TreeSSMConv", "TreeGPSConv", "local_conv", "GrootLMixer",
           "SelectiveSSM", "SelectiveTreeSSM", "raster_tree", "DropPath", "drop_path", "LayerNorm2d",
           "Mlp", "NarrowLinear"]
