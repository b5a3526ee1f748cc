r"""Computations recorded once in a CUDA graph and replayed for new inputs.

The layouts of a tree (:func:`treessm.ops.tiles.tile_plan`,
:func:`treessm.ops.walk.walk_plan`), a spanning forest's build
(:mod:`treessm.topology.captured`) and a causal tree's
(:class:`~treessm.topology.CausalSequenceTopology`) are a few hundred small kernels that
wait for nothing once the host knows their sizes. The layers run them in every forward,
each time on new values of the same sizes, and below about 10^6 vertices the host's cost
of issuing those launches (a few microseconds each) is most of their time. :class:`Recorded`
issues them once into a CUDA graph and replays it: one launch for all of them.
:class:`Recordings` keeps a few of them by a key of host-side sizes.

A recording keeps its inputs, outputs and intermediates in the graph's own memory pool, so
the callers keep few of them (a small cache) and only below a size bound. A replay
overwrites the recorded outputs: callers hand out copies. :func:`release_recordings` drops
them all (and the memory of their pools).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, List, Optional

import torch
from torch import Tensor

from ..tree import Tree

__all__ = ["Recorded", "Recordings", "record_or_replay", "can_replay", "can_record",
           "release_recordings", "register_recordings", "RECORDED_PLAN_MAX_NODES",
           "RECORDED_PLANS"]

#: Vertices of the largest forest whose layout build (a scan plan) is recorded and replayed
#: on CUDA: a recording holds the build's intermediate arrays in its memory pool.
RECORDED_PLAN_MAX_NODES = 1 << 21
#: Recorded builds of one kind of layout kept at once (least recently used dropped first).
RECORDED_PLANS = 4
_RELEASES: List[Callable[[], None]] = []


def register_recordings(clear: Callable[[], None]) -> None:
    """Have :func:`release_recordings` call ``clear``, which drops one cache of recordings
    (every :class:`Recordings` registers itself)."""
    _RELEASES.append(clear)


def release_recordings() -> None:
    """Drop every recorded CUDA graph of treessm (tiled and walk plans, causal trees,
    spanning-forest builds) with the memory its pool holds; later calls record anew.
    ``torch.cuda.empty_cache()`` afterwards returns that memory to the device.

    Example:
        >>> from treessm.ops.recorded import release_recordings
        >>> release_recordings()
    """
    for clear in _RELEASES:
        clear()


def can_replay(*tensors: Tensor) -> bool:
    """Whether a recorded computation on ``tensors`` may be replayed now: all on CUDA, and
    the caller neither compiling (dynamo traces the eager code instead) nor capturing a
    CUDA graph of its own (the eager launches are then part of the caller's graph)."""
    return (all(t.is_cuda for t in tensors) and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def can_record(*tensors: Tensor) -> bool:
    """Whether a computation on ``tensors`` may be recorded now: as :func:`can_replay`,
    and the caller has not asked to hear of host synchronisations
    (:func:`torch.cuda.set_sync_debug_mode`), since a recording waits for the device once."""
    return can_replay(*tensors) and torch.cuda.get_sync_debug_mode() == 0


class Recorded:
    """``fn(*inputs)`` recorded in a CUDA graph on copies of ``inputs``, replayed by
    :meth:`replay` for new inputs of the same shapes, dtypes and device.

    Args:
        fn (callable): tensors in, any structure of tensors out; it must issue no host
            synchronisation and read nothing but its inputs (sizes aside).
        *inputs (Tensor): example inputs on one CUDA device; ``fn`` runs on them once
            before the recording, so that lazy initialisations happen outside it.

    Raises:
        RuntimeError: where ``fn`` cannot be recorded (a host synchronisation, for one).
    """

    # Its buffers are ordinary tensors even when made under torch.inference_mode(), so that
    # replays outside that mode (a training step after an evaluation pass) may write them.
    @torch.inference_mode(False)
    def __init__(self, fn: Callable[..., Any], *inputs: Tensor):
        self.device = inputs[0].device
        self.inputs = tuple(t.detach().clone() for t in inputs)
        with torch.cuda.device(self.device):  # the graph is recorded on the current device
            caller = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                fn(*self.inputs)
            caller.wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn(*self.inputs)

    @torch.inference_mode(False)
    def replay(self, *inputs: Tensor) -> Any:
        """The recorded outputs, recomputed for ``inputs`` (not copies: the next replay
        overwrites them)."""
        for static, value in zip(self.inputs, inputs):
            static.copy_(value)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.output


_FAILED = object()


def record_or_replay(find: Callable[[], Any], keep: Callable[[Any], None],
                     fn: Callable[..., Any], *inputs: Tensor) -> Optional[Any]:
    """``fn(*inputs)`` replayed from the recording ``find()`` returns, made now and handed
    to ``keep`` where it returns ``None`` (``fn`` must compute the same launches for every
    input the caller's cache serves that recording to); ``None`` where it cannot run so
    (:func:`can_replay`, :func:`can_record`, or a recording that failed, which is kept as
    such so that it is not tried again). The outputs are the recording's own: copy what
    outlives the next replay."""
    if not can_replay(*inputs):
        return None
    recording = find()
    if recording is None:
        if not can_record(*inputs):
            return None
        try:
            recording = Recorded(fn, *inputs)
        except RuntimeError:  # an operation that cannot be recorded
            recording = _FAILED
        keep(recording)
    return None if recording is _FAILED else recording.replay(*inputs)


class Recordings:
    """Recordings of one computation by a key of host-side sizes, at most ``size`` of them
    (the least recently used dropped first).

    Args:
        size (int): recordings kept at once.
    """

    def __init__(self, size: int):
        self.size = size
        self._kept: "OrderedDict[Hashable, Any]" = OrderedDict()
        register_recordings(self.clear)

    def __len__(self) -> int:
        return len(self._kept)

    def clear(self) -> None:
        self._kept.clear()

    def replay(self, key: Hashable, fn: Callable[..., Any], *inputs: Tensor) -> Optional[Any]:
        """``fn(*inputs)`` replayed from the recording of ``key``
        (:func:`record_or_replay`)."""
        def find():
            recording = self._kept.get(key)
            if recording is not None:
                self._kept.move_to_end(key)
            return recording

        def keep(recording):
            self._kept[key] = recording
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)

        return record_or_replay(find, keep, fn, *inputs)

    def replay_layout(self, key: Hashable, layout: Callable[[Tree], Any],
                      tree: Tree) -> Optional[Any]:
        """``layout(tree)``, a named tuple of tensors and host-side numbers built from the
        tree's arrays alone, replayed from the recording of ``key`` (which must hold every
        host-side size the build reads: the tree's hints, its vertex and tree counts), as
        copies; ``None`` where :meth:`replay` gives none."""
        num_levels, largest = tree.num_levels, tree.max_tree_size

        def build(parent, order, child_ptr, tree_ptr, depth):
            return layout(Tree(parent, order, child_ptr, tree_ptr, depth,
                               num_levels=num_levels, max_tree_size=largest))

        out = self.replay(key, build, tree.parent, tree.order, tree.child_ptr,
                          tree.tree_ptr, tree.depth)
        if out is None:
            return None
        return type(out)(*(v.clone() if isinstance(v, Tensor) else v for v in out))
