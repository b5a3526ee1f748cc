"""Arrays for the compiled CPU kernels, each starting on a cache line.

numpy starts a large array 16 bytes into the block the C library gives it, so every
64-byte vector load of a kernel's row straddles two cache lines; from a cache line on, the
fused selective scan's kernels run 10-25% faster (``TreeSSMConv(64, 64)``'s shape, one
thread: at 10^5 vertices the forward kernel 170 -> 136 ms, the backward 540 -> 487 ms).
numpy also asks the kernel for transparent huge pages on large buffers, whose first-touch
page faults cost less than those of the 4 KiB pages of a fresh ``torch.empty``.
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import numpy as np

__all__ = ["CHUNK_ROWS", "LINE", "empty", "sum_rows_in_order", "zeros"]

#: Bytes in a cache line.
LINE = 64
#: Rows of one partial sum over rows (a fixed split, added by :func:`sum_rows_in_order`:
#: the sums do not depend on the number of threads).
CHUNK_ROWS = 4096


def empty(shape: Union[int, Tuple[int, ...]], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` whose first item starts on a cache
    line."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + LINE, dtype=np.uint8)
    start = (-raw.ctypes.data) % LINE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def zeros(shape: Union[int, Tuple[int, ...]], dtype) -> np.ndarray:
    """:func:`empty`, filled with zeros."""
    out = empty(shape, dtype)
    out.fill(0)
    return out


def sum_rows_in_order(p: np.ndarray) -> np.ndarray:
    """The rows of ``p`` (per-chunk partial sums ``[chunks, ...]``) added in ascending order,
    so that a kernel's reduction has the same bits whatever the number of threads."""
    acc = p[0].copy()
    for k in range(1, p.shape[0]):
        acc += p[k]
    return acc
