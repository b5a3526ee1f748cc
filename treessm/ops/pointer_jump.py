r"""Pointer jumping: sums and minima along linked lists in :math:`O(\log n)` rounds.

A list is a successor array ``succ``; it ends at an element that is its own successor and
holds the combine's identity, so jumping past the end changes nothing. One round replaces
every element's value by its combination with its successor's and every successor by its
successor's successor; after ``k`` rounds each element holds the combination of the
:math:`2^k` elements from it onwards. Users: the Euler tours of the spanning forests built
on the device (:mod:`treessm.topology.euler_tour`) and the subtree and root-path sums of
the scan layouts (:mod:`treessm.ops.heavy`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..typing import cuda_extension_available

__all__ = ["pointer_jump", "extension_kernels"]

_COMBINE = {torch.add: 0, torch.minimum: 1}  # cuda_pointer_jump's codes of the combines


def extension_kernels(t: Tensor) -> bool:
    """Whether the CUDA extension's operators run on ``t``: a CUDA tensor, eager (not
    traced by :func:`torch.compile`), the extension built."""
    return t.is_cuda and not torch.compiler.is_compiling() and cuda_extension_available()


def pointer_jump(succ: Tensor, value: Tensor, rounds: int, combine) -> Tensor:
    """``rounds`` rounds of ``value[i] = combine(value[i], value[succ[i]])``,
    ``succ = succ[succ]`` over int64 ``succ`` and ``value`` (1-D, one length; ``combine``:
    :func:`torch.add` or :func:`torch.minimum`).

    On a GPU one operator of the CUDA extension runs all rounds (one launch each, no
    atomics). Otherwise successor and value share one ``[2, M]`` tensor so that each round
    is one gather plus one in-place update.

    >>> succ = torch.tensor([1, 2, 3, 3])  # the list 0 -> 1 -> 2, ending at 3
    >>> pointer_jump(succ, torch.tensor([1, 1, 1, 0]), 2, torch.add)  # elements to the end
    tensor([3, 2, 1, 0])
    """
    if extension_kernels(succ):
        return torch.ops.treessm.cuda_pointer_jump(succ, value, rounds, _COMBINE[combine])
    x = torch.stack([succ, value])
    for _ in range(rounds):
        y = x.index_select(1, x[0])
        combine(y[1], x[1], out=y[1])
        x = y
    return x[1]
