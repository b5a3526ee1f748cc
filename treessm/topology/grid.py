"""Image grids: the minimum spanning tree of the 4- or 8-neighbour pixel graph.

Vertex ``b*H*W + i*W + j`` is pixel ``(i, j)`` of image ``b``. The candidate edges of an
image form one contiguous block, in this order (each part row-major):

1. horizontal ``(i, j) - (i, j+1)``,
2. vertical ``(i, j) - (i+1, j)``,
3. with 8-connectivity, diagonal ``(i, j) - (i+1, j+1)``,
4. and anti-diagonal ``(i, j+1) - (i+1, j)`` (cell ``(i, j)``),

so among equal costs a horizontal edge wins over a vertical one, and so on.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from numba import njit
from torch import Tensor

from .._checks import check_choice, check_features
from ..tree import Tree
from .base import Candidates, Topology
from ..ops.chunks import run_chunks
from .distance import (EPS, Distance, cpu_features, grid_costs_cpu, grid_costs_torch,
                       grid_image_costs, kind_code, safe_squares, scaled_rows)
from .layout import NO_MASK, NONFINITE, UNSCALED, Layout, empty_forest, layout_segment
from .mst import check_segment_sizes, kruskal_segment

__all__ = ["GridTopology", "grid_edges"]


def grid_edges(num_images: int, height: int, width: int, connectivity: int = 4) -> np.ndarray:
    """Candidate edges ``[2, E]`` (int64) of ``num_images`` grids, in the documented order."""
    idx = np.arange(height * width, dtype=np.int64).reshape(height, width)
    parts = [(idx[:, :-1], idx[:, 1:]), (idx[:-1, :], idx[1:, :])]
    if connectivity == 8:
        parts += [(idx[:-1, :-1], idx[1:, 1:]), (idx[:-1, 1:], idx[1:, :-1])]
    src = np.concatenate([a.reshape(-1) for a, _ in parts])
    dst = np.concatenate([b.reshape(-1) for _, b in parts])
    offset = (np.arange(num_images, dtype=np.int64) * (height * width))[:, None]
    return np.stack([(src[None, :] + offset).reshape(-1), (dst[None, :] + offset).reshape(-1)])


@njit(cache=True, nogil=True)
def _grid_build_chunk(b0, b1, x, cost, bits, nbits, h, w, diag, kind, eps, lo, hi, src, dst,
                      pref, offsets, mask, tree_u, tree_v, parent, order, child_ptr, depth,
                      tree_start, num_trees, status):
    """Costs, minimum spanning tree and layout of images ``[b0, b1)``, one image at a time:
    the image's data stays in cache from its features to its tree. An image whose pixels
    need scaling first (:func:`~treessm.topology.distance.grid_image_costs`) gets the status
    ``UNSCALED``."""
    flat = x.reshape(-1)
    c = x.shape[1]
    hw = h * w
    per_image = src.shape[0] // (parent.shape[0] // hw)
    for b in range(b0, b1):
        if not grid_image_costs(flat, c, b, h, w, diag, kind, eps, lo, hi, cost):
            status[b] = UNSCALED
            continue
        n0 = b * hw
        m = kruskal_segment(src, dst, bits, nbits, n0, n0 + hw, b * per_image,
                            (b + 1) * per_image, mask, tree_u, tree_v)
        if m < 0:
            status[b] = NONFINITE
            continue
        num_trees[b], status[b] = layout_segment(tree_u, tree_v, m, pref, n0, hw, offsets,
                                                 parent, order, child_ptr, depth, tree_start)


def _cuda_grid():
    """:mod:`treessm.topology.cuda_grid`, imported on first use (CPU-only runs never need it)."""
    from . import cuda_grid

    return cuda_grid


class GridTopology(Topology):
    r"""Minimum spanning tree of the pixel grid of each image (GrootV).

    Edge cost :math:`c(p, q) = d(x_p, x_q)` over 4- or 8-neighbour pixel pairs; one tree
    per image, rooted at its first pixel :math:`(0, 0)`, as in GrootVL, so that an edge's
    child is its end farther from that pixel.

    Args:
        connectivity (int): 4 or 8 neighbours. (default: ``4``)
        distance (str or callable): ``"cosine"``, ``"l2"`` or ``f(feat_u, feat_v) -> [E]``.
            (default: ``"cosine"``)

    Shapes:
        - **input:** features :math:`(B, H, W, C)`, channels last
        - **output:** a :class:`~treessm.Tree` over :math:`N = BHW` vertices, ``batch`` set

    Returns:
        Called on features, the :class:`~treessm.Tree` of the images' spanning trees, pixel
        ``(i, j)`` of image ``b`` being vertex ``b * H * W + i * W + j``.

    Raises:
        ValueError: if ``connectivity`` is not 4 or 8, or the features are not a
            ``[B, H, W, C]`` floating-point tensor with finite values.
        TypeError: if ``distance`` is neither a known name nor a callable.

    Example:
        >>> tree = GridTopology()(torch.randn(2, 8, 8, 16))
        >>> tree.num_nodes, tree.num_trees
        (128, 2)
    """

    def __init__(self, connectivity: int = 4, distance: Distance = "cosine"):
        super().__init__(distance)
        self.connectivity = check_choice(connectivity, "connectivity", (4, 8))

    @torch.compiler.disable
    def __call__(self, feat: Tensor) -> Tree:
        check_features(feat, 4, shape="[B, H, W, C]")
        if feat.shape[:3].numel() == 0:
            return empty_forest(feat.device)
        if isinstance(self.distance, str):
            device = feat.device.type
            if device == "cpu":
                if self._standard():
                    return self._build_fused(feat)
            elif device == "cuda" and self._standard_cuda():
                tree = self._build_fused_cuda(feat)
                if tree is not None:
                    return tree
        return super().__call__(feat)

    def _standard(self) -> bool:
        """Whether every step is this class's own, so the fused CPU kernel computes
        exactly what the steps would."""
        cls = type(self)
        return (cls.candidate_edges is GridTopology.candidate_edges
                and cls.edge_cost is GridTopology.edge_cost
                and cls.spanning_tree is Topology.spanning_tree
                and cls.roots is GridTopology.roots)

    def _standard_cuda(self) -> bool:
        """Whether the steps and the device builder are this class's own, so the fused
        CUDA kernels compute exactly what the generic path would."""
        cls = type(self)
        return (self._standard() and cls._build is Topology._build
                and cls._build_on_device is GridTopology._build_on_device)

    def _build_fused_cuda(self, feat: Tensor) -> Optional[Tree]:
        """Costs and tree in two fused kernel launches (CUDA, named distance), or ``None``
        when the kernels cannot build this shape. The per-call work is the validation of
        ``feat``, one cache look-up and the two op calls: nothing waits for the device."""
        entry = self._candidates(feat)
        b, h, w = entry.shape
        if not _cuda_grid().fused_ready(h, w, self.connectivity, feat.device):
            return None
        return _cuda_grid().grid_tree_from_features(feat, b, h, w, self.connectivity,
                                                    self.distance, entry.batch)

    def _build_fused(self, feat: Tensor) -> Tree:
        """All steps in one compiled pass per image (CPU, named distance)."""
        entry = self._candidates(feat)
        b, h, w = entry.shape
        check_segment_sizes(entry.plan.node_ptr, entry.plan.edge_ptr)
        with torch.no_grad():
            # the scale of l2 costs is of no matter here: they only order the edges
            x, _ = cpu_features(feat.reshape(b * h * w, feat.shape[-1]), self.distance, b)
        cost = np.empty(entry.plan.src.shape[0], x.dtype)
        bits = cost.view(np.uint32 if x.dtype == np.float32 else np.uint64)
        out = Layout(b * h * w, b)
        args = (cost, bits, 8 * x.itemsize, h, w, self.connectivity == 8,
                kind_code(self.distance), x.dtype.type(EPS), *safe_squares(x.dtype),
                entry.plan.src, entry.plan.dst, entry.root_flags, entry.plan.offsets, NO_MASK,
                *out.outputs())
        run_chunks(_grid_build_chunk, b, x, *args)
        if (out.status == UNSCALED).any():  # features too large or too small: scale them
            out.status[:] = 0
            run_chunks(_grid_build_chunk, b, scaled_rows(x), *args)
        try:
            return out.tree(entry.plan.node_ptr, entry.batch, feat.device)
        except ValueError as exc:
            raise ValueError(f"{exc}; check the features for NaN or infinite values") from None

    # ------------------------------------------------------------------ steps
    def _candidates(self, feat: Tensor) -> Candidates:
        check_features(feat, 4, shape="[B, H, W, C]")
        b, h, w, _ = feat.shape
        conn = self.connectivity
        return self._cache.get((b, h, w, conn, feat.device),
                               lambda: Candidates(grid_edges(b, h, w, conn), b, h * w, 0,
                                                  feat.device, (b, h, w)))

    def candidate_edges(self, feat: Tensor) -> Tuple[Tensor, Tensor, int]:
        """4- or 8-neighbour edges of each image (cached per shape and device)."""
        entry = self._candidates(feat)
        return entry.edge_index, entry.batch, entry.batch.shape[0]

    def edge_cost(self, feat: Tensor, edge_index: Tensor) -> Tensor:
        entry = self._cache.lookup(edge_index)
        if entry is not None and isinstance(self.distance, str):
            if feat.device.type == "cpu":
                # every pixel is read once for all of its edges
                return grid_costs_cpu(feat, *entry.shape, self.connectivity, self.distance)
            if feat.device.type == "cuda":
                # one fused kernel: each pixel's row is read about once for all its edges
                cost = _cuda_grid().grid_costs(feat, *entry.shape, self.connectivity,
                                               self.distance)
                if cost is not None:
                    return cost
            # elsewhere: shifted views of the image instead of gathering both ends of
            # every edge (which would write two [E, C] copies)
            return grid_costs_torch(feat, *entry.shape, self.connectivity, self.distance)
        return super().edge_cost(feat, edge_index)

    def roots(self, feat: Tensor) -> Tensor:
        """First pixel ``(0, 0)`` of each image."""
        return self._candidates(feat).roots

    def _build_on_device(self, edge_index, cost, num_nodes, roots, batch) -> Tree:
        # On CUDA, the fused kernel (one block per image) builds the same tree as the
        # steps. Images too large for one block take the generic device path with the
        # grid's own sizes (each image one tree of H * W pixels): fixed Borůvka rounds,
        # nothing waits, and small batches replay a recorded build.
        entry = self._cache.lookup(edge_index)
        if (entry is not None and cost.device.type == "cuda"
                and type(self).roots is GridTopology.roots):
            b, h, w = entry.shape
            tree = _cuda_grid().grid_spanning_tree(cost, b, h, w, self.connectivity, batch=batch)
            if tree is not None:
                return tree
        return super()._build_on_device(edge_index, cost, num_nodes, roots, batch)

    def extra_repr(self) -> str:
        return f"connectivity={self.connectivity}, {super().extra_repr()}"
