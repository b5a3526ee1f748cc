"""GPU benchmark of the tree scan and of tree construction.

Prints a table and saves JSON (``benchmarks/results/tree_scan_gpu_<card>.json`` by default):
the device, the device-to-device copy bandwidth measured in the same run, and

* ``rows`` -- GrootV-T stage sizes (B=32 images of 56x56 with C=160, 28x28x320, 14x14x640,
  7x7x1280, and 224x224x160), every direction, float32 and bfloat16: forward and backward
  GPU time (CUDA-graph replays of the operators, so no host time is counted), forward and
  forward+backward wall time through ``tree_scan`` and autograd, the build (features ->
  Tree with its level plan) and the bandwidth floors (read x and w and write h once;
  backward: read g, x, w, h and write both gradients once);
* ``graph`` -- one graph of 10^6 vertices and 5 * 10^6 random edges, its spanning forest
  built on the device (one giant tree and a few isolated vertices), C=64, ``both``: both
  schedules, forward and forward+backward;
* ``schedules`` -- every schedule on single random trees of 2^12 to 2^20 vertices, a chain
  of 10^6 and grid trees of 512x512 (B=4) and 224x224 (B=32) (C=64), 56x56 (B=32, C=160)
  and 14x14 (B=32, C=640), with the first call's
  time (its plan built): the crossovers that :data:`treessm.ops.plan.PHASES_MIN_TREE_SIZE`
  and :data:`treessm.ops.plan.TILES_MIN_NODES` encode (also alone, ``--schedules``, saved
  as ``tree_scan_schedules_<card>.json``);
* ``launch`` -- block width and position lanes on the four grid stages (results are the same
  bits): the measurements behind :func:`treessm.ops.plan.launch_config`;
* ``host`` -- the host overhead rows: a tiny tree, and 32 x 14x14 x 640 (wall against GPU
  time);
* ``chains`` -- the ``down`` scan over 4 chains of 2,048 tokens with 24,576 channels (the
  widths of Mamba-130m), the scan GrootL runs on, under the automatic schedule and under
  ``"columns"`` (a thread per chain and channel, the step before's value in a register);
* ``grid_build`` -- tree construction at 56x56, 112x112, 224x224 (B=32) and 512x512 (B=4).

* ``tiles`` (``--tiles``, alone) -- the tiled kernels (``torch.ops.treessm.cuda_tile_scan``
  on :func:`treessm.ops.tiles.tile_plan`) against the current kernels of ``tree_scan``, same
  direction and data: the 10^6-vertex graph's spanning forest and a chain of 10^6 (C=64),
  32 x 56x56 (C=160), 32 x 14x14 (C=640) and the 4 chains of 2,048 tokens (C=24,576);
  every direction, several tile sizes: forward and backward GPU time, the plan's shape
  (tiles, boundary vertices, boundary-tree depth) and build time, and the largest error
  against the float64 scan.

* ``fresh`` (``--fresh``, alone, ``tree_scan_fresh_<card>.json``) -- large trees of shapes
  the tests do not use (a power-law graph's spanning forest, a 1000 x 1000 grid tree, a
  random recursive tree of 3 * 10^6 vertices, a caterpillar 5 * 10^5 deep, a star of 1,000
  chains), every direction under the automatic schedule and under each schedule that suits
  the tree, float64: the largest error of the output and of both gradients against the
  numba CPU backend, relative to the largest entry.

``--headline`` measures only the grid rows in float32 ``both`` through the public API
(``GridTopology``, ``tree_scan``, autograd), so that the same script can time another
version of the package in the same run.

    python benchmarks/tree_scan.py --out benchmarks/results/tree_scan_gpu_h200.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import treessm
from treessm.ops.plan import SCHEDULES

RESULTS = Path(__file__).resolve().parent / "results"
DIRECTIONS = ("both", "up", "down")
STAGES = [(32, 56, 160), (32, 28, 320), (32, 14, 640), (32, 7, 1280)]
# the GrootVL authors' CUDA kernel on an H200, same inputs and tree (56x56, C=160, both)
AUTHORS_H200 = dict(fwd_ms=2.13, bwd_ms=4.47, build_ms=5.28)
# the release before the phase scans (level and per-vertex path kernels) on an H200
PREVIOUS_RELEASE_H200 = dict(
    what="the release before the phase scans (level and per-vertex path kernels), measured on "
         "an NVIDIA H200 with the benchmark of that release",
    grid_56_160_both_fwd_wall_ms=[0.3978, 0.4329], grid_56_160_both_fwd_bwd_wall_ms=[1.0716, 1.0322],
    grid_14_640_both_fwd_bwd_wall_ms=[0.4273, 0.3094],
    graph_1e6_both_fwd_ms=dict(levels=118, paths=81), graph_1e6_both_fwd_bwd_ms=276,
    chains_4x2048_24576_down_fwd_ms=1.18, chains_4x2048_24576_down_fwd_bwd_ms=4.0,
    tiny_64_4_both_fwd_bwd_wall_ms=0.52)


def cuda_time(fn, warmup=5, iters=30):
    """Median milliseconds of ``fn`` over ``iters`` calls, timed with CUDA events (host time
    counts when the host is slower than the device)."""
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


def graph_time(fn, iters=30):
    """Median milliseconds of a CUDA-graph replay of ``fn``: the device's own time."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time(graph.replay, warmup=3, iters=iters)


def copy_bandwidth(nbytes=2 << 30):
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = cuda_time(lambda: b.copy_(a), warmup=3, iters=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _inputs(n, c, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, c, device="cuda", dtype=torch.float32, generator=g).to(dtype)
    w = (torch.rand(n, c, device="cuda", generator=g) * 0.9 + 0.05).to(dtype)
    return x, w


def _floors(n, c, dtype, bw):
    item = torch.empty((), dtype=dtype).element_size()
    return 3 * n * c * item / (bw * 1e9) * 1e3, 6 * n * c * item / (bw * 1e9) * 1e3


def _wall(x, w, tree, direction, grad):
    fwd = cuda_time(lambda: treessm.tree_scan(x, w, tree, direction))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        # as a training step after zero_grad(): the backward writes the gradients, it does
        # not add them to those of the step before (two more passes over [N, C] each)
        xg.grad = wg.grad = None
        treessm.tree_scan(xg, wg, tree, direction).backward(grad)

    return fwd, cuda_time(step)


def _gpu(x, w, tree, direction, grad, schedule=None, **launch):
    """(forward, backward) GPU time of the CUDA operators along the tree's plan."""
    from treessm.ops import cuda, plan

    p = plan.scan_plan(tree, x.shape[1], x.dtype, schedule)
    if launch:
        p = p._replace(launch=p.launch._replace(**launch))
    h = cuda.forward(x, w, p, direction)
    fwd = graph_time(lambda: cuda.forward(x, w, p, direction))
    bwd = graph_time(lambda: cuda.backward(grad, x, w, h, p, direction))
    return fwd, bwd


def grid_row(B, H, C, direction, dtype, bw, topo, headline=False, build=True):
    n = B * H * H
    feat = torch.randn(B, H, H, C, device="cuda", dtype=dtype)
    row = dict(B=B, H=H, C=C, N=n, direction=direction, dtype=str(dtype).replace("torch.", ""))
    if build:
        if headline:
            row["build_ms"] = cuda_time(lambda: topo(feat), warmup=2, iters=10)
        else:
            from treessm.ops.plan import scan_plan

            row["build_ms"] = cuda_time(lambda: scan_plan(topo(feat), C, dtype), warmup=2,
                                        iters=10)
    tree = topo(feat)
    x, w = _inputs(n, C, dtype)
    grad = torch.randn_like(x)
    row["fwd_wall_ms"], row["fwd_bwd_wall_ms"] = _wall(x, w, tree, direction, grad)
    if not headline:
        row["fwd_gpu_ms"], row["bwd_gpu_ms"] = _gpu(x, w, tree, direction, grad)
        row["fwd_floor_ms"], row["bwd_floor_ms"] = _floors(n, C, dtype, bw)
        from treessm.ops.plan import choose_schedule

        row["schedule"] = choose_schedule(tree, None, C * dtype.itemsize)
        row["max_depth"] = tree.max_depth
    return row


def random_tree(n, gen):
    """Parent array of a random recursive tree of ``n`` vertices (parents up to 3,000
    positions back): bushy, with a few dozen phases."""
    idx = torch.arange(n)
    back = (torch.rand(n, generator=gen) * torch.clamp(idx, max=3000)).long() + 1
    parent = idx - back
    parent[0] = -1
    return parent


def graph_rows(bw):
    """One random graph of 10^6 vertices and 5 * 10^6 edges: its spanning forest built on the
    device, then the scan (C=64, both) with each schedule."""
    n, e, c = 10 ** 6, 5 * 10 ** 6, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    edge_index = torch.randint(0, n, (2, e), device="cuda", generator=gen)
    feat = torch.randn(n, 16, device="cuda", generator=gen)
    topo = treessm.GraphTopology()
    tree = topo(feat, edge_index)
    build_ms = cuda_time(lambda: topo(feat, edge_index), 1, 3)
    from treessm.ops import plan

    sizes = torch.diff(tree.tree_ptr)
    row = dict(case="graph 10^6 vertices, 5*10^6 edges, C=64, both, float32", N=n, E=e, C=c,
               trees=tree.num_trees, largest_tree=int(sizes.max()), build_ms=build_ms,
               auto=plan.choose_schedule(tree, None, c * 4))
    t0 = time.time()
    plan.scan_plan(tree, c, torch.float32, "phases")
    row["phase_layout_first_s"] = time.time() - t0
    bounds = plan.phase_plan(tree).phase_ptr_host
    row["phases"] = int((bounds[1:] > bounds[:-1]).sum())
    x, w = _inputs(n, c, torch.float32)
    grad = torch.randn_like(x)
    for sched in ("phases", "trees"):
        fwd, bwd = _gpu(x, w, tree, "both", grad, sched) if sched == "phases" else \
            _gpu_once(x, w, tree, "both", grad, sched)
        row[f"{sched}_fwd_gpu_ms"], row[f"{sched}_bwd_gpu_ms"] = fwd, bwd
    row["fwd_wall_ms"], row["fwd_bwd_wall_ms"] = _wall(x, w, tree, "both", grad)
    row["fwd_floor_ms"], row["bwd_floor_ms"] = _floors(n, c, torch.float32, bw)
    return [row]


def _gpu_once(x, w, tree, direction, grad, schedule):
    """(forward, backward) milliseconds of one slow call each (no graph, few repeats)."""
    from treessm.ops import cuda, plan

    p = plan.scan_plan(tree, x.shape[1], x.dtype, schedule)
    h = cuda.forward(x, w, p, direction)
    fwd = cuda_time(lambda: cuda.forward(x, w, p, direction), 1, 2)
    bwd = cuda_time(lambda: cuda.backward(grad, x, w, h, p, direction), 1, 2)
    return fwd, bwd


def schedules(bw):
    """Every schedule on one forest of each shape (float32, both): random recursive trees
    of 2^10 .. 2^20 vertices (closer steps about the rule's bounds: 2^10 to 2^12, 2^16 to
    2^19) and a chain of 10^6 (C=64), 32 grid trees of 14x14 (C=640) and of 56x56 (C=160),
    4 of 512x512 and 32 of 224x224 (C=64); forward and backward GPU time, the first call's
    wall time (its plan built), and what the automatic choice takes
    (``treessm.ops.plan.choose_schedule``)."""
    from treessm.ops.plan import choose_schedule
    from treessm.topology import chain_tree

    out = []
    gen = torch.Generator().manual_seed(0)
    topo = treessm.GridTopology()
    cases = [(f"random tree 2^{k}", treessm.Tree.from_parent(random_tree(1 << k, gen)).cuda(),
              64) for k in (10, 11, 12, 14, 16, 17, 18, 19, 20)]
    cases += [("chain 10^6", chain_tree(1, 10 ** 6, "cuda"), 64),
              ("32 x 14x14 grid trees", topo(torch.randn(32, 14, 14, 8, device="cuda")), 640),
              ("32 x 56x56 grid trees", topo(torch.randn(32, 56, 56, 8, device="cuda")), 160),
              ("4 x 512x512 grid trees", topo(torch.randn(4, 512, 512, 8, device="cuda")), 64),
              ("32 x 224x224 grid trees", topo(torch.randn(32, 224, 224, 8, device="cuda")),
               64)]
    for name, tree, c in cases:
        n = tree.num_nodes
        x, w = _inputs(n, c, torch.float32)
        grad = torch.randn_like(x)
        row = dict(case=name, N=n, C=c, levels=tree.num_levels, largest=tree.max_tree_size,
                   auto=choose_schedule(tree, None, c * 4))
        for sched in SCHEDULES:
            if (sched == "trees" and (tree.max_tree_size or n) > 1 << 16
                    or sched == "columns" and (tree.max_tree_size or n) > 1 << 12):
                continue  # one block (a thread) walking a tree this large: not a candidate
            tree.plan_cache.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            treessm.tree_scan(x, w, tree, "both", schedule=sched)
            torch.cuda.synchronize()
            row[f"{sched}_first_call_ms"] = (time.perf_counter() - t0) * 1e3
            row[f"{sched}_fwd_ms"], row[f"{sched}_bwd_ms"] = _gpu(x, w, tree, "both", grad, sched)
        out.append(row)
        print(json.dumps(row, default=lambda v: round(v, 4) if isinstance(v, float) else v),
              flush=True)
        del x, w, grad
    return out


def launch_sweep(bw, topo, quick=False):
    """Block width (bytes of channels per position) and position lanes on the four grid
    stages, ``both``, float32 (the same bits for every shape): the rule of
    :func:`treessm.ops.plan.launch_config` is read off this table."""
    from treessm.ops.plan import launch_config

    out = []
    for B, H, C in STAGES:
        feat = torch.randn(B, H, H, C, device="cuda")
        tree = topo(feat)
        x, w = _inputs(tree.num_nodes, C, torch.float32)
        grad = torch.randn_like(x)
        chosen = launch_config("trees", 4, tree.max_tree_size)
        for rb in (16, 32) if quick else (16, 32, 64):
            for lanes in (16, 32, 64, 128):
                f, b = _gpu(x, w, tree, "both", grad, "trees", row_bytes=rb, lanes=lanes)
                out.append(dict(B=B, H=H, C=C, row_bytes=rb, lanes=lanes, fwd_gpu_ms=f,
                                bwd_gpu_ms=b, chosen=(rb, lanes) == tuple(chosen)))
        del feat, tree, x, w, grad
    return out


def host_rows():
    """Host overhead: forward and forward+backward wall time against GPU time."""
    out = []
    gen = torch.Generator().manual_seed(1)
    tiny = treessm.Tree.from_parent(random_tree(64, gen)).cuda()
    x, w = _inputs(64, 4, torch.float32)
    grad = torch.randn_like(x)
    fwd, fb = _wall(x, w, tiny, "both", grad)
    gf, gb = _gpu(x, w, tiny, "both", grad)
    out.append(dict(case="tiny tree, 64 vertices, C=4, both", fwd_wall_ms=fwd,
                    fwd_bwd_wall_ms=fb, fwd_gpu_ms=gf, bwd_gpu_ms=gb))
    topo = treessm.GridTopology()
    feat = torch.randn(32, 14, 14, 640, device="cuda")
    tree = topo(feat)
    x, w = _inputs(tree.num_nodes, 640, torch.float32)
    grad = torch.randn_like(x)
    fwd, fb = _wall(x, w, tree, "both", grad)
    gf, gb = _gpu(x, w, tree, "both", grad)
    out.append(dict(case="32 x 14x14, C=640, both", fwd_wall_ms=fwd, fwd_bwd_wall_ms=fb,
                    fwd_gpu_ms=gf, bwd_gpu_ms=gb, wall_over_gpu=fb / (gf + gb)))
    return out


def chain_rows(bw):
    """The down scan over 4 chains of 2,048 tokens, 24,576 channels (d_inner 1536 x d_state
    16 of Mamba-130m)."""
    from treessm.topology import chain_tree

    tree = chain_tree(4, 2048, "cuda")
    x, w = _inputs(tree.num_nodes, 24576, torch.float32)
    grad = torch.randn_like(x)
    fwd, fb = _wall(x, w, tree, "down", grad)
    gf, gb = _gpu(x, w, tree, "down", grad)
    # one thread per (chain, channel) carrying the step before's value in a register
    cf, cb = _gpu(x, w, tree, "down", grad, schedule="columns")
    floor, bfloor = _floors(tree.num_nodes, 24576, torch.float32, bw)
    return [dict(case="4 chains x 2048, C=24576, down, float32", fwd_wall_ms=fwd,
                 fwd_bwd_wall_ms=fb, fwd_gpu_ms=gf, bwd_gpu_ms=gb, fwd_floor_ms=floor,
                 bwd_floor_ms=bfloor, fwd_share_of_bandwidth=floor / gf,
                 columns_fwd_gpu_ms=cf, columns_bwd_gpu_ms=cb)]


def grid_builds():
    out = []
    base = None
    for B, H in ((32, 56), (32, 112), (32, 224), (4, 512)):
        feat = torch.randn(B, H, H, 16, device="cuda")
        topo = treessm.GridTopology()
        ms = cuda_time(lambda f=feat, t=topo: t(f), warmup=2, iters=5)
        per = ms * 1e6 / (B * H * H)
        base = base or per
        out.append(dict(B=B, H=H, C=16, build_ms=ms, ns_per_vertex=per,
                        per_vertex_vs_56=per / base))
        torch.cuda.empty_cache()
    return out


def _tile_cases():
    """(name, tree, channels, tile sizes) of the tiled-kernel comparison."""
    from treessm.topology import chain_tree

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, e = 10 ** 6, 5 * 10 ** 6
    edge_index = torch.randint(0, n, (2, e), device="cuda", generator=gen)
    graph = treessm.GraphTopology()(torch.randn(n, 16, device="cuda", generator=gen), edge_index)
    topo = treessm.GridTopology()
    yield "graph 10^6, C=64", graph, 64, (2048, 512)
    yield "chain 10^6, C=64", chain_tree(1, n, "cuda"), 64, (2048, 512)
    yield ("32 x 56x56, C=160", topo(torch.randn(32, 56, 56, 160, device="cuda")), 160,
           (4096, 2048, 1024))
    yield "32 x 14x14, C=640", topo(torch.randn(32, 14, 14, 640, device="cuda")), 640, (2048,)
    yield "4 chains x 2048, C=24576", chain_tree(4, 2048, "cuda"), 24576, (2048,)


def _device_time(fn):
    """``(ms, timer)``: a CUDA-graph replay of ``fn`` where it can be captured, else CUDA
    events around eager calls (which count launch gaps too)."""
    try:
        return graph_time(fn), "graph"
    except RuntimeError:
        torch.cuda.synchronize()
        return cuda_time(fn), "events"


def tile_rows(bw):
    """The tiled kernels against the current ones (see the module docstring)."""
    from treessm.ops.plan import scan_plan
    from treessm.ops.tiles import tile_plan
    from treessm.typing import load_cuda_extension

    load_cuda_extension()  # the tiled operators are called directly
    out = []
    for name, tree, c, tiles in _tile_cases():
        x, w = _inputs(tree.num_nodes, c, torch.float32)
        grad = torch.randn_like(x)
        floor, bfloor = _floors(tree.num_nodes, c, torch.float32, bw)
        tree.plan_cache.clear()  # the current plan's build, from nothing, as a tile plan's
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        scan_plan(tree, c, torch.float32)
        torch.cuda.synchronize()
        current_build_ms = (time.perf_counter() - t0) * 1e3
        tree.plan_cache.clear()
        for direction in DIRECTIONS:
            ref = treessm.tree_scan(x.double(), w.double(), tree, direction)
            current = _gpu(x, w, tree, direction, grad)
            for tile in tiles:
                t0 = time.perf_counter()
                plan = tile_plan(tree, tile)
                torch.cuda.synchronize()
                build_ms = (time.perf_counter() - t0) * 1e3
                tensors = plan.op_tensors()
                row = dict(case=name, direction=direction, N=tree.num_nodes, C=c, tile=tile,
                           tiles=int((plan.tile_ptr.diff() > 0).sum()),
                           boundary=int(plan.boundary_level_ptr[-1]),
                           boundary_depth=int((plan.boundary_level_ptr.diff() > 0).sum()),
                           plan_build_ms=build_ms, current_plan_build_ms=current_build_ms,
                           fwd_floor_ms=floor, bwd_floor_ms=bfloor,
                           current_fwd_gpu_ms=current[0], current_bwd_gpu_ms=current[1])
                h = torch.ops.treessm.cuda_tile_scan(x, w, tensors, direction)
                row["tiled_fwd_gpu_ms"], row["tiled_timer"] = _device_time(
                    lambda: torch.ops.treessm.cuda_tile_scan(x, w, tensors, direction))
                row["tiled_bwd_gpu_ms"], _ = _device_time(
                    lambda: torch.ops.treessm.cuda_tile_scan_backward(grad, w, h, tensors,
                                                                      direction, x))
                row["tiled_max_rel_error"] = float((h.double() - ref).abs().max()
                                                   / ref.abs().max().clamp(min=1))
                out.append(row)
                print(json.dumps(row, default=lambda v: round(v, 4) if isinstance(v, float)
                                 else v), flush=True)
        del x, w, grad, h, ref
        torch.cuda.empty_cache()
    return out


def _section(result, name, fn):
    t0 = time.time()
    try:
        result[name] = fn()
    except Exception as exc:  # one broken section must not lose the others
        traceback.print_exc()
        result[name] = dict(error=f"{type(exc).__name__}: {exc}"[:800])
    print(f"[{name}: {time.time() - t0:.0f} s]", flush=True)


def _fresh_trees():
    """``(name, Tree)``: trees of about 10^6 vertices or more, shaped unlike the tests'."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from graph import _fresh_graphs

    name, ei, n = next(iter(_fresh_graphs(10 ** 6 // 3)))  # the power-law graph
    feat = torch.randn(n, 8, generator=torch.Generator().manual_seed(1)).cuda()
    yield f"spanning forest of a {name} graph", treessm.GraphTopology()(feat, ei.cuda())
    grid = torch.randn(1, 1000, 1000, 8, generator=torch.Generator().manual_seed(2)).cuda()
    yield "grid tree of 1000 x 1000", treessm.GridTopology()(grid)
    gen = torch.Generator().manual_seed(3)
    yield "random recursive tree of 3 * 10^6", treessm.Tree.from_parent(
        random_tree(3 * 10 ** 6, gen)).cuda()
    spine = 5 * 10 ** 5  # a chain with a leaf on every vertex of it
    idx = torch.arange(2 * spine)
    parent = torch.where(idx < spine, idx - 1, idx - spine)
    yield "caterpillar: a chain of 5 * 10^5 with a leaf on each", treessm.Tree.from_parent(
        parent).cuda()
    arms, length = 1000, 1000  # one root, 1,000 chains of 1,000 below it
    pos = torch.arange(arms * length)
    parent = torch.where(pos % length == 0, -1, pos - 1) + 1
    yield "star of 1,000 chains of 1,000", treessm.Tree.from_parent(
        torch.cat([torch.tensor([-1]), parent])).cuda()


def fresh_rows():
    """The scan of each fresh tree on the GPU against the numba backend (float64)."""
    from treessm.ops.plan import choose_schedule

    rows = []
    for name, tree in _fresh_trees():
        n, c = tree.num_nodes, 8
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, c, generator=gen, dtype=torch.float64)
        w = torch.rand(n, c, generator=gen, dtype=torch.float64) * 0.9 + 0.05
        g = torch.randn(n, c, generator=gen, dtype=torch.float64)
        cpu_tree = tree.cpu()
        largest = int(torch.diff(tree.tree_ptr).max())
        auto = choose_schedule(tree, None, c * 8)
        schedules = [None] + [s for s in SCHEDULES if (s != "trees" or largest <= 2 ** 16)
                              and (s != "columns" or largest <= 2 ** 12)]
        for d in DIRECTIONS:
            want = _value_and_grads(x, w, g, lambda a, b: treessm.tree_scan(
                a, b, cpu_tree, d, backend="numba"))
            for sched in schedules:
                got = _value_and_grads(x.cuda(), w.cuda(), g.cuda(), lambda a, b: treessm.tree_scan(
                    a, b, tree, d, backend="cuda", schedule=sched))
                err = [float((u.cpu() - v).abs().max() / v.abs().max().clamp_min(1e-300))
                       for u, v in zip(got, want)]
                rows.append(dict(tree=name, N=n, trees=tree.num_trees, largest=largest,
                                 max_depth=int(tree.max_depth), direction=d,
                                 schedule=sched or f"auto ({auto})", error_h=err[0],
                                 error_gx=err[1], error_gw=err[2]))
                print(f"fresh {name:<52} {d:>4} {rows[-1]['schedule']:<13} errors h "
                      f"{err[0]:.1e} gx {err[1]:.1e} gw {err[2]:.1e}", flush=True)
    return rows


def _value_and_grads(x, w, g, scan):
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    h = scan(xs, ws)
    gx, gw = torch.autograd.grad(h, (xs, ws), g)
    return h.detach(), gx, gw


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headline", action="store_true",
                        help="float32 'both' grid rows through the public API only")
    parser.add_argument("--quick", action="store_true", help="float32 rows only")
    parser.add_argument("--tiles", action="store_true",
                        help="only the tiled kernels against the current ones")
    parser.add_argument("--schedules", action="store_true",
                        help="only every schedule on trees of several shapes")
    parser.add_argument("--fresh", action="store_true",
                        help="only large trees the tests do not use, against the CPU backend")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    topo = treessm.GridTopology(connectivity=4, distance="cosine")
    result = dict(device=name, torch=torch.__version__, treessm=treessm.__version__,
                  copy_bandwidth_GBps=bw, authors_h200_56_160_both=AUTHORS_H200,
                  previous_release_h200=PREVIOUS_RELEASE_H200,
                  when=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.tiles:
        _section(result, "tiles", lambda: tile_rows(bw))
        result["rows"] = []
    elif args.schedules:
        _section(result, "schedules", lambda: schedules(bw))
        result["rows"] = []
    elif args.fresh:
        _section(result, "fresh", fresh_rows)
        result["rows"] = []
    elif args.headline:
        result["rows"] = [grid_row(B, H, C, "both", torch.float32, bw, topo, headline=True)
                          for B, H, C in STAGES]
    else:
        def rows():
            out = []
            for dtype in (torch.float32,) if args.quick else (torch.float32, torch.bfloat16):
                for B, H, C in STAGES:
                    for d in DIRECTIONS:
                        out.append(grid_row(B, H, C, d, dtype, bw, topo, build=d == "both"))
            out.append(grid_row(32, 224, 160, "both", torch.float32, bw, topo))
            return out

        _section(result, "rows", rows)
        _section(result, "host", host_rows)
        _section(result, "chains", lambda: chain_rows(bw))
        _section(result, "graph", lambda: graph_rows(bw))
        _section(result, "schedules", lambda: schedules(bw))
        _section(result, "launch", lambda: launch_sweep(bw, topo, args.quick))
        _section(result, "grid_build", grid_builds)

        def reference():
            from treessm.ops import reference as ref
            from treessm.ops.plan import level_groups

            feat = torch.randn(32, 56, 56, 160, device="cuda")
            tree = topo(feat)
            x, w = _inputs(tree.num_nodes, 160, torch.float32)
            groups = level_groups(tree)
            return cuda_time(lambda: ref.forward(x, w, tree.parent, groups, "both"), 1, 3)

        _section(result, "torch_reference_fwd_ms_56_160_both", reference)
    out = Path(args.out) if args.out else RESULTS / "tree_scan_gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"device: {name}  copy bandwidth: {bw:.0f} GB/s")
    print(f"{'B':>3} {'H':>4} {'C':>5} {'dir':>5} {'dtype':>9} {'fwd gpu':>8} {'bwd gpu':>8} "
          f"{'floor':>6} {'fwd wall':>9} {'f+b wall':>9} {'build':>7} {'sched':>7}")
    for r in result["rows"] if isinstance(result["rows"], list) else []:
        g = lambda k: f"{r[k]:.3f}" if r.get(k) is not None else "-"  # noqa: E731
        print(f"{r['B']:>3} {r['H']:>4} {r['C']:>5} {r['direction']:>5} {r['dtype']:>9} "
              f"{g('fwd_gpu_ms'):>8} {g('bwd_gpu_ms'):>8} {g('fwd_floor_ms'):>6} "
              f"{g('fwd_wall_ms'):>9} {g('fwd_bwd_wall_ms'):>9} {g('build_ms'):>7} "
              f"{r.get('schedule', '-'):>7}")
    for key in ("host", "chains", "graph", "schedules", "launch", "grid_build"):
        if key not in result:  # a section this run did not measure
            continue
        for r in result[key] if isinstance(result[key], list) else [result[key]]:
            print(key, json.dumps(r, default=lambda v: round(v, 4) if isinstance(v, float) else v))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
