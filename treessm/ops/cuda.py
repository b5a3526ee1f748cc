"""CUDA backend of the tree scan: the kernels of ``extensions/treessm_cuda`` behind
``torch.ops.treessm.cuda_scan_forward`` / ``cuda_scan_backward``.

The extension is compiled on first use (see :mod:`treessm._extension`), or ahead of time::

    python -m treessm.ops.cuda --build
"""
from __future__ import annotations

import argparse

import torch

from .._extension import is_loaded, load, source_dir

__all__ = ["load", "is_loaded", "source_dir", "forward", "backward"]


def forward(x, w, parent, order, child_ptr, plan, direction):
    """``plan`` is :meth:`treessm.Tree.scan_plan`, followed by :meth:`treessm.Tree.path_plan`
    for the path kernels."""
    if len(plan) == 8:
        return torch.ops.treessm.cuda_path_scan_forward(x, w, *plan[4:], direction)
    return torch.ops.treessm.cuda_scan_forward(x, w, order, child_ptr, *plan[:4], direction)


def backward(g, x, w, h, parent, order, child_ptr, plan, direction):
    if len(plan) == 8:
        return torch.ops.treessm.cuda_path_scan_backward(g, x, w, h, *plan[4:], direction)
    gx, gw = torch.ops.treessm.cuda_scan_backward(g, x, w, h, order, child_ptr, *plan[:4],
                                                  direction)
    return gx, gw


def _main(argv=None):
    parser = argparse.ArgumentParser(description="Build treessm's CUDA extension ahead of time.")
    parser.add_argument("--build", action="store_true", help="compile (or find) the extension")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.build:
        load(verbose=args.verbose)
        print(f"treessm CUDA extension ready (sources: {source_dir()})")
    else:
        parser.print_help()


if __name__ == "__main__":
    _main()
