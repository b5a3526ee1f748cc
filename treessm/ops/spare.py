"""Scatters whose elements would otherwise meet at a few addresses.

A GPU runs the atomic operations (and the stores) of a scatter one after another where
they meet at one address, so a scatter of ``N`` elements into one slot takes ``N`` steps.

* A scatter whose elements do not all have a target (edges outside a forest, positions
  that are not boundary vertices, what lies above a root) sends those elements past the
  end of its output, to one of :data:`SPARE_SLOTS` slots chosen by the element's position
  (:func:`kept_or_spare`), and cuts the spare slots off afterwards.
* A minimum or maximum over labels whose runs are long (a component label per vertex,
  where one component holds most vertices) first reduces each run of :data:`RUN`
  consecutive elements with one target to one element (:func:`scatter_reduce_runs`).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SPARE_SLOTS", "RUN", "kept_or_spare", "scatter_reduce_runs"]

#: Spare slots past the end of a scatter's output (a power of two).
SPARE_SLOTS = 1024
#: Consecutive elements that :func:`scatter_reduce_runs` reduces first when they share a
#: target.
RUN = 32


def kept_or_spare(index: Tensor, keep: Tensor, end: int) -> Tensor:
    """``index`` where ``keep``, else a spare slot in ``[end, end + SPARE_SLOTS)`` chosen by
    position along the last dimension.

    Example:
        >>> kept_or_spare(torch.tensor([3, 0, 1]), torch.tensor([True, False, True]), 5)
        tensor([3, 6, 1])
    """
    spare = torch.arange(index.shape[-1], device=index.device) & (SPARE_SLOTS - 1)
    return torch.where(keep, index, spare + end)


def scatter_reduce_runs(index: Tensor, src: Tensor, size: int, fill: int, reduce: str
                        ) -> Tensor:
    """``torch.full((size,), fill).scatter_reduce_(0, index, src, reduce)`` for 1-D
    ``index`` and ``src`` and ``reduce`` ``"amin"`` or ``"amax"``, with each block of
    :data:`RUN` consecutive elements that share one target reduced to one element first (the
    rest go to spare slots): a target that most elements share then takes ``N / RUN``
    atomic operations instead of ``N``. The same values on every device, whatever the
    order of the atomics.

    Example:
        >>> scatter_reduce_runs(torch.tensor([1, 1, 0]), torch.tensor([5, 3, 4]), 3, 9, "amin")
        tensor([4, 3, 9])
    """
    if reduce not in ("amin", "amax"):
        raise ValueError(f"reduce must be 'amin' or 'amax', got {reduce!r}")
    n = index.shape[0]
    out = torch.full((size + SPARE_SLOTS,), fill, dtype=src.dtype, device=src.device)
    if n == 0:
        return out[:size]
    pad = -n % RUN  # padded with copies of the last element, which change no result
    idx = torch.cat([index, index[-1:].expand(pad)]).view(-1, RUN)
    val = torch.cat([src, src[-1:].expand(pad)]).view(-1, RUN)
    uniform = (idx == idx[:, :1]).all(1, keepdim=True)
    first = torch.arange(RUN, device=idx.device) == 0
    whole = val.amin(1, keepdim=True) if reduce == "amin" else val.amax(1, keepdim=True)
    val = torch.where(uniform & first, whole, val)
    target = kept_or_spare(idx.reshape(-1), (~uniform | first).reshape(-1), size)
    out.scatter_reduce_(0, target, val.reshape(-1), reduce)
    return out[:size]
