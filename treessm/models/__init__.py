"""Backbones built from tree-SSM layers, with timm-style constructors, and the GrootVL
authors' weights in them; graph models of TreeGPSConv blocks."""
from .graph import GraphNet, LocalGlobalNet, graph_classifier, node_classifier
from .grootv import (FeatureInfo, GrootV, GrootVBlock, GrootVStage, count_flops,
                     grootv_base, grootv_small, grootv_tiny, take_indices)
from .grootvl_weights import (grootvl_to_treessm, load_grootvl_checkpoint,
                              read_grootvl_checkpoint, treessm_to_grootvl)

__all__ = ["GrootV", "GrootVBlock", "GrootVStage", "FeatureInfo", "count_flops",
           "take_indices", "grootv_tiny", "grootv_small", "grootv_base", "grootvl_to_treessm",
           "treessm_to_grootvl", "read_grootvl_checkpoint", "load_grootvl_checkpoint",
           "GraphNet", "LocalGlobalNet", "node_classifier", "graph_classifier"]
