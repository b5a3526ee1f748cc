"""The grid-tree kernels' own source, compiled for the host and run with one thread per CUDA
thread, against the CPU construction (Kruskal in ``treessm.minimum_spanning_tree``,
``root_forest`` at the first pixel, ``Tree.from_parent`` and its level plan): catches
indexing, tie-breaking and synchronisation mistakes in ``extensions/treessm_cuda`` on
machines without a GPU."""
import subprocess

import numpy as np
import pytest
import torch

from emulation import compile_harness
from treessm import Tree, minimum_spanning_tree
from treessm.topology.grid import grid_edges
from treessm.ops.plan import level_plan
from treessm.topology.rooting import root_forest

FIELDS = ("parent", "order", "child_ptr", "tree_ptr", "depth", "level_pos", "tree_level_ptr",
          "parent_pos")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "grid_harness.cpp")


def num_edges(h, w, connectivity):
    e = h * (w - 1) + (h - 1) * w
    return e + 2 * (h - 1) * (w - 1) if connectivity == 8 else e


def reference(cost, b, h, w, connectivity):
    """The eight tensors of the CPU construction."""
    n = b * h * w
    ei = torch.from_numpy(grid_edges(b, h, w, connectivity))
    mask = minimum_spanning_tree(ei, cost, n)
    roots = torch.arange(b) * (h * w)
    tree = Tree.from_parent(root_forest(ei[:, mask], n, roots))
    level_pos, tree_level_ptr, parent_pos = level_plan(tree)[:3]
    return dict(parent=tree.parent, order=tree.order, child_ptr=tree.child_ptr,
                tree_ptr=tree.tree_ptr, depth=tree.depth, level_pos=level_pos,
                tree_level_ptr=tree_level_ptr, parent_pos=parent_pos)


def emulate(harness, tmp, cost, b, h, w, connectivity, threads=32, solo=64, scan_threads=32):
    wide = cost.dtype == torch.float64
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array([b, h, w, connectivity, int(wide), threads, solo, scan_threads],
                 np.int64).tofile(f)
        cost.numpy().astype(np.float64 if wide else np.float32).tofile(f)
    r = subprocess.run([str(harness), str(src), str(dst)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    out = np.fromfile(dst, np.int64)
    n = b * h * w
    sizes = [n, n, n + 1, b + 1, n, n + 1, b + 1, n]
    assert out.size == sum(sizes)
    return dict(zip(FIELDS, np.split(out, np.cumsum(sizes)[:-1])))


def check(harness, tmp, cost, b, h, w, connectivity, **launch):
    got = emulate(harness, tmp, cost, b, h, w, connectivity, **launch)
    ref = reference(cost, b, h, w, connectivity)
    for name in FIELDS:
        np.testing.assert_array_equal(got[name], ref[name].numpy(),
                                      err_msg=f"{name} ({b}x{h}x{w}, {connectivity}, {launch})")


def random_costs(gen, b, h, w, connectivity, ties, dtype=torch.float32):
    e = b * num_edges(h, w, connectivity)
    if ties:  # a few integer values, negative zero among them: many equal keys
        cost = torch.tensor([-1.0, -0.0, 0.0, 2.0])[torch.randint(0, 4, (e,), generator=gen)]
    else:
        cost = torch.randn(e, generator=gen, dtype=torch.float64)
    return cost.to(dtype)


def test_by_hand(harness, tmp_path):
    # 2 x 3, 4-neighbour: horizontal edges 0..3, vertical 4..6; the root is pixel (0, 0) = 0.
    # Equal costs: Kruskal takes 0, 1, 2, 3 (two rows) and then vertical 4 (column 0).
    cost = torch.ones(7)
    got = emulate(harness, tmp_path, cost, 1, 2, 3, 4)
    assert got["parent"].tolist() == [-1, 0, 1, 0, 3, 4]
    assert got["order"].tolist() == [0, 1, 3, 2, 4, 5]
    assert got["depth"].tolist() == [0, 1, 2, 1, 2, 3]
    assert got["child_ptr"].tolist() == [1, 3, 4, 5, 5, 6, 6]
    assert got["level_pos"].tolist()[:5] == [0, 1, 3, 5, 6]
    assert got["tree_level_ptr"].tolist() == [0, 4]
    assert got["parent_pos"].tolist() == [-1, 0, 0, 1, 2, 4]
    # a cheaper vertical edge 6 ((0,2)-(1,2)) replaces the last horizontal edge of the
    # bottom row: 5 hangs from 2, not from 4
    cost = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    check(harness, tmp_path, cost, 1, 2, 3, 4)


SHAPES = [(1, 1, 1), (3, 1, 1), (2, 1, 6), (2, 5, 1), (2, 2, 2), (3, 7, 5), (2, 8, 8),
          (1, 4, 9), (1, 9, 4), (1, 2, 1), (1, 1, 2), (2, 16, 13)]


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_cpu_construction(harness, tmp_path, connectivity, ties):
    gen = torch.Generator().manual_seed(5 + connectivity + int(ties))
    for b, h, w in SHAPES:
        cost = random_costs(gen, b, h, w, connectivity, ties)
        check(harness, tmp_path, cost, b, h, w, connectivity)
        # every level on the whole block, two warps
        check(harness, tmp_path, cost, b, h, w, connectivity, threads=64, solo=0)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_float64_costs(harness, tmp_path, connectivity):
    # distinct doubles that round to one float32: only a 64-bit key orders them right
    gen = torch.Generator().manual_seed(17)
    b, h, w = 2, 6, 7
    e = b * num_edges(h, w, connectivity)
    cost = 1.0 + torch.randint(0, 3, (e,), generator=gen).double() * 1e-12
    check(harness, tmp_path, cost, b, h, w, connectivity)
    check(harness, tmp_path, random_costs(gen, b, h, w, connectivity, True, torch.float64),
          b, h, w, connectivity)


def test_wide_levels_and_launch_shapes(harness, tmp_path):
    """Levels wider than the block (chunked scans) and than the solo width, levels on warp 0
    alone, several warps, and a level scan over more images than its block."""
    gen = torch.Generator().manual_seed(23)
    # the first row and every column: level k is the anti-diagonal i + j = k, up to 70 wide
    b, h, w = 2, 72, 70
    horizontal = torch.ones(h, w - 1)
    horizontal[0] = 0.0
    comb = torch.cat([horizontal.reshape(-1), torch.full(((h - 1) * w,), 0.5)]).repeat(b)
    widths = np.diff(reference(comb, b, h, w, 4)["level_pos"].numpy())
    assert widths.max() > 64
    for threads, solo in [(32, 0), (64, 0), (32, 40), (96, 1024)]:
        check(harness, tmp_path, comb, b, h, w, 4, threads=threads, solo=solo)
    cost = random_costs(gen, b, h, w, 8, False)
    check(harness, tmp_path, cost, b, h, w, 8, threads=64, solo=16)
    cost = random_costs(gen, 70, 1, 2, 4, False)
    check(harness, tmp_path, cost, 70, 1, 2, 4, scan_threads=32)
