"""Test accuracy of the large-graph example under each mini-batch loader and each way of
predicting, on the CPU: ``treessm.examples.large_graph`` on a planted-partition graph
(``--num-nodes`` vertices, 10 edges a vertex, 8 communities), trained for ``--epochs``
epochs of ``--parts`` batches, then the test vertices predicted from the whole graph
(``full``) or batch by batch (``batches``). ``NeighborLoader`` rows run only where
``pyg-lib`` or ``torch-sparse`` is installed. Prints a table and saves
``benchmarks/results/loaders_cpu.json`` (``--out``).

    python benchmarks/loaders.py             # 20,000 vertices, about half a minute
    python benchmarks/loaders.py --quick     # 1,500 vertices, one epoch (checks the script)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import time
from pathlib import Path

import torch
import torch_geometric.typing as pyg_typing

import treessm
from treessm.examples import large_graph

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-nodes", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--parts", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_nodes, args.epochs, args.parts, args.hidden = 1500, 1, 3, 16
    loaders = ["tree", "random"]
    if pyg_typing.WITH_PYG_LIB or pyg_typing.WITH_TORCH_SPARSE:
        loaders.append("neighbor")
    rows = []
    print(f"{'loader':<9} {'eval':<8} {'test accuracy':>13} {'s / epoch':>10}")
    for loader in loaders:
        for evaluation in ("full", "batches"):
            with contextlib.redirect_stdout(io.StringIO()):  # the example's own JSON line
                summary = large_graph.main([
                    "--num-nodes", str(args.num_nodes), "--epochs", str(args.epochs),
                    "--parts", str(args.parts), "--hidden", str(args.hidden),
                    "--device", "cpu", "--loader", loader, "--eval", evaluation])
            rows.append({k: summary[k] for k in ("loader", "eval", "test_accuracy",
                                                 "seconds_per_epoch", "steps_per_process")})
            print(f"{loader:<9} {evaluation:<8} {summary['test_accuracy']:>13.4f} "
                  f"{summary['seconds_per_epoch']:>10.2f}", flush=True)
    result = dict(torch=torch.__version__, treessm=treessm.__version__,
                  machine=platform.machine(), threads=torch.get_num_threads(),
                  when=time.strftime("%Y-%m-%d %H:%M:%S"), num_nodes=args.num_nodes,
                  epochs=args.epochs, parts=args.parts, hidden=args.hidden, rows=rows)
    out = Path(args.out) if args.out else RESULTS / "loaders_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")
    return result


if __name__ == "__main__":
    main()
