"""What each topology costs on the CPU: the time to build a tree and the tree's depth.

Every topology builds its tree over the same number of vertices, ``N = 32 * 56 * 56 =
100,352`` (a batch of 32 images of 56 x 56, or 32 sequences of 3,136 tokens, or one graph),
from random float32 features of ``C`` channels, as a layer calls it (the whole call, with its
cached candidate graph warm). Reported per topology: the median time of a call, the
candidate edges it compares, and the depth of the tree it builds (the longest root path:
the number of dependent steps of a level-by-level scan, and what separates a chain from a
tree). Prints a table and saves ``benchmarks/results/topologies_cpu.json``.

    OMP_WAIT_POLICY=PASSIVE nice -n 10 python benchmarks/topologies_cpu.py          # C = 16
    OMP_WAIT_POLICY=PASSIVE nice -n 10 python benchmarks/topologies_cpu.py --quick  # checks it

(``OMP_WAIT_POLICY=PASSIVE``: torch's and numba's OpenMP threads otherwise spin against each
other on a machine of few cores; the value is stored with the results.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numba
import torch

import treessm
from treessm.topology import CausalSequenceTopology, GrootLTopology

RESULTS = Path(__file__).resolve().parent / "results"


def _cases(batch: int, side: int, channels: int, gen: torch.Generator):
    images = torch.randn(batch, side, side, channels, generator=gen)
    tokens = images.reshape(batch, side * side, channels)
    n = batch * side * side
    nodes = images.reshape(n, channels)
    # a random graph of average degree 10 (5 N edges, as PyG lists both directions of an
    # undirected one), one connected component in practice
    edge_index = torch.randint(0, n, (2, 5 * n), generator=gen)
    return [
        ("GridTopology(4)", treessm.GridTopology(4), (images,)),
        ("GridTopology(8)", treessm.GridTopology(8), (images,)),
        ("SequenceTopology(1)", treessm.SequenceTopology(1), (tokens,)),
        ("SequenceTopology(3)", treessm.SequenceTopology(3), (tokens,)),
        ("CausalSequenceTopology(4)", CausalSequenceTopology(4), (tokens,)),
        ("GrootLTopology(window=3)", GrootLTopology(None, 3), (tokens,)),
        ("GraphTopology, 5N edges", treessm.GraphTopology(), (nodes, edge_index)),
    ]


def _depth(tree) -> int:
    return int(tree.depth.max()) if tree.num_nodes else 0


def run(batch: int, side: int, channels: int, repeats: int) -> list:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, topology, args in _cases(batch, side, channels, gen):
        tree = topology(*args)  # warm: compiled kernels, cached candidate graph
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            tree = topology(*args)
            samples.append(time.perf_counter() - start)
        if name.startswith("Graph"):
            candidates = args[1].shape[1]
        else:
            candidates = int(topology.candidate_edges(*args)[0].shape[1]) \
                if not name.startswith("Causal") else 4 * tree.num_nodes
        rows.append({"topology": name, "num_nodes": tree.num_nodes, "channels": channels,
                     "candidate_edges": candidates, "num_trees": tree.num_trees,
                     "depth": _depth(tree), "build_ms": 1e3 * statistics.median(samples),
                     "build_min_ms": 1e3 * min(samples), "calls": repeats})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="8 images: checks the script")
    parser.add_argument("--out", type=Path, default=RESULTS / "topologies_cpu.json")
    args = parser.parse_args()
    batch = 8 if args.quick else 32
    rows = run(batch, 56, args.channels, 3 if args.quick else args.repeats)
    print(f"{'topology':<28}{'N':>9}{'candidates':>12}{'depth':>8}{'build ms':>10}")
    for r in rows:
        print(f"{r['topology']:<28}{r['num_nodes']:>9}{r['candidate_edges']:>12}"
              f"{r['depth']:>8}{r['build_ms']:>10.1f}")
    if args.quick:
        return
    result = {"benchmark": "topologies_cpu",
              "machine": {"platform": platform.platform(), "processor": platform.machine(),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "numba_threads": numba.get_num_threads(),
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                          "load_average_1min": round(os.getloadavg()[0], 2)},
              "versions": {"treessm": treessm.__version__, "torch": torch.__version__,
                           "numba": numba.__version__},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
