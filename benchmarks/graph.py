"""Where a tree scan beats local message passing, and what it costs.

Two tables, saved as JSON (``benchmarks/results/graph_<device>.json`` by default):

* ``accuracy`` -- node classification with TreeSSMConv, GCNConv, GATConv and GINConv at
  equal depth (1, 2 and 4 layers) and similar parameter counts, 3 seeds, mean and standard
  deviation of test accuracy and training time per epoch, on Zachary's karate club, PyG's
  ``InfectionDataset`` (labels are path distances to infected vertices; two values of
  ``max_path_length``) and a long-range task (``far_label``: every vertex of a path must
  name the colour of its head, up to 23 hops away). Tasks and models are those of
  ``treessm.examples.graphs``.
* ``timing`` -- one forward of ``TreeSSMConv(64, 64)`` against ``GCNConv(64, 64)`` on random
  graphs of 10^4, 10^5 and 10^6 vertices with five times as many edges, and the parts of
  the block at 10^6: ``GraphTopology`` build, ``tree_scan`` forward and backward.

    python benchmarks/graph.py                          # CPU, both tables
    python benchmarks/graph.py --device cuda --timing   # a GPU: the timing table
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
from treessm.examples import graphs as tasks
from treessm.nn import TreeSSMConv

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def accuracy_table(seeds=(0, 1, 2), depths=(1, 2, 4), epochs=150):
    rows = []
    task_list = [tasks.karate(), tasks.infection(3), tasks.infection(6), tasks.far_label(24)]
    for task in task_list:
        for kind in tasks.CONVS:
            for depth in depths:
                runs = []
                for seed in seeds:
                    torch.manual_seed(seed)
                    model = tasks.matched_model(kind, task, depth)
                    runs.append(tasks.train_node_classifier(model, task, epochs))
                acc = [r["test_accuracy"] for r in runs]
                row = dict(task=task.name, model=kind, depth=depth, params=runs[0]["params"],
                           test_accuracy_mean=statistics.mean(acc),
                           test_accuracy_std=statistics.pstdev(acc), test_accuracy=acc,
                           seconds_per_epoch=statistics.mean(r["seconds_per_epoch"] for r in runs))
                rows.append(row)
                print(f"{task.name:<14} {kind:<9} depth {depth}  params {row['params']:>6}  "
                      f"test {row['test_accuracy_mean']:.3f} ± {row['test_accuracy_std']:.3f}  "
                      f"{1e3 * row['seconds_per_epoch']:.1f} ms/epoch", flush=True)
    return rows


def _random_graph(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g).to(device)
    ei = torch.randint(0, n, (2, 5 * n), generator=g).to(device)
    return x, ei


def timing_table(device, sizes=(10 ** 4, 10 ** 5, 10 ** 6)):
    from torch_geometric.nn import GCNConv

    rows = []
    for n in sizes:
        x, ei = _random_graph(n, device)
        torch.manual_seed(0)
        conv = TreeSSMConv(64, 64).to(device)
        gcn = GCNConv(64, 64).to(device)
        repeats = 3 if (device.type == "cpu" and n >= 10 ** 6) else 7
        with torch.no_grad():
            t_conv = _time(lambda: conv(x, ei), device, repeats)
            t_gcn = _time(lambda: gcn(x, ei), device, repeats)
        row = dict(vertices=n, edges=5 * n, tree_ssm_conv_ms=t_conv, gcn_conv_ms=t_gcn,
                   ratio=t_conv / t_gcn, tree_ssm_conv_ns_per_vertex=1e6 * t_conv / n)
        rows.append(row)
        print(f"n={n:>8}  TreeSSMConv(64, 64) {t_conv:9.2f} ms  GCNConv(64, 64) {t_gcn:8.2f} ms  "
              f"ratio {row['ratio']:5.1f}  {row['tree_ssm_conv_ns_per_vertex']:.0f} ns/vertex",
              flush=True)
    # the parts, at the largest size
    n = sizes[-1]
    x, ei = _random_graph(n, device)
    topo = treessm.GraphTopology()
    parts = dict(vertices=n, edges=5 * n)
    repeats = 3 if device.type == "cpu" else 7
    parts["graph_topology_build_ms"] = _time(lambda: topo(x, ei), device, repeats)
    tree = topo(x, ei)
    parts["num_trees"], parts["max_depth"] = tree.num_trees, tree.max_depth
    parts["max_tree_size"] = tree.max_tree_size
    if device.type == "cuda":
        from treessm.ops import plan

        parts["schedule"] = plan.choose_schedule(tree)
    xs = torch.randn(n, 64, device=device)
    w = torch.rand(n, 64, device=device) * 0.9 + 0.05
    parts["tree_scan_fwd_ms"] = _time(lambda: treessm.tree_scan(xs, w, tree, "both"), device,
                                      repeats)
    xg, wg = xs.clone().requires_grad_(), w.clone().requires_grad_()
    h = treessm.tree_scan(xg, wg, tree, "both")
    g = torch.randn_like(h)
    parts["tree_scan_fwd_bwd_ms"] = _time(
        lambda: torch.autograd.grad(treessm.tree_scan(xg, wg, tree, "both"), (xg, wg), g),
        device, repeats)
    parts["tree_scan_bwd_ms"] = parts["tree_scan_fwd_bwd_ms"] - parts["tree_scan_fwd_ms"]
    print("parts at n=%d: %s" % (n, json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                              for k, v in parts.items()})))
    return dict(per_size=rows, parts=parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--accuracy", action="store_true", help="only the accuracy table")
    parser.add_argument("--timing", action="store_true", help="only the timing table")
    parser.add_argument("--quick", action="store_true", help="small sizes, one seed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    both = not (args.accuracy or args.timing)
    result = dict(device=name, torch=torch.__version__, treessm=treessm.__version__,
                  threads=torch.get_num_threads(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.accuracy or both:
        result["accuracy"] = (accuracy_table(seeds=(0,), depths=(1, 2), epochs=20)
                              if args.quick else accuracy_table())
    if args.timing or both:
        result["timing"] = timing_table(device, (10 ** 3, 10 ** 4) if args.quick
                                        else (10 ** 4, 10 ** 5, 10 ** 6))
    card = "h200" if "H200" in name else device.type
    out = Path(args.out) if args.out else RESULTS / f"graph_{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
