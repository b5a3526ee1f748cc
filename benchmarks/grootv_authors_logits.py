"""The GrootVL authors' GrootV against treessm's, with their own code, on a GPU: same weights,
same logits?

    python benchmarks/grootv_authors_logits.py --authors-repo PATH/TO/GrootVL
    python benchmarks/grootv_authors_logits.py --authors-repo PATH --size small \\
        --checkpoint grootv_s_1k_224.pth            # their released weights, if at hand
    python benchmarks/grootv_authors_logits.py --authors-repo PATH --prepare-only DIR

``PATH/TO/GrootVL`` is a checkout of https://github.com/EasonXiao-888/GrootVL. The script

1. makes their model importable: the package ``GrootV/classification/models`` (under the
   name ``grootvl_models``), their CUDA kernels (``tree_scan._C``) from an installed
   ``tree_scan`` package or else compiled here from ``GrootV/third-party/TreeScan/
   tree_scan/csrc`` with the few substitutions that current PyTorch needs (``COMPAT``)
   and the pieces that folder lacks (below);
   stand-ins for what their model file imports but does not run in evaluation (timm's
   ``trunc_normal_`` and ``DropPath``, fvcore's ``flop_count``) when those packages are
   missing (installing timm would replace the machine's torch), and a small ``rearrange``
   / ``repeat`` when einops is missing;
2. builds their GrootV-T/S/B and treessm's (``grootv_tiny`` / ``_small`` / ``_base``) with
   the same weights: the checkpoint's when given, otherwise their initialisation with
   every tensor perturbed (so no LayerNorm is an identity). Weights go theirs -> treessm
   (:func:`treessm.models.load_grootvl_checkpoint`, strict) and treessm -> theirs
   (:func:`treessm.models.treessm_to_grootvl`, ``load_state_dict(strict=True)`` into a
   second instance of their model); the round trip must give back every tensor exactly;
3. runs both in float32 with TF32 off, in evaluation mode, on a batch of noise images and
   of smooth images at 224x224 and at 200x300 (not square, not a multiple of 32), and
   compares the logits and the four stage maps (their ``forward_features_seq_out``,
   treessm's ``forward_intermediates``);
4. prints a table and saves ``benchmarks/results/grootv_authors_logits_gpu_<card>.json``.

What to look at: ``top1`` 100% and ``logits max|d|`` far below the logits' scale (float32
through 13-17 tree scans of different kernels: 1e-4 or less), on every row. A large
difference on the "smooth" rows only would come from tied edge costs, where the two
minimum-spanning-tree codes may pick different trees; a large difference everywhere is a
real disagreement. Needs a CUDA GPU and a CUDA toolkit matching torch (for the build).

Their kernels, built from their sources. ``GrootV/third-party/TreeScan/tree_scan/csrc``
holds ``vision.cpp``, ``bfs.cu``, ``refine.cu`` / ``refine.h`` and ``boruvka_rst.cu``, but
``vision.cpp`` includes ``bfs.h``, ``mst.h`` and ``rst.h`` and binds ``mst_forward`` and
``rst_forward``, which no file there defines, and ``boruvka_rst.cu`` includes the absent
``boruvka_rst.h``. The GrootL part of the same repository
(``GrootL/third-party/TreeScanLan/tree_scan_lan/csrc``) holds the missing definitions:
``mst.cu`` (``mst_forward``, with ``boruvka.cu``'s ``boruvkaMST`` and ``createGraph``) and
``rst.cu`` (``rst_forward``, on ``boruvka_rst.cu``'s ``boruvka_rst`` and ``create_graph``).
:func:`prepare_kernel_sources` copies GrootV's folder and those three GrootL files, all with
the ``COMPAT`` substitutions and otherwise unchanged, and writes each missing header as the
declarations of the functions its source defines, read from their definitions
(``HEADERS``), plus, for the two Borůvka headers, the ``Edge`` / ``Graph`` structs with the
members their code uses (``GRAPH_STRUCTS``: the only definition that is not theirs). GrootL's
own ``bfs.h`` is not used: it declares a ``bfs_forward`` returning four tensors, where
GrootV's ``bfs.cu`` returns the three that GrootV's model unpacks.

GrootL's ``mst_forward`` is the function GrootV's model calls: ``tree_scan_core.py`` passes
``mst(index, weight, H * W)`` with int32 edges ``[B, E, 2]`` (vertical neighbours
``(i, j) - (i+1, j)`` row-major, then horizontal ones ``(i, j) - (i, j+1)``), float32 costs
``[B, E]`` (``exp(-cosine)``) and the number of pixels, and takes back int32 tree edges
``[B, H * W - 1, 2]``, which is the signature and result of ``mst.cu``. It runs Borůvka on
the CPU, one thread per image; each component takes its cheapest edge by a strict ``>``, so
among equal costs the edge listed first wins: the tree is the minimum spanning tree under
the total order (cost, edge position), deterministic. treessm breaks ties the same way but
lists horizontal edges before vertical ones (:mod:`treessm.topology.grid`), so where costs
are equal (or equal after the rounding of the two cost computations) the trees can differ,
which the "smooth" rows would show. ``rst_forward`` (a random spanning tree: ``boruvka_rst``
compares costs through ``rand()``) is bound by ``vision.cpp`` but never called by GrootV.
Their sources as prepared compile with nvcc 13.0 (sm_90, torch 2.13's headers) and link
with no symbol of theirs missing or defined twice; ``--prepare-only DIR`` writes them
without building anything.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import re
import shutil
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from treessm.models import (load_grootvl_checkpoint, read_grootvl_checkpoint,  # noqa: E402
                            treessm_to_grootvl)
from treessm.models import grootv as treessm_grootv  # noqa: E402

SIZES = {"tiny": ("grootv_tiny", 80), "small": ("grootv_small", 96), "base": ("grootv_base", 128)}
KERNELS = Path("GrootV/third-party/TreeScan/tree_scan/csrc")
LANGUAGE_KERNELS = Path("GrootL/third-party/TreeScanLan/tree_scan_lan/csrc")
MODELS = Path("GrootV/classification/models")
# (old, new): what current PyTorch removed from the C++ API the kernels were written for
COMPAT = (
    ("#include <THC/THCAtomics.cuh>", "#include <ATen/cuda/Atomic.cuh>"),
    (".data<", ".data_ptr<"),
    ("AT_CHECK(", "TORCH_CHECK("),
)
# The headers their sources include but their repository does not ship: each declares
# functions that one of their .cu files defines (the declarations are read from those
# definitions when the sources are prepared) -- header: (defining source, functions).
HEADERS = {
    "bfs.h": ("bfs.cu", ("bfs_forward",)),
    "mst.h": ("mst.cu", ("mst_forward",)),
    "rst.h": ("rst.cu", ("rst_forward",)),
    "boruvka.h": ("boruvka.cu", ("createGraph", "boruvkaMST")),
    "boruvka_rst.h": ("boruvka_rst.cu", ("create_graph", "boruvka_rst")),
}
# The one definition no .cu file holds: the graph that their Boruvka codes read, with the
# members those codes use (graph->V, ->E, ->edge; edge[i].src, .dest, .weight; the weight a
# float, as rst.cu stores static_cast<float>(...) and boruvka_rst.cu compares floats).
GRAPH_STRUCTS = """\
struct Edge {
    int src, dest;
    float weight;
};

struct Graph {
    int V, E;
    Edge* edge;
};
"""
INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


# ---------------------------------------------------------------------------- their code
def _axes(side: str):
    groups, group = [], None
    for token in side.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            group = []
        elif token == ")":
            groups.append(group)
            group = None
        elif group is not None:
            group.append(token)
        else:
            groups.append([token])
    return groups


def _split(tensor, left, sizes):
    sizes = dict(sizes)
    for group, dim in zip(left, tensor.shape):
        unknown = [a for a in group if a not in sizes]
        known = math.prod(sizes[a] for a in group if a in sizes)
        if len(unknown) > 1:
            raise ValueError(f"cannot infer the sizes of {unknown}")
        if unknown:
            sizes[unknown[0]] = dim // known
    axes = [a for g in left for a in g]
    return tensor.reshape([sizes[a] for a in axes]), axes, sizes


def rearrange(tensor, pattern: str, **sizes):
    """einops' ``rearrange`` for named axes and groups (what the authors' code uses)."""
    left, right = (_axes(s) for s in pattern.split("->"))
    tensor, axes, sizes = _split(tensor, left, sizes)
    tensor = tensor.permute([axes.index(a) for g in right for a in g])
    return tensor.reshape([math.prod(sizes[a] for a in g) for g in right])


def repeat(tensor, pattern: str, **sizes):
    """einops' ``repeat`` for named axes and groups (what the authors' code uses)."""
    left, right = (_axes(s) for s in pattern.split("->"))
    tensor, axes, sizes = _split(tensor, left, sizes)
    new = [a for g in right for a in g if a not in axes]
    tensor = tensor.reshape(list(tensor.shape) + [1] * len(new))
    axes = axes + new
    tensor = tensor.expand([sizes[a] for a in axes])
    tensor = tensor.permute([axes.index(a) for g in right for a in g])
    return tensor.reshape([math.prod(sizes[a] for a in g) for g in right])


def _stand_in(name: str, **attrs) -> None:
    if importlib.util.find_spec(name.split(".")[0]) is not None:
        return
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


class _DropPath(torch.nn.Module):  # identity in evaluation, which is all this script runs
    def __init__(self, p=0.0):
        super().__init__()

    def forward(self, x):
        return x


def _code(text: str) -> str:
    """``text`` with its C/C++ comments blanked out (string and character literals kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            out.append(" ")
        elif text[i] in "\"'":
            j = i + 1
            while j < n and text[j] != text[i]:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def declaration(source: str, name: str) -> str:
    """The declaration of the function ``name`` that the C++/CUDA text ``source`` defines:
    its return type, name and parameters as the definition writes them, and a ``;``.

    Args:
        source (str): the text of a ``.cu`` / ``.cpp`` file.
        name (str): the function.

    Raises:
        ValueError: if ``source`` defines no function ``name``, or more than one, or one
            that another file cannot call (``static``, a template, a kernel).
    """
    code = _code(source)
    found = []
    for match in re.finditer(rf"\b{re.escape(name)}\s*\(", code):
        depth, j = 0, match.end() - 1
        while j < len(code):
            depth += {"(": 1, ")": -1}.get(code[j], 0)
            if depth == 0:
                break
            j += 1
        if not code[j + 1:].lstrip().startswith("{"):
            continue  # a call or a declaration
        head = max(code.rfind(c, 0, match.start()) for c in ";{}") + 1
        lines = code[head:match.start()].splitlines()
        returns = " ".join(" ".join(l.split()) for l in lines if not l.lstrip().startswith("#"))
        found.append(f"{returns.strip()} {name}({' '.join(code[match.end():j].split())});")
    if len(found) != 1:
        raise ValueError(f"expected one definition of {name}, found {len(found)}")
    if re.search(r"\b(static|template|__global__|__device__)\b", found[0].split(name)[0]):
        raise ValueError(f"{name} cannot be declared for other files: {found[0]}")
    return found[0]


def prepare_kernel_sources(repo: Path, dst: Path) -> list:
    """Their kernel sources in ``dst``, ready for :func:`torch.utils.cpp_extension.load`.

    Copies every source of ``repo / KERNELS`` with the :data:`COMPAT` substitutions; for each
    ``#include "X"`` that no copied file answers, writes ``X`` from :data:`HEADERS`: the
    declarations of the functions that the named source defines, read from its text (that
    source taken from ``KERNELS``, else from ``LANGUAGE_KERNELS``, the GrootL part of the
    same repository, and copied with the same substitutions). Headers are never taken from
    ``LANGUAGE_KERNELS``: its ``bfs.h`` declares a ``bfs_forward`` of four tensors, the
    ``bfs.cu`` here returns three (the return type is not part of the linker's name, so the
    build would succeed and the call read a wrong result).

    Args:
        repo (Path): a checkout of the GrootVL repository.
        dst (Path): the folder to write (emptied first).

    Returns:
        the sources to compile: ``vision.cpp`` first, then the ``.cu`` files, sorted.

    Raises:
        FileNotFoundError: if ``repo / KERNELS`` is not a folder, or an included file is
            neither in it nor one that :data:`HEADERS` can write.
    """
    src, other = repo / KERNELS, repo / LANGUAGE_KERNELS
    if not src.is_dir():
        raise FileNotFoundError(f"{src} not found: is {repo} a checkout of the GrootVL "
                                "repository?")
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)

    def copy(path: Path) -> None:
        text = path.read_text()
        for old, new in COMPAT:
            text = text.replace(old, new)
        (dst / path.name).write_text(text)
        pending.append(dst / path.name)

    pending = []
    for path in sorted(src.iterdir()):
        if path.suffix in (".cu", ".cpp", ".h", ".cuh"):
            copy(path)
    while pending:
        for header in INCLUDE.findall(pending.pop(0).read_text()):
            if (dst / header).exists():
                continue
            if header not in HEADERS:
                raise FileNotFoundError(f"{header} is included by their sources but is in "
                                        f"neither {src} nor {other}")
            source, functions = HEADERS[header]
            if not (dst / source).exists():
                origin = src / source if (src / source).exists() else other / source
                if not origin.exists():
                    raise FileNotFoundError(f"{source} (the definitions {header} declares) "
                                            f"is in neither {src} nor {other}")
                copy(origin)
            text = (dst / source).read_text()
            lines = [f"extern {declaration(text, f)}" for f in functions]
            prelude = GRAPH_STRUCTS if "struct Graph" in "".join(lines) else \
                "#include <torch/extension.h>\n"
            (dst / header).write_text(
                f"// Written by benchmarks/grootv_authors_logits.py: declarations of the "
                f"functions that\n// {source} (the GrootVL authors' code) defines.\n"
                f"#pragma once\n{prelude}\n" + "\n".join(lines) + "\n")
    return [dst / "vision.cpp"] + sorted(dst.glob("*.cu"))


def kernels(repo: Path, build_dir: Path):
    """Their ``tree_scan._C``: the installed package, or compiled from their sources."""
    spec = importlib.util.find_spec("tree_scan")
    if spec is not None and spec.submodule_search_locations:  # their package, not a module
        from tree_scan import _C  # of that name beside this script
        return _C
    from torch.utils.cpp_extension import load

    dst = build_dir / "csrc"
    try:
        sources = prepare_kernel_sources(repo, dst)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    flags = ["-O3", "-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__",
             "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    build = build_dir / "build"
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load(name="grootvl_tree_scan", sources=[str(p) for p in sources],
                    extra_include_paths=[str(dst)], extra_cflags=["-O3"],
                    extra_cuda_cflags=flags, build_directory=str(build), verbose=True)
    except Exception as exc:  # the message of the compiler is above
        raise SystemExit(f"building the authors' kernels from {dst} failed ({exc}); patch "
                         "that copy (see COMPAT in this script) or install their package "
                         "(pip install -e GrootV/third-party/TreeScan)") from None


def authors_package(repo: Path, build_dir: Path):
    """The authors' ``models`` package, importable with its kernels."""
    ext = kernels(repo, build_dir)
    package = types.ModuleType("tree_scan")
    package._C = ext
    sys.modules.setdefault("tree_scan", package)
    sys.modules.setdefault("tree_scan._C", ext)
    _stand_in("timm.models.layers", trunc_normal_=torch.nn.init.trunc_normal_,
              DropPath=_DropPath)
    _stand_in("fvcore.nn", flop_count=None)
    _stand_in("einops", rearrange=rearrange, repeat=repeat)
    root = repo / MODELS
    spec = importlib.util.spec_from_file_location(
        "grootvl_models", root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["grootvl_models"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("grootvl_models.grootv")


# ---------------------------------------------------------------------------- comparison
def images(kind: str, batch: int, height: int, width: int, generator) -> torch.Tensor:
    if kind == "noise":
        return torch.randn(batch, 3, height, width, generator=generator)
    coarse = torch.randn(batch, 3, height // 16 + 1, width // 16 + 1, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)


def differences(mine: torch.Tensor, theirs: torch.Tensor) -> dict:
    d = (mine.double() - theirs.double()).abs()
    return dict(max_abs=float(d.max()), max_rel=float(d.max() / theirs.double().abs().max()))


def _perturb(model: torch.nn.Module) -> None:
    """Every tensor of ``model`` moved off its initial value (no LayerNorm an identity)."""
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if key.endswith("running_var"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn_like(t))


def build_pair(theirs_module, size: str, device, checkpoint=None, use_ema=False):
    """Their GrootV of ``size`` and treessm's with the same weights, in evaluation mode.

    Returns:
        ``(theirs, mine, weights, round_trip)``: the two models, what the weights are, and
        whether treessm's state dict converted back (:func:`treessm_to_grootvl`) and loaded
        strictly into a second instance of their model gives back every tensor exactly.
    """
    name, channels = SIZES[size]
    depths = list(treessm_grootv.ARCHITECTURES[name]["depths"])

    def build_theirs():
        return theirs_module.GrootV(channels=channels, depths=depths, num_classes=1000,
                                    mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
                                    layer_scale=None, post_norm=False, with_cp=False,
                                    cls_scale=1.5).to(device).eval()

    torch.manual_seed(0)
    theirs = build_theirs()
    if checkpoint:
        state = read_grootvl_checkpoint(checkpoint, use_ema=use_ema, weights_only=False)
        theirs.load_state_dict(state, strict=True)
        weights = f"{Path(checkpoint).name}{' (ema)' if use_ema else ''}"
    else:
        _perturb(theirs)
        weights = "their initialisation, perturbed"
    state = {k: v.detach().clone() for k, v in theirs.state_dict().items()}
    mine = getattr(treessm_grootv, name)().to(device).eval()
    load_grootvl_checkpoint(mine, state, classifier=True)
    again = build_theirs()
    again.load_state_dict(treessm_to_grootvl(mine), strict=True)
    round_trip = all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    return theirs, mine, weights, round_trip


def compare(theirs, mine, batch: int, device, sizes=((224, 224), (200, 300))) -> list:
    """One row per input (noise and smooth images at each of ``sizes``): top-1 agreement and
    the largest differences of the logits and of the four stage maps."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for height, width in sizes:
        for kind in ("noise", "smooth"):
            x = images(kind, batch, height, width, generator).to(device)
            with torch.no_grad():
                want = theirs(x)
                want_maps = theirs.forward_features_seq_out(x)
                got = mine(x)
                got_maps = mine.forward_intermediates(x, output_fmt="NHWC",
                                                      intermediates_only=True)
            if got.shape != want.shape or [m.shape for m in got_maps] != \
                    [m.shape for m in want_maps]:
                raise RuntimeError(f"shapes differ: logits {tuple(got.shape)} and "
                                   f"{tuple(want.shape)}, stage maps "
                                   f"{[tuple(m.shape) for m in got_maps]} and "
                                   f"{[tuple(m.shape) for m in want_maps]}")
            rows.append(dict(input=f"{kind} {height}x{width}", batch=batch,
                             top1=float((got.argmax(1) == want.argmax(1)).float().mean()),
                             logits=differences(got, want),
                             logit_scale=float(want.abs().max()),
                             stages=[differences(a, b) for a, b in zip(got_maps, want_maps)]))
    return rows


def print_table(rows: list) -> None:
    print(f"{'input':<18}{'top1':>7}{'logits max|d|':>15}{'rel':>10}"
          + "".join(f"{f'stage {i} max|d|':>16}" for i in range(4)))
    for r in rows:
        print(f"{r['input']:<18}{100 * r['top1']:>6.1f}%{r['logits']['max_abs']:>15.2e}"
              f"{r['logits']['max_rel']:>10.1e}"
              + "".join(f"{s['max_abs']:>16.2e}" for s in r["stages"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-repo", type=Path, required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--checkpoint", type=Path, help="their checkpoint file (optional)")
    parser.add_argument("--use-ema", action="store_true", help="load its 'model_ema'")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--build-dir", type=Path, default=HERE.parent / ".grootvl_build")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--prepare-only", type=Path, metavar="DIR",
                        help="write their kernel sources, ready to compile, to DIR and stop "
                             "(needs no GPU)")
    args = parser.parse_args()
    if args.prepare_only:
        try:
            sources = prepare_kernel_sources(args.authors_repo.resolve(), args.prepare_only)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(str(exc)) from None
        print("\n".join(str(p) for p in sources))
        return
    if not torch.cuda.is_available():
        raise SystemExit("the authors' kernels need a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")

    theirs_module = authors_package(args.authors_repo.resolve(), args.build_dir.resolve())
    theirs, mine, weights, round_trip = build_pair(theirs_module, args.size, device,
                                                   args.checkpoint, args.use_ema)
    rows = compare(theirs, mine, args.batch, device)

    name = SIZES[args.size][0]
    card = torch.cuda.get_device_name().split()[-1].lower()
    print(f"{name} on {torch.cuda.get_device_name()}, weights: {weights}; round trip of the "
          f"state dict exact: {round_trip}")
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"grootv_authors_logits_gpu_{card}.json"
    path.write_text(json.dumps(dict(
        model=name, device=torch.cuda.get_device_name(), torch=torch.__version__,
        python=platform.python_version(), weights=weights, float32_tf32_off=True,
        state_dict_round_trip_exact=round_trip, rows=rows), indent=1))
    print(f"saved {path}")
    if not round_trip:
        sys.exit(1)


if __name__ == "__main__":
    main()
