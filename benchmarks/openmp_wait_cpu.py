"""A training step on the CPU with OpenMP's waiting threads spinning or sleeping.

Between parallel regions torch's OpenMP worker threads wait for the next one, by default
spinning for a while; on a machine of few cores they take the cores that treessm's compiled
kernels (run on threads of their own, ``treessm.ops.chunks``) need. This script
times the same small training step (two ``TreeSSMConv(32, 32)`` layers and a linear head
over 1,280 vertices of a batch of graphs, forward, backward and an optimiser step) in a
fresh process per setting of ``OMP_WAIT_POLICY`` (unset, ``ACTIVE``, ``PASSIVE``), since the
runtimes read it once when they load. Prints a table and saves
``benchmarks/results/openmp_wait_cpu.json``.

    python benchmarks/openmp_wait_cpu.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = (None, "ACTIVE", "PASSIVE")


def step_times(steps: int) -> list:
    """Wall times of ``steps`` training steps after two warm-up steps (in this process)."""
    import torch
    from torch_geometric.nn import global_mean_pool

    from treessm.nn import TreeSSMConv

    torch.manual_seed(0)
    n, graphs = 1280, 20
    x = torch.randn(n, 32)
    batch = torch.arange(graphs).repeat_interleave(n // graphs)
    edge_index = torch.randint(0, n // graphs, (2, 4 * n)) + (n // graphs) * torch.randint(
        0, graphs, (1, 4 * n))
    y = torch.randint(0, 2, (graphs,))
    convs = torch.nn.ModuleList([TreeSSMConv(32, 32), TreeSSMConv(32, 32)])
    head = torch.nn.Linear(32, 2)
    params = list(convs.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        h = x
        for conv in convs:
            h = torch.nn.functional.gelu(conv(h, edge_index, batch=batch))
        loss = torch.nn.functional.cross_entropy(head(global_mean_pool(h, batch)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "openmp_wait_cpu.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step_times(args.steps)))
        return
    rows = []
    for policy in POLICIES:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy is not None:
            env["OMP_WAIT_POLICY"] = policy
        done = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps)],
                              env=env, capture_output=True, text=True, check=True)
        times = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"omp_wait_policy": policy or "unset",
                     "step_ms_median": 1e3 * statistics.median(times),
                     "step_ms_min": 1e3 * min(times), "steps": len(times)})
    print(f"{'OMP_WAIT_POLICY':<18}{'step ms (median)':>18}{'min':>10}")
    for r in rows:
        print(f"{r['omp_wait_policy']:<18}{r['step_ms_median']:>18.1f}{r['step_ms_min']:>10.1f}")
    import torch

    result = {"benchmark": "openmp_wait_cpu", "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "load_average_1min": round(os.getloadavg()[0], 2), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
