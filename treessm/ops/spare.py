"""Spare slots for scatters that drop some of their elements.

A scatter whose elements do not all have a target (edges outside a forest, positions that
are not boundary vertices, what lies above a root) sends those elements past the end of its
output, to one of :data:`SPARE_SLOTS` slots chosen by the element's position, and cuts the
spare slots off afterwards. With a single dropped slot, most of such a scatter's elements
would meet at one address, where a GPU's atomic operations (and its stores) run one after
another.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SPARE_SLOTS", "kept_or_spare"]

#: Spare slots past the end of a scatter's output (a power of two).
SPARE_SLOTS = 1024


def kept_or_spare(index: Tensor, keep: Tensor, end: int) -> Tensor:
    """``index`` where ``keep``, else a spare slot in ``[end, end + SPARE_SLOTS)`` chosen by
    position along the last dimension.

    Example:
        >>> kept_or_spare(torch.tensor([3, 0, 1]), torch.tensor([True, False, True]), 5)
        tensor([3, 6, 1])
    """
    spare = torch.arange(index.shape[-1], device=index.device) & (SPARE_SLOTS - 1)
    return torch.where(keep, index, spare + end)
