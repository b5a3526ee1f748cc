"""Work sharing for the compiled CPU kernels (the scans and the topology builders).

Parallel work is shared by :func:`run_chunks` rather than by ``prange``: the calling
thread works through the chunks itself while helper threads take chunks whenever they
get a core. A ``prange`` loop ends at a barrier that waits for every thread, so one
thread descheduled by other load stalls the whole call for a scheduler time slice
(measured: a 4 ms construction took 35 ms with one core busy); here the caller just
does the helper's share and the call degrades to serial speed. The threads are Python's,
made again in a forked child (a DataLoader worker), where an OpenMP ``prange`` would end the
process once its parent had used it.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numba

__all__ = ["run_chunks", "on_slots"]

_pool = {"executor": None, "workers": 0, "pid": None}
_pool_lock = threading.Lock()


def _helpers(workers: int) -> ThreadPoolExecutor:
    with _pool_lock:
        # a forked child inherits the executor but not its threads: make a new one
        if (_pool["executor"] is None or _pool["workers"] < workers
                or _pool["pid"] != os.getpid()):
            _pool["executor"] = ThreadPoolExecutor(max_workers=workers,
                                                   thread_name_prefix="treessm")
            _pool["workers"] = workers
            _pool["pid"] = os.getpid()
        return _pool["executor"]


def run_chunks(kernel: Callable, num_items: int, *args) -> None:
    """Run ``kernel(start, stop, *args)`` over the items ``[0, num_items)`` in chunks.

    ``kernel`` is a ``nogil`` compiled function (or a Python function whose work runs in
    such functions) writing disjoint outputs per item. The calling thread and up to
    ``numba.get_num_threads() - 1`` helpers take chunks from a shared counter until none
    are left; the call returns when every chunk taken is done, so a helper that never got a
    core costs nothing (see the module documentation).
    """
    threads = numba.get_num_threads()
    if num_items <= 0:
        return
    if threads <= 1 or num_items == 1:
        kernel(0, num_items, *args)
        return
    first = 0
    if not getattr(kernel, "signatures", True):
        # a compiled kernel never called yet: one item first, on this thread, compiles (or
        # loads) it before any helper calls it
        kernel(0, 1, *args)
        first = 1
    size = -(-(num_items - first) // (4 * threads))  # a few chunks per thread even out items
    bounds = [(a, min(a + size, num_items)) for a in range(first, num_items, size)]
    claimed = itertools.count()  # next() on a count is atomic under the GIL
    finished = itertools.count(1)
    all_done = threading.Event()
    errors = []

    def work():
        while True:
            k = next(claimed)
            if k >= len(bounds):
                return
            try:
                kernel(bounds[k][0], bounds[k][1], *args)
            except BaseException as exc:  # re-raised by the calling thread
                errors.append(exc)
            if next(finished) == len(bounds):
                all_done.set()

    executor = _helpers(threads - 1)
    for _ in range(min(threads, len(bounds)) - 1):
        executor.submit(work)
    work()
    all_done.wait()
    if errors:
        raise errors[0]



def _slots(start: int, stop: int, fn: Callable, *args) -> None:
    for slot in range(start, stop):
        fn(slot, *args)


def on_slots(fn: Callable, num_slots: int, *args) -> None:
    """``fn(slot, *args)`` for every ``slot`` in ``range(num_slots)``, shared by the threads
    of :func:`run_chunks` (``fn`` releases the GIL; each slot owns its scratch and outputs)."""
    run_chunks(_slots, num_slots, fn, *args)
