"""Arrays for the compiled CPU kernels, each starting on a cache line.

numpy starts a large array 16 bytes into the block the C library gives it, so every
64-byte vector load of a kernel's row straddles two cache lines; from a cache line on, the
fused selective scan's kernels run 10-25% faster (``TreeSSMConv(64, 64)``'s shape, one
thread: at 10^5 vertices the forward kernel 170 -> 136 ms, the backward 540 -> 487 ms).

Two kinds of array, two kinds of memory:

* a kernel's *results* (:func:`empty`, :func:`zeros`) are new memory in every call, taken
  from torch's allocator (64-byte aligned, 4 KiB pages). numpy asks the kernel for
  transparent huge pages on large buffers, and where the system defragments memory for
  such requests (``defrag`` set to ``madvise``, the common default) the first touch of a
  fresh buffer stalls on compaction now and then: on the 2-core machine the tables were
  measured on, filling a fresh 512 MiB buffer ran at 0.09-6.0 GB/s from numpy and at a
  steady 2.9 GB/s from torch.
* a kernel's *internal* arrays (its inputs copied into its own layout, its scratch, its
  results before they are laid out again) come from a *workspace*: buffers each thread
  keeps by name between calls (:func:`workspace`), as oneDNN keeps its scratchpad and
  PyTorch's CUDA allocator its blocks, so that their pages are faulted in once, not in
  every call (the C library maps every allocation above 32 MiB afresh and unmaps it when
  it is freed). They keep numpy's huge pages, whose warm rows are written 12% faster
  there (7.9 against 7.0 GB/s). :func:`release_workspace` frees them. The fused selective
  scan's forward over a random recursive tree of 10^6 vertices (128 channels, 4 states,
  one thread, calls after the first) took 5.1-5.8 s with fresh numpy arrays, 2.5-2.6 s
  from a workspace and torch's memory for its result.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import Tuple, Union

import numpy as np
import torch

__all__ = ["CHUNK_ROWS", "LINE", "empty", "release_workspace", "sum_rows_in_order",
           "workspace", "workspace_bytes", "zeros"]

#: Bytes in a cache line.
LINE = 64
#: Rows of one partial sum over rows (a fixed split, added by :func:`sum_rows_in_order`:
#: the sums do not depend on the number of threads).
CHUNK_ROWS = 4096


def empty(shape: Union[int, Tuple[int, ...]], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` whose first item starts on a cache
    line."""
    dtype, shape, nbytes = _sized(shape, dtype)
    return _carved(torch.empty(nbytes + LINE, dtype=torch.uint8).numpy(), dtype, shape, nbytes)


def _sized(shape, dtype) -> Tuple[np.dtype, Tuple[int, ...], int]:
    """``(dtype, shape as a tuple, bytes)`` of an array."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    return dtype, shape, math.prod(shape) * dtype.itemsize


def _carved(raw: np.ndarray, dtype: np.dtype, shape: Tuple[int, ...], nbytes: int) -> np.ndarray:
    """The array of ``shape`` and ``dtype`` at the first cache line of the byte buffer
    ``raw`` (which holds ``nbytes + LINE`` bytes at least)."""
    start = (-raw.ctypes.data) % LINE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def zeros(shape: Union[int, Tuple[int, ...]], dtype) -> np.ndarray:
    """:func:`empty`, filled with zeros."""
    out = empty(shape, dtype)
    out.fill(0)
    return out


class _Buffers:
    """One thread's workspace: raw byte buffers by name (an object of its own, so that the
    registry below can hold it weakly and forget it with its thread)."""

    def __init__(self):
        self.by_name = {}


_LOCAL = threading.local()
_ALL_BUFFERS = weakref.WeakSet()  # every live thread's workspace, for release_workspace


def _buffers() -> _Buffers:
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = _Buffers()
        _ALL_BUFFERS.add(buffers)
    return buffers


def workspace(name: str, shape: Union[int, Tuple[int, ...]], dtype, *,
              zero: bool = False) -> np.ndarray:
    """An array of ``shape`` (uninitialised unless ``zero``), starting on a cache line,
    carved from the buffer the calling thread keeps under ``name``; the buffer grows when
    a call needs more, and is kept for the next call.

    Only for a kernel's internal arrays: the array is overwritten by the next call that
    asks for ``name`` on this thread, so it must neither outlive its call nor be returned
    (wrap a result in a fresh array), and two arrays alive at once need two names.
    """
    dtype, shape, nbytes = _sized(shape, dtype)
    buffers = _buffers().by_name
    raw = buffers.get(name)
    if raw is None or raw.nbytes < nbytes + LINE:
        buffers.pop(name, None)  # the old buffer goes before the new one comes
        raw = buffers[name] = np.empty(nbytes + LINE, dtype=np.uint8)
    out = _carved(raw, dtype, shape, nbytes)
    if zero:
        out.fill(0)
    return out


def workspace_bytes() -> int:
    """Bytes the CPU kernels' workspaces hold, over all threads.

    Returns:
        int: the bytes of every buffer kept (:func:`release_workspace` frees them).

    Example:
        >>> import treessm
        >>> treessm.ops.release_workspace()
        >>> treessm.ops.workspace_bytes()
        0
    """
    return sum(raw.nbytes for buffers in list(_ALL_BUFFERS)
               for raw in list(buffers.by_name.values()))


def release_workspace() -> None:
    """Free the buffers the CPU kernels keep between calls, in every thread (as
    :func:`torch.cuda.empty_cache` does for the CUDA allocator's). They hold about as
    much as a few ``[N, D]`` arrays of the largest problem run so far (the fused selective
    scan's inputs in its layout and its scratch); the next call allocates them again.
    Arrays still in use keep their own buffers until they are gone.

    Example:
        >>> import torch, treessm
        >>> tree = treessm.Tree.from_parent([-1, 0, 1])
        >>> h = treessm.tree_scan(torch.ones(3, 2), torch.ones(3, 2), tree, backend="numba")
        >>> treessm.ops.workspace_bytes() > 0
        True
        >>> treessm.ops.release_workspace()
        >>> treessm.ops.workspace_bytes()
        0
    """
    for buffers in list(_ALL_BUFFERS):
        buffers.by_name.clear()


def sum_rows_in_order(p: np.ndarray) -> np.ndarray:
    """The rows of ``p`` (per-chunk partial sums ``[chunks, ...]``) added in ascending order,
    so that a kernel's reduction has the same bits whatever the number of threads."""
    acc = p[0].copy()
    for k in range(1, p.shape[0]):
        acc += p[k]
    return acc
