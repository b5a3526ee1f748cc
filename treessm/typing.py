"""Optional dependencies of treessm, probed in one place.

Each flag says whether an optional package can be imported, without importing it (timm
pulls in torchvision, transformers a whole model zoo): the probe is
:func:`importlib.util.find_spec`, and the package is imported by the module that uses it.

* ``WITH_TORCH_SCATTER`` -- torch-scatter, an accelerator that
  :func:`torch_geometric.utils.scatter` picks up by itself;
* ``WITH_TIMM`` -- timm, for :mod:`treessm.integrations.timm`;
* ``WITH_TRANSFORMERS`` -- transformers, for :mod:`treessm.integrations.transformers`;
* ``WITH_PEFT`` -- peft (LoRA on converted language models).

The CUDA extension (``extensions/treessm_cuda``) is the one optional part that is built
rather than installed: :func:`load_cuda_extension` compiles it on first GPU use (cached by
``torch.utils.cpp_extension`` under ``TORCH_EXTENSIONS_DIR``) or finds a library built
ahead of time (``python -m treessm.ops.cuda --build``, or ``TREESSM_BUILD_CUDA=1 pip
install .``). CPU-only installations never import a compiler.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["TORCH_MIN", "check_torch_version", "release", "WITH_TORCH_SCATTER", "WITH_TIMM",
           "WITH_TRANSFORMERS", "WITH_PEFT", "require", "load_cuda_extension",
           "cuda_extension_available", "cuda_extension_loaded", "cuda_extension_error",
           "cuda_source_dir"]


#: The oldest torch release treessm runs on: its operators are ``torch.library.custom_op``
#: with ``register_fake`` and ``register_autograd``, and the layers read the autocast state
#: of a device type (``torch.get_autocast_dtype``), all from torch 2.4.
TORCH_MIN = (2, 4)


def release(version: str, package: str) -> Tuple[int, int]:
    """``(major, minor)`` of a ``version`` string of ``package``, pre-releases and local
    suffixes ignored: what the supported ranges of treessm's dependencies compare.

    Args:
        version (str): the version string, such as ``torch.__version__``.
        package (str): the package's name, for the message.

    Returns:
        Tuple[int, int]: the major and minor release.

    Raises:
        ImportError: when ``version`` does not start with two dotted numbers.

    Example:
        >>> release("2.4.0a0+git1234", "torch")
        (2, 4)
    """
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ImportError(f"cannot read the {package} version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(version: Optional[str] = None) -> None:
    """Raise an :class:`ImportError` that names the release needed when torch (or the given
    ``version`` string) is older than :data:`TORCH_MIN`.

    Args:
        version (str, optional): a torch version string; the installed one when ``None``.

    Raises:
        ImportError: when the version is older than :data:`TORCH_MIN`, or unreadable.

    Example:
        >>> check_torch_version("2.11.0+cu130")
        >>> check_torch_version("2.3.1")
        Traceback (most recent call last):
        ...
        ImportError: treessm needs torch>=2.4, found 2.3.1: pip install -U "torch>=2.4"
    """
    text = torch.__version__ if version is None else version
    if release(text, "torch") < TORCH_MIN:  # nightlies of 2.4 count
        need = ".".join(map(str, TORCH_MIN))
        raise ImportError(f'treessm needs torch>={need}, found {text}: pip install -U '
                          f'"torch>={need}"')


def _importable(name: str) -> bool:
    if name in sys.modules:  # imported already (or blocked with None)
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


#: whether torch-scatter is installed (PyG's ``scatter`` then uses it by itself)
WITH_TORCH_SCATTER = _importable("torch_scatter")
#: whether timm is installed (:mod:`treessm.integrations.timm` registers GrootV with it)
WITH_TIMM = _importable("timm")
#: whether transformers is installed (:mod:`treessm.integrations.transformers`)
WITH_TRANSFORMERS = _importable("transformers")
#: whether peft is installed (LoRA on converted language models)
WITH_PEFT = _importable("peft")

# what each optional package is for and how to get it
_INSTALL = {
    "timm": "pip install 'treessm[timm]'  (timm brings torchvision, a CUDA build of torch on "
            "some machines)",
    "transformers": "pip install 'treessm[transformers]'",
    "peft": "pip install peft",
    "torch_scatter": "pip install torch-scatter -f https://data.pyg.org/whl/torch-"
                     "<version>+<cpu|cuXXX>.html  (or build it from source)",
}


def require(name: str, feature: str) -> None:
    """Raise an :class:`ImportError` that says how to install ``name`` when it is missing.

    Args:
        name (str): the importable name (``"timm"``, ``"transformers"``, ...).
        feature (str): what needs it, for the message.

    Raises:
        ImportError: when ``name`` cannot be imported; the message says how to install it.

    Example:
        >>> require("torch", "treessm")                       # installed: nothing happens
        >>> require("not_a_package", "this example")
        Traceback (most recent call last):
        ...
        ImportError: this example needs not_a_package: pip install not_a_package
    """
    if not _importable(name):
        raise ImportError(f"{feature} needs {name}: {_INSTALL.get(name, 'pip install ' + name)}")


# ---------------------------------------------------------------------------- CUDA extension
_EXT_NAME = "treessm_cuda"
_SOURCES = ("tree_scan.cu", "grid_tree.cu", "grid_costs.cu", "path_plan.cu", "selective_walk.cu",
            "tile_scan.cu", "boruvka.cu", "euler_tour.cu", "expansion.cu", "csr_matmul.cu",
            "pointwise.cu")
_lock = threading.Lock()
_state = {"loaded": False, "error": None}


def cuda_source_dir() -> Path:
    """Folder holding the extension's sources (inside the package when installed, else the
    repository's ``extensions/treessm_cuda``).

    Returns:
        :class:`pathlib.Path` of the folder.

    Raises:
        FileNotFoundError: when neither place holds the sources.

    Example:
        >>> (cuda_source_dir() / "tree_scan.cu").is_file()
        True
    """
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "extensions" / _EXT_NAME):
        if all((cand / s).is_file() for s in _SOURCES):
            return cand
    raise FileNotFoundError("treessm's CUDA sources were not found (expected extensions/"
                            f"{_EXT_NAME} beside the package or treessm/csrc)")


def cuda_extension_loaded() -> bool:
    """Whether the CUDA operators are registered (``torch.ops.treessm.cuda_*``).

    Returns:
        bool: ``True`` once :func:`load_cuda_extension` succeeded in this process.

    Example:
        >>> cuda_extension_loaded() in (True, False)
        True
    """
    return _state["loaded"]


def cuda_extension_error() -> Optional[BaseException]:
    """Why the last :func:`load_cuda_extension` failed, or ``None``.

    Returns:
        The exception of the failed load (kept, so that a failing build is not retried),
        or ``None`` when no load failed.

    Example:
        >>> err = cuda_extension_error()       # None until a load was tried and failed
        >>> err is None or isinstance(err, Exception)
        True
    """
    return _state["error"]


@torch.compiler.assume_constant_result
def cuda_extension_available() -> bool:
    """Whether the CUDA operators can be used: loads (or builds) the extension the first
    time, and answers ``False`` without raising where it cannot be loaded. Run eagerly when
    ``torch.compile`` traces a caller (its answer a constant of the graph), as loading
    cannot be traced.

    Returns:
        bool: ``True`` once the operators are registered in this process.

    Example:
        >>> cuda_extension_available() in (True, False)
        True
    """
    try:
        load_cuda_extension()
    except RuntimeError:
        return False
    return True


def _ops_present() -> bool:
    try:
        torch.ops.treessm.cuda_tree_scan  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def load_cuda_extension(verbose: bool = False) -> None:
    """Make the CUDA operators available: a prebuilt library if present, else a cached JIT
    build for the GPUs of this machine.

    Args:
        verbose (bool): show the compiler's output of a build. (default: ``False``)

    Raises:
        RuntimeError: without a CUDA device, without a CUDA toolkit to build with, or when
            the build fails (the error is remembered and raised again without retrying).

    Example:
        >>> if torch.cuda.is_available():  # doctest: +SKIP
        ...     load_cuda_extension()            # compiles once, then loads from the cache
        ...     assert cuda_extension_loaded()
    """
    if _state["loaded"]:
        return
    with _lock:
        if _state["loaded"]:
            return
        if _state["error"] is not None:
            raise RuntimeError(f"treessm's CUDA extension is unavailable: {_state['error']}")
        try:
            _load(verbose)
        except Exception as exc:  # missing device or toolkit, failed build
            _state["error"] = exc
            raise RuntimeError(f"treessm's CUDA extension is unavailable: {exc}") from exc
        _state["loaded"] = True


def _load(verbose: bool) -> None:
    if _ops_present():
        return
    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA backend needs a CUDA device; torch.cuda.is_available() is "
                           "False")
    for lib in sorted(Path(__file__).resolve().parent.glob("_treessm_cuda*.so")):
        torch.ops.load_library(str(lib))
        if _ops_present():
            return
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit was found to build treessm's CUDA extension: install "
                           "one matching torch.version.cuda and put nvcc on PATH or set "
                           "CUDA_HOME")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()  # build for the GPU in the machine
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    src = cuda_source_dir()
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
