"""How many block-wide steps a tree scan takes, level by level and by heavy paths.

The CUDA scan walks a tree's breadth-first levels with one block-wide barrier per level,
and each level costs about the same time whatever its width (docs/cuda.md), so the number
of levels sets the scan's time. This script counts, on the grid trees a GrootV layer
builds, what an alternative schedule would need: heavy-path decomposition (each vertex
continues the path of the child with the largest subtree; a group of lanes walks one path
in sequence; the block synchronises only between path depths). For that schedule it
reports the number of phases (path depths) and the sequential steps, the sum over phases
of the longest path in the phase. Runs on the CPU.

    python benchmarks/scan_depth.py            # prints a table, saves results/scan_depth.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import treessm

RESULTS = Path(__file__).resolve().parent / "results"


def path_schedule(tree: treessm.Tree) -> dict:
    """Levels per tree and the heavy-path schedule's phases and sequential steps (maxima
    over the trees of the forest)."""
    parent = tree.parent.numpy()
    order = tree.order.numpy()  # breadth-first, roots first
    n = parent.size
    depth = np.zeros(n, np.int64)
    for v in order:  # parents come before children
        p = parent[v]
        if p >= 0:
            depth[v] = depth[p] + 1
    size = np.ones(n, np.int64)
    for v in order[::-1]:  # children before parents
        p = parent[v]
        if p >= 0:
            size[p] += size[v]
    # heavy child: largest subtree, ties to the smallest vertex id
    heavy = np.full(n, -1, np.int64)
    best = np.zeros(n, np.int64)
    for v in range(n - 1, -1, -1):
        p = parent[v]
        if p >= 0 and size[v] >= best[p]:
            best[p] = size[v]
            heavy[p] = v
    head = np.arange(n)
    phase = np.zeros(n, np.int64)  # light edges from the root
    for v in order:
        p = parent[v]
        if p >= 0:
            if heavy[p] == v:
                head[v] = head[p]
                phase[v] = phase[p]
            else:
                phase[v] = phase[p] + 1
    path_len = np.bincount(head, minlength=n)
    root = np.empty(n, np.int64)
    for v in order:
        root[v] = v if parent[v] < 0 else root[parent[v]]
    out = dict(levels=0, phases=0, sequential_steps=0)
    for r in np.unique(root):
        in_tree = root == r
        heads = np.flatnonzero(in_tree & (head == np.arange(n)))
        steps = 0
        for ph in np.unique(phase[heads]):
            steps += int(path_len[heads[phase[heads] == ph]].max())
        out["levels"] = max(out["levels"], int(depth[in_tree].max()) + 1)
        out["phases"] = max(out["phases"], int(phase[in_tree].max()) + 1)
        out["sequential_steps"] = max(out["sequential_steps"], steps)
    return out


def image_features(size: int) -> torch.Tensor:
    """Real photographs (scikit-image's astronaut, coffee, camera), resized to size x size,
    as [3, size, size, 3] RGB features; None when scikit-image is missing."""
    try:
        from skimage import data, transform
    except ImportError:
        return None
    imgs = []
    for name in ("astronaut", "coffee", "camera"):
        im = getattr(data, name)().astype(np.float32) / 255.0
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        imgs.append(transform.resize(im, (size, size), anti_aliasing=True))
    return torch.from_numpy(np.stack(imgs)).float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "scan_depth.json"))
    args = parser.parse_args(argv)
    topo = treessm.GridTopology(connectivity=4, distance="cosine")
    g = torch.Generator().manual_seed(0)
    cases = []
    for size, channels, batch in ((56, 160, 4), (28, 320, 4), (14, 640, 4), (7, 1280, 4),
                                  (224, 16, 2)):
        cases.append((f"random {size}x{size}x{channels}",
                      torch.randn(batch, size, size, channels, generator=g)))
    for size in (56, 224):
        feat = image_features(size)
        if feat is not None:
            cases.append((f"photos {size}x{size}x3", feat))
    rows = []
    for name, feat in cases:
        t0 = time.perf_counter()
        tree = topo(feat)
        n = feat[0, ..., 0].numel()
        parents = tree.parent.reshape(feat.shape[0], n)
        local = torch.where(parents >= 0, parents - torch.arange(feat.shape[0])[:, None] * n,
                            parents)
        per_image = [path_schedule(treessm.Tree.from_parent(p)) for p in local]
        row = dict(case=name, vertices=int(feat[0, ..., 0].numel()),
                   levels=max(r["levels"] for r in per_image),
                   phases=max(r["phases"] for r in per_image),
                   sequential_steps=max(r["sequential_steps"] for r in per_image),
                   seconds=time.perf_counter() - t0)
        rows.append(row)
    result = dict(rows=rows, when=time.strftime("%Y-%m-%d %H:%M:%S"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'case':<26} {'vertices':>8} {'levels':>7} {'phases':>7} {'seq. steps':>10}")
    for r in rows:
        print(f"{r['case']:<26} {r['vertices']:>8} {r['levels']:>7} {r['phases']:>7} "
              f"{r['sequential_steps']:>10}")
    print("levels: block-wide barriers per pass of the level schedule; phases: barriers of the "
          "heavy-path schedule; seq. steps: its one-vertex steps in sequence (max over images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
