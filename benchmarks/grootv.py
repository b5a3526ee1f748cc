"""Throughput of GrootV-T: images per second for inference and training.

Measures ``grootv_tiny`` at 224x224 for

* inference (batch 128, ``torch.no_grad``) and training (batch 64: forward, cross-entropy,
  backward and an AdamW step),
* float32 and bfloat16 autocast,
* the real layer (tree construction + tree scan in every TreeSSM), the authors' faster
  variant with one tree per stage (``shared``: the first block's tree serves the stage),
  and the same network with tree construction replaced by a forest of isolated pixels, so
  that the fused scan forms its states and reads them out but carries nothing along an
  edge (``h = x``) -- the upper bound that a free tree scan would reach;
* with ``--graph``, the training step of the real layer captured once in a CUDA graph and
  replayed (nothing in a step waits for the host), beside the eager step.

Each configuration runs warm-up iterations, then timed iterations with CUDA synchronised
before and after each one; the median is reported. Results go to
``benchmarks/results/grootv_gpu.json`` (on a GPU) with the device name, and a table is
printed. The GrootVL authors' numbers on an H100 (bf16, same batches) are stored beside
them for reference: 564 / 242 img/s (inference / training) with their tree scan and
2238 / 713 img/s with a free stand-in.

    python benchmarks/grootv.py                       # CUDA, about 2 minutes on an H100
    python benchmarks/grootv.py --compile             # also try torch.compile
    python benchmarks/grootv.py --device cpu --quick  # tiny sizes: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import treessm
from treessm.models import grootv_tiny
from treessm.nn import TreeSSM
from treessm.ops import available_backends

AUTHORS_H100_BF16 = {"tree": {"inference": 564, "training": 242},
                     "standin": {"inference": 2238, "training": 713}}
# the release before the phase scans on an H200, bf16, same batches (its saved table)
PREVIOUS_RELEASE_H200_BF16 = {"tree": {"inference": 2166.5, "training": 701.4},
                              "standin": {"inference": 3006.3, "training": 933.0}}


_ISOLATED = {}


def _isolated_pixels(u):
    # a forest of single pixels: the fused scan runs its discretisation, state
    # normalisation and read-out but carries nothing along an edge
    n = u.shape[0] * u.shape[1] * u.shape[2]
    key = (n, u.device)
    if key not in _ISOLATED:
        _ISOLATED[key] = treessm.Tree.from_parent(torch.full((n,), -1)).to(u.device)
    return _ISOLATED[key]


def use_standin(model: torch.nn.Module) -> int:
    """Replace tree construction in every TreeSSM of ``model`` by a forest of isolated
    pixels (an instance attribute shadows the method), so that the scan is free. Returns the
    count."""
    count = 0
    for m in model.modules():
        if isinstance(m, TreeSSM):
            m.scan_tree = _isolated_pixels
            count += 1
    return count


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup: int, iters: int, max_seconds: float):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < iters:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return times


def _captured_step(step, device):
    """``step`` captured in a CUDA graph (after warm-up on a side stream); returns replay."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def bench_one(scan: str, precision: str, mode: str, args, device: torch.device) -> dict:
    batch = args.infer_batch if mode == "inference" else args.train_batch
    torch.manual_seed(0)
    graphed = scan.endswith("+graph")
    base = scan.replace("+graph", "")
    model = grootv_tiny(num_classes=1000, shared_tree=base == "shared").to(device)
    if base == "standin":
        use_standin(model)
    if args.compile:
        model = torch.compile(model)
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(x)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                capturable=graphed)

        def step():
            with autocast:
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=not graphed)
            loss.backward()
            opt.step()

        if graphed:
            step = _captured_step(step, device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = _time(step, device, args.warmup, args.iters, args.max_seconds)
    med = statistics.median(times)
    out = dict(scan=scan, precision=precision, mode=mode, batch=batch,
               images_per_s=round(batch / med, 1), ms_median=round(1e3 * med, 2),
               ms_all=[round(1e3 * t, 2) for t in times])
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="GrootV-T images/s (inference and training)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few iterations (checks that the script runs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--size", type=int, default=None, help="image size (default: 224)")
    parser.add_argument("--infer-batch", type=int, default=None, help="(default: 128)")
    parser.add_argument("--train-batch", type=int, default=None, help="(default: 64)")
    parser.add_argument("--warmup", type=int, default=None, help="(default: 3)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: 10)")
    parser.add_argument("--max-seconds", type=float, default=8.0,
                        help="stop timing a configuration after this long (at least 3 "
                             "iterations)")
    parser.add_argument("--graph", action="store_true",
                        help="also time the training step captured in a CUDA graph")
    parser.add_argument("--scans", default="tree,shared,standin",
                        help="comma-separated variants: tree, shared, standin")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="comma-separated: fp32, bf16")
    parser.add_argument("--out", default=None,
                        help="JSON file (default: benchmarks/results/grootv_gpu.json on CUDA, "
                             "grootv_cpu.json otherwise)")
    args = parser.parse_args(argv)
    quick = dict(size=64, infer_batch=4, train_batch=2, warmup=1, iters=2)
    full = dict(size=224, infer_batch=128, train_batch=64, warmup=3, iters=10)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu --quick to check the script")
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    here = os.path.dirname(os.path.abspath(__file__))
    out_path = args.out or os.path.join(
        here, "results", "grootv_gpu.json" if device.type == "cuda" else "grootv_cpu.json")

    results = []
    header = f"{'scan':<10} {'precision':<9} {'mode':<9} {'batch':>5} {'img/s':>9} {'ms/iter':>9}"
    print(f"GrootV-T at {args.size}x{args.size} on {device_name} "
          f"(tree_scan backends: {available_backends(device)})")
    print(header)
    print("-" * len(header))
    precisions = args.precisions.split(",")
    configs = [(scan, precision, mode) for scan in args.scans.split(",")
               for precision in precisions for mode in ("inference", "training")]
    if args.graph and device.type == "cuda":
        configs += [("tree+graph", precision, "training") for precision in precisions]
    for scan, precision, mode in configs:
        try:
            r = bench_one(scan, precision, mode, args, device)
            line = f"{r['images_per_s']:>9.1f} {r['ms_median']:>9.2f}"
        except Exception as exc:  # keep measuring the other configurations
            r = dict(scan=scan, precision=precision, mode=mode,
                     error=f"{type(exc).__name__}: {exc}"[:500])
            line = f"  failed: {r['error'][:60]}"
        batch = args.infer_batch if mode == "inference" else args.train_batch
        print(f"{scan:<10} {precision:<9} {mode:<9} {batch:>5} {line}", flush=True)
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def rate(scan, precision, mode):
        for r in results:
            if (r["scan"], r["precision"], r["mode"]) == (scan, precision, mode):
                return r.get("images_per_s")
        return None

    ratios = {}
    for precision in precisions:
        for mode in ("inference", "training"):
            tree, free = rate("tree", precision, mode), rate("standin", precision, mode)
            if tree and free:
                # share of the step spent in tree construction + scan
                ratios[f"{precision}_{mode}_scan_share"] = round(1 - tree / free, 3)
                ratios[f"{precision}_{mode}_tree_over_standin"] = round(tree / free, 3)
    if ratios:
        print("share of time in tree construction + scan: " +
              ", ".join(f"{k[:-11]} {v:.0%}" for k, v in ratios.items() if k.endswith("_share")))

    report = dict(
        benchmark="grootv_tiny throughput", device=device_name, device_type=device.type,
        torch=torch.__version__, cuda=torch.version.cuda, treessm=treessm.__version__,
        python=sys.version.split()[0], tree_scan_backends=available_backends(device),
        image_size=args.size, infer_batch=args.infer_batch, train_batch=args.train_batch,
        warmup=args.warmup, iters=args.iters, compile=args.compile, quick=args.quick,
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_cudnn=torch.backends.cudnn.allow_tf32,
        standin="tree construction replaced by isolated pixels (the scan carries nothing: "
                "h = x)",
        results=results, scan_share=ratios,
        authors_h100_bf16_images_per_s=AUTHORS_H100_BF16,
        previous_release_h200_bf16_images_per_s=PREVIOUS_RELEASE_H200_BF16)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"saved {out_path}")
    return report


if __name__ == "__main__":
    main()
