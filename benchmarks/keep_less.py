"""What keeping less for the backward costs and saves on a GPU.

Off the CPU, on arrays of at least ``treessm.ops.recompute.KEEP_LESS_MIN_ELEMENTS``
elements, the selective layers keep only the inputs of their output gate and local mixing
and only the output of their steps' softplus, and form the rest again in the backward. This
script measures, in one process and in turns, the layers with that rule (``keep_less``)
against the same layers keeping everything (``keep_all``: the floor out of reach):

* GrootV-T training steps at 224x224, batch 64 (forward, cross-entropy, backward, AdamW),
  float32 and bfloat16 autocast: images per second and peak memory (``grootv.py``'s step);
* ``TreeSSMConv(64, 64)`` on a random graph of 10^6 vertices and 5 * 10^6 edges: forward
  + backward milliseconds and peak memory (``graph.py``'s timing).

Each row also says how often the rule was asked and how often it kept less
(``keeps_less_true`` / ``keeps_less_calls``), and how much memory the process held when the
row began (``start_memory_gib``, after a garbage collection): a ``keep_less`` row whose rule
never answered yes, or that began above an earlier row's leftovers, shows it.

Saved to ``benchmarks/results/keep_less_gpu.json`` unless ``--out`` names a file.

    python benchmarks/keep_less.py            # CUDA, about a minute
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import graph as graph_bench  # noqa: E402
import grootv as grootv_bench  # noqa: E402
from treessm.ops import recompute  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KEEP_ALL = 1 << 62  # no array is this large: every composition keeps what torch keeps


def _variants(default: int):
    """The two rules as ``(name, floor)``; ``default`` is the library's floor, read once
    before any turn sets another (a turn of ``keep_all`` leaves its floor behind)."""
    return (("keep_less", default), ("keep_all", KEEP_ALL))


@contextlib.contextmanager
def _counted(row: dict):
    """Count the keep-less rule's answers inside the block into ``row``, and record the
    memory the process holds when it begins (after a garbage collection)."""
    gc.collect()
    torch.cuda.empty_cache()
    row["start_memory_gib"] = round(torch.cuda.memory_allocated() / 2 ** 30, 3)
    rule = recompute.keeps_less
    answers = []

    def counting(x, *others):
        answers.append(rule(x, *others))
        return answers[-1]

    recompute.keeps_less = counting
    try:
        yield
    finally:
        recompute.keeps_less = rule
        row["keeps_less_calls"], row["keeps_less_true"] = len(answers), sum(answers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="turns of each variant")
    parser.add_argument("--vertices", type=int, default=10 ** 6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (on the CPU the layers keep what torch keeps)")
    device = torch.device("cuda")
    step_args = argparse.Namespace(infer_batch=128, train_batch=64, size=224, warmup=3,
                                   iters=10, max_seconds=8.0, compile=False)
    rows = []
    default = recompute.KEEP_LESS_MIN_ELEMENTS
    try:
        for rnd in range(args.rounds):
            for name, floor in _variants(default):
                recompute.KEEP_LESS_MIN_ELEMENTS = floor
                for precision in ("bf16", "fp32"):
                    row = dict(model="grootv_tiny", variant=name, round=rnd)
                    with _counted(row):
                        row.update(grootv_bench.bench_one("tree", precision, "training",
                                                          step_args, device))
                    rows.append(row)
                    print(f"GrootV-T training {precision:<4} {name:<9} "
                          f"{row['images_per_s']:8.1f} img/s  peak "
                          f"{row['peak_memory_gib']:6.2f} GiB  (from "
                          f"{row['start_memory_gib']:.2f}; kept less "
                          f"{row['keeps_less_true']} of {row['keeps_less_calls']})", flush=True)
        for name, floor in _variants(default):
            recompute.KEEP_LESS_MIN_ELEMENTS = floor
            row = dict(variant=name)
            with _counted(row):
                row.update(graph_bench.time_layer("tree_ssm_conv", args.vertices, device, 5))
            rows.append(row)
            print(f"TreeSSMConv(64, 64) n={args.vertices} {name:<9} forward + backward "
                  f"{row['forward_backward_ms']:8.1f} ms  peak "
                  f"{row['forward_backward_peak_mb']:8.0f} MiB  (kept less "
                  f"{row['keeps_less_true']} of {row['keeps_less_calls']})", flush=True)
    finally:
        recompute.KEEP_LESS_MIN_ELEMENTS = default
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  keep_less_min_elements=default, when=time.strftime("%Y-%m-%d %H:%M:%S"),
                  rows=rows)
    out = Path(args.out) if args.out else RESULTS / "keep_less_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
