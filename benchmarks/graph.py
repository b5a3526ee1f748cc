"""Graph benchmarks: real datasets against GCN, GAT, GIN and GPS; long range; cost.

Three tables, saved as JSON under ``benchmarks/results/``:

* ``--real`` (``graph_real_<device>.json``) -- PyG's own datasets from ``--root`` (laid out
  as ``treessm.datasets`` describes; a read-only root is copied first): Cora (public split,
  test accuracy over seeds), Minesweeper and Tolokers (ROC-AUC over the 10 fixed splits),
  MUTAG and PROTEINS (accuracy, stratified 10-fold cross-validation, the next fold as
  validation), and Tree-NeighborsMatch at depths ``--nm-depths`` (train and test accuracy,
  r + 1 blocks of width 32; every model trained alike: Adam at ``--nm-lr``, batches of
  ``--nm-batch-size``, at most ``--nm-epochs`` epochs, ended after ``--nm-patience``
  epochs without a better train accuracy). On Cora every model is the two-layer GCN shape
  (``treessm.models.LocalGlobalNet``): GCN layers with the tree scan or attention as a
  weight-decayed global branch, or GCN / GAT / GIN layers alone. Elsewhere every model is a
  ``treessm.models.GraphNet`` of one block kind:
  ``tree`` (``TreeGPSConv``: the dataset's local layer plus the tree scan), ``gps`` (PyG's
  ``GPSConv``: the same local layer plus multi-head attention), ``gcn`` / ``gat`` / ``gin``
  (the layer alone in the same residual, normalised, feed-forward frame), widths matched to
  the tree model's parameter count; the same training loop, and the same search (``SEARCH``:
  learning rate and dropout) on the first split's validation score for every model.
* ``--small`` (in ``graph_<device>.json``, beside the rest) -- training steps of
  ``TreeSSMConv(64, 64)`` and ``GCNConv(64, 64)`` on random graphs of 100 to 2,708 vertices in
  one process with ``--threads`` (wall-clock medians, the layers taking turns).
* ``--synthetic`` (in ``graph_<device>.json``) -- karate club, ``InfectionDataset`` and the
  far-label task at depths 1, 2 and 4 (``treessm.examples.graphs``).
* ``--timing`` (in ``graph_<device>.json``) -- ``TreeSSMConv(64, 64)`` against
  ``GCNConv(64, 64)`` on random graphs with five edges per vertex: forward and
  forward+backward, peak memory (on the CPU each size and layer in processes of their own,
  the two layers' taking turns, ``CPU_ROUNDS`` of each below 10^6 vertices: the medians),
  and the parts of the block at the largest size.

    python benchmarks/graph.py --real --root ../shared/data    # the full protocol
    python benchmarks/graph.py --real --update --tasks MUTAG --runs 10 --epoch-scale 0.3
                                                # one dataset, reduced, into the table
    python benchmarks/graph.py --real --update --tasks tree_neighbors_match --nm-examples 256
                                                # Tree-NeighborsMatch, 256 examples per depth
    python benchmarks/graph.py --markdown benchmarks/results/graph_real_cpu.json
    python benchmarks/graph.py --timing                        # CPU, 10^4..10^6
    python benchmarks/graph.py --device cuda --timing --sizes 4,5,6,7   # a GPU
    python benchmarks/graph.py --real --device cuda --root DIR  # the full protocol on a GPU
    python benchmarks/graph.py --real --device cuda --root DIR --tasks minesweeper \
        --models tree --jobs 9               # its splits nine at a time (the same scores)
    python benchmarks/graph.py --small --threads 2             # small graphs, two threads
    python benchmarks/graph.py --quick                         # everything, tiny (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import treessm
from treessm.examples import graphs as tasks
from treessm.nn import TreeSSMConv

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    """Median milliseconds of ``fn`` by :func:`_clock`."""
    clock = _clock(device)
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
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


def _peak_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_layer(layer, n, device, repeats):
    """Forward and forward+backward of one layer of 64 channels on a random graph of ``n``
    vertices and ``5 n`` edges (medians), and the peak memory each adds to what the inputs
    and the layer hold: on a GPU the allocator's peak, on the CPU the process's peak
    resident size (run one layer and size per process to read it)."""
    from torch_geometric.nn import GCNConv

    torch.manual_seed(0)
    x, ei = _random_graph(n, device)
    conv = (TreeSSMConv(64, 64) if layer == "tree_ssm_conv" else GCNConv(64, 64)).to(device)
    row = dict(layer=layer, vertices=n, edges=5 * n)
    if layer == "tree_ssm_conv":
        # the graph prepared once (as every later call on the same edge_index finds it)
        t0 = time.perf_counter()
        treessm.prepare_graph(ei, n)
        _sync(device)
        row["prepare_graph_ms"] = 1e3 * (time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_bytes(device)  # inputs, parameters (and on the CPU the interpreter) in place
    with torch.no_grad():
        row["forward_ms"] = _time(lambda: conv(x, ei), device, repeats)
    row["forward_peak_mb"] = (_peak_bytes(device) - base) / 2 ** 20
    xg = x.clone().requires_grad_()

    def step():  # as a training step after zero_grad(): no gradient added to the last one's
        xg.grad = None
        conv.zero_grad(set_to_none=True)
        out = conv(xg, ei)
        out.backward(torch.ones_like(out))

    row["forward_backward_ms"] = _time(step, device, repeats)
    row["forward_backward_peak_mb"] = (_peak_bytes(device) - base) / 2 ** 20
    return row


#: CPU processes per layer and size below 10^6 vertices, the two layers' taking turns: on a
#: 2-core machine one process's times moved by a fifth from the next one's.
CPU_ROUNDS = 3


def _median_row(rows):
    """The median of each timing and memory field over rows of one layer and size, and the
    rows themselves (``rounds``)."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if key.endswith(("_ms", "_mb")) and isinstance(value, float):
            out[key] = statistics.median(r[key] for r in rows)
    if len(rows) > 1:
        out["rounds"] = rows
    return out


def _out_of_memory_row(n, device):
    """The row of a size that does not fit the device: what it has, instead of times."""
    row = dict(vertices=n, edges=5 * n, out_of_memory=True)
    name = str(device)
    if device.type == "cuda":
        row["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        name = f"{torch.cuda.get_device_name(device)} ({row['device_memory_gib']:.0f} GiB)"
        torch.cuda.empty_cache()
    print(f"n={n:>9}  out of memory on {name}: larger sizes skipped", flush=True)
    return row


def _rows_until_out_of_memory(sizes, measure, device):
    """``(rows, fitted)``: ``measure(n)`` for each size in turn until one runs out of device
    memory, whose row says so and ends the table; ``fitted``, the sizes measured."""
    rows, fitted = [], []
    for n in sizes:
        try:
            rows.append(measure(n))
        except torch.OutOfMemoryError:
            rows.append(_out_of_memory_row(n, device))
            break
        fitted.append(n)
    return rows, fitted


def _layer_pair_row(n, device):
    """Both layers at ``n`` vertices: medians over the rounds, and the ratios."""
    runs = {"gcn_conv": [], "tree_ssm_conv": []}
    repeats = 2 if (device.type == "cpu" and n >= 10 ** 6) else 5
    rounds = CPU_ROUNDS if device.type == "cpu" and n < 10 ** 6 else 1
    for _ in range(rounds):
        for layer in runs:
            if device.type == "cpu":  # a fresh process: its peak resident size is its own
                cmd = [sys.executable, __file__, "--time-layer", layer, str(n), str(repeats),
                       "--threads", str(torch.get_num_threads())]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env=_child_env())
                runs[layer].append(json.loads(out.stdout.strip().splitlines()[-1]))
            else:
                runs[layer].append(time_layer(layer, n, device, repeats))
    pair = {layer: _median_row(r) for layer, r in runs.items()}
    t, g = pair["tree_ssm_conv"], pair["gcn_conv"]
    row = dict(vertices=n, edges=5 * n, tree_ssm_conv=t, gcn_conv=g,
               forward_ratio=t["forward_ms"] / g["forward_ms"],
               forward_backward_ratio=t["forward_backward_ms"] / g["forward_backward_ms"])
    print(f"n={n:>9}  forward {t['forward_ms']:9.1f} / {g['forward_ms']:8.1f} ms "
          f"({row['forward_ratio']:4.1f}x)  fwd+bwd {t['forward_backward_ms']:9.1f} / "
          f"{g['forward_backward_ms']:8.1f} ms ({row['forward_backward_ratio']:4.1f}x)  "
          f"peak {t['forward_backward_peak_mb']:8.0f} / {g['forward_backward_peak_mb']:6.0f}"
          f" MB  prepare {t['prepare_graph_ms']:.0f} ms", flush=True)
    return row


def timing_table(device, sizes=(10 ** 4, 10 ** 5, 10 ** 6)):
    """The per-size rows (a size that runs out of device memory ends them with a row that
    says so), the parts of the block at the largest size that fitted, the builds of the
    spanning forest and the fresh graphs."""
    rows, fitted = _rows_until_out_of_memory(
        sizes, lambda n: _layer_pair_row(n, device), device)
    if not fitted:
        return dict(per_size=rows)
    # the parts, at the largest size that fitted
    n = fitted[-1]
    x, ei = _random_graph(n, device)
    topo = treessm.GraphTopology()
    parts = dict(vertices=n, edges=5 * n)
    repeats = 2 if device.type == "cpu" else 7
    parts["graph_topology_build_ms"] = _time(lambda: topo(x, ei), device, repeats)
    tree = topo(x, ei)
    parts["num_trees"], parts["max_depth"] = tree.num_trees, tree.max_depth
    parts["max_tree_size"] = tree.max_tree_size
    if device.type == "cuda":
        from treessm.ops import plan

        parts["schedule"] = plan.choose_schedule(tree, None, 64 * 4)  # the scan timed below
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
    print("parts at n=%d: %s" % (n, json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                              for k, v in parts.items()})))
    return dict(per_size=rows, parts=parts, topology=topology_rows(device, fitted),
                fresh=fresh_rows(device, 10 ** 3 if max(sizes) < 10 ** 4 else 10 ** 5))


#: Vertex counts of the small-graph table: a molecule batch, a few hundred, a PROTEINS-sized
#: batch of graphs, Cora.
SMALL_SIZES = (100, 400, 1250, 2708)


def captured_step_ms(step):
    """GPU milliseconds of one replay of ``step`` captured in a CUDA graph
    (``tree_scan.graph_time``: three eager steps on a side stream first, as capture needs),
    or ``None`` with the reason printed where ``step`` cannot be captured."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from tree_scan import graph_time

    try:
        return graph_time(step)
    except RuntimeError as exc:
        print(f"  not captured: {str(exc).splitlines()[0][:160]}", flush=True)
        torch.cuda.synchronize()
        return None


def small_graph_table(device, sizes=SMALL_SIZES, rounds=15, steps=10):
    """A training step of ``TreeSSMConv(64, 64)`` and of ``GCNConv(64, 64)`` on small random
    graphs (five edges per vertex) in this process, with its threads: the wall-clock medians
    of ``rounds`` rounds of ``steps`` steps, the two layers taking turns, and their ratio.
    On small graphs the fixed costs of a call (dispatch, the work sharing among threads)
    weigh, and those are what the threads of a process change. On a GPU, each step is also
    captured in a CUDA graph and replayed (``*_captured_ms``, a replay's GPU time), as a
    training loop over a fixed graph can: the graph prepared once
    (:func:`treessm.prepare_graph`), a replay costs the host one launch."""
    from torch_geometric.nn import GCNConv

    rows = []
    for n in sizes:
        torch.manual_seed(0)
        x, ei = _random_graph(n, device)
        layers = {"tree_ssm_conv": TreeSSMConv(64, 64).to(device),
                  "gcn_conv": GCNConv(64, 64).to(device)}
        xg = x.clone().requires_grad_()

        def step(conv, *graph):
            xg.grad = None
            conv.zero_grad(set_to_none=True)
            out = conv(xg, *graph)
            out.backward(torch.ones_like(out))

        times = {name: [] for name in layers}
        for conv in layers.values():
            step(conv, ei)  # compiled kernels loaded, graph prepared
        for _ in range(rounds):
            for name, conv in layers.items():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(conv, ei)
                _sync(device)
                times[name].append(1e3 * (time.perf_counter() - t0) / steps)
        row = dict(vertices=n, edges=5 * n, threads=torch.get_num_threads())
        for name, ts in times.items():
            row[f"{name}_step_ms"] = statistics.median(ts)
        row["ratio"] = row["tree_ssm_conv_step_ms"] / row["gcn_conv_step_ms"]
        line = (f"n={n:>6}  training step {row['tree_ssm_conv_step_ms']:8.2f} / "
                f"{row['gcn_conv_step_ms']:6.2f} ms ({row['ratio']:4.1f}x)")
        if device.type == "cuda":
            # each layer over its graph prepared once: TreeSSMConv's PreparedGraph, and for
            # GCNConv the normalised graph that GCNConv(normalize=False) takes (its own
            # normalisation reads sizes back from the device, which a capture forbids)
            from torch_geometric.nn.conv.gcn_conv import gcn_norm

            gcn = GCNConv(64, 64, normalize=False).to(device)
            gcn.load_state_dict(layers["gcn_conv"].state_dict())
            normalised = gcn_norm(ei, None, n, add_self_loops=True)
            prepared = treessm.prepare_graph(ei, n)
            row["tree_ssm_conv_captured_ms"] = captured_step_ms(
                lambda: step(layers["tree_ssm_conv"], prepared))
            row["gcn_conv_captured_ms"] = captured_step_ms(lambda: step(gcn, *normalised))
            got = [row[f"{name}_captured_ms"] for name in layers]
            line += "; captured " + " / ".join("-" if t is None else f"{t:.2f}" for t in got)
            line += " ms"
        print(line, flush=True)
        rows.append(row)
    return rows


def topology_rows(device, sizes):
    """``GraphTopology``'s spanning forest at each size: the first build of a graph (which
    prepares it and, on a GPU, counts its trees) and later builds over the same graph (what
    every layer of every step pays), with the cost per candidate edge."""
    rows = []
    for n in sizes:
        x, ei = _random_graph(n, device)
        topo = treessm.GraphTopology()
        t0 = time.perf_counter()
        topo(x, ei)
        _sync(device)
        first = 1e3 * (time.perf_counter() - t0)
        build = _time(lambda: topo(x, ei), device, 2 if device.type == "cpu" else 5)
        rows.append(dict(vertices=n, edges=5 * n, first_build_ms=first, build_ms=build,
                         ns_per_edge=build * 1e6 / (5 * n)))
        print(f"GraphTopology n={n:>9}: first build {first:8.1f} ms, later builds "
              f"{build:8.1f} ms ({rows[-1]['ns_per_edge']:.1f} ns per edge)", flush=True)
        del x, ei
    return rows


def _fresh_graphs(scale):
    """Graphs of shapes the timing table and the tests do not use: ``(name, edge_index,
    num_nodes)``, about ``scale`` vertices each."""
    from torch_geometric.utils import grid

    g = torch.Generator().manual_seed(7)
    n = 3 * scale
    # power-law degrees (Chung-Lu: both ends drawn with weight i^(-1 / (2.5 - 1)), exponent
    # 2.5), 4 edges a vertex; a few hubs hold a large share of the edges
    weight = torch.arange(1, n + 1, dtype=torch.float64).pow(-1 / 1.5)
    ends = torch.multinomial(weight, 8 * n, replacement=True, generator=g)
    yield "power law (Chung-Lu, exponent 2.5)", ends.view(2, -1), n
    size = 150  # many components: disjoint random graphs of 150 vertices, ids shuffled
    parts = n // size
    local = torch.randint(0, size, (2, 3 * size * parts), generator=g)
    which = torch.arange(parts).repeat_interleave(3 * size)
    perm = torch.randperm(parts * size, generator=g)
    yield f"{parts} random graphs of {size} vertices", perm[local + which * size], parts * size
    side = int((2 * n) ** 0.5)  # a lattice: long, thin spanning trees
    yield f"{side} x {side} lattice", grid(side, side)[0], side * side
    m = 2 * n  # sparse: about as many edges as vertices, many trees and isolated vertices
    yield "sparse random (E = N)", torch.randint(0, m, (2, m), generator=g), m


def fresh_rows(device, scale=10 ** 5):
    """``GraphTopology``'s forest on graphs of other shapes and sizes (:func:`_fresh_graphs`):
    later builds timed on ``device``, and on a GPU the tree compared with the CPU's for
    the same costs (``distance="edge_attr"``, random attributes: the same numbers on both
    devices; the cheapest copy of a repeated edge counts)."""
    rows = []
    topo = treessm.GraphTopology("edge_attr")
    for name, ei, n in _fresh_graphs(scale):
        attr = torch.rand(ei.shape[1], generator=torch.Generator().manual_seed(n))
        graph = treessm.prepare_graph(ei.to(device), n, edge_attr=attr.to(device), reduce="min")
        x = torch.zeros(n, 1, device=device)
        tree = topo(x, graph)
        build = _time(lambda: topo(x, graph), device, 2 if device.type == "cpu" else 5)
        e = graph.edge_index.shape[1]
        row = dict(graph=name, vertices=n, edges=e, trees=tree.num_trees, build_ms=build,
                   ns_per_edge=build * 1e6 / max(e, 1))
        if device.type != "cpu":
            cpu_graph = treessm.prepare_graph(ei, n, edge_attr=attr, reduce="min")
            want = topo(torch.zeros(n, 1), cpu_graph)
            got = topo(x, graph)
            row["equal_to_cpu"] = all(torch.equal(getattr(got, f).cpu(), getattr(want, f))
                                      for f in ("parent", "order", "child_ptr", "tree_ptr",
                                                "depth"))
        rows.append(row)
        print(f"fresh {name:<44} n={n:>8} E={e:>8} trees {row['trees']:>7}: later builds "
              f"{build:7.2f} ms ({row['ns_per_edge']:.1f} ns per edge)"
              + (f", equal to the CPU's: {row['equal_to_cpu']}" if "equal_to_cpu" in row else ""),
              flush=True)
    return rows


# ---------------------------------------------------------------------------- real data
class LocalBlock(nn.Module):
    """A message-passing layer in the same residual, normalised, feed-forward frame as
    TreeGPSConv and GPSConv (only the global branch is missing): the GCN / GAT / GIN
    baselines."""

    def __init__(self, channels, conv, dropout=0.0, norm="batch_norm", edge_features=True):
        super().__init__()
        from torch_geometric.nn.resolver import normalization_resolver

        self.conv, self.dropout, self.edge_features = conv, dropout, edge_features
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(2 * channels, channels), nn.Dropout(dropout))
        self.norm1 = normalization_resolver(norm, channels)
        self.norm2 = normalization_resolver(norm, channels)

    def forward(self, x, edge_index, edge_attr=None, *, batch=None):
        if edge_attr is None or not self.edge_features:  # GCN takes no edge feature vectors
            h = self.conv(x, edge_index)
        else:
            h = self.conv(x, edge_index, edge_attr)
        h = self.norm1(x + F.dropout(h, self.dropout, self.training))
        return self.norm2(h + self.mlp(h))


class GPSBlock(nn.Module):
    """PyG's GPSConv (multi-head attention as the global mixer) in the calling convention of
    GraphNet's blocks."""

    def __init__(self, channels, conv, dropout=0.0, norm="batch_norm", heads=4):
        super().__init__()
        from torch_geometric.nn import GPSConv

        self.gps = GPSConv(channels, conv, heads=heads, dropout=dropout, norm=norm)

    def forward(self, x, edge_index, edge_attr=None, *, batch=None):
        extra = {} if edge_attr is None else {"edge_attr": edge_attr}
        return self.gps(x, edge_index, batch, **extra)


class AttentionMixer(nn.Module):
    """GPSConv's global branch alone: multi-head attention over every graph of the batch,
    called as the tree mixer is (``mixer(h, edge_index, batch=None)``)."""

    def __init__(self, channels, heads=4):
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.out_proj = self.attn.out_proj  # zeroed by LocalGlobalNet, as the tree mixer's

    def reset_parameters(self):
        self.attn._reset_parameters()

    def forward(self, h, edge_index, batch=None):
        from torch_geometric.utils import to_dense_batch

        dense, mask = to_dense_batch(h, batch)
        out = self.attn(dense, dense, dense, key_padding_mask=~mask, need_weights=False)[0]
        return out[mask]


class DenseInput(nn.Module):
    """A layer that sums raw neighbour features (GIN) fed sparse features as dense."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def reset_parameters(self):
        self.conv.reset_parameters()

    def forward(self, x, edge_index):
        return self.conv(x.to_dense() if x.is_sparse else x, edge_index)


MODELS = ("tree", "gcn", "gat", "gin", "gps")


def build_local_global(kind, width, dropout, in_channels, num_classes, d_state=4, heads=8):
    """The two-layer frame (``treessm.models.LocalGlobalNet``): GCN layers with the tree
    scan (``tree``) or attention (``gps``) as the global branch, or GCN / GAT / GIN layers
    alone."""
    from torch_geometric.nn import GATConv, GCNConv, GINConv
    from treessm.models import LocalGlobalNet

    def gat(i, o):
        return (GATConv(i, o // heads, heads=heads, dropout=dropout) if o == width else
                GATConv(i, o, heads=1, dropout=dropout))

    def gin(i, o):
        return DenseInput(GINConv(nn.Sequential(nn.Linear(i, width), nn.ReLU(),
                                                nn.Linear(width, o))))

    conv = {"gat": gat, "gin": gin}.get(kind, GCNConv)
    mixer = {"tree": "tree", "gps": AttentionMixer(width)}.get(kind)
    return LocalGlobalNet(in_channels, width, num_classes, conv=conv, mixer=mixer,
                          d_state=d_state, dropout=dropout, mixer_dropout=dropout)


def make_block(kind, local, dropout, norm, edge_dim=None, d_state=4):
    """``block(channels)`` of a model kind: the TreeGPSConv block (local layer ``local``
    plus the tree scan), GPSConv with attention (the same local layer), or a GCN / GAT /
    GIN layer alone."""
    from treessm.nn import TreeGPSConv, local_conv

    if local == "gin" and edge_dim:  # GIN with edge features
        local = "gine"

    def block(c):
        if kind == "tree":
            return TreeGPSConv(c, conv=local, d_state=d_state, dropout=dropout, norm=norm,
                               edge_dim=edge_dim)
        if kind == "gps":
            return GPSBlock(c, local_conv(local, c, edge_dim), dropout, norm)
        conv = {"gcn": "gcn", "gat": "gat", "gin": "gine" if edge_dim else "gin"}[kind]
        return LocalBlock(c, local_conv(conv, c, edge_dim), dropout, norm, kind != "gcn")
    return block


def build_model(kind, spec, width, dropout, in_channels, num_classes):
    from treessm.models import GraphNet

    if spec.get("frame") == "local_global":
        return build_local_global(kind, width, dropout, in_channels, num_classes,
                                  spec.get("d_state", 4))
    encoder = spec.get("encoder", lambda c: None)(width)
    return GraphNet(in_channels, width, num_classes, spec["layers"],
                    make_block(kind, spec["local"], dropout, spec.get("norm", "batch_norm"),
                               spec.get("edge_dim"), spec.get("d_state", 4)),
                    pool=spec.get("pool"), encoder=encoder, dropout=spec.get("in_dropout", 0.0))


def matched_width(kind, spec, in_channels, num_classes):
    """The width (a multiple of 4) whose parameter count is closest to the tree model's at
    ``spec['hidden']``."""
    def count(k, c):
        m = build_model(k, spec, c, 0.0, in_channels, num_classes)
        return sum(p.numel() for p in m.parameters() if not isinstance(
            p, nn.parameter.UninitializedParameter))

    if kind == "tree" or spec.get("frame") == "local_global":
        return spec["hidden"]  # the two-layer frame: one hidden width for every model
    target = count("tree", spec["hidden"])
    return min(range(8, 4 * spec["hidden"] + 1, 8), key=lambda c: abs(count(kind, c) - target))


def _metric(name, logits, y):
    logits, y = logits.cpu(), y.cpu()
    if name == "roc_auc":
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(y.numpy(), logits.softmax(-1)[:, 1].numpy()))
    return float((logits.argmax(-1) == y).float().mean())


def _peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _optimizer(model, lr, weight_decay, mixer_weight_decay=0.0):
    """Adam; for the two-layer frame weight decay on its first layer and the global mixer
    only (the GCN recipe), otherwise on every parameter."""
    groups = (model.parameter_groups(weight_decay, mixer_weight_decay)
              if hasattr(model, "parameter_groups") else
              [dict(params=list(model.parameters()), weight_decay=weight_decay)])
    return torch.optim.Adam(groups, lr=lr)


def _epoch_seconds(times):
    """Seconds per training epoch (by :func:`_clock`), the first (kernel compilation,
    caches) left out when there are others."""
    return statistics.mean(times[1:] if len(times) > 1 else times)


def _clock(device):
    """Wall time on a GPU and on a CPU with more than one thread (processor time would add
    the threads' times, their waits for one another included); with one CPU thread the
    processor time of this process, which a busy shared machine does not inflate."""
    if device.type == "cuda" or torch.get_num_threads() > 1:
        return time.perf_counter
    return time.process_time


def train_node_split(model, data, train, val, test, epochs, lr, weight_decay, metric,
                     mixer_weight_decay=0.0):
    """Full-batch training on the device of ``data``; the test score at the epoch of the
    best validation score (validation and test rows read from one forward pass)."""
    device = data.x.device
    opt = _optimizer(model, lr, weight_decay, mixer_weight_decay)
    # the split as indices, and the targets, once: a boolean mask indexes through a
    # nonzero (a host synchronisation) every time
    train_idx = train.nonzero().view(-1)
    y_train = data.y[train_idx]
    eval_idx = torch.cat([val.nonzero().view(-1), test.nonzero().view(-1)])
    y_eval = data.y[eval_idx].cpu()
    num_val = int(val.sum())
    clock = _clock(device)
    best = (-1.0, 0.0, 0)
    times = []
    for epoch in range(epochs):
        model.train()
        t0 = clock()
        out = model(data.x, data.edge_index)
        loss = F.cross_entropy(out[train_idx], y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _sync(device)
        times.append(clock() - t0)
        model.eval()
        with torch.no_grad():
            out = model(data.x, data.edge_index)[eval_idx].cpu()
        v = _metric(metric, out[:num_val], y_eval[:num_val])
        if v > best[0]:
            best = (v, _metric(metric, out[num_val:], y_eval[num_val:]), epoch)
    return dict(val=best[0], test=best[1], best_epoch=best[2],
                seconds_per_epoch=_epoch_seconds(times))


def _graph_eval(model, loader, metric, mask_key=None, edge_attr=False):
    model.eval()
    outs, ys = [], []
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in loader:
            b = b.to(device)
            out = model(b.x, b.edge_index, b.edge_attr if edge_attr else None, b.batch)
            if mask_key is not None:
                out = out[b[mask_key]]
            outs.append(out.cpu())
            ys.append(b.y.cpu())
    return _metric(metric, torch.cat(outs), torch.cat(ys))


def train_graph_split(model, train_set, val_set, test_set, epochs, lr, weight_decay, metric,
                      batch_size=64, mask_key=None, seed=0, edge_attr=False, patience=None):
    """Mini-batch training on graphs; the scores at the epoch of the best validation score
    (for Tree-NeighborsMatch, which has no validation set, the best training accuracy).
    Training ends early once that score is perfect (no later epoch can replace it) or, with
    ``patience``, after that many epochs without a better one."""
    from torch_geometric.loader import DataLoader

    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=g)
    evals = {k: DataLoader(v, batch_size=256) for k, v in
             (("train", train_set), ("val", val_set), ("test", test_set)) if v}
    opt = _optimizer(model, lr, weight_decay)
    device = next(model.parameters()).device
    clock = _clock(device)
    best = None
    times = []
    for epoch in range(epochs):
        model.train()
        t0 = clock()
        for b in loader:
            b = b.to(device)
            out = model(b.x, b.edge_index, b.edge_attr if edge_attr else None, b.batch)
            if mask_key is not None:
                out = out[b[mask_key]]
            loss = F.cross_entropy(out, b.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        _sync(device)
        times.append(clock() - t0)
        key = "val" if "val" in evals else "train"
        score = {k: _graph_eval(model, l, metric, mask_key, edge_attr) for k, l in evals.items()
                 if k != "train" or key == "train"}
        if best is None or score[key] > best[key]:
            best = dict(score, best_epoch=epoch)
        if best[key] >= 1.0 or (patience is not None and epoch - best["best_epoch"] >= patience):
            break
    best["seconds_per_epoch"], best["epochs_run"] = _epoch_seconds(times), len(times)
    return best


# search grid, the same for every model: chosen on the validation score of the first split
SEARCH = ({"lr": 1e-3, "dropout": 0.2}, {"lr": 5e-3, "dropout": 0.5})

# per dataset: model size, local layer of the tree and GPS blocks, training budget (and a
# search grid of its own where SEARCH does not fit the dataset's usual recipe)
SPECS = {
    # the two-layer GCN recipe (Kipf & Welling): row-normalised features, dropout on input
    # and hidden layer, weight decay on the first layer; the global branch (tree scan or
    # attention) is weight-decayed on its own (mixer_weight_decay, docs/graphs.md)
    "Cora": dict(frame="local_global", hidden=64, layers=2, local="gcn", epochs=200, runs=10,
                 weight_decay=5e-4, mixer_weight_decay=0.5, normalize_features=True,
                 metric="accuracy",
                 search=({"lr": 1e-2, "dropout": 0.5}, {"lr": 1e-2, "dropout": 0.7})),
    "minesweeper": dict(hidden=64, layers=3, local="sage", epochs=300, runs=10,
                        weight_decay=0.0, metric="roc_auc"),
    # the local layer chosen on split 0's validation score at a third of the epochs, among
    # sage, gcn and gat (graph_real_tolokers_local_cpu.json: 82.8, 84.7, 84.7)
    "tolokers": dict(hidden=64, layers=3, local="gcn", epochs=300, runs=10,
                     weight_decay=0.0, metric="roc_auc"),
    "MUTAG": dict(hidden=64, layers=4, local="gin", pool="sum", epochs=100, runs=10,
                  weight_decay=0.0, metric="accuracy", batch_size=32, edge_dim=4),
    "PROTEINS": dict(hidden=64, layers=4, local="gin", pool="sum", epochs=100, runs=10,
                     weight_decay=0.0, metric="accuracy", batch_size=64),
}


class KeyValueEncoder(nn.Module):
    """Tree-NeighborsMatch's input: key and value embedded separately and summed."""

    def __init__(self, num_leaves, channels):
        super().__init__()
        self.key = nn.Embedding(num_leaves + 1, channels)
        self.value = nn.Embedding(num_leaves + 1, channels)

    def forward(self, x):
        return self.key(x[:, 0]) + self.value(x[:, 1])


def _folds(labels, k, seed=0):
    """Stratified fold id of every example."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(labels.numel(), dtype=torch.long)
    for label in torch.unique(labels):
        idx = (labels == label).nonzero().view(-1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        fold[idx] = torch.arange(idx.numel()) % k
    return fold


def _summary(runs, key):
    vals = [r[key] for r in runs]
    return statistics.mean(vals), statistics.pstdev(vals)


def _real_runner(name, spec, kind, root, copy_to, device):
    """``(run, info)``: ``run(split, cfg)`` trains one model of ``kind`` on one split of
    dataset ``name`` on ``device`` and returns its scores; ``info`` holds the width, the
    data and the sizes."""
    from treessm.datasets import load_dataset

    extra = {}
    if spec.get("normalize_features"):
        from torch_geometric.transforms import NormalizeFeatures

        extra["transform"] = NormalizeFeatures()
    dataset = load_dataset(name, root, copy_to=copy_to, **extra)
    is_graph = "pool" in spec
    if is_graph:
        labels = torch.tensor([int(d.y) for d in dataset])
        fold = _folds(labels, 10)
    data = None if is_graph else dataset[0]
    if data is not None and data.x.count_nonzero() < 0.1 * data.x.numel():
        data.x = data.x.to_sparse()  # bag-of-words features: dropout on the stored entries
    if data is not None:
        data = data.to(device)
    in_channels, num_classes = dataset.num_features, dataset.num_classes
    width = matched_width(kind, spec, in_channels, num_classes)

    def run(split, cfg):
        torch.manual_seed(split)
        model = build_model(kind, spec, width, cfg["dropout"], in_channels,
                            num_classes).to(device)
        if not is_graph:
            if data.train_mask.dim() == 2:  # the fixed splits of the heterophilous sets
                masks = [data[k][:, split] for k in ("train_mask", "val_mask", "test_mask")]
            else:
                masks = [data.train_mask, data.val_mask, data.test_mask]
            return train_node_split(model, data, *masks, spec["epochs"], cfg["lr"],
                                    spec["weight_decay"], spec["metric"],
                                    spec.get("mixer_weight_decay", 0.0))
        test = fold == split
        val = fold == (split + 1) % 10
        train = ~(test | val)
        pick = lambda m: dataset[m.nonzero().view(-1)]  # noqa: E731
        return train_graph_split(model, pick(train), pick(val), pick(test), spec["epochs"],
                                 cfg["lr"], spec["weight_decay"], spec["metric"],
                                 spec.get("batch_size", 64), seed=split,
                                 edge_attr=spec.get("edge_dim") is not None)

    return run, dict(width=width, data=data, is_graph=is_graph, in_channels=in_channels,
                     num_classes=num_classes)


def _child_env():
    """This process's environment, with the treessm it imported first on the path: a child
    process runs this script from benchmarks/, where an uninstalled checkout's package is
    not importable by itself."""
    here = str(Path(treessm.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else "")}


def _split_in_process(name, kind, spec, root, copy_to, device, split, cfg):
    """One split trained by a fresh process (``--jobs``) with this one's CPU threads: the
    same seed, the same result."""
    cmd = [sys.executable, __file__, "--real-split", name, kind, json.dumps(spec), root,
           str(split), json.dumps(cfg), "--device", str(device),
           "--threads", str(torch.get_num_threads())
           ] + (["--copy-to", copy_to] if copy_to else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def real_task(name, spec, kind, root, copy_to, device=torch.device("cpu"), jobs=1):
    """One model on one dataset: the search on the first split, then every split with the
    chosen configuration; with ``jobs`` > 1 the trainings of each of the two stages run
    in that many processes at once."""
    run, info = _real_runner(name, spec, kind, root, copy_to, device)
    rss0 = _peak_rss_mb()  # interpreter, libraries and the dataset

    def logged(split, cfg):
        if jobs > 1:
            r = _split_in_process(name, kind, spec, root, copy_to, device, split, cfg)
        else:
            r = run(split, cfg)
        print(f"  {name} {kind} split {split} {cfg}: val {r['val']:.4f} test {r['test']:.4f}",
              file=sys.stderr, flush=True)
        return r

    def stage(pairs):
        if jobs <= 1:
            return [logged(*p) for p in pairs]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(lambda p: logged(*p), pairs))

    configs = list(spec.get("search", SEARCH))
    trials = list(zip(stage([(0, cfg) for cfg in configs]), configs))
    first, cfg = max(trials, key=lambda t: t[0]["val"])
    runs = [first] + stage([(split, cfg) for split in range(1, spec["runs"])])
    model = build_model(kind, spec, info["width"], 0.0, info["in_channels"],
                        info["num_classes"]).to(device)
    if not info["is_graph"]:
        model.eval()
        with torch.no_grad():
            model(info["data"].x, info["data"].edge_index)  # materialise lazy weights
    test_mean, test_std = _summary(runs, "test")
    return dict(task=name, model=kind, width=info["width"],
                params=sum(p.numel() for p in model.parameters()),
                metric=spec["metric"], test_mean=test_mean, test_std=test_std,
                test=[r["test"] for r in runs], val_mean=_summary(runs, "val")[0],
                chosen=cfg, search=[dict(t[1], val=t[0]["val"]) for t in trials],
                runs=len(runs), epochs=spec["epochs"],
                seconds_per_epoch=statistics.mean(r["seconds_per_epoch"] for r in runs),
                peak_rss_mb=_peak_rss_mb(), rss_before_training_mb=rss0, jobs=jobs)


def neighbors_match_task(depth, kind, num_permutations=None, epochs=100, lr=1e-3,
                         batch_size=16, patience=20):
    """Tree-NeighborsMatch at depth r: r + 1 blocks of width 32, trained on 80% of the
    examples (Adam, mini-batches of ``batch_size``, at most ``epochs`` epochs, ending after
    ``patience`` epochs without a better train accuracy); train accuracy (as the paper
    reports it) and test accuracy at the epoch of the best train accuracy."""
    from treessm.datasets import stratified_split, tree_neighbors_match
    data = tree_neighbors_match(depth, num_permutations=num_permutations)
    train, test = stratified_split(torch.cat([d.y for d in data]), 0.8, seed=0)
    leaves = 2 ** depth
    spec = dict(hidden=32, layers=depth + 1, local="gin",
                encoder=lambda c: KeyValueEncoder(leaves, c))
    # widths as for the other tasks: matched to the tree model's parameters
    width = matched_width(kind, spec, 2, leaves)
    torch.manual_seed(0)
    model = build_model(kind, spec, width, 0.0, 2, leaves)
    r = train_graph_split(model, [data[i] for i in train], None, [data[i] for i in test],
                          epochs, lr, 0.0, "accuracy", batch_size, mask_key="root_mask",
                          patience=patience)
    return dict(task="tree_neighbors_match", depth=depth, model=kind, width=width,
                params=sum(p.numel() for p in model.parameters()), examples=len(data),
                permutations=num_permutations, lr=lr, epochs=epochs, batch_size=batch_size,
                patience=patience, train_accuracy=r["train"], test_accuracy=r.get("test"),
                best_epoch=r["best_epoch"], epochs_run=r["epochs_run"],
                seconds_per_epoch=r["seconds_per_epoch"])


REAL_TASKS = tuple(SPECS)
NEIGHBORS_MATCH = "tree_neighbors_match"  # --tasks name of Tree-NeighborsMatch (--nm-depths)


def real_table(args, device):
    """The real-data table (and Tree-NeighborsMatch) under the budget of ``args``."""
    rows = []
    copy_to = args.copy_to
    for name in [t for t in args.tasks if t != NEIGHBORS_MATCH]:
        spec = dict(SPECS[name])
        for item in args.set:
            key, _, value = item.partition("=")
            spec[key] = json.loads(value)
        if args.runs:
            spec["runs"] = args.runs
        spec["epochs"] = max(1, int(spec["epochs"] * args.epoch_scale))
        for kind in args.models:
            if kind == "gps" and name in args.no_attention:
                continue
            t0 = time.perf_counter()
            if device.type == "cpu" and not args.in_process:
                # a process per model: its peak resident size is this model's
                cmd = [sys.executable, __file__, "--real-one", name, kind, json.dumps(spec),
                       args.root, "--threads", str(args.threads), "--jobs", str(args.jobs)
                       ] + (["--copy-to", copy_to] if copy_to else [])
                out = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
                if out.returncode:
                    raise RuntimeError(out.stderr[-3000:])
                row = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                row = real_task(name, spec, kind, args.root, copy_to, device, args.jobs)
            row["seconds"] = time.perf_counter() - t0
            row["spec"] = {k: v for k, v in spec.items() if k != "encoder"}
            rows.append(row)
            print(f"{name:<12} {kind:<5} width {row['width']:>3} params {row['params']:>7}  "
                  f"{row['metric']} {row['test_mean']:.4f} ± {row['test_std']:.4f} "
                  f"({row['runs']} runs, {row['epochs']} epochs, chosen {row['chosen']})  "
                  f"{1e3 * row['seconds_per_epoch']:.0f} ms/epoch", flush=True)
    for depth in args.nm_depths if NEIGHBORS_MATCH in args.tasks else ():
        permutations = args.nm_permutations
        if args.nm_examples:  # two permutations at least: the root's key alone never
            # names the value (with one, every model fits by reading the key at the root)
            permutations = max(2, args.nm_examples // 2 ** depth)
        for kind in args.models:
            row = neighbors_match_task(depth, kind, permutations, max(1, int(args.nm_epochs)),
                                       args.nm_lr, args.nm_batch_size, args.nm_patience)
            rows.append(row)
            test = row["test_accuracy"]
            print(f"NeighborsMatch r={depth} {kind:<5} train {row['train_accuracy']:.3f} test "
                  f"{'–' if test is None else f'{test:.3f}'} ({row['examples']} examples, "
                  f"{1e3 * row['seconds_per_epoch']:.0f} ms/epoch)", flush=True)
    return rows


def markdown_table(result):
    """The real-data table as markdown: a row per dataset (mean ± std in percent; for
    Tree-NeighborsMatch train / test accuracy), a column per model."""
    names = dict(tree="TreeSSMConv model", gcn="GCN", gat="GAT", gin="GIN",
                 gps="attention (GPS)")
    rows = result["rows"]
    lines = ["| dataset (metric; budget) | " + " | ".join(names[m] for m in MODELS) + " |",
             "|---" * (len(MODELS) + 1) + "|"]
    for task in [t for t in REAL_TASKS if any(r["task"] == t for r in rows)]:
        cells = {r["model"]: r for r in rows if r["task"] == task}
        any_row = next(iter(cells.values()))
        unit = ("seeds" if task == "Cora" else "splits" if any_row["metric"] == "roc_auc"
                else "folds")
        unit = unit if any_row["runs"] != 1 else unit[:-1]
        budget = f"{any_row['runs']} {unit} × {any_row['epochs']} epochs"
        metric = "ROC-AUC" if any_row["metric"] == "roc_auc" else "accuracy"
        vals = [f"{100 * cells[m]['test_mean']:.1f} ± {100 * cells[m]['test_std']:.1f}"
                if m in cells else "–" for m in MODELS]
        lines.append(f"| {task} ({metric}; {budget}) | " + " | ".join(vals) + " |")
    for depth in sorted({r["depth"] for r in rows if r["task"] == "tree_neighbors_match"}):
        cells = {r["model"]: r for r in rows
                 if r["task"] == "tree_neighbors_match" and r["depth"] == depth}
        any_row = next(iter(cells.values()))
        vals = [f"{cells[m]['train_accuracy']:.2f} / " + (
                    "–" if cells[m]["test_accuracy"] is None else
                    f"{cells[m]['test_accuracy']:.2f}") if m in cells else "–" for m in MODELS]
        lines.append(f"| Tree-NeighborsMatch r = {depth} (train / test accuracy; "
                     f"{any_row.get('examples', '?')} examples, "
                     f"{'≤ ' if 'patience' in any_row else ''}{any_row['epochs']} epochs) | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


def _row_key(row):
    return row["task"], row["model"], row.get("depth")


def _updated(old, new):
    """``new`` with the rows of ``old`` it does not replace; each task's budget (runs,
    epochs, search) stays with its rows, in ``budgets``."""
    budgets = dict(old.get("budgets", {}))
    budget = new.pop("budget")
    for task in {r["task"] for r in new["rows"]}:
        budgets[task] = budget
    keys = {_row_key(r) for r in new["rows"]}
    rows = [r for r in old["rows"] if _row_key(r) not in keys] + new["rows"]
    return dict(new, budgets=budgets, rows=rows)


def _csv(kind):
    return lambda s: [kind(v) for v in s.split(",") if v]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real", action="store_true", help="the real-data table")
    parser.add_argument("--synthetic", action="store_true", help="karate, infection, far label")
    parser.add_argument("--timing", action="store_true", help="cost against GCNConv")
    parser.add_argument("--small", action="store_true",
                        help="training steps on small graphs against GCNConv, in this process "
                             "with --threads; kept beside the other tables of the file")
    parser.add_argument("--quick", action="store_true", help="every table, tiny (CI)")
    parser.add_argument("--sizes", type=_csv(int), default=[4, 5, 6],
                        help="timing: powers of ten of the vertex counts")
    parser.add_argument("--root", default=os.environ.get("TREESSM_DATA", "data"),
                        help="root of the real datasets (treessm.datasets)")
    parser.add_argument("--copy-to", default=None, help="where a read-only root is copied")
    parser.add_argument("--tasks", type=_csv(str), default=list(REAL_TASKS) + [NEIGHBORS_MATCH],
                        help="datasets of --real (default: all, and %s)" % NEIGHBORS_MATCH)
    parser.add_argument("--models", type=_csv(str), default=list(MODELS))
    parser.add_argument("--runs", type=int, default=None, help="seeds / splits / folds")
    parser.add_argument("--epoch-scale", type=float, default=1.0)
    parser.add_argument("--no-attention", type=_csv(str), default=[],
                        help="datasets on which GPS (O(N^2) attention per graph) is not run")
    parser.add_argument("--nm-depths", type=_csv(int), default=[2, 3, 4, 5, 6, 7, 8])
    parser.add_argument("--nm-permutations", type=int, default=None)
    parser.add_argument("--nm-examples", type=int, default=None,
                        help="Tree-NeighborsMatch: about this many examples per depth "
                             "(permutations = examples / 2^r, at least 2)")
    parser.add_argument("--nm-epochs", type=int, default=100, help="at most this many")
    parser.add_argument("--nm-lr", type=float, default=1e-3)
    parser.add_argument("--nm-batch-size", type=int, default=16)
    parser.add_argument("--nm-patience", type=int, default=20,
                        help="end after this many epochs without a better train accuracy")
    parser.add_argument("--out", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a value of every task's spec, e.g. "
                             "mixer_weight_decay=0 (an ablation; rows record their spec)")
    parser.add_argument("--update", action="store_true",
                        help="--real: keep the rows of the existing table that this run does "
                             "not measure (a table run in pieces, each with its budget)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the models of --real in this process (no peak memory)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of torch and numba per process, on a GPU too "
                             "(default 1: on a shared or small machine, or with --jobs, more "
                             "threads wait on each other)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="--real: train this many splits of a model at once, each in a "
                             "process of its own (the search's configurations, then the "
                             "other splits); the results are those of one process")
    parser.add_argument("--markdown", default=None, metavar="FILE",
                        help="print the real-data table of FILE as markdown and exit")
    parser.add_argument("--time-layer", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--real-one", nargs=4, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--real-split", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.tasks) - set(REAL_TASKS) - {NEIGHBORS_MATCH}
    if unknown:
        parser.error(f"--tasks: unknown {sorted(unknown)}, expected some of "
                     f"{list(REAL_TASKS) + [NEIGHBORS_MATCH]}")
    device = torch.device(args.device)
    # on a GPU too: the processes of --jobs share the host's cores
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    if args.time_layer:  # one measurement in a process of its own (peak memory)
        layer, n, repeats = args.time_layer
        print(json.dumps(time_layer(layer, int(n), device, int(repeats))))
        return 0
    if args.markdown:
        print(markdown_table(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.real_one:
        name, kind, spec, root = args.real_one
        print(json.dumps(real_task(name, json.loads(spec), kind, root, args.copy_to, device,
                                   args.jobs)))
        return 0
    if args.real_split:
        name, kind, spec, root, split, cfg = args.real_split
        run, _ = _real_runner(name, json.loads(spec), kind, root, args.copy_to, device)
        print(json.dumps(run(int(split), json.loads(cfg))))
        return 0
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    card = ("gpu_h200" if "H200" in name else "gpu") if device.type == "cuda" else device.type
    meta = dict(device=name, torch=torch.__version__, treessm=treessm.__version__,
                threads=torch.get_num_threads(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
    # the C library's thresholds for mapping large blocks afresh move the CPU times (and
    # the ratios between layers) more than most code changes: a table says what it ran with
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if malloc:
        meta["malloc"] = malloc
    if args.quick:
        args.real = args.synthetic = args.timing = True
        args.tasks, args.runs, args.epoch_scale = ["Cora", "MUTAG", NEIGHBORS_MATCH], 1, 0.02
        args.nm_depths, args.nm_permutations, args.nm_epochs = [2], 4, 2
        args.sizes = [3]
    if args.small and not (args.real or args.synthetic or args.timing):
        # its own key of the device's table, the rest of the file kept
        out = Path(args.out) if args.out else RESULTS / f"graph_{card}.json"
        result = json.loads(out.read_text()) if out.exists() else dict(meta)
        result["small"] = small_graph_table(device)
        result["small_when"] = meta["when"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"saved {out}")
        return 0
    if not (args.real or args.synthetic or args.timing):
        args.synthetic = args.timing = True
    saved = []
    if args.real:
        result = dict(meta, search=list(SEARCH), specs={k: {q: v for q, v in s.items()}
                                                        for k, s in SPECS.items()},
                      budget=dict(runs=args.runs, epoch_scale=args.epoch_scale,
                                  nm_permutations=args.nm_permutations,
                                  nm_examples=args.nm_examples, nm_lr=args.nm_lr,
                                  nm_epochs=args.nm_epochs, nm_batch_size=args.nm_batch_size,
                                  nm_patience=args.nm_patience,
                                  no_attention=args.no_attention),
                      rows=real_table(args, device))
        out = Path(args.out) if args.out else RESULTS / f"graph_real_{card}.json"
        old = (json.loads(out.read_text()) if args.update and out.exists()
               else dict(rows=[], budgets={}))
        result = _updated(old, result)
        saved.append((out, result))
    if args.synthetic or args.timing:
        result = dict(meta)
        if args.synthetic:
            result["accuracy"] = (accuracy_table(seeds=(0,), depths=(1,), epochs=3)
                                  if args.quick else accuracy_table())
        if args.timing:
            result["timing"] = timing_table(device, [10 ** k for k in args.sizes])
        out = (Path(args.out).with_name("graph_" + Path(args.out).name) if args.out and args.real
               else Path(args.out) if args.out else RESULTS / f"graph_{card}.json")
        saved.append((out, result))
    for out, result in saved:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
