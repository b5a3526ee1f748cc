"""``tree_scan``: the public operator, its autograd and the backend dispatcher.

Backends (each beside the torch reference, each tested against the dense oracle):

* ``"torch"``  -- :mod:`treessm.ops.reference`, level-synchronous, any device;
* ``"numba"``  -- :mod:`treessm.ops.cpu`, compiled CPU kernels (default on the CPU);
* ``"cuda"``   -- :mod:`treessm.ops.cuda`, the C++/CUDA extension (default on CUDA tensors),
  launched along the plan and schedule of :mod:`treessm.ops.plan`.

The compiled backends run behind the custom operators ``torch.ops.treessm.tree_scan``
and ``torch.ops.treessm.tree_scan_backward`` (``torch.library``), which carry fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` traces through them.
Eager CUDA calls take a leaner road to the same kernels: ``torch.ops.treessm.cuda_tree_scan``,
whose autograd is written in C++, so a forward and backward cost the host a few
microseconds instead of the Python custom-op layers. The ``"tiles"`` schedule, whose
kernels have no C++ autograd, runs through :class:`_TiledScan`, whose ``"both"`` keeps its
forward's parts for the backward. The math is in ``docs/concepts.md``.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..tree import Tree
from ..typing import cuda_extension_available, cuda_extension_error
from . import cpu, reference
from .plan import SCHEDULES, Launch, ScanPlan, level_groups, scan_plan

__all__ = ["tree_scan", "DIRECTIONS", "BACKENDS", "available_backends"]

#: the scan directions: every vertex of the tree, the subtree, the path from the root
DIRECTIONS = ("both", "up", "down")
#: the scan backends: torch reference (any device), numba (CPU), cuda (CUDA)
BACKENDS = ("torch", "numba", "cuda")
_FLOAT_TYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_warned = []


# ---------------------------------------------------------------------------- backends
@torch.compiler.assume_constant_result
def _cuda_ready(warn: bool) -> bool:
    """Whether the CUDA extension is there; without it, one warning (the caller falls back
    to the torch reference). Run eagerly when ``torch.compile`` traces a caller (its answer
    a constant of the graph): the first CUDA call of a process may come inside a traced
    function, and loading the library and registering its fake kernels cannot be traced."""
    if cuda_extension_available():
        _register_fakes()
        return True
    if warn and not _warned:
        _warned.append(True)
        warnings.warn(
            "treessm: the CUDA extension is not available "
            f"({cuda_extension_error()}); falling back to the torch reference backend, "
            "which is much slower. Install a CUDA toolkit matching PyTorch (nvcc on PATH "
            "or CUDA_HOME set) or prebuild with `python -m treessm.ops.cuda --build`.",
            RuntimeWarning, stacklevel=5)
    return False


_fakes = []


def _register_fakes() -> None:
    """Shapes of the C++ lean-path ops for fake-tensor tracing (once the library is
    loaded; the ops are defined by it)."""
    if _fakes:
        return
    _fakes.append(True)

    @torch.library.register_fake("treessm::cuda_tree_scan")
    def _(x, weight, p0, p1, p2, p3, p4, schedule, launch, direction):
        return torch.empty_like(x)

    @torch.library.register_fake("treessm::cuda_tree_scan_backward")
    def _(grad, x, weight, out, p0, p1, p2, p3, p4, schedule, launch, direction):
        return torch.empty_like(x), torch.empty_like(weight)


def available_backends(device="cpu") -> List[str]:
    """Backends that can run on ``device`` in this installation.

    Args:
        device (torch.device or str): the device asked about. (default: ``"cpu"``)

    Returns:
        list of str: names from :data:`BACKENDS`, the torch reference first.

    Example:
        >>> available_backends("cpu")
        ['torch', 'numba']
    """
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cpu":
        out.append("numba")
    elif device.type == "cuda" and _cuda_ready(warn=False):
        out.append("cuda")
    return out


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    if backend is None or backend == "auto":
        if device.type == "cpu":
            return "numba"
        if device.type == "cuda" and _cuda_ready(warn=True):
            return "cuda"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "numba" and device.type != "cpu":
        raise ValueError(f"backend 'numba' runs on CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
        if not _cuda_ready(warn=False):
            raise RuntimeError(f"backend 'cuda' was requested but the extension is unavailable: "
                               f"{cuda_extension_error()}")
    return backend


def _as_plan(plan: List[Tensor], schedule: str, launch: List[int]) -> ScanPlan:
    return ScanPlan(schedule, tuple(plan), Launch(*launch))


def _compiled_forward(x, w, order, child_ptr, tree_ptr, plan, schedule, launch, direction,
                      backend):
    if backend == "cuda":
        from . import cuda

        return cuda.forward(x, w, _as_plan(plan, schedule, launch), direction)
    if x.dtype in (torch.float32, torch.float64):
        return cpu.forward(x, w, order, child_ptr, tree_ptr, direction)
    # half types: accumulate in float32
    return cpu.forward(x.float(), w.float(), order, child_ptr, tree_ptr, direction).to(x.dtype)


def _compiled_backward(g, x, w, h, order, child_ptr, tree_ptr, plan, schedule, launch,
                       direction, backend):
    if backend == "cuda":
        from . import cuda

        return cuda.backward(g, x, w, h, _as_plan(plan, schedule, launch), direction)
    if x.dtype in (torch.float32, torch.float64):
        return cpu.backward(g, x, w, h, order, child_ptr, tree_ptr, direction)
    gx, gw = cpu.backward(g.float(), x.float(), w.float(), h.float(), order, child_ptr,
                          tree_ptr, direction)
    return gx.to(x.dtype), gw.to(w.dtype)


# ---------------------------------------------------------------------------- custom ops
@torch.library.custom_op("treessm::tree_scan", mutates_args=())
def _tree_scan_op(x: Tensor, weight: Tensor, order: Tensor, child_ptr: Tensor, tree_ptr: Tensor,
                  plan: List[Tensor], schedule: str, launch: List[int], direction: str,
                  backend: str) -> Tensor:
    return _compiled_forward(x, weight, order, child_ptr, tree_ptr, plan, schedule, launch,
                             direction, backend)


@_tree_scan_op.register_fake
def _(x, weight, order, child_ptr, tree_ptr, plan, schedule, launch, direction, backend):
    return torch.empty_like(x)


@torch.library.custom_op("treessm::tree_scan_backward", mutates_args=())
def _tree_scan_backward_op(grad: Tensor, x: Tensor, weight: Tensor, out: Tensor, order: Tensor,
                           child_ptr: Tensor, tree_ptr: Tensor, plan: List[Tensor],
                           schedule: str, launch: List[int], direction: str,
                           backend: str) -> Tuple[Tensor, Tensor]:
    return _compiled_backward(grad.contiguous(), x, weight, out, order, child_ptr, tree_ptr,
                              plan, schedule, launch, direction, backend)


@_tree_scan_backward_op.register_fake
def _(grad, x, weight, out, order, child_ptr, tree_ptr, plan, schedule, launch, direction,
      backend):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, order, child_ptr, tree_ptr, plan, schedule, launch, direction, backend = inputs
    ctx.args = (schedule, launch, direction, backend)
    ctx.num_plan = len(plan)
    ctx.save_for_backward(x, weight, output, order, child_ptr, tree_ptr, *plan)


def _backward(ctx, grad):
    x, weight, out, order, child_ptr, tree_ptr, *plan = ctx.saved_tensors
    gx, gw = torch.ops.treessm.tree_scan_backward(grad, x, weight, out, order, child_ptr,
                                                  tree_ptr, plan, *ctx.args)
    # a list of ints is one leaf of the inputs' structure (the launch is never empty)
    return gx, gw, None, None, None, [None] * ctx.num_plan, None, None, None, None


_tree_scan_op.register_autograd(_backward, setup_context=_setup_context)


class _ReferenceScan(torch.autograd.Function):
    """Autograd for the torch backend, reusing the tree's cached level groups."""

    @staticmethod
    def forward(ctx, x, weight, tree, direction):
        out = reference.forward(x, weight, tree.parent, level_groups(tree), direction)
        ctx.save_for_backward(x, weight, out)
        ctx.tree, ctx.direction = tree, direction
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        gx, gw = reference.backward(grad, x, weight, out, ctx.tree.parent, level_groups(ctx.tree),
                                    ctx.direction, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gw, None, None


class _TiledScan(torch.autograd.Function):
    """Autograd for eager scans under the ``"tiles"`` schedule. ``"both"`` keeps what its
    forward formed (the up scan, the brackets and the down scan, in the accumulation type:
    :func:`treessm.ops.cuda.forward_with_parts`) instead of ``x`` and the output, so that its
    backward scans the gradient only, where the custom operator's backward scans ``x`` a
    second time; ``"up"`` and ``"down"`` keep the weights and the output. The gradients are
    the same bits either way."""

    @staticmethod
    def forward(ctx, x, weight, plan, direction):
        from . import cuda

        if not any(ctx.needs_input_grad[:2]):
            return cuda.forward(x, weight, plan, direction)
        h, parts = cuda.forward_with_parts(x, weight, plan, direction)
        out = cuda.total(h, x.dtype)
        ctx.plan, ctx.direction, ctx.has_parts = plan, direction, parts is not None
        ctx.save_for_backward(weight, *(parts if parts is not None else (out,)))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        from . import cuda

        weight, *kept = ctx.saved_tensors
        parts = kept if ctx.has_parts else None
        out = None if ctx.has_parts else kept[0]
        gx, gw = cuda.backward_from_parts(grad.contiguous(), None, weight, out, parts, ctx.plan,
                                          ctx.direction)
        return cuda.total(gx, grad.dtype), gw, None, None


class _EdgelessScan(torch.autograd.Function):
    """A forest without an edge (every vertex a root): every direction gives ``h = x``, and
    the weights, all at roots, get a zero gradient."""

    @staticmethod
    def forward(ctx, x, weight):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.zeros_like(grad) if ctx.needs_input_grad[1] else None


# ---------------------------------------------------------------------------- public API
def _check_inputs(x, weight, tree, direction, schedule) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be a treessm.Tree, got {type(tree).__name__}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if schedule is not None and schedule != "auto" and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be None, 'auto' or one of {SCHEDULES}, got "
                         f"{schedule!r}")
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"x must be a floating-point tensor (float32, float64, bfloat16 or "
                        f"float16), got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (vertices first), got a scalar")
    if weight.shape != x.shape:
        raise ValueError(f"weight must have the same shape as x, got {list(weight.shape)} and "
                         f"{list(x.shape)}")
    if x.shape[0] != tree.num_nodes:
        raise ValueError(f"x must have one row per tree vertex ({tree.num_nodes}), got "
                         f"{x.shape[0]}")
    if x.device != weight.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    if tree.device != x.device:
        raise ValueError(f"tree must be on the device of x ({x.device}), got {tree.device}; "
                         "use tree.to(x.device)")


def _shaped(t: Tensor, shape: torch.Size) -> Tensor:
    """``t`` in ``shape``, itself where it has it: a reshape to the same shape is a view,
    which adds a node to autograd's graph."""
    return t if t.shape == shape else t.reshape(shape)


def tree_scan(x: Tensor, weight: Tensor, tree: Tree, direction: str = "both",
              backend: Optional[str] = None, schedule: Optional[str] = None) -> Tensor:
    r"""Linear-time tree scan, differentiable in ``x`` and ``weight`` (``docs/concepts.md``).

    .. math::
        h_v = \sum_u S(u, v)\, x_u, \qquad S(u, v) = \prod_{e \in \mathrm{path}(u, v)} w_e

    where the sum runs over all vertices of v's tree (``"both"``), over v's subtree
    (``"up"``) or over the path from v's root to v (``"down"``). The weight of the edge
    (v, parent(v)) is ``weight[v]``; weights of roots are ignored (their gradient is zero).
    A forest without an edge (every vertex a root) gives ``h = x`` on every backend without
    running one.

    Args:
        x (Tensor): input per vertex, channels last.
        weight (Tensor): edge weight per vertex and channel, same shape as ``x``.
        tree (Tree): forest over the N vertices, on the device of ``x``.
        direction (str): ``"both"``, ``"up"`` or ``"down"``. (default: ``"both"``)
        backend (str, optional): ``"torch"``, ``"numba"`` or ``"cuda"``; by default the
            fastest available for the device. (default: ``None``)
        schedule (str, optional): CUDA schedule, ``"trees"``, ``"phases"``, ``"tiles"`` or
            ``"columns"``; by default
            chosen from the tree's size (:func:`treessm.ops.plan.choose_schedule`). Every
            schedule computes the same sums. (default: ``None``)

    Returns:
        Tensor shaped and typed like ``x``. float16/bfloat16 inputs accumulate in float32.

    Shapes:
        - **input:** x :math:`(N, *)`, weight :math:`(N, *)`, a tree over :math:`N` vertices
        - **output:** :math:`(N, *)`

    Raises:
        TypeError: if ``x``, ``weight`` or ``tree`` is of the wrong type or dtype.
        ValueError: on shapes that do not match the tree, tensors on different devices, an
            unknown ``direction``, ``backend`` or ``schedule``, or a backend that cannot run
            on the device (``docs/validation.md`` lists every case).

    Example:
        >>> tree = Tree.from_parent([-1, 0, 1])            # the chain 0 - 1 - 2
        >>> x, w = torch.ones(3, 1), torch.full((3, 1), 0.5)
        >>> tree_scan(x, w, tree, direction="down").flatten().tolist()
        [1.0, 1.5, 1.75]
        >>> tree_scan(x, w, tree, direction="both").flatten().tolist()
        [1.75, 2.0, 1.75]
    """
    _check_inputs(x, weight, tree, direction, schedule)
    shape = x.shape
    channels = math.prod(shape[1:])
    x2 = _shaped(x, torch.Size((shape[0], channels)))
    w2 = _shaped(weight, torch.Size((shape[0], channels)))
    if x2.numel() == 0:
        return _shaped(x2 + 0 * w2, shape)  # keeps autograd connected
    backend = _resolve_backend(backend, x.device)
    if tree.num_trees == tree.num_nodes:  # no edge: nothing to carry, on every backend
        return _shaped(_EdgelessScan.apply(x2, w2), shape)
    if backend == "torch":
        return _shaped(_ReferenceScan.apply(x2, w2, tree, direction), shape)
    x2, w2 = x2.contiguous(), w2.contiguous()
    if backend == "numba":
        out = torch.ops.treessm.tree_scan(x2, w2, tree.order, tree.child_ptr, tree.tree_ptr, [],
                                          "", [0], direction, backend)
        return _shaped(out, shape)
    plan = scan_plan(tree, channels, x.dtype, schedule)
    if torch.compiler.is_compiling():  # the Python custom op, which dynamo traces
        out = torch.ops.treessm.tree_scan(x2, w2, tree.order, tree.child_ptr, tree.tree_ptr,
                                          list(plan.tensors), plan.schedule, list(plan.launch),
                                          direction, backend)
    elif plan.schedule == "tiles":
        out = _TiledScan.apply(x2, w2, plan, direction)
    else:
        out = torch.ops.treessm.cuda_tree_scan(x2, w2, *plan.tensors, plan.schedule,
                                               plan.launch, direction)
    return _shaped(out, shape)
