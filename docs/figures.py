"""The pictures of the documentation site, from real data and the saved benchmark tables.

* ``photo_tree.png`` -- the minimum spanning tree over a photograph (scikit-image's
  astronaut, shipped with scikit-image) and how far one pixel's state reaches along it;
* ``scan_speed.png``, ``graph_cost.png``, ``topology_cost.png``, ``graph_accuracy.png`` --
  plots of ``benchmarks/results/*.json``;
* ``cora_tree.png`` -- the spanning tree of Cora (read with PyG's ``Planetoid`` through
  :func:`treessm.datasets.load_dataset`) coloured by class.

The first two kinds need nothing but the repository and are drawn by every site build
(``docs/conf.py`` calls :func:`build_figures`), so they never drift from the tables. Cora is
a download for a fresh clone, so its picture is drawn once and kept in
``docs/_static/cora_tree.png``::

    python docs/figures.py --cora-root DATA     # DATA: a PyG root holding planetoid/Cora
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import treessm

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "benchmarks" / "results"
GENERATED = HERE / "_generated"
STATIC = HERE / "_static"
CORA_CLASSES = ("case based", "genetic algorithms", "neural networks",
                "probabilistic methods", "reinforcement learning", "rule learning", "theory")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "savefig.dpi": 110})
    return plt


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


# ---------------------------------------------------------------------------- photograph
def photo_tree(out: Path, size: int = 96, sigma: float = 0.1) -> Path:
    """The grid tree of a photograph under colour distance, its edges coloured by that
    distance, and the weight :math:`S(u, v)` with which every pixel ``u`` reaches one
    marked pixel ``v`` in a tree scan whose edge weights are :math:`\\exp(-d / \\sigma)`."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm
    from skimage import data
    from skimage.transform import resize

    plt = _plt()
    photo = resize(data.astronaut() / 255.0, (size, size), anti_aliasing=True)
    feat = torch.from_numpy(photo).float().reshape(1, size, size, 3)
    tree = treessm.GridTopology(4, "l2")(feat)
    flat = feat.reshape(-1, 3)
    child = torch.nonzero(tree.parent >= 0).view(-1)
    parent = tree.parent[child]
    dist = torch.zeros(size * size)
    dist[child] = (flat[child] - flat[parent]).norm(dim=1)
    weight = torch.exp(-dist / sigma)
    v = (size * 3 // 10) * size + size // 2                 # a pixel of the face
    onehot = torch.zeros(size * size, 1)
    onehot[v] = 1.0
    reach = treessm.tree_scan(onehot, weight[:, None], tree, "both").view(size, size).numpy()

    xy = lambda ids: np.stack([ids % size, ids // size], 1)  # noqa: E731
    segments = np.stack([xy(child.numpy()), xy(parent.numpy())], 1).astype(np.float32)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.9))
    axes[0].imshow(photo, alpha=0.25)
    lines = LineCollection(segments, cmap="magma_r", linewidths=1.1,
                           norm=LogNorm(vmin=1e-3, vmax=1.0))
    lines.set_array(np.clip(dist[child].numpy(), 1e-3, None))
    axes[0].add_collection(lines)
    fig.colorbar(lines, ax=axes[0], fraction=0.046, pad=0.02,
                 label="colour distance of the tree edge (RGB, log scale)")
    axes[0].set_title(f"minimum spanning tree of {size}×{size} pixels "
                      f"(depth {int(tree.depth.max())})")
    shown = axes[1].imshow(np.clip(reach, 1e-12, 1), cmap="viridis",
                           norm=LogNorm(vmin=1e-12, vmax=1.0))
    axes[1].plot([v % size], [v // size], "r+", markersize=10, markeredgewidth=2)
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02,
                 label="S(u, v): weight of pixel u at v (log scale)")
    axes[1].set_title(f"reach of the marked pixel v, edge weight exp(−d / {sigma})")
    for ax in axes:
        ax.set_xlim(-0.5, size - 0.5)
        ax.set_ylim(size - 0.5, -0.5)
        ax.axis("off")
    return _save(fig, out / "photo_tree.png")


# ---------------------------------------------------------------------------- benchmarks
def scan_speed(out: Path) -> Path:
    """Tree-scan time against size, CPU (numba, torch reference) and H200 (CUDA)."""
    plt = _plt()
    cpu = _load("tree_scan_cpu.json")
    gpu = _load("tree_scan_gpu_h200.json")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9), sharey=True)
    series = {}
    for r in cpu["scan"]:
        if r["direction"] == "both" and r["dtype"] == "float32":
            key = f"CPU, 2 cores, {r['backend']}"
            series.setdefault(key, []).append((r["n"] * r["c"], r["fwd_ms"],
                                               r["fwd_ms"] + r["bwd_ms"]))
    for r in gpu["rows"]:
        if r["direction"] == "both" and r["dtype"] == "float32":
            series.setdefault("H200, CUDA", []).append((r["N"] * r["C"], r["fwd_wall_ms"],
                                                        r["fwd_bwd_wall_ms"]))
    styles = {"CPU, 2 cores, numba": "o-", "CPU, 2 cores, torch": "s", "H200, CUDA": "^-"}
    for name, points in series.items():
        points.sort()
        size, fwd, both = (np.array(p) for p in zip(*points))
        axes[0].plot(size, fwd, styles.get(name, "o-"), label=name)
        axes[1].plot(size, both, styles.get(name, "o-"), label=name)
    for ax, title in zip(axes, ("forward", "forward + backward")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vertices × channels (batches of image grids, direction 'both')")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("milliseconds")
    axes[0].legend(frameon=False)
    fig.suptitle("tree_scan, float32: tree_scan_cpu.json (2-core CPU) and "
                 "tree_scan_gpu_h200.json (NVIDIA H200)", fontsize=9)
    return _save(fig, out / "scan_speed.png")


def graph_cost(out: Path) -> Path:
    """TreeSSMConv(64, 64) against GCNConv(64, 64) by graph size (graph_cpu.json)."""
    plt = _plt()
    rows = _load("graph_cpu.json")["timing"]["per_size"]
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    vertices = [r["vertices"] for r in rows]
    for layer, marker in (("tree_ssm_conv", "o"), ("gcn_conv", "s")):
        name = "TreeSSMConv(64, 64)" if layer == "tree_ssm_conv" else "GCNConv(64, 64)"
        ax.plot(vertices, [r[layer]["forward_ms"] for r in rows], marker + "-",
                label=f"{name}, forward")
        ax.plot(vertices, [r[layer]["forward_backward_ms"] for r in rows], marker + "--",
                label=f"{name}, forward + backward")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("vertices (5 edges per vertex)")
    ax.set_ylabel("milliseconds (processor time, one thread)")
    ax.set_title("graph layers on the CPU (graph_cpu.json)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(fig, out / "graph_cost.png")


def topology_cost(out: Path) -> Path:
    """Build time and tree depth of every topology at 100,352 vertices."""
    plt = _plt()
    rows = _load("topologies_cpu.json")["rows"]
    names = [r["topology"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    y = np.arange(len(rows))
    axes[0].barh(y, [max(r["build_ms"], 0.01) for r in rows], color="tab:blue")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("build time, ms (CPU, 2 cores)")
    axes[1].barh(y, [r["depth"] for r in rows], color="tab:orange")
    axes[1].set_xlabel("depth of the tree (longest root path)")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(True, axis="x", alpha=0.3)
    n, c = rows[0]["num_nodes"], rows[0]["channels"]
    fig.suptitle(f"topologies over {n:,} vertices, {c} channels (topologies_cpu.json)",
                 fontsize=9)
    return _save(fig, out / "topology_cost.png")


def graph_accuracy(out: Path) -> Path:
    """Test accuracy by task and model: the synthetic tasks (graph_cpu.json, best depth
    of each model) and the real datasets (graph_real_cpu.json)."""
    plt = _plt()
    synthetic = _load("graph_cpu.json")["accuracy"]
    best = {}
    for r in synthetic:
        key = (r["task"], r["model"])
        if key not in best or r["test_accuracy_mean"] > best[key]["test_accuracy_mean"]:
            best[key] = r
    real = _load("graph_real_cpu.json")["rows"]
    panels = [("synthetic tasks (graph_cpu.json)\nbest depth of each model",
               [(t, m, r["test_accuracy_mean"], r["test_accuracy_std"])
                for (t, m), r in sorted(best.items())]),
              ("real datasets (graph_real_cpu.json, CPU budgets: its 'budgets')\n"
               "NM: Tree-NeighborsMatch, train accuracy",
               [_real_entry(r) for r in real])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
    colours = {}
    for ax, (title, entries) in zip(axes, panels):
        tasks = list(dict.fromkeys(t for t, *_ in entries))
        models = list(dict.fromkeys(m for _, m, *_ in entries))
        width = 0.8 / max(len(models), 1)
        for j, model in enumerate(models):
            xs, ys, es = [], [], []
            for i, task in enumerate(tasks):
                for t, m, mean, std in entries:
                    if t == task and m == model:
                        xs.append(i + (j - (len(models) - 1) / 2) * width)
                        ys.append(mean)
                        es.append(std)
            kind = "tree" if model.startswith("tree") else model
            colour = colours.setdefault(kind, f"C{len(colours)}")
            ax.bar(xs, ys, width, yerr=es, label=model, color=colour, capsize=2,
                   hatch="//" if "(" in model else None)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("test accuracy (minesweeper, tolokers: ROC-AUC)")
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=7, ncol=2)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out / "graph_accuracy.png")


def _real_entry(row: dict) -> tuple:
    if row["task"] == "tree_neighbors_match":  # train accuracy, as the paper reports it
        return f"NM r={row['depth']}", row["model"], row["train_accuracy"], 0.0
    return row["task"], row["model"], row["test_mean"], row["test_std"]


def build_figures(out: Path = GENERATED) -> list:
    """Every picture that needs only the repository: the photograph and the plots of the
    saved tables (what ``docs/conf.py`` draws on every build)."""
    out.mkdir(parents=True, exist_ok=True)
    return [photo_tree(out), scan_speed(out), graph_cost(out), topology_cost(out),
            graph_accuracy(out)]


# ---------------------------------------------------------------------------- Cora
def _radial_layout(parent: np.ndarray, order: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Positions of a tree's vertices: depth as radius, each subtree an angular wedge as
    wide as its share of the leaves."""
    n = parent.shape[0]
    leaves = np.zeros(n)
    for v in order[::-1]:                          # children before parents
        leaves[v] = max(leaves[v], 1.0)
        if parent[v] >= 0:
            leaves[parent[v]] += leaves[v]
    start = np.zeros(n)                           # each subtree owns [start, start + leaves)
    cursor = {}
    for v in order:                                # parents before children
        p = parent[v]
        if p >= 0:
            start[v] = cursor.get(p, start[p])
            cursor[p] = start[v] + leaves[v]
    angle = np.zeros(n)
    total = leaves[order[0]]
    for v in order:
        angle[v] = 2 * np.pi * (start[v] + leaves[v] / 2) / total
    return np.stack([depth * np.cos(angle), depth * np.sin(angle)], 1)


def cora_tree(out: Path, root: str) -> Path:
    """The minimum spanning forest of Cora under cosine distance of the papers' words
    (:class:`treessm.GraphTopology`), its largest tree drawn radially from its root,
    papers coloured by class."""
    from matplotlib.collections import LineCollection

    from treessm.datasets import load_dataset

    plt = _plt()
    data = load_dataset("Cora", root)[0]
    tree = treessm.GraphTopology()(data.x, data.edge_index)
    parent = tree.parent.numpy()
    y = data.y.numpy()
    has = parent >= 0
    same_tree = float((y[has] == y[parent[has]]).mean())
    ei = data.edge_index.numpy()
    same_graph = float((y[ei[0]] == y[ei[1]]).mean())
    # the largest tree, its vertices in breadth-first order
    sizes = np.diff(tree.tree_ptr.numpy())
    t = int(np.argmax(sizes))
    order_all = tree.order.numpy()
    members = order_all[tree.tree_ptr[t]:tree.tree_ptr[t + 1]]
    local = -np.ones(data.num_nodes, dtype=np.int64)
    local[members] = np.arange(members.size)
    lp = np.where(parent[members] >= 0, local[np.maximum(parent[members], 0)], -1)
    depth = tree.depth.numpy()[members].astype(float)
    pos = _radial_layout(lp, np.arange(members.size), depth)
    child = np.nonzero(lp >= 0)[0]
    fig, ax = plt.subplots(figsize=(8.2, 8.2))
    ax.add_collection(LineCollection(np.stack([pos[child], pos[lp[child]]], 1),
                                     colors="0.6", linewidths=0.3))
    for c, name in enumerate(CORA_CLASSES):
        pick = y[members] == c
        ax.scatter(pos[pick, 0], pos[pick, 1], s=5, color=f"C{c}", label=name, linewidths=0)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(frameon=False, markerscale=3, fontsize=8, loc="upper left",
              bbox_to_anchor=(0.0, 1.0))
    ax.set_title(f"Cora: the largest tree of its minimum spanning forest ({members.size:,} of "
                 f"{data.num_nodes:,} papers, {tree.num_trees} trees), cosine distance of the "
                 f"papers' words,\nradius = depth from the root; {100 * same_tree:.0f}% of "
                 f"tree edges join papers of one class (of the graph's edges: "
                 f"{100 * same_graph:.0f}%)", fontsize=8.5)
    return _save(fig, out / "cora_tree.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder (default: docs/_generated, docs/_static for Cora)")
    parser.add_argument("--cora-root", default=None,
                        help="a PyG root holding planetoid/Cora: draw cora_tree.png")
    args = parser.parse_args()
    if args.cora_root:
        print(cora_tree(args.out or STATIC, args.cora_root))
    else:
        for path in build_figures(args.out or GENERATED):
            print(path)


if __name__ == "__main__":
    main()
