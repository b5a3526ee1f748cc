r"""Grid trees from one fused CUDA kernel: minimum spanning tree, rooting and plan per image.

For a batch of ``B`` images of ``H x W`` pixels whose candidate-edge costs are already on
the GPU, :func:`grid_spanning_tree` builds the whole :class:`~treessm.Tree` -- the same one
:class:`~treessm.GridTopology` builds on the CPU -- in one thread block per image, with
everything in shared memory:

1. **Minimum spanning tree** by Borůvka's algorithm over the keys :math:`(c_e, e)`
   (cost, then candidate index), so the tree is the unique one of
   :func:`~treessm.minimum_spanning_tree` (Kruskal, ties to the lower index).
2. **Breadth-first search** from the first pixel :math:`(0, 0)`, level by level, children
   in ascending id: ``parent``, ``order``,
   ``child_ptr``, ``tree_ptr`` and ``depth`` equal those of :meth:`Tree.from_parent`.
3. **Level plan** (``level_pos``, ``tree_level_ptr``, ``parent_pos``) as
   :func:`treessm.ops.plan.level_plan` computes it, handed to the plan cache
   (:func:`treessm.ops.plan.attach_level_plan`) so the scan's layout is built from it.

Nothing waits for the device, so the call can be recorded in a CUDA graph. An image must
fit one block's shared memory: :func:`shared_memory_bytes` bytes, about ``18 HW`` with
4-connectivity and ``20 HW`` with 8-connectivity (up to roughly 113 x 113 and 107 x 107
pixels on an H100). :func:`grid_spanning_tree` returns ``None`` when it cannot run -- a CPU
tensor, no CUDA extension, an image too large -- and the caller builds the tree another way
(:func:`treessm.topology.euler_tour.spanning_tree_on_device`).

The candidate-edge costs come from another fused kernel, :func:`grid_costs`
(``torch.ops.treessm.cuda_grid_costs``): a group of lanes per pixel reads the pixel's
feature row and those of its right and lower neighbours (16-byte loads where the rows
allow), and writes the cosine or Euclidean cost of its edges, so the features are read
from memory about once. It agrees with
:func:`~treessm.topology.distance.grid_costs_torch` to rounding. The same sums serve any
list of edges (:func:`pair_costs_cuda`, ``torch.ops.treessm.cuda_edge_costs``: a group of
lanes per edge reads the rows of both ends, instead of gathering them into ``[E, C]``
arrays first), which the topologies use for graphs on the GPU; it agrees with
:func:`~treessm.topology.distance.edge_cost` to rounding.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .._checks import check_choice, check_int
from ..ops.plan import (GRID_COSTS_GROUP, GRID_TREE_SOLO, GRID_TREE_THREADS,
                        attach_level_plan, device_limits)
from ..tree import Tree
from ..typing import cuda_extension_available
from .distance import DISTANCES, EPS, grid_costs_torch, kind_code, scale_by_power_of_two

__all__ = ["grid_spanning_tree", "grid_tree_from_features", "grid_costs", "pair_costs_cuda",
           "num_candidate_edges", "shared_memory_bytes", "fits", "fused_ready"]

_COST_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT_MAX = 2**31 - 1


def _check_connectivity(connectivity) -> int:
    return check_choice(connectivity, "connectivity", (4, 8))


def num_candidate_edges(height: int, width: int, connectivity: int = 4) -> int:
    """Candidate edges of one image: :math:`H(W-1) + (H-1)W`, plus :math:`2(H-1)(W-1)`
    diagonals with 8-connectivity."""
    height = check_int(height, "height", 1)
    width = check_int(width, "width", 1)
    e = height * (width - 1) + (height - 1) * width
    if _check_connectivity(connectivity) == 8:
        e += 2 * (height - 1) * (width - 1)
    return e


def shared_memory_bytes(height: int, width: int, connectivity: int = 4) -> int:
    """Shared memory one image's block needs: 16 bytes per pixel (Borůvka's keys, hooks and
    labels, reused by the search), one byte per candidate edge and 256 bytes of scalars
    (the layout of ``extensions/treessm_cuda/grid_tree_kernels.cuh``)."""
    e = num_candidate_edges(height, width, connectivity)
    return 16 * height * width + 256 + (e + 15) // 16 * 16


def fits(height: int, width: int, connectivity: int, device) -> bool:
    """Whether one ``height x width`` image fits a block of the CUDA ``device`` (the
    extension must be loaded)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return shared_memory_bytes(height, width, connectivity) <= device_limits(index)[2]


@functools.lru_cache(maxsize=256)
def fused_ready(height: int, width: int, connectivity: int, device: torch.device) -> bool:
    """Whether :func:`grid_tree_from_features` can run for this image size on ``device``
    (a CUDA device): the extension loads and one image fits a block (remembered for the
    256 most recent sizes)."""
    return (device.type == "cuda" and cuda_extension_available()
            and fits(height, width, connectivity, device))


def _grid_tree(cost: Tensor, B: int, H: int, W: int, connectivity: int,
               batch: Optional[Tensor]) -> Tree:
    out = torch.ops.treessm.cuda_grid_tree.default(cost, B, H, W, connectivity,
                                                   GRID_TREE_THREADS, GRID_TREE_SOLO)
    parent, order, child_ptr, tree_ptr, depth, level_pos, tree_level_ptr, parent_pos = out
    tree = Tree(parent, order, child_ptr, tree_ptr, depth, batch, max_tree_size=H * W)
    attach_level_plan(tree, level_pos, tree_level_ptr, parent_pos)
    return tree


def grid_tree_from_features(feat: Tensor, B: int, H: int, W: int, connectivity: int,
                            distance: str, batch: Optional[Tensor]) -> Tree:
    """Costs and tree of ``B`` images from CUDA features ``feat [B, H, W, C]`` (or
    ``[B*H*W, C]``), without argument checks: the caller has validated the arguments and
    :func:`fused_ready` has returned ``True`` for them. Two launches of fused kernels (the
    costs come from :func:`~treessm.topology.distance.grid_costs_torch` for feature types
    or sizes the cost kernel does not take); nothing waits for the device."""
    cost = _fused_costs(feat, B, H, W, connectivity, distance, unscale=False)
    if cost is None:
        x = feat.detach()
        cost = grid_costs_torch(x.reshape(B * H * W, x.shape[-1]), B, H, W, connectivity,
                                distance)
    return _grid_tree(cost, B, H, W, connectivity, batch)


def grid_costs(feat: Tensor, B: int, H: int, W: int, connectivity: int = 4,
               distance: str = "cosine") -> Optional[Tensor]:
    r"""Costs of the candidate edges of ``B`` image grids from CUDA features, by one fused
    kernel.

    The same costs as :func:`~treessm.topology.distance.grid_costs_torch` (to rounding),
    in the order of :func:`treessm.topology.grid.grid_edges`:

    .. math::
        c(p, q) = \exp\Big(-\frac{\langle x_p, x_q \rangle}{\max(\lVert x_p \rVert,
        \epsilon)\,\max(\lVert x_q \rVert, \epsilon)}\Big) \ (\text{cosine})
        \quad\text{or}\quad c(p, q) = \lVert x_p - x_q \rVert_2 \ (\text{l2}).

    Args:
        feat (Tensor [B * H * W, C] or [B, H, W, C]): features on a CUDA device, float32,
            float64, float16 or bfloat16 (accumulated in float32, float64 for float64).
        B (int): number of images.
        H (int): image height.
        W (int): image width.
        connectivity (int): 4 or 8 neighbours. (default: ``4``)
        distance (str): ``"cosine"`` or ``"l2"``. (default: ``"cosine"``)

    Returns:
        Tensor [B * E] (float64 for float64 features, else float32) on ``feat``'s device, or
        ``None`` when ``feat`` is not on a CUDA device, has another floating dtype, or the
        CUDA extension (or this kernel in it) is unavailable; the caller then computes the
        costs another way.

    Raises:
        TypeError: if ``feat`` is not a floating-point tensor.
        ValueError: on a shape of ``feat`` that does not match ``B, H, W``, sizes below one,
            a connectivity other than 4 or 8 or an unknown distance.
    """
    if not isinstance(feat, Tensor) or not feat.is_floating_point():
        got = feat.dtype if isinstance(feat, Tensor) else type(feat).__name__
        raise TypeError(f"feat must be a floating-point tensor, got {got}")
    B = check_int(B, "B", 0)
    H = check_int(H, "H", 1)
    W = check_int(W, "W", 1)
    connectivity = _check_connectivity(connectivity)
    if not isinstance(distance, str) or distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    shape = list(feat.shape)
    if not ((len(shape) == 2 and shape[0] == B * H * W)
            or (len(shape) == 4 and shape[:3] == [B, H, W])):
        raise ValueError(f"feat must have shape [B * H * W, C] = [{B * H * W}, C] or "
                         f"[B, H, W, C] = [{B}, {H}, {W}, C], got {shape}")
    if feat.device.type != "cuda" or not cuda_extension_available():
        return None
    return _fused_costs(feat, B, H, W, connectivity, distance)


def _fused_costs(feat: Tensor, B: int, H: int, W: int, connectivity: int, distance: str,
                 unscale: bool = True) -> Optional[Tensor]:
    """The cost kernel on validated CUDA features once the extension is loaded, or ``None``
    when it cannot take them (another dtype, sizes beyond the kernel's 32-bit indexing).

    Euclidean costs are computed on each image's features scaled by the power of two that
    brings their largest magnitude into ``[1/2, 1)`` (exact: an image's distances keep their
    order whatever the scale of its features), and multiplied back unless ``unscale`` is
    false (a tree needs only the order). The cosine kernel scales rows itself."""
    if feat.dtype not in _COST_TYPES or H * W > _INT_MAX or feat.shape[-1] > _INT_MAX:
        return None
    x = feat.detach()
    scale = None
    if distance == "l2" and x.numel():
        flat, scale = scale_by_power_of_two(x.reshape(B, -1), 1, return_scale=True)
        x = flat.reshape(x.shape)
    cost = torch.ops.treessm.cuda_grid_costs.default(x, B, H, W, connectivity,
                                                     kind_code(distance), EPS, GRID_COSTS_GROUP)
    if scale is not None and unscale:
        cost = (cost.reshape(B, -1) * scale.to(cost.dtype)).reshape(-1)
    return cost


@torch.no_grad()
def pair_costs_cuda(feat: Tensor, edge_index: Tensor, distance: str = "cosine"
                    ) -> Optional[Tensor]:
    """The costs of the edges ``edge_index [2, E]`` (int64 ids of rows of ``feat [N, C]``,
    trusted) from the edge-cost kernel, or ``None`` when it cannot take them (features not
    on a CUDA device, no extension, another dtype, rows of 2^31 channels or more): the
    values of :func:`~treessm.topology.distance.edge_cost`, to rounding, without gathering
    the ends' rows. Euclidean costs are computed on the features scaled by the power of two
    that brings their largest magnitude into ``[1/2, 1)`` and multiplied back, as there;
    the cosine kernel scales rows itself.

    Returns:
        Tensor [E] (float64 for float64 features, else float32), or ``None``.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if (feat.device.type != "cuda" or feat.dim() != 2 or feat.dtype not in _COST_TYPES
            or feat.shape[1] > _INT_MAX or not cuda_extension_available()):
        return None
    x = feat.detach()
    scale = None
    if distance == "l2" and x.numel():
        # scaled in the accumulation type: a power of two is exact there
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        x, scale = scale_by_power_of_two(x, (0, 1), return_scale=True)
    cost = torch.ops.treessm.cuda_edge_costs.default(x, edge_index.long(), kind_code(distance),
                                                     EPS, GRID_COSTS_GROUP)
    return cost if scale is None else cost * scale.reshape(()).to(cost.dtype)


@torch.no_grad()
def grid_spanning_tree(cost: Tensor, B: int, H: int, W: int, connectivity: int = 4,
                       batch: Optional[Tensor] = None) -> Optional[Tree]:
    r"""The rooted minimum spanning tree of each of ``B`` image grids, built on the GPU.

    Image ``b`` is the graph on vertices ``b*H*W + i*W + j`` whose candidate edges carry the
    costs ``cost[b*E : (b+1)*E]``, in the order of :func:`treessm.topology.grid.grid_edges`
    (horizontal, vertical, then with 8-connectivity diagonal and anti-diagonal, each part
    row-major). The result equals, tensor for tensor, the CPU construction

    .. math::
        T_b = \operatorname{MST}\big(\text{grid}_b,\ (c_e, e)\big)
        \text{ rooted at } b HW \text{ (the first pixel)},

    laid out by :meth:`Tree.from_parent`, with its level plan already in the plan cache.

    Args:
        cost (Tensor [B * E]): candidate-edge costs on a CUDA device, float32, float64,
            float16 or bfloat16. NaN gives an unspecified tree; infinities are ordinary
            (largest or smallest) costs.
        B (int): number of images.
        H (int): image height.
        W (int): image width.
        connectivity (int): 4 or 8 neighbours. (default: ``4``)
        batch (LongTensor [B * H * W], optional): stored in the tree as is.
            (default: ``None``)

    Returns:
        Tree or None: ``None`` when ``cost`` is not on a CUDA device, the CUDA extension is
        unavailable or an image needs more shared memory than the device offers (see
        :func:`fits`); the caller then builds the tree another way.

    Raises:
        TypeError: if ``cost`` is not a floating-point tensor of a supported dtype.
        ValueError: on a wrong size of ``cost``, sizes below one or a connectivity other
            than 4 or 8.

    Shapes:
        - **input:** edge costs :math:`(B \cdot E)`
        - **output:** a :class:`~treessm.Tree` over :math:`N = BHW` vertices, ``B`` trees
    """
    if not isinstance(cost, Tensor):
        raise TypeError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dtype not in _COST_TYPES:
        raise TypeError(f"cost must be float32, float64, float16 or bfloat16, got {cost.dtype}")
    B = check_int(B, "B", 0)
    H = check_int(H, "H", 1)
    W = check_int(W, "W", 1)
    connectivity = _check_connectivity(connectivity)
    e = num_candidate_edges(H, W, connectivity)
    if cost.dim() != 1 or cost.shape[0] != B * e:
        raise ValueError(f"cost must have shape [B * E] = [{B * e}] ({e} candidate edges per "
                         f"{H} x {W} image), got {list(cost.shape)}")
    if cost.device.type != "cuda" or not cuda_extension_available():
        return None
    if not fits(H, W, connectivity, cost.device):
        return None
    return _grid_tree(cost.detach().contiguous(), B, H, W, connectivity, batch)
