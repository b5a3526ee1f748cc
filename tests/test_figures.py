"""The site's pictures draw from the saved tables and from real data."""
import importlib.util
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("figures", ROOT / "docs" / "figures.py")
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)


def test_cora_tree_draws_from_the_dataset(tmp_path, shared_data):
    # the committed docs/_static/cora_tree.png comes from this function
    path = figures.cora_tree(tmp_path, str(shared_data))
    assert path.stat().st_size > 50_000


def test_radial_layout_gives_each_subtree_its_share_of_the_circle():
    # root 0 with children 1 (two leaves below: 3, 4) and 2 (a leaf)
    parent = [-1, 0, 0, 1, 1]
    pos = figures._radial_layout(np.array(parent), list(range(5)), np.array([0, 1, 1, 2, 2.0]))
    radius = (pos ** 2).sum(1) ** 0.5
    assert radius.round(6).tolist() == [0, 1, 1, 2, 2]
    # subtree of 1 holds 2 of the 3 leaves: its wedge [0, 2/3) of the circle, 2 gets the rest
    angle = np.arctan2(pos[:, 1], pos[:, 0]) % (2 * math.pi)
    assert abs(angle[1] - 2 * math.pi * (1 / 3)) < 1e-9
    assert abs(angle[2] - 2 * math.pi * (2.5 / 3)) < 1e-9
