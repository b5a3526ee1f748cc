r"""Spanning-tree builds replayed from CUDA graphs.

A graph layer builds the spanning forest of one graph in every layer of every step, each
time with new edge costs. Once the graph's sizes are known (its number of trees and the
largest, which the first build records),
:func:`~treessm.topology.euler_tour.spanning_tree_on_device` waits for nothing, so its
launches -- a few hundred, each a few microseconds of the host's time -- can be recorded
once in a CUDA graph and replayed for every new cost vector. On a
graph of 10^4 or 10^5 vertices, or a batch of large images, those launches are most of the
build's time; on larger graphs the device's own work is, and a graph gains little while its
memory pool (the build's intermediate tensors, kept between replays) grows with the graph.
So only graphs of at most :data:`CAPTURE_MAX_EDGES` candidate edges are captured (32 images
of 224 x 224 pixels have 3.2 million, 4 of 512 x 512 2.1 million).

:func:`captured_build` keeps one recording per candidate graph (the same ``edge_index``
tensor, unchanged: an in-place change or another tensor records anew), at most
:data:`CAPTURED_BUILDS` of them. A replay returns copies of the recorded outputs, so a
tree handed out earlier never changes under its holder. Trees equal those of the eager
build, tensor for tensor. Nothing is recorded while the caller is itself capturing a CUDA
graph or compiling (the eager build then runs, and is itself captured), nor while
:func:`torch.cuda.set_sync_debug_mode` is set (a recording waits for the device once), or
where the recording fails (the eager build runs from then on for that graph).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.recorded import record_or_replay, register_recordings
from ..tree import Tree
from .euler_tour import spanning_tree_on_device
from .prepared_graph import TensorKeyedCache

__all__ = ["captured_build", "copied_tree", "CAPTURE_MAX_EDGES", "CAPTURED_BUILDS"]

#: Candidate edges of the largest graph whose build is recorded.
CAPTURE_MAX_EDGES = 1 << 22
#: Recorded builds kept at once (least recently used dropped first).
CAPTURED_BUILDS = 4

_BUILDS = TensorKeyedCache(size=CAPTURED_BUILDS)
register_recordings(_BUILDS.clear)


def copied_tree(tree: Tree, batch: Optional[Tensor] = None) -> Tree:
    """A recorded tree's copy (the next replay overwrites the recording's own tensors),
    with ``batch`` attached, or the recorded batch copied where ``batch`` is ``None``."""
    if batch is None and tree.batch is not None:
        batch = tree.batch.clone()
    return Tree(tree.parent.clone(), tree.order.clone(), tree.child_ptr.clone(),
                tree.tree_ptr.clone(), tree.depth.clone(), batch, num_levels=tree.num_levels,
                max_tree_size=tree.max_tree_size)


def captured_build(edge_index: Tensor, cost: Tensor, num_nodes: int, roots: Optional[Tensor],
                   batch: Optional[Tensor], hints: dict) -> Optional[Tree]:
    """``spanning_tree_on_device(edge_index, cost, num_nodes, roots, batch, **hints)`` from a
    recorded CUDA graph, or ``None`` where none is kept (a CPU tensor, a graph above
    :data:`CAPTURE_MAX_EDGES` edges, a caller that is capturing or compiling, a recording
    that failed, or none made yet while the caller has asked to hear of synchronisations).
    ``hints`` must hold ``num_trees`` (else the build would wait for the device), and
    ``roots`` and ``edge_index`` must not change between calls (a changed ``edge_index``
    is recorded anew; ``roots`` is part of the key)."""
    if hints.get("num_trees") is None or edge_index.shape[1] > CAPTURE_MAX_EDGES:
        return None
    extra = (num_nodes, cost.dtype, cost.device, tuple(sorted(hints.items())))

    def run(c: Tensor) -> Tree:
        return spanning_tree_on_device(edge_index, c, num_nodes, roots, None, **hints)

    tree = record_or_replay(lambda: _BUILDS.get((edge_index, roots), extra),
                            lambda recording: _BUILDS.put((edge_index, roots), extra,
                                                          recording), run, cost)
    return None if tree is None else copied_tree(tree, batch)
