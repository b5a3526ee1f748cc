"""GPU benchmark of the tree scan and of tree construction (GrootV-T stage sizes).

Prints a table and saves ``benchmarks/results/tree_scan_gpu.json``: the device, the
device-to-device copy bandwidth measured in the same run, and one row per
(B, H, C, direction, dtype) with forward, backward and build times next to their
memory-bandwidth floors (reading x and weight and writing h once, float32).

    python benchmarks/tree_scan.py                 # full table (CUDA required)
    python benchmarks/tree_scan.py --quick         # a few rows

The scan runs the default schedule (heavy paths, ``TREESSM_CUDA_SCAN=path``); ``build_ms``
includes every plan the scan needs (the level plan and, for the path schedule, the path
plan). A sweep compares the schedules and launch shapes on the headline size in one run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import treessm
from treessm.ops import tree_scan
from treessm.ops.tree_scan import cuda_plan

RESULTS = Path(__file__).resolve().parent / "results"


def cuda_time(fn, warmup=5, iters=30):
    """Median milliseconds of ``fn`` over ``iters`` runs, timed with CUDA events."""
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


def copy_bandwidth(nbytes=2 << 30):
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = cuda_time(lambda: b.copy_(a), warmup=3, iters=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# one topology object, as a layer holds one: its candidate grid is built once per shape
_GRID = treessm.GridTopology(connectivity=4, distance="cosine") if hasattr(treessm, "GridTopology") \
    else None


def grid_tree(feat):
    tree = _GRID(feat)
    cuda_plan(tree)
    return tree


def _scipy_grid_tree(feat):
    """Stand-in used only when the topology module is unavailable."""
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse import csgraph

    B, H, W, C = feat.shape
    idx = np.arange(B * H * W).reshape(B, H, W)
    e = np.concatenate([np.stack([idx[:, :, :-1].ravel(), idx[:, :, 1:].ravel()]),
                        np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()])], 1)
    f = torch.nn.functional.normalize(feat.float().reshape(-1, C), dim=1).cpu().numpy()
    cost = np.exp(-(f[e[0]] * f[e[1]]).sum(1)) + 1e-6
    n = B * H * W
    m = csgraph.minimum_spanning_tree(sp.coo_matrix((cost, (e[0], e[1])), shape=(n, n)))
    roots = idx[:, H // 2, W // 2]
    _, pred = csgraph.breadth_first_order(m + m.T, roots[0], directed=False)
    parent = np.full(n, -1)
    for r in roots:
        order, pred = csgraph.breadth_first_order(m + m.T, r, directed=False)
        parent[order[1:]] = pred[order[1:]]
    tree = treessm.Tree.from_parent(torch.from_numpy(parent)).to(feat.device)
    cuda_plan(tree)
    return tree


if not hasattr(treessm, "GridTopology"):
    grid_tree = _scipy_grid_tree  # noqa: F811


def bench_row(B, H, C, direction, dtype, bw, with_build=True, iters=30):
    dev = "cuda"
    N = B * H * H
    feat = torch.randn(B, H, H, C, device=dev, dtype=dtype)
    build_ms = cuda_time(lambda: grid_tree(feat), warmup=2, iters=10) if with_build else None
    tree = grid_tree(feat)
    x = torch.randn(N, C, device=dev, dtype=dtype)
    w = torch.rand(N, C, device=dev, dtype=dtype) * 0.9 + 0.05
    fwd_ms = cuda_time(lambda: tree_scan(x, w, tree, direction), iters=iters)
    h = tree_scan(x, w, tree, direction)
    g = torch.randn_like(h)
    args = (g, x, w, h, *tree.tensors(), cuda_plan(tree), direction, "cuda")
    bwd_ms = cuda_time(lambda: torch.ops.treessm.tree_scan_backward(*args), iters=iters)
    elems = N * C
    fwd_floor = 3 * elems * 4 / (bw * 1e9) * 1e3
    bwd_floor = 6 * elems * 4 / (bw * 1e9) * 1e3
    return dict(B=B, H=H, C=C, N=N, direction=direction, dtype=str(dtype).replace("torch.", ""),
                fwd_ms=fwd_ms, bwd_ms=bwd_ms, build_ms=build_ms, fwd_floor_ms=fwd_floor,
                bwd_floor_ms=bwd_floor, fwd_over_floor=fwd_ms / fwd_floor,
                bwd_over_floor=bwd_ms / bwd_floor, max_depth=tree.max_depth,
                ns_per_vertex_fwd=fwd_ms * 1e6 / N)


def _forest(family, trees, n, gen):
    """Parent array of ``trees`` trees of ``n`` vertices: chains, random recursive trees whose
    parents lie at most ``locality`` positions back, or minimum spanning trees of grids."""
    if family.startswith("grid"):
        h = int(round(n ** 0.5))
        feat = torch.randn(trees, h, h, 16, generator=gen)
        return treessm.GridTopology(connectivity=4, distance="cosine")(feat).parent
    loc = 1 if family == "chain" else int(family.split("_")[1])
    idx = torch.arange(n)
    back = (torch.rand(trees, n, generator=gen) * torch.clamp(idx, max=loc)).long() + 1
    parent = idx - back
    parent[:, 0] = -1
    parent = parent + (torch.arange(trees) * n)[:, None]
    parent[:, 0] = -1
    return parent.reshape(-1)


def schedule_by_shape(knob_env, x, w, g):
    """Level (staged) against heavy-path schedule on forests of different depth, forward and
    backward of "both"; the crossover sets treessm.ops.tree_scan.PATH_MAX_LEVEL_WIDTH."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for family in ("chain", "locality_2", "locality_4", "locality_8", "locality_16",
                   "locality_64", "grid"):
        parent = _forest(family, 32, 56 * 56, gen)
        tree = treessm.Tree.from_parent(parent).cuda()
        n = tree.num_nodes
        xs, ws, gs = x[:n], w[:n], g[:n]
        row = dict(family=family, vertices=n, levels=tree.num_levels,
                   vertices_per_level=n / tree.num_levels)
        for sched in ("staged", "path"):
            knob_env({"TREESSM_CUDA_SCAN": sched})
            plan = cuda_plan(tree)
            h = tree_scan(xs, ws, tree, "both")
            bargs = (gs, xs, ws, h, *tree.tensors(), plan, "both", "cuda")
            row[f"{sched}_fwd_ms"] = cuda_time(lambda: tree_scan(xs, ws, tree, "both"), iters=10)
            row[f"{sched}_bwd_ms"] = cuda_time(
                lambda: torch.ops.treessm.tree_scan_backward(*bargs), iters=10)
        lp = tree.scan_plan()
        from treessm.path_plan import path_plan
        row["path_plan_ms"] = cuda_time(lambda: path_plan(tree.order, tree.child_ptr, tree.tree_ptr,
                                                          tree.depth, lp[2]), warmup=2, iters=10)
        rows.append(row)
    return rows


def launch_choices(knob_env):
    """The staged kernels' launch defaults against the fixed settings they replaced: a
    shared-memory budget sized so that every block runs in one wave (against 100 KiB per
    block), and 32 channels per block for 16-bit types (against 64)."""
    rows = []
    cases = [(32, 28, 320, torch.float32, dict(TREESSM_CUDA_SMEM=100 * 1024)),
             (32, 14, 640, torch.float32, dict(TREESSM_CUDA_SMEM=100 * 1024)),
             (32, 7, 1280, torch.float32, dict(TREESSM_CUDA_SMEM=100 * 1024)),
             (32, 56, 160, torch.bfloat16, dict(TREESSM_CUDA_LPV=16)),
             (32, 14, 640, torch.bfloat16, dict(TREESSM_CUDA_SMEM=100 * 1024, TREESSM_CUDA_LPV=16))]
    for B, H, C, dtype, fixed in cases:
        feat = torch.randn(B, H, H, C, device="cuda", dtype=dtype)
        tree = grid_tree(feat)
        N = B * H * H
        x = torch.randn(N, C, device="cuda", dtype=dtype)
        w = torch.rand(N, C, device="cuda", dtype=dtype) * 0.9 + 0.05
        h = tree_scan(x, w, tree, "both")
        g = torch.randn_like(h)
        bargs = (g, x, w, h, *tree.tensors(), cuda_plan(tree), "both", "cuda")
        row = dict(B=B, H=H, C=C, dtype=str(dtype).replace("torch.", ""),
                   fixed=",".join(f"{k.replace('TREESSM_CUDA_', '').lower()}={v}"
                                  for k, v in fixed.items()))
        outs = []
        for name, env in (("default", {}), ("fixed", fixed)):
            knob_env(env)
            row[f"{name}_fwd_ms"] = cuda_time(lambda: tree_scan(x, w, tree, "both"), iters=20)
            row[f"{name}_bwd_ms"] = cuda_time(
                lambda: torch.ops.treessm.tree_scan_backward(*bargs), iters=20)
            outs.append((tree_scan(x, w, tree, "both"),
                         *torch.ops.treessm.tree_scan_backward(*bargs)))
        row["same_bits"] = all(torch.equal(a, b) for a, b in zip(*outs))
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quick-sweep", action="store_true",
                        help="fewer launch shapes of the direct kernels")
    parser.add_argument("--out", default=str(RESULTS / "tree_scan_gpu.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available: nothing to measure", file=sys.stderr)
        return 1
    treessm.ops.cuda.load()
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth()
    stages = [(32, 56, 160), (32, 28, 320), (32, 14, 640), (32, 7, 1280)]
    if args.quick:
        stages = stages[:1]
    rows = []
    for (B, H, C) in stages:
        for dtype in (torch.float32, torch.bfloat16):
            for direction in ("both", "up", "down"):
                rows.append(bench_row(B, H, C, direction, dtype, bw,
                                      with_build=(direction == "both")))
    # linear scaling: one 224x224 grid row per dtype, same channels as stage 1
    big = [] if args.quick else [(32, 224, 160)]
    for (B, H, C) in big:
        rows.append(bench_row(B, H, C, "both", torch.float32, bw, iters=10))
    # schedules and launch shapes on the headline size, all in this run: heavy paths (the
    # default), the staged level kernels (TREESSM_CUDA_SCAN=staged) and the direct ones
    import os
    feat = torch.randn(32, 56, 56, 160, device="cuda")
    tree = grid_tree(feat)
    x = torch.randn(32 * 56 * 56, 160, device="cuda")
    w = torch.rand_like(x) * 0.9 + 0.05
    h = tree_scan(x, w, tree, "both")
    g = torch.randn_like(h)
    knobs = ("TREESSM_CUDA_SCAN", "TREESSM_CUDA_LPV", "TREESSM_CUDA_THREADS", "TREESSM_CUDA_RING",
             "TREESSM_CUDA_SMEM")
    shapes = [dict()]  # the defaults
    shapes += [dict(TREESSM_CUDA_THREADS=t) for t in (64, 256)]
    shapes += [dict(TREESSM_CUDA_LPV=lpv) for lpv in (4, 16)]
    shapes += [dict(TREESSM_CUDA_SMEM=s) for s in (60 * 1024, 200 * 1024)]
    shapes += [dict(TREESSM_CUDA_SCAN="staged"), dict(TREESSM_CUDA_SCAN="direct"),
               dict(TREESSM_CUDA_SCAN="path"), dict(TREESSM_CUDA_SCAN="path", TREESSM_CUDA_THREADS=256)]
    if not args.quick_sweep:
        shapes += [dict(TREESSM_CUDA_SCAN="staged", TREESSM_CUDA_THREADS=256),
                   dict(TREESSM_CUDA_SCAN="staged", TREESSM_CUDA_LPV=4),
                   dict(TREESSM_CUDA_SCAN="staged", TREESSM_CUDA_RING=128)]

    def knob_env(shape):
        """Only the knobs of ``shape`` set (read by the extension at every launch)."""
        for k in knobs:
            os.environ.pop(k, None)
        os.environ.update({k: str(v) for k, v in shape.items()})

    tuning = []
    for shape in shapes:
        knob_env(shape)
        bargs = (g, x, w, h, *tree.tensors(), cuda_plan(tree), "both", "cuda")
        try:
            fwd = cuda_time(lambda: tree_scan(x, w, tree, "both"), iters=20)
            bwd = cuda_time(lambda: torch.ops.treessm.tree_scan_backward(*bargs), iters=20)
            hs = tree_scan(x, w, tree, "both")
            same = bool(torch.equal(hs, h))
            diff = float(((hs - h).norm() / h.norm()).item())
        except RuntimeError as exc:
            fwd = bwd = diff = float("nan")
            same = str(exc).splitlines()[0][:120]
        tuning.append(dict(shape={k: str(v) for k, v in shape.items()}, fwd_ms=fwd, bwd_ms=bwd,
                           equal_to_default=same, rel_diff_to_default=diff))
    # time per level: B chains of 56*56 vertices (one vertex per level), forward "both"
    # walks 2 * 3136 levels one after another
    n_chain = 56 * 56
    chain_parent = torch.arange(-1, n_chain - 1, device="cuda").repeat(32)
    chain_parent += torch.repeat_interleave(torch.arange(32, device="cuda") * n_chain, n_chain)
    chain_parent[::n_chain] = -1
    chain = treessm.Tree.from_parent(chain_parent)
    chain.scan_plan()
    level_ns = {}
    for name in ("path", "staged", "direct"):
        knob_env({"TREESSM_CUDA_SCAN": name})
        cuda_plan(chain)
        ms = cuda_time(lambda: tree_scan(x, w, chain, "both"), iters=10)
        level_ns[name] = ms * 1e6 / (2 * n_chain)
    knob_env({})
    # the path plan alone (one kernel), on the headline trees
    from treessm.path_plan import path_plan
    lp = tree.scan_plan()
    plan_ms = cuda_time(lambda: path_plan(tree.order, tree.child_ptr, tree.tree_ptr, tree.depth,
                                          lp[2]), warmup=2, iters=10)
    by_shape = schedule_by_shape(knob_env, x, w, g)
    knob_env({})
    launch_ab = launch_choices(knob_env)
    knob_env({})
    # the torch reference on the headline size, for the same-run ratio
    ref_fwd = cuda_time(lambda: tree_scan(x, w, tree, "both", backend="torch"), warmup=1, iters=5)
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        copy_bandwidth_GBps=bw,
        torch_reference_fwd_ms_56_160_both=ref_fwd,
        kernels_56_160_both_fp32=tuning,
        path_plan_ms_56=plan_ms,
        schedule_by_shape=by_shape,
        launch_defaults_vs_fixed=launch_ab,
        ns_per_level_chain_56_160_both=level_ns,
        rows=rows,
        when=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    head = rows[0]
    if not args.quick:
        big_row = rows[-1]
        result["scaling_224_vs_56_per_vertex"] = big_row["ns_per_vertex_fwd"] / head["ns_per_vertex_fwd"]
    result["targets"] = {
        "fwd <= 2x floor": head["fwd_ms"] <= 2 * head["fwd_floor_ms"],
        "bwd <= 0.30 ms": head["bwd_ms"] <= 0.30,
        "build <= 0.36 ms": head["build_ms"] is not None and head["build_ms"] <= 0.36,
        "224 per-vertex within 1.2x": result.get("scaling_224_vs_56_per_vertex", 99) <= 1.2,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"device: {result['device']}  copy bandwidth: {bw:.0f} GB/s")
    print(f"{'B':>3} {'H':>4} {'C':>5} {'dir':>5} {'dtype':>9} {'fwd ms':>8} {'floor':>7} "
          f"{'x':>5} {'bwd ms':>8} {'floor':>7} {'x':>5} {'build ms':>9} {'depth':>6}")
    for r in rows:
        b = f"{r['build_ms']:.3f}" if r["build_ms"] is not None else "-"
        print(f"{r['B']:>3} {r['H']:>4} {r['C']:>5} {r['direction']:>5} {r['dtype']:>9} "
              f"{r['fwd_ms']:8.3f} {r['fwd_floor_ms']:7.3f} {r['fwd_over_floor']:5.1f} "
              f"{r['bwd_ms']:8.3f} {r['bwd_floor_ms']:7.3f} {r['bwd_over_floor']:5.1f} {b:>9} "
              f"{r['max_depth']:>6}")
    print(f"torch reference fwd (56x56, C=160, both): {ref_fwd:.2f} ms "
          f"({ref_fwd / head['fwd_ms']:.0f}x the CUDA kernel)")
    print(f"path plan alone (56x56 trees, part of build ms): {plan_ms:.3f} ms")
    print("schedules and launch shapes (both, fp32, 56x56, C=160; defaults = auto, which "
          "takes the level kernels for these trees):")
    for r in tuning:
        name = ",".join(f"{k.replace('TREESSM_CUDA_', '').lower()}={v}"
                        for k, v in r["shape"].items()) or "defaults"
        print(f"  {name:<48} fwd {r['fwd_ms']:.3f} ms  bwd {r['bwd_ms']:.3f} ms  "
              f"same bits: {r['equal_to_default']}  rel. diff {r['rel_diff_to_default']:.1e}")
    print("schedule by tree shape (32 trees, about 100k vertices, C=160, fp32, both; "
          "forward / backward ms; path plan ms):")
    for r in by_shape:
        print(f"  {r['family']:<22} {r['vertices_per_level']:7.1f} vertices/level  staged "
              f"{r['staged_fwd_ms']:.3f} / {r['staged_bwd_ms']:.3f}  path {r['path_fwd_ms']:.3f} / "
              f"{r['path_bwd_ms']:.3f}  plan {r['path_plan_ms']:.3f}")
    print("launch defaults against fixed settings (both; forward / backward ms):")
    for r in launch_ab:
        print(f"  {r['B']}x{r['H']}x{r['H']}x{r['C']} {r['dtype']:<9} defaults {r['default_fwd_ms']:.3f} / "
              f"{r['default_bwd_ms']:.3f}  {r['fixed']:<26} {r['fixed_fwd_ms']:.3f} / "
              f"{r['fixed_bwd_ms']:.3f}  same bits: {r['same_bits']}")
    print("time per vertex on chains (32 chains of 3136 vertices, C=160, both): " +
          ", ".join(f"{k} {v:.0f} ns" for k, v in level_ns.items()))
    for k, v in result["targets"].items():
        print(f"target {k}: {'met' if v else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
