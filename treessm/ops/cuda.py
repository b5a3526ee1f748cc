"""CUDA backend of the tree scan: the kernels of ``extensions/treessm_cuda`` behind
``torch.ops.treessm.cuda_tree_scan`` and ``cuda_tree_scan_backward`` (schedules
``"trees"``, ``"phases"`` and ``"columns"``) and ``cuda_tile_scan`` and ``cuda_tile_scan_backward``
(``"tiles"``; ``"both"`` also through ``cuda_tile_scan_both_parts`` and
``cuda_tile_scan_both_backward``, which give the scan in parts and keep the forward's parts
for the backward),
launched with the plan, schedule and parameters of :mod:`treessm.ops.plan`.

The extension is compiled on first use (:func:`treessm.typing.load_cuda_extension`), or
ahead of time::

    python -m treessm.ops.cuda --build
"""
from __future__ import annotations

import argparse

import torch

from ..typing import cuda_source_dir, load_cuda_extension
from .plan import ScanPlan

__all__ = ["forward", "backward", "forward_with_parts", "backward_from_parts", "total"]


def forward(x, w, plan: ScanPlan, direction: str):
    """Scan of contiguous ``x, w [N, C]`` on the GPU along ``plan``."""
    if plan.schedule == "tiles":
        return torch.ops.treessm.cuda_tile_scan(x, w, list(plan.tensors), direction)
    return torch.ops.treessm.cuda_tree_scan(x, w, *plan.tensors, plan.schedule,
                                            list(plan.launch), direction)


def backward(g, x, w, h, plan: ScanPlan, direction: str):
    """``(dL/dx, dL/dw)`` given ``g = dL/dh`` and the forward output ``h``."""
    if plan.schedule == "tiles":
        return torch.ops.treessm.cuda_tile_scan_backward(g, w, h, list(plan.tensors),
                                                         direction, x)
    return torch.ops.treessm.cuda_tree_scan_backward(g, x, w, h, *plan.tensors, plan.schedule,
                                                     list(plan.launch), direction)


def forward_with_parts(x, w, plan: ScanPlan, direction: str):
    """``(h, parts)``: the scan as a list of tensors whose sum it is (:func:`total`), and
    what :func:`backward_from_parts` takes besides the data. For ``"both"`` under
    ``"tiles"``, ``h`` is the up scan and the down scan of the brackets, in the accumulation
    type (a caller that reads them once saves the pass adding them), and ``parts`` the
    forward's parts (the up scan, the brackets and the down scan), so that the backward
    does not scan ``x`` a second time; otherwise ``h`` is the one output and ``parts``
    ``None``."""
    if plan.schedule == "tiles" and direction == "both":
        parts = list(torch.ops.treessm.cuda_tile_scan_both_parts(x, w, list(plan.tensors)))
        return [parts[0], parts[2]], parts
    return [forward(x, w, plan, direction)], None


def backward_from_parts(g, x, w, h, parts, plan: ScanPlan, direction: str):
    """``(dL/dx, dL/dw)`` as :func:`backward`, ``dL/dx`` a list of addends as ``h`` is in
    :func:`forward_with_parts`, from its ``parts`` where it kept them (``x`` is then not
    read)."""
    if parts is not None:
        g_up, g_out, gw = torch.ops.treessm.cuda_tile_scan_both_backward(
            g, w, *parts, list(plan.tensors))
        return [g_up, g_out], gw
    gx, gw = backward(g, x, w, h, plan, direction)
    return [gx], gw


def total(addends, dtype):
    """The tensor of a list of addends (:func:`forward_with_parts`): the one addend itself,
    or the sum of two, formed in their type (the accumulation type) and rounded to
    ``dtype``."""
    if len(addends) == 1:
        return addends[0]
    return torch.add(*addends).to(dtype)


def _main(argv=None):
    parser = argparse.ArgumentParser(description="Build treessm's CUDA extension ahead of time.")
    parser.add_argument("--build", action="store_true", help="compile (or find) the extension")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.build:
        load_cuda_extension(verbose=args.verbose)
        print(f"treessm CUDA extension ready (sources: {cuda_source_dir()})")
    else:
        parser.print_help()


if __name__ == "__main__":
    _main()
