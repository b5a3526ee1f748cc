"""The fused CUDA grid-tree construction (``torch.ops.treessm.cuda_grid_tree`` and
:func:`treessm.topology.cuda_grid.grid_spanning_tree`) against the CPU construction: Kruskal
in ``treessm.minimum_spanning_tree``, ``root_forest`` at the first pixel,
``Tree.from_parent`` and its level plan. Needs a CUDA GPU and the extension."""
import pytest
import torch

import treessm
from treessm import Tree, minimum_spanning_tree
from treessm.ops.plan import level_plan
from treessm.topology import cuda_grid
from treessm.topology.grid import grid_edges
from treessm.topology.rooting import root_forest

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: torch.cuda.is_available() is False")]

TREE_FIELDS = ("parent", "order", "child_ptr", "tree_ptr", "depth")
PLAN_FIELDS = ("level_pos", "tree_level_ptr", "parent_pos")


@pytest.fixture(scope="module")
def ops(cuda_ops):
    return cuda_ops


def reference(cost, b, h, w, connectivity):
    n = b * h * w
    ei = torch.from_numpy(grid_edges(b, h, w, connectivity))
    mask = minimum_spanning_tree(ei, cost.cpu(), n)
    roots = torch.arange(b) * (h * w)
    tree = Tree.from_parent(root_forest(ei[:, mask], n, roots))
    plan = level_plan(tree)[:3]
    return dict(zip(TREE_FIELDS + PLAN_FIELDS, [getattr(tree, f) for f in TREE_FIELDS] + list(plan)))


def random_costs(gen, b, h, w, connectivity, ties, dtype=torch.float32):
    e = b * cuda_grid.num_candidate_edges(h, w, connectivity)
    if ties:
        cost = torch.tensor([-1.0, -0.0, 0.0, 2.0])[torch.randint(0, 4, (e,), generator=gen)]
    else:
        cost = torch.rand(e, generator=gen, dtype=torch.float64)
    return cost.to(dtype)


def assert_matches(got, cost, b, h, w, connectivity):
    ref = reference(cost, b, h, w, connectivity)
    for name, tensor in zip(TREE_FIELDS + PLAN_FIELDS, got):
        assert tensor.is_cuda and tensor.dtype == torch.long, name
        assert torch.equal(tensor.cpu(), ref[name]), f"{name} differs ({b}x{h}x{w}, {connectivity})"


SHAPES = [(1, 1, 1), (2, 1, 7), (2, 6, 1), (3, 2, 2), (2, 7, 5), (4, 8, 8), (2, 33, 17),
          (32, 56, 56), (2, 64, 64)]


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_op_matches_cpu_construction(ops, connectivity, ties):
    gen = torch.Generator().manual_seed(2 * connectivity + int(ties))
    for b, h, w in SHAPES:
        cost = random_costs(gen, b, h, w, connectivity, ties)
        got = ops.cuda_grid_tree(cost.cuda(), b, h, w, connectivity, 0, 64)
        assert_matches(got, cost, b, h, w, connectivity)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_op_other_cost_dtypes(ops, dtype):
    gen = torch.Generator().manual_seed(9)
    for connectivity in (4, 8):
        for ties in (False, True):
            b, h, w = 4, 23, 19
            cost = random_costs(gen, b, h, w, connectivity, ties, dtype)
            got = ops.cuda_grid_tree(cost.cuda(), b, h, w, connectivity, 0, 64)
            assert_matches(got, cost, b, h, w, connectivity)
    # distinct doubles that round to one float32
    b, h, w = 2, 9, 9
    e = b * cuda_grid.num_candidate_edges(h, w, 4)
    cost = 1.0 + torch.randint(0, 3, (e,), generator=gen).double() * 1e-12
    if dtype == torch.float64:
        assert_matches(ops.cuda_grid_tree(cost.cuda(), b, h, w, 4, 0, 64), cost, b, h, w, 4)


def test_op_launch_settings(ops):
    """Every block size and solo width gives the same tree."""
    gen = torch.Generator().manual_seed(4)
    b, h, w = 3, 40, 37
    cost = random_costs(gen, b, h, w, 8, False)
    for threads, solo in [(32, 0), (64, 1024), (1024, 32), (96, 64)]:
        assert_matches(ops.cuda_grid_tree(cost.cuda(), b, h, w, 8, threads, solo), cost, b, h,
                       w, 8)


_ARGUMENT_CHECKS = """
import torch, treessm
from treessm.topology import cuda_grid
from treessm.typing import load_cuda_extension
load_cuda_extension()
ops = torch.ops.treessm


def raises(match, fn, *args):
    try:
        fn(*args)
    except RuntimeError as exc:
        assert match in str(exc), str(exc)
        return
    raise AssertionError(f"no error for {match}")


cost = torch.rand(2 * 12, device="cuda")  # two 3 x 3 images
ops.cuda_grid_tree(cost, 2, 3, 3, 4, 0, 64)
raises("cost must hold", ops.cuda_grid_tree, cost, 3, 3, 3, 4, 0, 64)
raises("connectivity", ops.cuda_grid_tree, cost, 2, 3, 3, 6, 0, 64)
raises("float32", ops.cuda_grid_tree, cost.int(), 2, 3, 3, 4, 0, 64)
raises("threads", ops.cuda_grid_tree, cost, 2, 3, 3, 4, 33, 64)
raises("shared memory", ops.cuda_grid_tree,
       torch.rand(cuda_grid.num_candidate_edges(400, 400), device="cuda"), 1, 400, 400, 4, 0, 64)
empty = ops.cuda_grid_tree(torch.zeros(0, device="cuda"), 0, 3, 3, 4, 0, 64)
assert [t.tolist() for t in empty] == [[], [], [0], [0], [], [0], [0], []]
print("ok")
"""


def test_op_checks_arguments(ops):
    # in a child process: a failure in the extension's error path must fail this test,
    # not take the test session down with it
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _ARGUMENT_CHECKS], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-3000:])


def test_grid_tree_wrapper_and_scan(ops):
    gen = torch.Generator().manual_seed(12)
    b, h, w = 3, 14, 15
    cost = random_costs(gen, b, h, w, 4, False)
    batch = torch.arange(b, device="cuda").repeat_interleave(h * w)
    tree = cuda_grid.grid_spanning_tree(cost.cuda(), b, h, w, 4, batch=batch)
    ref = reference(cost, b, h, w, 4)
    for name in TREE_FIELDS:
        assert torch.equal(getattr(tree, name).cpu(), ref[name]), name
    assert tree.num_nodes == b * h * w and tree.num_trees == b and tree.batch is batch
    for got, name in zip(level_plan(tree), PLAN_FIELDS):
        assert torch.equal(got.cpu(), ref[name]), name
    x = torch.randn(b * h * w, 5, device="cuda")
    wt = torch.rand(b * h * w, 5, device="cuda")
    cpu_tree = Tree.from_parent(ref["parent"])
    expected = treessm.tree_scan(x.cpu(), wt.cpu(), cpu_tree, "both")
    torch.testing.assert_close(treessm.tree_scan(x, wt, tree, "both").cpu(), expected)


def test_grid_tree_wrapper_declines(ops):
    assert cuda_grid.grid_spanning_tree(torch.rand(17), 1, 3, 4) is None  # CPU costs
    big = cuda_grid.num_candidate_edges(300, 300, 8)
    assert not cuda_grid.fits(300, 300, 8, "cuda")
    assert cuda_grid.grid_spanning_tree(torch.rand(big, device="cuda"), 1, 300, 300, 8) is None
    assert cuda_grid.fits(64, 64, 8, "cuda")
    with pytest.raises(ValueError, match="cost must have shape"):
        cuda_grid.grid_spanning_tree(torch.rand(5, device="cuda"), 1, 3, 4)
    with pytest.raises(ValueError, match="connectivity"):
        cuda_grid.grid_spanning_tree(torch.rand(17, device="cuda"), 1, 3, 4, 6)
    with pytest.raises(TypeError, match="float32"):
        cuda_grid.grid_spanning_tree(torch.ones(17, dtype=torch.long, device="cuda"), 1, 3, 4)


def test_grid_tree_does_not_synchronise(ops):
    gen = torch.Generator().manual_seed(1)
    cost = random_costs(gen, 32, 56, 56, 4, False).cuda()
    cuda_grid.grid_spanning_tree(cost, 32, 56, 56, 4)  # warm up: load, device properties
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tree = cuda_grid.grid_spanning_tree(cost, 32, 56, 56, 4)
        level_plan(tree)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches([getattr(tree, f) for f in TREE_FIELDS] + list(level_plan(tree)[:3]), cost,
                   32, 56, 56, 4)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_images_too_large_for_one_block(ops, connectivity):
    # GridTopology on images beyond the fused kernel: the tensor path with the grid's own
    # sizes (one tree of H * W pixels per image) builds the CPU's tree without waiting for
    # the device
    b, h, w = 2, 240, 250
    assert not cuda_grid.fits(h, w, connectivity, "cuda")
    topo = treessm.GridTopology(connectivity=connectivity)
    feat = torch.randn(b, h, w, 3, generator=torch.Generator().manual_seed(connectivity)).cuda()
    topo(feat)  # warm up: candidates, extension, device properties
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tree = topo(feat)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    edge_index, _, _ = topo.candidate_edges(feat)
    want = reference(topo.edge_cost(feat, edge_index), b, h, w, connectivity)
    for name in TREE_FIELDS:
        assert torch.equal(getattr(tree, name).cpu(), want[name]), name
    assert tree.num_trees == b and tree.max_tree_size == h * w
