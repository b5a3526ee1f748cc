"""CUDA kernels of the fused selective tree scan (:mod:`treessm.ops.selective_scan`): the
directions ``"down"`` and ``"up"`` along the depth-first walk of :mod:`treessm.ops.walk`
(``extensions/treessm_cuda/walk_kernels.cuh``), without the state expansion in memory.

``P`` adjacent lanes of a warp hold the ``S`` states of one channel of one tree in
registers (``S / P`` each, ``S`` padded to a power of two) and walk the tree; the backward
walks it again from checkpoints saved at segment starts (about ``1 / segment`` of the
states, more where the walk's stack is deep). A forward that a backward will follow writes
them as it walks and keeps them where they take no more memory than ``u``
(:func:`kept_rows`: a forest of chains); else the backward writes them in a forward walk of
its own. The backward of ``"down"`` over a forest of chains
(:attr:`treessm.ops.walk.WalkPlan.chains`) runs in time instead (``chain_backward_kernel``: a
warp per channel and chain, its lanes consecutive positions, the steps composed and scanned
across the warp state by state), from the same checkpoints.
:func:`lanes_per_channel` chooses ``P`` for the walk. Results are bitwise reproducible, the
same whether the checkpoints were kept or not, and all but the gradients of ``B`` and ``C``
(sums over the channels of a block) are the same bits for every ``P``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..tree import Tree
from ..typing import load_cuda_extension
from .selective_scan_cpu import EDGE_RULES
from .walk import walk_plan

__all__ = ["forward", "backward", "layout", "supports", "kept_rows", "lanes_per_channel",
           "MAX_STATES", "WARPS_PER_SM"]

#: ``d_state`` the kernels hold in registers, at most.
MAX_STATES = 16
#: Warps per multiprocessor the launch aims for: each lane walks a chain of dependent steps,
#: whose latency only other warps hide, but every lane of a channel repeats the step's
#: bookkeeping for its share of the states. On the H200 at GrootL's widths (4 sequences of
#: 2,048 tokens, 1,536 channels, 16 states) the kernels took 0.87 / 3.30 ms forward /
#: backward at 8 lanes a channel (11.6 warps per multiprocessor), 1.14 / 3.33 at 16 and
#: 1.03 / 3.74 at 4.
WARPS_PER_SM = 8
_DIRECTIONS = ("down", "up")  # the kernels' direction codes: 0 and 1
_BLOCK = 64         # walk_kernels.cuh: kThreads, lanes of a block (two warps)
_TREE_ROWS = 2048   # selective_walk.cu: kMaxTreeRows, block rows over the trees


def supports(direction: str, moments: bool, d_state: int) -> bool:
    """Whether the fused kernels run this problem (else the expanded path does)."""
    return direction in _DIRECTIONS and not moments and 1 <= d_state <= MAX_STATES


def lanes_per_channel(num_trees: int, channels: int, d_state: int, multiprocessors: int) -> int:
    """Lanes ``P`` that share one channel's states: the smallest power of two whose launch
    (``min(num_trees, 2048)`` block rows of ``ceil(channels * P / 64)`` blocks of two warps)
    gives at least :data:`WARPS_PER_SM` warps per multiprocessor, at most ``d_state`` padded
    to a power of two.

    >>> lanes_per_channel(4, 1536, 16, 132)  # GrootL at Mamba-130m widths, 4 sequences
    8
    >>> lanes_per_channel(3000, 40, 16, 132)  # many small trees fill the device already
    1
    """
    states = 1 << (max(d_state, 1) - 1).bit_length()
    rows = min(num_trees, _TREE_ROWS)
    lanes = 1
    target = WARPS_PER_SM * multiprocessors
    while lanes < states and rows * 2 * -(-channels * lanes // _BLOCK) < target:
        lanes *= 2
    return lanes


def _lanes(u: Tensor, A: Tensor, tree_ptr: Tensor) -> int:
    props = torch.cuda.get_device_properties(u.device)
    return lanes_per_channel(tree_ptr.numel() - 1, u.shape[1], A.shape[1],
                             props.multi_processor_count)


def _segment(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16  # walk_kernels.cuh: Segment<T>::K


def layout(tree: Tree, dtype: torch.dtype) -> Tuple[List[Tensor], List[int]]:
    """The walk plan's tensors, and its slot count and whether the forest is chains
    (:attr:`treessm.ops.walk.WalkPlan.chains`), for the kernels."""
    plan = walk_plan(tree, _segment(dtype))
    return [plan.rec, plan.tree_ptr], [plan.num_slots, int(plan.chains)]


def kept_rows(sizes: List[int], n: int, d: int, d_state: int) -> int:
    """Checkpoint slots the forward keeps for the backward when asked (else the backward
    walks the tree once more to write them): all of them where they take no more memory
    than ``u`` (a forest of chains: one slot a segment, ``d_state / 32`` of ``u`` in
    float32), none where the slot count is a bound far above the walk's own (a forest built
    on the GPU: :func:`treessm.ops.walk.slot_bound`) or the problem is empty."""
    num_slots = sizes[0]
    return num_slots if n * d > 0 and num_slots * d_state <= n else 0


def forward(u, dx, de, A, B, C, gamma, h0, srow, snext, layout: List[Tensor], sizes: List[int],
            direction: str, edge_rule: str, moments: bool, keep: bool):
    """``(y, mu, m2, states, kept)`` as :func:`treessm.ops.selective_scan_cpu.forward`
    (``mu`` and ``m2`` empty: moments are not supported here), and with ``keep`` the
    backward's checkpoints where :func:`kept_rows` keeps them."""
    _check(direction, moments, gamma)
    load_cuda_extension()
    rec, tree_ptr = layout
    num_slots = sizes[0]
    keep = keep and kept_rows(sizes, u.shape[0], u.shape[1], A.shape[1]) > 0
    y, states, kept = torch.ops.treessm.cuda_selective_walk(
        *_contiguous(u, dx, de, A, B, C, h0), srow, snext, rec, tree_ptr, num_slots,
        EDGE_RULES.index(edge_rule), _DIRECTIONS.index(direction), _lanes(u, A, tree_ptr), keep)
    return y, u.new_empty(0), u.new_empty(0), states, kept


def backward(gy, gmu, gm2, gstates, u, dx, de, A, B, C, gamma, h0, mu, kept, srow, snext,
             layout: List[Tensor], sizes: List[int], direction: str, edge_rule: str,
             moments: bool) -> Tuple[Optional[Tensor], ...]:
    """Gradients as :func:`treessm.ops.selective_scan_cpu.backward`, from the forward's
    checkpoints where it kept them."""
    _check(direction, moments, gamma)
    load_cuda_extension()
    rec, tree_ptr = layout
    given = edge_rule == "given"
    num_slots, chains = sizes
    gu, gdx, gde, gA, gB, gC, gh0 = torch.ops.treessm.cuda_selective_walk_backward(
        *_contiguous(gy, gstates, u, dx, de, A, B, C, h0), srow, snext, rec, tree_ptr,
        num_slots, EDGE_RULES.index(edge_rule), _DIRECTIONS.index(direction),
        _lanes(u, A, tree_ptr), kept if kept.numel() else None,
        bool(chains) and direction == "down")
    return (gu, gdx, gde if given else None, gA, gB, gC, None,
            gh0 if h0 is not None else None)


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _check(direction: str, moments: bool, gamma) -> None:
    if direction not in _DIRECTIONS or moments or gamma is not None:
        raise ValueError(f"the CUDA fused kernels run the directions {_DIRECTIONS} without "
                         f"state normalisation, got direction={direction!r}, moments={moments}")
