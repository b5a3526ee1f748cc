"""GrootLMixer against transformers' MambaMixer at Mamba-130m widths.

Times one mixer layer -- hidden 768, d_state 16, expand 2 (d_inner 1536), batch 4, 2,048
tokens -- for

* transformers' ``MambaMixer`` (its CUDA kernels when ``mamba_ssm`` and ``causal_conv1d``
  are installed, else its torch path: a loop over the tokens),
* :class:`~treessm.nn.grootl.GrootLMixer` with ``mode="chain"`` (the same recurrence as a
  tree scan over the chain), ``mode="causal"`` (tree built from the scan inputs in every
  call, then the scan) and ``mode="paper"`` (chain scan, minimum spanning tree, tree scan),

in forward (``torch.no_grad``) and forward + backward, all in the same run on the same
inputs and weights. On a GPU each repeat is timed with CUDA events; the median of the
repeats is reported, with the ratio to ``MambaMixer``. Results go to
``benchmarks/results/grootl_<gpu|cpu>.json`` (``--out``) with the device and versions::

    python benchmarks/grootl.py                          # CUDA, about 2 minutes on an H200
    python benchmarks/grootl.py --device cpu --quick     # tiny sizes: checks the script runs
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

import treessm
from treessm.nn.grootl import GrootLMixer

FULL = dict(hidden=768, state=16, expand=2, batch=4, length=2048)
QUICK = dict(hidden=64, state=4, expand=2, batch=2, length=128)


def _mamba_mixer(size, device, dtype):
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    config = MambaConfig(hidden_size=size["hidden"], state_size=size["state"],
                         expand=size["expand"], num_hidden_layers=1)
    torch.manual_seed(0)
    mixer = MambaMixer(config, layer_idx=0)
    if hasattr(mixer, "init_mamba_weights"):
        mixer.init_mamba_weights()
    return config, mixer.to(device=device, dtype=dtype)


def _timer(device):
    if device.type == "cuda":
        def run(fn):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def measure(module, x, backward: bool, warmup: int, repeats: int, max_seconds: float,
            device) -> dict:
    timer = _timer(device)
    grad = torch.randn_like(x)

    def step():
        if backward:
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).backward(grad)
        else:
            with torch.no_grad():
                module(x)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, start = [], time.perf_counter()
    while len(times) < repeats:
        times.append(timer(step))
        if len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    row = dict(median_ms=round(1e3 * statistics.median(times), 3),
               min_ms=round(1e3 * min(times), 3), repeats=len(times))
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--modes", default="chain,causal,paper")
    parser.add_argument("-k", type=int, default=4, help="candidate parents of mode='causal'")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="stop repeating a row after this long (at least 3 repeats)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu")
    dtype = getattr(torch, args.dtype)
    size = QUICK if args.quick else FULL
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 3), 1
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"grootl_{'gpu' if device.type == 'cuda' else 'cpu'}.json")

    import transformers

    config, mamba = _mamba_mixer(size, device, dtype)
    candidates = [("MambaMixer", mamba)]
    for mode in [m for m in args.modes.split(",") if m]:
        options = dict(k=args.k) if mode == "causal" else {}
        mixer = GrootLMixer.from_config(config, mode=mode, **options).to(device=device,
                                                                         dtype=dtype)
        mixer.load_state_dict(mamba.state_dict())
        candidates.append((f"GrootLMixer {mode}", mixer))
    torch.manual_seed(1)
    x = torch.randn(size["batch"], size["length"], size["hidden"], device=device, dtype=dtype,
                    requires_grad=True)
    with torch.no_grad():  # same weights, so the chain must agree with Mamba
        ref = mamba(x)
        agree = float((candidates[1][1](x) - ref).abs().max()) if len(candidates) > 1 else None

    rows = []
    for name, module in candidates:
        module.train()
        for phase, backward in (("forward", False), ("forward+backward", True)):
            row = dict(mixer=name, phase=phase,
                       **measure(module, x, backward, args.warmup, args.repeats,
                                 args.max_seconds, device))
            rows.append(row)
            print(f"  {name:22s} {phase:17s} {row['median_ms']:10.2f} ms", flush=True)
    base = {r["phase"]: r["median_ms"] for r in rows if r["mixer"] == "MambaMixer"}
    for r in rows:
        r["vs_mamba"] = round(r["median_ms"] / base[r["phase"]], 3)

    print(f"\nmixer at hidden {size['hidden']}, d_state {size['state']}, batch {size['batch']}, "
          f"length {size['length']}, {args.dtype}, {device}")
    print(f"{'mixer':22s} {'phase':17s} {'median ms':>10s} {'vs Mamba':>9s}")
    for r in rows:
        print(f"{r['mixer']:22s} {r['phase']:17s} {r['median_ms']:10.2f} {r['vs_mamba']:9.3f}")
    result = dict(
        size=size, dtype=args.dtype, k=args.k, rows=rows, chain_max_abs_diff_vs_mamba=agree,
        device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                else platform.processor() or platform.machine()),
        threads=torch.get_num_threads(), torch=torch.__version__,
        transformers=transformers.__version__, treessm=treessm.__version__,
        python=sys.version.split()[0],
        note="MambaMixer runs its torch path unless mamba_ssm and causal_conv1d are installed")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"saved {out}")
    return result


if __name__ == "__main__":
    main()
