"""The tree-filter example runs and filters like an edge-preserving smoother."""
import json

import numpy as np
from scipy import ndimage

from treessm.examples.tree_filter import main, tree_filter


def test_main_writes_figure_and_preserves_edges(tmp_path, capsys):
    result = main(["--out", str(tmp_path), "--size", "40"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    png = tmp_path / "tree_filter.png"
    assert line["out"] == str(png) and png.stat().st_size > 10_000
    assert line["num_nodes"] == 40 * 40 and line["tree_depth"] > 0

    image, filtered = result["image"], result["filtered"]
    assert filtered.shape == image.shape
    # a normalised weighted average stays inside the range of the input, per channel
    assert (filtered >= image.min((0, 1)) - 1e-5).all()
    assert (filtered <= image.max((0, 1)) + 1e-5).all()
    # it smooths (less total variation) ...
    tv = lambda a: np.abs(np.diff(a, axis=0)).sum() + np.abs(np.diff(a, axis=1)).sum()  # noqa
    assert tv(filtered) < 0.95 * tv(image)
    # ... but, unlike a box blur, not across the strongest colour edges
    grad = np.linalg.norm(np.stack(np.gradient(image, axis=(0, 1))), axis=(0, -1))
    edges = grad >= np.quantile(grad, 0.9)
    box = ndimage.uniform_filter(image, size=(5, 5, 1), mode="nearest")
    assert np.abs(filtered - image)[edges].mean() < 0.5 * np.abs(box - image)[edges].mean()


def test_two_flat_regions_do_not_mix():
    image = np.zeros((6, 8, 3), np.float32)
    image[:, 4:] = [1.0, 0.5, 0.0]
    noisy = image + np.random.default_rng(0).normal(0, 0.01, image.shape).astype(np.float32)
    filtered, tree, _ = tree_filter(noisy, sigma=0.05)
    assert tree.num_trees == 1
    # each side is averaged towards its own colour; the step survives
    assert np.abs(filtered - image).max() < 0.05
    assert np.abs(filtered - image).mean() < np.abs(noisy - image).mean()
