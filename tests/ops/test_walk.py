"""The walk plan of the fused CUDA selective scan (its layout is built on any device)."""
import pytest
import torch

from oracle import random_forest
from treessm import Tree
from treessm.ops.walk import ROOT, _plan, walk_plan


@pytest.mark.parametrize("n", [1, 5, 70])
@pytest.mark.parametrize("segment", [16, 32])
def test_isolated_vertices_take_the_general_plan_without_scans(n, segment):
    # a forest of isolated vertices (a generation step's new tokens) is planned directly:
    # the same records and slots as the general construction
    g = torch.Generator().manual_seed(n)
    tree = Tree.from_parent(torch.full((n,), -1, dtype=torch.long)[torch.randperm(n, generator=g)])
    fast = walk_plan(tree, segment)
    general = _plan(tree, segment)
    assert torch.equal(fast.rec, general.rec)
    assert torch.equal(fast.tree_ptr, general.tree_ptr)
    assert fast.num_slots == general.num_slots == n
    assert (fast.rec[:, 2] == ROOT).all()


def test_plan_is_cached_per_segment():
    tree = Tree.from_parent(random_forest(40, 3, torch.Generator().manual_seed(0)))
    assert walk_plan(tree, 32) is walk_plan(tree, 32)
    assert walk_plan(tree, 16) is not walk_plan(tree, 32)
