"""Backbones built from tree-SSM layers, with timm-style constructors."""
from .grootv import (FeatureInfo, GrootV, GrootVBlock, GrootVStage, count_flops, grootv_base,
                     grootv_small, grootv_tiny)

__all__ = ["GrootV", "GrootVBlock", "GrootVStage", "FeatureInfo", "count_flops", "grootv_tiny",
           "grootv_small", "grootv_base"]
