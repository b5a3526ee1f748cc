"""GPU benchmark of the tiled tree scan (``torch.ops.treessm.cuda_tile_scan``) against
``treessm.tree_scan`` (the heavy-path kernels) on the same inputs.

Rows: the spanning tree of a random graph of 10^6 vertices and 5 * 10^6 edges, a chain of
10^6 vertices, 32 grid trees of 56x56 (GrootV-T's first stage) and a random forest of 10^6
vertices in 1,000 trees; ``down`` and ``up``, float32, C = 64 (and the grid at C = 160);
tile sizes 2048 and 512 (the grid also at 4096). Each row: forward milliseconds of both
(median of CUDA-event timings, the plans built and cached beforehand), the plan's shape
(tiles, boundary vertices, boundary-tree depth) and the largest difference between the two
results relative to the largest value. Prints a table and saves JSON
(``benchmarks/results/tile_scan_gpu_<card>.json``).

    python benchmarks/tile_scan_cuda.py --out benchmarks/results/tile_scan_gpu_h200.json
    python benchmarks/tile_scan_cuda.py --quick        # small sizes, a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import treessm
from treessm.ops.tiles import tile_plan

RESULTS = Path(__file__).resolve().parent / "results"


def cuda_time(fn, warmup=3, iters=20):
    """Median milliseconds of ``fn`` over ``iters`` calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def forests(scale):
    g = torch.Generator().manual_seed(0)
    n = 10 ** 6 // scale
    edge_index = torch.randint(0, n, (2, 5 * n), generator=g).cuda()
    spanning = treessm.GraphTopology()(torch.randn(n, 16, generator=g).cuda(), edge_index)
    chain = treessm.Tree.from_parent(torch.arange(-1, n - 1)).to("cuda")
    b = max(1, 32 // scale)
    grid = treessm.GridTopology()(torch.randn(b, 56, 56, 16, generator=g).cuda())
    # trees of n / 1000 consecutive vertices, each hanging from a random earlier one
    idx = torch.arange(n)
    start = idx // (n // max(1, 1000 // scale)) * (n // max(1, 1000 // scale))
    parent = start + (torch.rand(n, generator=g) * (idx - start)).long()
    random = treessm.Tree.from_parent(torch.where(idx == start, -1, parent)).to("cuda")
    return {"spanning_1e6": (spanning, 64), "chain_1e6": (chain, 64), "grid_32x56x56": (grid, 64),
            "grid_32x56x56_c160": (grid, 160), "random_forest_1e6": (random, 64)}


def row(name, tree, channels, tile, direction):
    n = tree.num_nodes
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(n, channels, device="cuda", generator=g)
    w = torch.rand(n, channels, device="cuda", generator=g)
    plan = tile_plan(tree, tile)
    tensors = list(plan[3:])

    def tiled():
        return torch.ops.treessm.cuda_tile_scan(x, w, tensors, plan.tile, direction)

    def paths():
        return treessm.tree_scan(x, w, tree, direction)

    want, got = paths(), tiled()
    rel = float((got - want).abs().max() / want.abs().max().clamp(min=1))
    nb = int(plan.boundary_level_ptr[-1])
    depth = int((plan.boundary_level_ptr.diff() > 0).sum())
    return dict(forest=name, n=n, channels=channels, tile=tile, direction=direction,
                tiles=int((plan.tile_ptr.diff() > 0).sum()), boundary=nb,
                boundary_depth=depth, tiled_ms=cuda_time(tiled), tree_scan_ms=cuda_time(paths),
                max_rel_diff=rel)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="sizes divided by 100")
    args = ap.parse_args()
    from treessm.typing import load_cuda_extension

    load_cuda_extension()
    card = torch.cuda.get_device_name().split()[-1].lower()
    rows = []
    print(f"{'forest':22} {'C':>4} {'tile':>5} {'dir':>5} {'tiles':>6} {'bound':>6} "
          f"{'depth':>5} {'tiled ms':>9} {'scan ms':>8} {'rel diff':>9}")
    for name, (tree, channels) in forests(100 if args.quick else 1).items():
        tiles = (4096, 2048, 512) if name.startswith("grid") else (2048, 512)
        for tile in tiles:
            for direction in ("down", "up"):
                r = row(name, tree, channels, tile, direction)
                rows.append(r)
                print(f"{name:22} {channels:4} {tile:5} {direction:>5} {r['tiles']:6} "
                      f"{r['boundary']:6} {r['boundary_depth']:5} {r['tiled_ms']:9.3f} "
                      f"{r['tree_scan_ms']:8.3f} {r['max_rel_diff']:9.1e}", flush=True)
    out = args.out or RESULTS / f"tile_scan_gpu_{card}{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                   torch=torch.__version__, rows=rows), indent=1) + "\n")
    print("saved", out)


if __name__ == "__main__":
    main()
