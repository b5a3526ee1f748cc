"""The walk plan of the fused CUDA selective scan (its layout is built on any device)."""
import pytest
import torch

from oracle import chain, random_forest, star
from treessm import Tree
from treessm.ops.walk import ROOT, _plan, slot_bound, walk_plan
from treessm.topology import chain_tree


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


def test_plan_says_whether_the_forest_is_chains():
    # read on the host with the slot count: chains (and isolated vertices) take the chain
    # kernel; one vertex of two children, or a slot count that is only a bound, does not
    g = torch.Generator().manual_seed(3)
    assert walk_plan(chain_tree(3, 50), 32).chains
    assert walk_plan(Tree.from_parent(chain(70, g)), 16).chains
    assert walk_plan(Tree.from_parent(torch.full((4,), -1)), 32).chains
    assert not walk_plan(Tree.from_parent(star(5)), 32).chains
    fork = torch.cat([chain(30, g), torch.tensor([0])])  # vertex 0 gains a second child
    assert not walk_plan(Tree.from_parent(fork), 32).chains
    assert not _plan(chain_tree(3, 50), 32, bounded=True).chains


def test_plan_is_cached_per_segment():
    tree = Tree.from_parent(random_forest(40, 3, torch.Generator().manual_seed(0)))
    assert walk_plan(tree, 32) is walk_plan(tree, 32)
    assert walk_plan(tree, 16) is not walk_plan(tree, 32)


@pytest.mark.parametrize("segment", [1, 16, 32])
@pytest.mark.parametrize("roots", [1, 5, 40])
def test_bounded_slot_count_covers_the_walk(segment, roots):
    # a recorded plan (built on the device, nothing read back) takes slot_bound slots: at
    # least the walk's own count, and every record equal to the exact plan's
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        tree = Tree.from_parent(random_forest(300, roots, g, locality=1 + 5 * seed))
        exact = _plan(tree, segment)
        bounded = _plan(tree, segment, bounded=True)
        largest = int(tree.tree_ptr.diff().max())
        assert bounded.num_slots == slot_bound(300, tree.num_trees, largest, segment)
        assert exact.num_slots <= bounded.num_slots
        assert torch.equal(exact.rec, bounded.rec) and torch.equal(exact.tree_ptr,
                                                                    bounded.tree_ptr)
        # the deepest stack at a segment start stays within the bound's log2 term
        depth = exact.rec[:, 2] >> 4
        assert int(depth.max()) < largest.bit_length()
    assert slot_bound(0, 0, 0, 32) == 0
    assert slot_bound(1, 1, 1, 32) == 1


def test_no_recording_for_trees_with_a_host_level_count_or_on_the_cpu():
    from treessm.ops import walk
    walk._RECORDINGS.clear()
    tree = Tree.from_parent(random_forest(100, 2, torch.Generator().manual_seed(9)))
    device_built = Tree(tree.parent, tree.order, tree.child_ptr, tree.tree_ptr, tree.depth,
                        max_tree_size=100)
    assert walk._replayed(tree, 32) is None and walk._replayed(device_built, 32) is None
    assert len(walk._RECORDINGS) == 0
    assert walk_plan(device_built, 32).num_slots == _plan(tree, 32).num_slots  # exact


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: torch.cuda.is_available() is False")


@needs_cuda
@pytest.mark.cuda
def test_recorded_plans_on_cuda_equal_the_walk_and_scan_alike():
    # forests of one set of sizes built "on the device" (no level count): one recording,
    # replayed; records equal the exact plan's, slots the bound; the fused scan over them
    # (its backward's checkpoints in the bounded buffer) equals the CPU kernels'
    from treessm import selective_tree_scan
    from treessm.ops import walk
    walk._RECORDINGS.clear()
    handed = []
    for seed in range(3):
        host = Tree.from_parent(random_forest(2000, 3, torch.Generator().manual_seed(seed)))
        tree = Tree(*(a.cuda() for a in (host.parent, host.order, host.child_ptr,
                                         host.tree_ptr, host.depth)), max_tree_size=2000)
        plan = walk_plan(tree, 32)
        exact = _plan(host, 32)
        assert torch.equal(plan.rec.cpu(), exact.rec)
        assert plan.num_slots == slot_bound(2000, 3, 2000, 32) >= exact.num_slots
        handed.append((plan, exact))
        g = torch.Generator().manual_seed(10 + seed)
        u, delta = torch.randn(2000, 6, generator=g), torch.randn(2000, 6, generator=g)
        A = -torch.rand(6, 4, generator=g)
        B, C = torch.randn(2000, 4, generator=g), torch.randn(2000, 4, generator=g)
        for direction in ("down", "up"):
            outs = []
            for dev, t in (("cpu", host), ("cuda", tree)):
                leaves = [a.to(dev).requires_grad_() for a in (u, delta, A, B, C)]
                y = selective_tree_scan(*leaves, t, delta_softplus=True, direction=direction)
                grads = torch.autograd.grad((y * y).sum(), leaves)
                outs.append([y.detach().cpu()] + [x.cpu() for x in grads])
            for a, b in zip(*outs):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert len(walk._RECORDINGS) == 1
    assert all(torch.equal(plan.rec.cpu(), exact.rec) for plan, exact in handed)
