r"""Edge-preserving smoothing with a minimum spanning tree (a tree filter).

The pixels of a photo are joined by the minimum spanning tree of their colour
differences (:class:`treessm.GridTopology`). Every pixel is then replaced by a weighted
average of *all* pixels, the weight of ``u`` seen from ``v`` being the product of the
edge weights on the tree path between them,

.. math::
    y_v = \frac{\sum_u S(u, v)\, x_u}{\sum_u S(u, v)}, \qquad
    S(u, v) = \prod_{e \in \mathrm{path}(u, v)} \exp(-d_e / \sigma),

which is exactly ``tree_scan(x, w, tree, "both")`` normalised by the same scan of ones.
A colour edge in the image is crossed by few tree paths, each through an expensive edge,
so little mixes across it, while flat regions are averaged widely.

    python -m treessm.examples.tree_filter --out tree_filter_out --size 256

writes ``tree_filter.png`` (photo, its tree, the filtered photo) and prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import treessm

__all__ = ["load_photo", "tree_filter", "main"]


def load_photo(size: int) -> np.ndarray:
    """scikit-image's astronaut photo (bundled, no download) as float RGB in [0, 1],
    ``size`` x ``size`` (area-averaged down from 512 x 512)."""
    from skimage import data
    from skimage.transform import resize

    photo = data.astronaut().astype(np.float32) / 255.0
    if size != photo.shape[0]:
        photo = resize(photo, (size, size), anti_aliasing=True).astype(np.float32)
    return photo


def tree_filter(image: np.ndarray, sigma: float = 0.08, connectivity: int = 4):
    """Tree-filter an ``[H, W, 3]`` float image.

    Returns ``(filtered [H, W, 3], tree, edge_weight [H * W])`` where ``edge_weight[v]`` is
    the weight of the edge from pixel ``v`` to its parent.
    """
    h, w, c = image.shape
    x = torch.from_numpy(np.ascontiguousarray(image)).reshape(1, h, w, c)
    # Euclidean RGB distance, not cosine: cosine ignores brightness, so a dark and a light
    # patch of the same hue would look identical and their border would be smoothed away.
    tree = treessm.GridTopology(connectivity=connectivity, distance="l2")(x)
    flat = x.reshape(h * w, c)
    has_parent = tree.parent >= 0
    dist = torch.zeros(h * w)
    dist[has_parent] = torch.linalg.vector_norm(
        flat[has_parent] - flat[tree.parent[has_parent]], dim=-1)
    weight = torch.exp(-dist / sigma)
    weights = weight[:, None].expand(h * w, c).contiguous()  # one weight for all channels
    num = treessm.tree_scan(flat, weights, tree, direction="both")
    den = treessm.tree_scan(torch.ones_like(flat), weights, tree, direction="both")
    return (num / den).reshape(h, w, c).numpy(), tree, weight.numpy()


def _figure(image, tree, filtered, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    h, w, _ = image.shape
    child = torch.nonzero(tree.parent >= 0).view(-1).numpy()
    par = tree.parent.numpy()[child]
    segments = np.stack([np.stack([child % w, child // w], 1),
                         np.stack([par % w, par // w], 1)], 1).astype(np.float32)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    axes[0].imshow(image)
    axes[0].set_title("photo")
    axes[1].imshow(image, alpha=0.35)
    axes[1].add_collection(LineCollection(segments, colors="k", linewidths=0.35))
    axes[1].plot([w // 2], [h // 2], "r.", markersize=8)
    axes[1].set_title(f"minimum spanning tree ({tree.num_nodes} pixels, depth {tree.max_depth})")
    axes[2].imshow(np.clip(filtered, 0, 1))
    axes[2].set_title("tree filter (direction 'both', normalised)")
    for ax in axes:
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description="Tree filter of scikit-image's astronaut photo.")
    parser.add_argument("--out", default="tree_filter_out", help="output folder")
    parser.add_argument("--size", type=int, default=256, help="side of the (square) image")
    parser.add_argument("--sigma", type=float, default=0.08,
                        help="edge weight exp(-colour distance / sigma)")
    parser.add_argument("--connectivity", type=int, default=4, choices=(4, 8))
    args = parser.parse_args(argv)
    if args.size < 2:
        parser.error(f"--size must be at least 2, got {args.size}")

    start = time.perf_counter()
    image = load_photo(args.size)
    t0 = time.perf_counter()
    filtered, tree, _ = tree_filter(image, args.sigma, args.connectivity)
    filter_s = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tree_filter.png"
    _figure(image, tree, filtered, path)
    result = {"out": str(path), "num_nodes": tree.num_nodes, "tree_depth": tree.max_depth,
              "build_and_filter_ms": round(1e3 * filter_s, 1),
              "total_s": round(time.perf_counter() - start, 2)}
    print(json.dumps(result))
    return dict(result, image=image, filtered=filtered)


if __name__ == "__main__":
    main()
