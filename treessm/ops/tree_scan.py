"""``tree_scan``: the public operator, its autograd and the backend dispatcher.

Backends (each beside the torch reference, each tested against the dense oracle):

* ``"torch"``  -- :mod:`treessm.ops.reference`, level-synchronous, any device;
* ``"numba"``  -- :mod:`treessm.ops.cpu`, compiled CPU kernels (default on the CPU);
* ``"cuda"``   -- :mod:`treessm.ops.cuda`, the C++/CUDA extension (default on CUDA tensors).

The compiled backends run behind the custom operators ``torch.ops.treessm.tree_scan``
and ``torch.ops.treessm.tree_scan_backward`` (``torch.library``), which carry fake
implementations and autograd, so ``torch.compile(fullgraph=True)`` traces through them.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..tree import Tree
from . import reference

__all__ = ["tree_scan", "DIRECTIONS", "BACKENDS", "available_backends"]

DIRECTIONS = ("both", "up", "down")
BACKENDS = ("torch", "numba", "cuda")
_FLOAT_TYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------- backends
def _numba_backend():
    from . import cpu

    return cpu


_numba_state = {}


def _numba_available() -> bool:
    if "ok" not in _numba_state:
        try:
            _numba_backend()
            _numba_state["ok"] = True
        except ImportError:
            _numba_state["ok"] = False
    return _numba_state["ok"]


_cuda_state = {"module": None, "error": None, "warned": False}


def _cuda_backend():
    """The CUDA extension module, or None (with one warning) when it cannot be built."""
    if _cuda_state["module"] is None and _cuda_state["error"] is None:
        try:
            from . import cuda as cuda_mod

            cuda_mod.load()
            _cuda_state["module"] = cuda_mod
        except Exception as exc:  # missing toolchain, failed build
            _cuda_state["error"] = exc
    if _cuda_state["module"] is None and not _cuda_state["warned"]:
        _cuda_state["warned"] = True
        warnings.warn(
            "treessm: the CUDA extension is not available "
            f"({type(_cuda_state['error']).__name__}: {_cuda_state['error']}); falling back to the "
            "torch reference backend, which is much slower. Install a CUDA toolkit matching "
            "PyTorch (nvcc on PATH or CUDA_HOME set) or prebuild with "
            "`python -m treessm.ops.cuda --build`.", RuntimeWarning, stacklevel=4)
    return _cuda_state["module"]


def available_backends(device="cpu"):
    """Backends that can run on ``device`` in this installation."""
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cpu" and _numba_available():
        out.append("numba")
    elif device.type == "cuda":
        try:
            from . import cuda as cuda_mod

            cuda_mod.load()
            out.append("cuda")
        except Exception:
            pass
    return out


def _resolve_backend(backend: Optional[str], device: torch.device) -> str:
    if backend is None or backend == "auto":
        if device.type == "cpu":
            return "numba" if _numba_available() else "torch"
        if device.type == "cuda":
            return "cuda" if _cuda_backend() is not None else "torch"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend == "numba" and device.type != "cpu":
        raise ValueError(f"backend 'numba' runs on CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
        if _cuda_backend() is None:
            raise RuntimeError(f"backend 'cuda' was requested but the extension is unavailable: "
                               f"{_cuda_state['error']}")
    return backend


def _levels(order, depth):
    return reference.levels_from_tensors(order, depth)


def _compiled_forward(x, w, parent, order, child_ptr, tree_ptr, depth, plan, direction, backend):
    if backend == "torch":
        return reference.forward(x, w, parent, _levels(order, depth), direction)
    if backend == "cuda":
        return _cuda_backend().forward(x, w, parent, order, child_ptr, plan, direction)
    mod = _numba_backend()
    if x.dtype in (torch.float32, torch.float64):
        return mod.forward(x, w, parent, order, child_ptr, tree_ptr, depth, direction)
    # half types: accumulate in float32
    h = mod.forward(x.float(), w.float(), parent, order, child_ptr, tree_ptr, depth, direction)
    return h.to(x.dtype)


def _compiled_backward(g, x, w, h, parent, order, child_ptr, tree_ptr, depth, plan, direction,
                       backend):
    if backend == "torch":
        return reference.backward(g, x, w, h, parent, _levels(order, depth), direction)
    if backend == "cuda":
        return _cuda_backend().backward(g, x, w, h, parent, order, child_ptr, plan, direction)
    mod = _numba_backend()
    if x.dtype in (torch.float32, torch.float64):
        return mod.backward(g, x, w, h, parent, order, child_ptr, tree_ptr, depth, direction)
    gx, gw = mod.backward(g.float(), x.float(), w.float(), h.float(), parent, order, child_ptr,
                          tree_ptr, depth, direction)
    return gx.to(x.dtype), gw.to(w.dtype)


# ---------------------------------------------------------------------------- custom ops
@torch.library.custom_op("treessm::tree_scan", mutates_args=())
def _tree_scan_op(x: Tensor, weight: Tensor, parent: Tensor, order: Tensor, child_ptr: Tensor,
                  tree_ptr: Tensor, depth: Tensor, plan: List[Tensor], direction: str,
                  backend: str) -> Tensor:
    return _compiled_forward(x, weight, parent, order, child_ptr, tree_ptr, depth, plan, direction,
                             backend)


@_tree_scan_op.register_fake
def _(x, weight, parent, order, child_ptr, tree_ptr, depth, plan, direction, backend):
    return torch.empty_like(x)


@torch.library.custom_op("treessm::tree_scan_backward", mutates_args=())
def _tree_scan_backward_op(grad: Tensor, x: Tensor, weight: Tensor, out: Tensor, parent: Tensor,
                           order: Tensor, child_ptr: Tensor, tree_ptr: Tensor, depth: Tensor,
                           plan: List[Tensor], direction: str,
                           backend: str) -> Tuple[Tensor, Tensor]:
    gx, gw = _compiled_backward(grad.contiguous(), x, weight, out, parent, order, child_ptr,
                                tree_ptr, depth, plan, direction, backend)
    return gx, gw


@_tree_scan_backward_op.register_fake
def _(grad, x, weight, out, parent, order, child_ptr, tree_ptr, depth, plan, direction, backend):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, parent, order, child_ptr, tree_ptr, depth, plan, direction, backend = inputs
    ctx.direction = direction
    ctx.backend = backend
    ctx.num_plan = len(plan)
    ctx.save_for_backward(x, weight, output, parent, order, child_ptr, tree_ptr, depth, *plan)


def _backward(ctx, grad):
    x, weight, out, parent, order, child_ptr, tree_ptr, depth, *plan = ctx.saved_tensors
    gx, gw = torch.ops.treessm.tree_scan_backward(grad, x, weight, out, parent, order, child_ptr,
                                                  tree_ptr, depth, plan, ctx.direction,
                                                  ctx.backend)
    return gx, gw, None, None, None, None, None, [None] * ctx.num_plan, None, None


_tree_scan_op.register_autograd(_backward, setup_context=_setup_context)


class _ReferenceScan(torch.autograd.Function):
    """Autograd for the torch backend, reusing the Tree's cached levels."""

    @staticmethod
    def forward(ctx, x, weight, tree, direction):
        levels = tree.levels()
        out = reference.forward(x, weight, tree.parent, levels, direction)
        ctx.save_for_backward(x, weight, out)
        ctx.tree, ctx.direction = tree, direction
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        gx, gw = reference.backward(grad, x, weight, out, ctx.tree.parent, ctx.tree.levels(),
                                    ctx.direction, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gw, None, None


# ---------------------------------------------------------------------------- public API
# Above this many vertices per breadth-first level on average the level kernels win; below
# it (deep, narrow trees: chains, sequences) the heavy-path kernels do. On an H100 (32 trees
# of 3136 vertices, C=160, float32, both) the path kernels took 0.60x the forward time of the
# level kernels on chains, 0.74x at 2.5 vertices per level, 0.97x at 4.5 and 1.3x at 8.4
# (benchmarks/tree_scan.py, "schedule by tree shape").
PATH_MAX_LEVEL_WIDTH = 3.5


def cuda_schedule(tree: Optional[Tree] = None) -> str:
    """The CUDA scan schedule: ``TREESSM_CUDA_SCAN`` = ``auto`` (the default: ``path`` for
    forests whose breadth-first levels hold fewer than :data:`PATH_MAX_LEVEL_WIDTH` vertices
    on average, when the level count is known on the host (:attr:`Tree.num_levels`, set by
    :meth:`Tree.from_parent`), else ``staged``), ``staged`` (breadth-first levels staged through shared
    memory), ``direct`` (levels read from global memory) or ``path`` (heavy paths)."""
    s = os.environ.get("TREESSM_CUDA_SCAN", "auto")
    if s not in ("path", "staged", "direct"):
        s = "auto"
    if s == "auto":
        levels = None if tree is None else tree.num_levels  # known when built on the host
        if levels is None or tree.num_nodes == 0:
            return "staged"
        return "path" if tree.num_nodes < PATH_MAX_LEVEL_WIDTH * levels else "staged"
    return s


def cuda_plan(tree: Tree) -> List[Tensor]:
    """Plan tensors for the CUDA kernels: the level plan, plus the heavy-path plan when the
    path schedule runs (the kernels pick the schedule by the number of tensors)."""
    plan = tree.scan_plan()
    if cuda_schedule(tree) == "path" and tree.num_nodes < 2 ** 31 - 1:
        plan = plan + tree.path_plan()
    return plan


def tree_scan(x: Tensor, weight: Tensor, tree: Tree, direction: str = "both",
              backend: Optional[str] = None) -> Tensor:
    r"""Linear-time tree scan (DESIGN.md, section 1), differentiable in ``x`` and ``weight``.

    .. math::
        h_v = \sum_u S(u, v)\, x_u, \qquad S(u, v) = \prod_{e \in \mathrm{path}(u, v)} w_e

    where the sum runs over all vertices of v's tree (``"both"``), over v's subtree
    (``"up"``) or over the path from v's root to v (``"down"``). The weight of the edge
    (v, parent(v)) is ``weight[v]``; weights of roots are ignored.

    Args:
        x (Tensor [N, *]): input per vertex, channels last.
        weight (Tensor [N, *]): edge weight per vertex and channel, same shape as ``x``.
        tree (Tree): forest over the N vertices, on the device of ``x``.
        direction (str): ``"both"``, ``"up"`` or ``"down"``. (default: ``"both"``)
        backend (str, optional): ``"torch"``, ``"numba"`` or ``"cuda"``; by default the
            fastest available for the device. (default: ``None``)

    Returns:
        Tensor shaped and typed like ``x``. float16/bfloat16 inputs accumulate in float32.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if not isinstance(tree, Tree):
        raise TypeError(f"tree must be a treessm.Tree, got {type(tree).__name__}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
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
    shape = x.shape
    channels = math.prod(shape[1:])
    x2 = x.reshape(shape[0], channels)
    w2 = weight.reshape(shape[0], channels)
    if x2.numel() == 0:
        return (x2 + 0 * w2).reshape(shape)  # keeps autograd connected
    backend = _resolve_backend(backend, x.device)
    if backend == "torch":
        out = _ReferenceScan.apply(x2, w2, tree, direction)
    else:
        plan = cuda_plan(tree) if backend == "cuda" else []
        out = torch.ops.treessm.tree_scan(x2.contiguous(), w2.contiguous(), *tree.tensors(), plan,
                                          direction, backend)
    return out.reshape(shape)
