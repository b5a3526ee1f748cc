"""The fused selective tree scan against the expanded one, at the layers' shapes, on the CPU
or a GPU.

For each shape, ``treessm.selective_tree_scan`` (``backend="numba"``: the fused kernels,
which never form the ``[N, d_inner, d_state]`` expansion) against the same computation
expanded, as the layers did before: ``x = Δ·B·u`` and ``w = exp(Δe·A)`` materialised,
``treessm.tree_scan`` (numba) over them, the state normalisation and the read-out in torch
(``selective_tree_scan_ref(..., scan=tree_scan)``). Forward (no gradient) and forward +
backward (gradients of every input); medians of the processor time of the process (the
machine is shared: processor time is what a busy machine inflates least) and of the wall
time; the peak resident memory each adds to its inputs (each shape and path in a process
of its own). Shapes:

* ``tree_ssm_conv`` -- ``TreeSSMConv(64, 64)`` on a random graph of 10^5 vertices and
  5 * 10^5 edges: its spanning forest, d_inner 128, d_state 4, ``both``, edge steps the mean
  of the ends', state normalisation;
* ``grootl_chain`` -- a GrootL / Mamba mixer in chain mode: 4 sequences of 2,048 tokens,
  d_inner 384, d_state 16, ``down``;
* ``grootv_stage1`` -- GrootV-T's first stage: 8 images of 56 x 56 (their grid trees),
  d_inner 160, d_state 1, ``both``, state normalisation.

Then ``TreeSSMConv(64, 64)`` against ``GCNConv(64, 64)`` at 10^5 vertices, forward and
forward + backward, with ``benchmarks/graph.py``'s layer timer (one thread per process; the
ratio that the layer targets: at most 3x forward), and the forward of each layer cut into
its parts (``layer_parts``: one thread, processor time, medians), which shows where the
layer's time goes. Results: ``benchmarks/results/selective_scan_cpu.json``.

On a GPU (``--device cuda``) the shapes are those of the GPU targets -- GrootL at Mamba-130m
widths (4 x 2,048 tokens, d_inner 1,536, d_state 16) over the chain and over the causal tree
(``down``) and its leaf-to-root scan (``up``, given edge steps), and ``TreeSSMConv(64, 64)``'s
scan on the spanning forest of a graph of 10^6 vertices -- timed with CUDA events (medians
of at least ``GPU_REPEATS`` calls after three, each call from an idle device, so that the
host's time counts where it is the longer),
with the peak of the allocator over the inputs, the copy bandwidth of the same run and each
path's floor: the bytes of its inputs and outputs at that bandwidth. ``"fused"`` is
``treessm.selective_tree_scan``'s default on CUDA (the fused kernels where they run, else the
expansion in blocks of channels), ``"expanded"`` the whole expansion scanned by
``treessm.tree_scan``. Results: ``benchmarks/results/selective_scan_gpu_<card>.json``.

    python benchmarks/selective_scan.py                 # CPU: about 5 minutes on 2 cores
    python benchmarks/selective_scan.py --quick         # tiny shapes: checks the script
    python benchmarks/selective_scan.py --device cuda   # GPU: about a minute on an H200
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import treessm
from treessm.ops.selective_scan import selective_tree_scan_ref
from tree_scan import copy_bandwidth, cuda_time  # the CUDA timer beside this script

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SHAPES = {
    "tree_ssm_conv": dict(kind="graph", n=10 ** 5, d=128, s=4, direction="both",
                          edge_step="mean", state_norm=True),
    "grootl_chain": dict(kind="chains", b=4, length=2048, d=384, s=16, direction="down",
                         edge_step="child", state_norm=False),
    "grootv_stage1": dict(kind="grid", b=8, side=56, d=160, s=1, direction="both",
                          edge_step="child", state_norm=True),
}
QUICK = {"tree_ssm_conv": dict(n=2000), "grootl_chain": dict(length=64, d=32),
         "grootv_stage1": dict(b=2, side=12, d=16)}
GPU_SHAPES = {
    "grootl_chain": dict(kind="chains", b=4, length=2048, d=1536, s=16, direction="down",
                         edge_step="child", state_norm=False),
    "grootl_causal": dict(kind="causal", b=4, length=2048, d=1536, s=16, direction="down",
                          edge_step="child", state_norm=False),
    "grootl_paper_up": dict(kind="causal", b=4, length=2048, d=1536, s=16, direction="up",
                            edge_step="given", state_norm=False),
    "tree_ssm_conv": dict(kind="graph", n=10 ** 6, d=128, s=4, direction="both",
                          edge_step="mean", state_norm=True),
}
GPU_QUICK = {"grootl_chain": dict(length=64, d=32), "grootl_causal": dict(length=64, d=32),
             "grootl_paper_up": dict(length=64, d=32), "tree_ssm_conv": dict(n=2000)}


#: Calls timed per GPU row at least: with three, rows moved by a fifth between runs on an
#: H200 (the causal tree's fused forward 1.09 and 1.30 ms with the same kernels).
GPU_REPEATS = 10


def _tree(shape):
    g = torch.Generator().manual_seed(0)
    if shape["kind"] == "graph":
        n = shape["n"]
        x = torch.randn(n, 64, generator=g)
        return treessm.GraphTopology()(x, torch.randint(0, n, (2, 5 * n), generator=g))
    if shape["kind"] == "chains":
        return treessm.topology.chain_tree(shape["b"], shape["length"])
    if shape["kind"] == "causal":
        feat = torch.randn(shape["b"], shape["length"], 32, generator=g)
        return treessm.topology.CausalSequenceTopology()(feat)
    b, side = shape["b"], shape["side"]
    return treessm.GridTopology()(torch.randn(b, side, side, 16, generator=g))


def _inputs(shape, tree):
    g = torch.Generator().manual_seed(1)
    n, d, s = tree.num_nodes, shape["d"], shape["s"]
    # steps and states in the ranges of an initialised layer
    t = dict(u=torch.randn(n, d, generator=g), delta=torch.randn(n, d, generator=g) * 0.1,
             A=-torch.arange(1.0, s + 1).expand(d, s).contiguous(),
             B=torch.randn(n, s, generator=g), C=torch.randn(n, s, generator=g),
             D=torch.ones(d), delta_bias=torch.rand(d, generator=g) * 4 - 6)
    if shape["state_norm"]:
        t["norm_weight"] = torch.ones(d, s) + 0.1 * torch.randn(d, s, generator=g)
        t["norm_bias"] = 0.1 * torch.randn(d, s, generator=g)
    if shape["edge_step"] == "given":
        t["edge_step"] = torch.randn(n, d, generator=g) * 0.1
    options = dict(delta_softplus=True, direction=shape["direction"],
                   state_norm=shape["state_norm"])
    if shape["edge_step"] != "given":
        options["edge_step"] = shape["edge_step"]
    return t, options


def _peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _median_times(fn, repeats):
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return 1e3 * statistics.median(cpu), 1e3 * statistics.median(wall)


def _passes(op, tree, tensors, options, grad):
    """The forward (no gradient) and the forward + backward (gradients of every input) of
    ``op`` on one problem, as functions of no argument."""
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}

    def forward():
        with torch.no_grad():
            op(tree=tree, **tensors, **options)

    def forward_backward():
        y = op(tree=tree, **leaves, **options)
        torch.autograd.grad(y, list(leaves.values()), grad)

    return forward, forward_backward


def measure(name, path, repeats, quick):
    """One shape and path (``"fused"`` or ``"expanded"``), in this process."""
    shape = dict(SHAPES[name], **(QUICK[name] if quick else {}))
    tree = _tree(shape)
    tensors, options = _inputs(shape, tree)
    if path == "fused":
        op = functools.partial(treessm.selective_tree_scan, backend="numba")
    else:
        op = functools.partial(selective_tree_scan_ref,
                               scan=functools.partial(treessm.tree_scan, backend="numba"))
    grad = torch.randn(tree.num_nodes, shape["d"], generator=torch.Generator().manual_seed(2))
    forward, forward_backward = _passes(op, tree, tensors, options, grad)

    row = dict(shape=name, path=path, vertices=tree.num_nodes, d_inner=shape["d"],
               d_state=shape["s"], direction=shape["direction"])
    # the kernels loaded on a tiny problem of the same kind before the baseline
    tiny = dict(shape, **QUICK[name])
    small_tree = _tree(tiny)
    small, _ = _inputs(tiny, small_tree)
    small = {k: v.clone().requires_grad_() for k, v in small.items()}
    y = op(tree=small_tree, **small, **options)
    torch.autograd.grad(y.sum(), list(small.values()))
    base = _peak_bytes()
    row["forward_cpu_ms"], row["forward_wall_ms"] = _median_times(forward, repeats)
    row["forward_peak_mb"] = (_peak_bytes() - base) / 2 ** 20
    row["forward_backward_cpu_ms"], row["forward_backward_wall_ms"] = _median_times(
        forward_backward, repeats)
    row["forward_backward_peak_mb"] = (_peak_bytes() - base) / 2 ** 20
    return row


def measure_gpu(name, path, repeats, quick, bandwidth):
    """One shape and path on the current CUDA device, in this process."""
    shape = dict(GPU_SHAPES[name], **(GPU_QUICK[name] if quick else {}))
    tree = _tree(shape).cuda()
    tensors, options = _inputs(shape, tree)
    tensors = {k: v.cuda() for k, v in tensors.items()}
    if path == "fused":
        op = treessm.selective_tree_scan
    else:
        op = functools.partial(selective_tree_scan_ref,
                               scan=functools.partial(treessm.tree_scan, backend=None))
    grad = torch.randn(tree.num_nodes, shape["d"], device="cuda")
    forward, forward_backward = _passes(op, tree, tensors, options, grad)

    n, d, s = tree.num_nodes, shape["d"], shape["s"]
    item = 4
    # what the op must read and write at least: its [N, D] and [N, S] tensors
    rows = len([k for k in tensors if tensors[k].shape[:1] == (n,) and tensors[k].dim() == 2
                and tensors[k].shape[1] == d])
    forward_bytes = item * ((rows + 1) * n * d + 2 * n * s)
    backward_bytes = item * ((2 * rows + 1) * n * d + 4 * n * s)
    row = dict(shape=name, path=path, vertices=n, d_inner=d, d_state=s,
               direction=shape["direction"], edge_step=shape["edge_step"],
               state_norm=shape["state_norm"])
    forward_backward()  # plans, kernels and caches before the measurements
    for label, fn in (("forward", forward), ("forward_backward", forward_backward)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        row[f"{label}_ms"] = cuda_time(fn, warmup=3, iters=max(repeats, GPU_REPEATS))
        row[f"{label}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    row["forward_floor_ms"] = 1e3 * forward_bytes / bandwidth
    row["forward_backward_floor_ms"] = 1e3 * (forward_bytes + backward_bytes) / bandwidth
    return row


def main_gpu(args):
    bandwidth = 1e9 * copy_bandwidth(nbytes=2 ** 30)  # bytes per second
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  treessm=treessm.__version__, when=time.strftime("%Y-%m-%d %H:%M:%S"),
                  copy_bandwidth_gbs=bandwidth / 1e9, op=[])
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'shape':<17}{'path':<10}{'forward ms (floor)':>22}{'fwd+bwd ms (floor)':>22}"
          f"{'peak fwd / fwd+bwd MiB':>26}")
    for name in GPU_SHAPES:
        for path in ("fused", "expanded"):
            row = measure_gpu(name, path, args.repeats, args.quick, bandwidth)
            result["op"].append(row)
            print(f"{name:<17}{path:<10}{row['forward_ms']:>10.2f} ({row['forward_floor_ms']:.2f})"
                  f"{row['forward_backward_ms']:>14.2f} ({row['forward_backward_floor_ms']:.2f})"
                  f"{row['forward_peak_mib']:>14.0f} / {row['forward_backward_peak_mib']:<8.0f}",
                  flush=True)
            torch.cuda.empty_cache()
    card = torch.cuda.get_device_name().split()[-1].lower()
    out = Path(args.out) if args.out else RESULTS / f"selective_scan_gpu_{card}.json"
    if not args.quick or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"saved {out}")
    return 0


def layer_parts(n, repeats):
    """Forward processor time of the parts of ``TreeSSMConv(64, 64)`` and ``GCNConv(64,
    64)`` on graph.py's random graph of ``n`` vertices (one thread, as graph.py times)."""
    import numba
    from torch_geometric.nn import GCNConv

    from treessm.topology.graph import check_graph

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, ei = torch.randn(n, 64, generator=g), torch.randint(0, n, (2, 5 * n), generator=g)
    torch.manual_seed(0)
    conv, gcn = treessm.nn.TreeSSMConv(64, 64), GCNConv(64, 64)
    treessm.prepare_graph(ei, n)

    def ms(fn):
        return _median_times(fn, repeats)[0]

    row = {}
    with torch.no_grad():
        row["tree_ssm_conv_ms"] = ms(lambda: conv(x, ei))
        graph, _ = check_graph(x, ei, None, None, edge_weight=None, reduce="mean")
        row["graph_check_ms"] = ms(lambda: check_graph(x, ei, None, None, edge_weight=None,
                                                       reduce="mean"))
        u, z = conv.project_in(x, graph)
        row["project_in_ms"] = ms(lambda: conv.project_in(x, graph))
        row["in_proj_ms"] = ms(lambda: conv.in_proj(x))
        # the layer's neighbour mean: over the 64 input channels, then projected (the mean
        # of u's 128 channels, for scale)
        half = conv.in_proj.first_half()
        row["neighbour_mean_ms"] = ms(
            lambda: treessm.nn.tree_ssm_conv.projected_neighbour_mean(x, *half, graph))
        row["neighbour_mean_of_u_ms"] = ms(
            lambda: treessm.nn.tree_ssm_conv.neighbour_mean(u, graph))
        tree = conv.scan_tree(x, u, graph)
        row["spanning_forest_ms"] = ms(lambda: conv.scan_tree(x, u, graph))
        y = conv.selective_scan(u, tree)
        row["selective_scan_ms"] = ms(lambda: conv.selective_scan(u, tree))
        row["ssm_inputs_ms"] = ms(lambda: conv.ssm_inputs(u))
        row["project_out_ms"] = ms(lambda: conv.project_out(y, z))
        row["gcn_conv_ms"] = ms(lambda: gcn(x, ei))
        row["gcn_linear_ms"] = ms(lambda: gcn.lin(x))
        h = torch.randn(n, 128, generator=g)
        row["copy_n_by_128_ms"] = ms(lambda: h.clone())
    return row


def _in_process(args):
    cmd = [sys.executable] + args
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CI)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--measure", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parts", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return main_gpu(args)
    if args.parts:  # the layers' parts in a process of their own
        print(json.dumps(layer_parts(args.parts, args.repeats)))
        return 0
    if args.measure:  # one measurement in a process of its own (peak memory)
        print(json.dumps(measure(*args.measure, args.repeats, args.quick)))
        return 0
    result = dict(device=platform.processor() or platform.machine(), torch=torch.__version__,
                  treessm=treessm.__version__, threads=torch.get_num_threads(),
                  when=time.strftime("%Y-%m-%d %H:%M:%S"), op=[])
    print(f"{'shape':<15}{'path':<10}{'forward cpu / wall ms':>24}{'fwd+bwd cpu / wall ms':>26}"
          f"{'peak fwd / fwd+bwd MB':>24}")
    for name in SHAPES:
        for path in ("fused", "expanded"):
            flags = ["--measure", name, path, "--repeats", str(args.repeats)]
            row = _in_process([__file__] + flags + (["--quick"] if args.quick else []))
            result["op"].append(row)
            print(f"{name:<15}{path:<10}{row['forward_cpu_ms']:>12.0f} / "
                  f"{row['forward_wall_ms']:<9.0f}{row['forward_backward_cpu_ms']:>14.0f} / "
                  f"{row['forward_backward_wall_ms']:<9.0f}{row['forward_peak_mb']:>12.0f} / "
                  f"{row['forward_backward_peak_mb']:<8.0f}", flush=True)
    n = 2000 if args.quick else 10 ** 5
    layers = {layer: _in_process([str(HERE / "graph.py"), "--time-layer", layer, str(n),
                                  str(args.repeats)])
              for layer in ("gcn_conv", "tree_ssm_conv")}
    t, g = layers["tree_ssm_conv"], layers["gcn_conv"]
    result["layer"] = dict(vertices=n, edges=5 * n, tree_ssm_conv=t, gcn_conv=g,
                           forward_ratio=t["forward_ms"] / g["forward_ms"],
                           forward_backward_ratio=t["forward_backward_ms"]
                           / g["forward_backward_ms"])
    print(f"TreeSSMConv(64, 64) / GCNConv(64, 64) at {n} vertices (processor time): forward "
          f"{t['forward_ms']:.0f} / {g['forward_ms']:.0f} ms = "
          f"{result['layer']['forward_ratio']:.1f}x, forward+backward "
          f"{t['forward_backward_ms']:.0f} / {g['forward_backward_ms']:.0f} ms = "
          f"{result['layer']['forward_backward_ratio']:.1f}x")
    parts = _in_process([__file__, "--parts", str(n), "--repeats", str(args.repeats)])
    result["layer_parts"] = dict(vertices=n, edges=5 * n, threads=1, **parts)
    print("forward parts, one thread (ms): " + ", ".join(
        f"{k[:-3]} {v:.0f}" for k, v in parts.items()))
    out = Path(args.out) if args.out else RESULTS / "selective_scan_cpu.json"
    if not args.quick or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
