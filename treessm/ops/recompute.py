r"""What the selective layers keep between the forward and the backward off the CPU.

torch's autograd keeps the intermediate arrays of a composition of operators for its
backward: the output gate :math:`\mathrm{LN}(y) \odot \mathrm{SiLU}(z)` keeps four
``[N, C]`` arrays, where its inputs are two. Where memory is what a GPU runs out of, the
layers keep the inputs of such a composition only and form the rest again in the backward
(:func:`recomputed`), and the steps' softplus keeps its output only (the scan keeps it
anyway). Both cost the host a little per call (:func:`recomputed`: about 70 us more than
the plain composition's forward and backward) and the device one more pass, so they are
taken for large arrays only (:func:`keeps_less`); on the CPU the layers' own kernels
already recompute in their backward, and torch's ``expm1``, which the softplus's slope
needs, is slow there (the slope's backward took 60 against torch's softplus's 25 ms at
``[10^5, 128]`` on one thread).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["KEEP_LESS_MIN_ELEMENTS", "keeps_less", "recomputed"]

#: Elements of an array from which the layers keep less for the backward: 2^22, 16 MiB of
#: float32 (``TreeSSMConv(64, 64)``'s ``[N, 128]`` arrays from about 33,000 vertices; every
#: stage of GrootV-T at batch 64).
KEEP_LESS_MIN_ELEMENTS = 1 << 22


def _transformed() -> bool:
    # torch.func's transforms (per-example gradients, vmap) differentiate their own way
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def keeps_less(x: Tensor, *others: Tensor) -> bool:
    """Whether an operation on ``x`` (and ``others``) keeps less for the backward: autograd
    records it, ``x`` is off the CPU and holds at least :data:`KEEP_LESS_MIN_ELEMENTS`, and
    neither a compiler (which plans what the backward keeps itself) nor a ``torch.func``
    transform is tracing it."""
    return (x.device.type != "cpu" and x.numel() >= KEEP_LESS_MIN_ELEMENTS
            and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not _transformed()
            and any(isinstance(t, Tensor) and t.requires_grad for t in (x,) + others))


class _Recomputed(torch.autograd.Function):
    """``composition(*args)`` keeping its tensor arguments only; the backward runs the
    composition again under the forward's autocast state and differentiates it."""

    @staticmethod
    def forward(ctx, composition: Callable, *args):
        ctx.composition = composition
        ctx.save_for_backward(*(a for a in args if isinstance(a, Tensor)))
        ctx.constants = [None if isinstance(a, Tensor) else a for a in args]
        device = next(a for a in args if isinstance(a, Tensor)).device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device),
                        torch.is_autocast_enabled(device))
        return composition(*args)

    @staticmethod
    def backward(ctx, grad: Tensor):
        higher = torch.is_grad_enabled()  # a backward that builds its own graph
        needs = ctx.needs_input_grad[1:]
        saved = iter(ctx.saved_tensors)
        # the inputs themselves where the gradient's own graph must reach them
        args = [constant if constant is not None
                else (next(saved) if higher else next(saved).detach().requires_grad_(need))
                for constant, need in zip(ctx.constants, needs)]
        device, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype, enabled):
            out = ctx.composition(*args)
        wanted = [a for a, need in zip(args, needs) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=higher)
                     if wanted else ())
        return (None,) + tuple(next(grads) if need else None for need in needs)


def recomputed(composition: Callable, *args) -> Tensor:
    """``composition(*args)`` (torch operators, one tensor out, no randomness), keeping only
    its tensor arguments for the backward, which forms the rest again: the same operations,
    so the same gradients, bit for bit."""
    return _Recomputed.apply(composition, *args)
