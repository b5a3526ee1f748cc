"""Loader of treessm's C++/CUDA extension (``extensions/treessm_cuda``).

One library holds every CUDA operator of the package (the tree scan, the fused grid-tree
builder), registered under ``torch.ops.treessm``. It is compiled on first use for the GPU
in the machine (cached by ``torch.utils.cpp_extension`` under ``TORCH_EXTENSIONS_DIR``),
or ahead of time with ``python -m treessm.ops.cuda --build``. CPU-only installations never
import a compiler: nothing here runs until CUDA tensors reach the library. It sits below
``treessm.topology`` and ``treessm.ops``, which both use it.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

__all__ = ["load", "is_loaded", "source_dir"]

_lock = threading.Lock()
_loaded = False
_EXT_NAME = "treessm_cuda"
_SOURCES = ("tree_scan.cu", "grid_tree.cu", "grid_costs.cu", "path_plan.cu")


def source_dir() -> Path:
    """Folder holding the extension's sources (inside the package when installed, else the
    repository's ``extensions/treessm_cuda``)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "extensions" / _EXT_NAME):
        if all((cand / s).is_file() for s in _SOURCES):
            return cand
    raise FileNotFoundError("treessm's CUDA sources were not found (expected extensions/"
                            f"{_EXT_NAME} beside the package or treessm/csrc)")


def is_loaded() -> bool:
    return _loaded


def _ops_present() -> bool:
    try:
        torch.ops.treessm.cuda_scan_forward  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def load(verbose: bool = False) -> None:
    """Make the CUDA ops available: a prebuilt library if present, else a cached JIT build.

    Raises:
        RuntimeError: without a CUDA device or without a CUDA toolkit to build with.
    """
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        if _ops_present():
            _loaded = True
            return
        if not torch.cuda.is_available():
            raise RuntimeError("the CUDA backend needs a CUDA device; torch.cuda.is_available() is "
                               "False")
        for lib in sorted(Path(__file__).resolve().parent.glob("_treessm_cuda*.so")):
            torch.ops.load_library(str(lib))
            if _ops_present():
                _loaded = True
                return
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("no CUDA toolkit was found to build treessm's CUDA extension: install "
                               "one matching torch.version.cuda and put nvcc on PATH or set "
                               "CUDA_HOME")
        major, minor = torch.cuda.get_device_capability()
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        src = source_dir()
        cpp_extension.load(
            name=_EXT_NAME,
            sources=[str(src / s) for s in _SOURCES],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo"],
            is_python_module=False,
            verbose=verbose,
        )
        if not _ops_present():
            raise RuntimeError("the treessm CUDA extension built but registered no ops")
        _loaded = True
