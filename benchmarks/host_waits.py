"""Where a layer's training step waits for the GPU: one step of each layer, after warm-up,
under ``torch.cuda.set_sync_debug_mode("warn")``, each wait counted at the treessm lines
that caused it (innermost first), the step's kernels, copies and fills counted by the
profiler, and the operators it dispatches counted at the treessm lines that called them
(views and bare allocations left out: they launch nothing). A step that waits nowhere can be
captured in a CUDA graph; one that puts few operations on the device is not host-bound, and
the lines that dispatch the most operators are where a step's launches come from. Waits
that torch's sync debug mode does not detect, or that C++ code raises outside any Python
call, are not counted.

    python benchmarks/host_waits.py                     # every layer, printed
    python benchmarks/host_waits.py --out waits.json    # and saved

Cases: ``TreeSSMConv(64, 64)`` on a random graph of 2,708 vertices (five edges a vertex)
given as ``edge_index``, as a prepared graph, and with ``batch``; ``TreeSSM(96)`` (GrootV-T's
first stage width) on 2 images of 28x28; ``GrootLMixer(256)`` in each mode on 2 sequences of
256 tokens.
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import treessm
from treessm.nn import GrootLMixer, TreeSSM, TreeSSMConv


def _cases(device):
    g = torch.Generator().manual_seed(0)
    n = 2708
    x = torch.randn(n, 64, generator=g).to(device)
    ei = torch.randint(0, n, (2, 5 * n), generator=g).to(device)
    conv = TreeSSMConv(64, 64).to(device)
    prepared = treessm.prepare_graph(ei, n)
    batch = torch.zeros(n, dtype=torch.long, device=device)
    image = torch.randn(2, 28, 28, 96, generator=g).to(device)
    tokens = torch.randn(2, 256, 256, generator=g).to(device)
    yield "TreeSSMConv, edge_index", conv, (x, ei), {}
    yield "TreeSSMConv, PreparedGraph", conv, (x, prepared), {}
    yield "TreeSSMConv, PreparedGraph and batch", conv, (x, prepared), dict(batch=batch)
    yield "TreeSSM (GrootV)", TreeSSM(96).to(device), (image,), {}
    for mode in ("chain", "causal", "paper"):
        yield f"GrootLMixer, {mode}", GrootLMixer(256, mode=mode).to(device), (tokens,), {}


def _site(depth: int = 3) -> str:
    """The innermost ``depth`` treessm frames of the current stack, as file:line."""
    frames = [f for f in traceback.extract_stack()[:-1]
              if "/treessm/" in f.filename and "/benchmarks/" not in f.filename]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[::-1][:depth])


def _waits(step):
    """The treessm call sites (file:line, innermost first) of the waits in one ``step``."""
    seen = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        seen[_site() or "outside treessm"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return dict(seen)


def _device_ops(step):
    """The kernels, copies and fills that one ``step`` puts on the device."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if str(e.device_type).endswith("CUDA"))


# operators that launch nothing: views, and allocations without a fill
_SILENT = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
           "resize_", "set_", "lift_fresh", "detach", "alias"}


class _OperatorSites(TorchDispatchMode):
    """Counts the operators dispatched inside it by the treessm lines that called them (the
    innermost two)."""

    def __init__(self):
        super().__init__()
        self.sites = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func._opname in _SILENT):
            self.sites[_site(2) or "outside treessm (autograd's own formulas, torch)"] += 1
        return func(*args, **(kwargs or {}))


def _operator_sites(step, top: int = 12):
    """The total of operators dispatched in one ``step`` (forward and backward), and the
    ``top`` call sites by count."""
    with _OperatorSites() as counting:
        step()
    return sum(counting.sites.values()), dict(counting.sites.most_common(top))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="save the table as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = []
    for name, module, inputs, kwargs in _cases(torch.device("cuda")):
        leaf = inputs[0].clone().requires_grad_()

        def step():
            leaf.grad = None
            module.zero_grad(set_to_none=True)
            module(leaf, *inputs[1:], **kwargs).square().sum().backward()

        for _ in range(3):  # graphs prepared, sizes cached, kernels loaded
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        operators, sites = _operator_sites(step)
        row = dict(case=name, step_ms=(time.perf_counter() - t0) * 100,
                   device_ops=_device_ops(step), waits=_waits(step), operators=operators,
                   operator_sites=sites)
        rows.append(row)
        print(f"{name:<40} {row['step_ms']:7.2f} ms a step, {row['device_ops']:4d} device ops, "
              f"{operators:4d} operators, {sum(row['waits'].values())} waits", flush=True)
        for where, count in row["waits"].items():
            print(f"    {count} x {where}", flush=True)
        for where, count in sites.items():
            print(f"    {count:4d} operators at {where}", flush=True)
    if args.out:
        result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                      treessm=treessm.__version__, when=time.strftime("%Y-%m-%d %H:%M:%S"),
                      rows=rows)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
