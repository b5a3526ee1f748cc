"""The step counts of benchmarks/scan_depth.py on trees whose schedules are known by hand."""
import importlib.util
from pathlib import Path

import torch

import treessm

_spec = importlib.util.spec_from_file_location(
    "scan_depth", Path(__file__).resolve().parents[1] / "benchmarks" / "scan_depth.py")
scan_depth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scan_depth)


def schedule(parent):
    return scan_depth.path_schedule(treessm.Tree.from_parent(torch.tensor(parent)))


def test_chain_is_one_path():
    assert schedule([-1, 0, 1, 2, 3]) == dict(levels=5, phases=1, sequential_steps=5)


def test_star_walks_its_heavy_leaf_then_the_others_at_once():
    # root 0, leaves 1..4: path 0-1 (ties go to the smallest vertex), then three paths of one
    assert schedule([-1, 0, 0, 0, 0]) == dict(levels=2, phases=2, sequential_steps=3)


def test_heavy_child_is_the_larger_subtree_and_forests_take_the_worst_tree():
    # tree A: 0 -> 1 -> 2 -> 3 and 0 -> 4: heavy path 0,1,2,3 (4 steps), then {4} (1 step)
    # tree B: 5 -> 6: one path of 2
    got = schedule([-1, 0, 1, 2, 0, -1, 5])
    assert got == dict(levels=4, phases=2, sequential_steps=5)
