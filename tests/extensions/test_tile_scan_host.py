"""The tiled tree-scan kernels (tile_kernels.cuh), compiled for the host and run with one
thread per CUDA thread through their three phases, against the dense oracle (small forests)
and the float64 tree scan (larger ones), with poisoned shared memory and scratch; the same
bits for every block width and channel slicing."""
import functools
import subprocess

import numpy as np
import pytest
import torch

from emulation import compile_harness
from oracle import all_roots, chain, dense_tree_scan, empty, random_forest, single_vertex, star
from treessm import GraphTopology, GridTopology, Tree, tree_scan
from treessm.ops.tiles import tile_plan

C = 3  # channels: one partial group of 32 lanes


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "tile_harness.cpp")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


FORESTS = {
    "single_vertex": single_vertex,
    "empty": empty,
    "many_roots": lambda: all_roots(11),
    "random": lambda: random_forest(100, 1, _gen(0)),
    "random_many_roots": lambda: random_forest(100, 13, _gen(1)),
    "deep": lambda: random_forest(100, 2, _gen(2), locality=3),
    "star": lambda: star(90, center=13),
    "grid_trees": lambda: GridTopology()(torch.randn(2, 7, 6, 4, generator=_gen(3))).parent,
    "graph_forest": lambda: GraphTopology()(
        torch.randn(120, 5, generator=_gen(5)),
        torch.randint(0, 120, (2, 170), generator=_gen(4))).parent,
}


@functools.lru_cache(maxsize=None)
def _tree(name):
    if name == "chain_5000":
        return Tree.from_parent(chain(5000, _gen(6)))
    if name == "random_3000":
        return Tree.from_parent(random_forest(3000, 4, _gen(7)))
    return Tree.from_parent(FORESTS[name]())


def _inputs(n, weights, seed=10, c=C):
    g = _gen(seed)
    x = torch.randn(n, c, dtype=torch.float64, generator=g)
    if weights == "unit_interval":
        w = torch.rand(n, c, dtype=torch.float64, generator=g)
    elif weights == "zeros":
        w = torch.rand(n, c, dtype=torch.float64, generator=g)
        w[torch.rand(n, c, generator=g) < 0.3] = 0.0
    else:  # above 1 in magnitude, both signs, some zeros
        w = (torch.rand(n, c, dtype=torch.float64, generator=g) * 2 - 1) * 1.6
        w[torch.rand(n, c, generator=g) < 0.1] = 0.0
    return x, w


DIRECTIONS = ("down", "up", "both")


def _forward(out):
    """h of down, up and both from the outputs of :func:`_run`."""
    return out[0], out[1], out[6]


def _run(harness, tmp_path, tree, tile, x, w, threads=32, groups_per_block=1, g=None,
         backward=True, options=""):
    """h of down and up, (grad_x, grad_w) of down and of up at ``g``, then h of both and
    its (grad_x, grad_w) at ``g`` (the gradients left out without ``backward``). Options of
    the harness: ``g`` the tile tree's sums in global memory, ``s`` float data with double
    accumulators."""
    plan = tile_plan(tree, tile)
    g = torch.ones_like(x) if g is None else g
    n, c = x.shape
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        np.array([n, c, plan.num_tiles, plan.num_levels, tile, tree.num_trees],
                 np.int64).tofile(f)
        x.numpy().astype(np.float64).tofile(f)
        w.numpy().astype(np.float64).tofile(f)
        g.numpy().astype(np.float64).tofile(f)
        for t in plan[3:]:
            t.numpy().astype(np.int32).tofile(f)
    args = [str(harness), str(src), str(dst), str(threads), str(groups_per_block),
            options + ("" if backward else "f")]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    out = np.fromfile(dst, np.float64)
    assert out.size == 9 * n * c
    return tuple(torch.from_numpy(a.copy()) for a in out.reshape(9, n, c))


@pytest.mark.parametrize("tile", [1, 7, 64, 2048])
@pytest.mark.parametrize("name", list(FORESTS))
def test_tiled_scan_matches_the_dense_oracle(harness, tmp_path, name, tile):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, "above_one")
    h = _run(harness, tmp_path, tree, tile, x, w, backward=False)
    for got, direction in zip(_forward(h), DIRECTIONS):
        want = dense_tree_scan(x, w, tree.parent, direction)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=direction)


def _reference_backward(tree, x, w, g, direction, dense):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    h = (dense_tree_scan(x, w, tree.parent, direction) if dense
         else tree_scan(x, w, tree, direction))
    return torch.autograd.grad(h, (x, w), g)


@pytest.mark.parametrize("name,tile", [("random_many_roots", 1), ("deep", 7), ("star", 7),
                                       ("graph_forest", 64), ("random", 2048),
                                       ("chain_5000", 64)])
def test_backward_building_blocks_match_autograd(harness, tmp_path, name, tile):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, "unit_interval", seed=14)
    g = torch.randn(x.shape, dtype=torch.float64, generator=_gen(15))
    out = _run(harness, tmp_path, tree, tile, x, w, g=g, threads=64)
    for direction, (gx, gw) in (("down", out[2:4]), ("up", out[4:6]), ("both", out[7:9])):
        want_x, want_w = _reference_backward(tree, x, w, g, direction, name != "chain_5000")
        torch.testing.assert_close(gx, want_x, rtol=1e-10, atol=1e-10, msg=direction)
        torch.testing.assert_close(gw, want_w, rtol=1e-10, atol=1e-10, msg=direction)


@pytest.mark.parametrize("weights", ["unit_interval", "zeros", "above_one"])
@pytest.mark.parametrize("name,tile", [("chain_5000", 64), ("random", 2048),
                                       ("random_many_roots", 7), ("star", 1)])
def test_tiled_scan_weights(harness, tmp_path, name, tile, weights):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, weights, seed=11)
    if name == "chain_5000" and weights == "above_one":
        w = w.clamp(-1.01, 1.01)  # products over 5000 steps stay finite
    h = _run(harness, tmp_path, tree, tile, x, w, threads=64, backward=False)
    for got, direction in zip(_forward(h), DIRECTIONS):
        want = tree_scan(x, w, tree, direction)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=direction)


def test_full_tiles_of_2048(harness, tmp_path):
    # three tiles of up to 2048 positions, levels longer than the block: chunks per thread
    tree = _tree("chain_5000")
    x, w = _inputs(tree.num_nodes, "zeros", seed=16)
    h = _run(harness, tmp_path, tree, 2048, x, w, threads=64, backward=False)
    for got, direction in zip(_forward(h), DIRECTIONS):
        torch.testing.assert_close(got, tree_scan(x, w, tree, direction), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tile", [1, 2048])
def test_both_with_large_weights_takes_no_differences(harness, tmp_path, tile):
    # both[v] sums over the whole tree; nothing is formed as a total minus a share, so a
    # weight of 1e4 on a chain of 3 gives the exact products
    tree = Tree.from_parent(chain(3))
    w = torch.full((3, C), 1e4, dtype=torch.float64)
    x = torch.zeros(3, C, dtype=torch.float64)
    x[2, 0], x[0, 1], x[1, 2] = 1.0, 1.0, 1.0
    g = torch.randn(3, C, dtype=torch.float64, generator=_gen(20))
    out = _run(harness, tmp_path, tree, tile, x, w, g=g)
    want = torch.tensor([[1e8, 1.0, 1e4], [1e4, 1e4, 1.0], [1.0, 1e8, 1e4]], dtype=torch.float64)
    assert torch.equal(out[6], want)
    want_x, want_w = _reference_backward(tree, x, w, g, "both", dense=True)
    torch.testing.assert_close(out[7], want_x, rtol=1e-12, atol=0)
    torch.testing.assert_close(out[8], want_w, rtol=1e-12, atol=0)


def _check_both(out, tree, x, w, g, tol, dense):
    """``both`` of the harness's outputs and its gradients at ``g`` against the dense oracle
    (``dense``) or the torch reference, within ``tol``."""
    want = dense_tree_scan(x, w, tree.parent, "both") if dense else tree_scan(x, w, tree, "both")
    torch.testing.assert_close(out[6], want, rtol=tol, atol=tol)
    want_x, want_w = _reference_backward(tree, x, w, g, "both", dense=dense)
    torch.testing.assert_close(out[7], want_x, rtol=tol, atol=tol)
    torch.testing.assert_close(out[8], want_w, rtol=tol, atol=tol)


@pytest.mark.parametrize("tile", [1, 7, 64])
def test_both_on_a_chain_of_weights_above_one(harness, tmp_path, tile):
    tree = Tree.from_parent(chain(50))
    x = torch.randn(50, C, dtype=torch.float64, generator=_gen(21))
    w = torch.full((50, C), 1.5, dtype=torch.float64)
    w[17, 1] = 0.0
    g = torch.randn(50, C, dtype=torch.float64, generator=_gen(22))
    out = _run(harness, tmp_path, tree, tile, x, w, g=g)
    _check_both(out, tree, x, w, g, 1e-12, dense=True)


def test_both_on_a_star_of_thousands_of_children(harness, tmp_path):
    # the centre's 3000 children: one thread per (centre, channel) walks them forwards for
    # the prefix and backwards for the suffix
    tree = Tree.from_parent(star(3001, center=5))
    x, w = _inputs(tree.num_nodes, "above_one", seed=23)
    g = torch.randn(x.shape, dtype=torch.float64, generator=_gen(24))
    out = _run(harness, tmp_path, tree, 64, x, w, g=g, threads=64)
    _check_both(out, tree, x, w, g, 1e-10, dense=False)


@pytest.mark.parametrize("tile", [7, 2048])
def test_both_for_every_child_count_around_the_registers(harness, tmp_path, tile):
    # hubs of 1 to 9 children below one root: the brackets of up to four children
    # (kBracketChildren) are formed in registers, those of more along the sibling links
    parent = [-1]
    for k in range(1, 10):
        hub = len(parent)
        parent += [0] + [hub] * k
    tree = Tree.from_parent(torch.tensor(parent))
    x, w = _inputs(tree.num_nodes, "above_one", seed=25)
    g = torch.randn(x.shape, dtype=torch.float64, generator=_gen(26))
    out = _run(harness, tmp_path, tree, tile, x, w, g=g)
    _check_both(out, tree, x, w, g, 1e-10, dense=True)


def test_chain_crosses_many_tiles():
    # the 5000-chain at tile 64: 79 tiles, a boundary tree 78 deep
    plan = tile_plan(_tree("chain_5000"), 64)
    assert int((plan.boundary_level_ptr.diff() > 0).sum()) == 78
    assert int((plan.tile_ptr.diff() > 0).sum()) == 79


@pytest.mark.parametrize("name,tile", [("random_many_roots", 7), ("deep", 64), ("star", 7),
                                       ("random_3000", 256)])
def test_launch_shape_does_not_change_bits(harness, tmp_path, name, tile):
    # chunks of 8 elements whatever the block width, carried through in order; a channel's
    # values do not depend on the groups its block takes; the tile tree's sums in shared
    # or global memory alike
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, "above_one", seed=12, c=70)  # three groups, the last partial
    g = torch.randn(x.shape, dtype=torch.float64, generator=_gen(25))
    base = _run(harness, tmp_path, tree, tile, x, w, threads=32, g=g)
    for threads, per_block, options in ((64, 2, ""), (256, 3, ""), (96, 1, "g")):
        got = _run(harness, tmp_path, tree, tile, x, w, threads=threads,
                   groups_per_block=per_block, g=g, options=options)
        for a, b in zip(got, base):
            assert torch.equal(a, b), (threads, per_block, options)
    for direction, got in zip(DIRECTIONS, _forward(base)):
        torch.testing.assert_close(got, tree_scan(x, w, tree, direction), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("c", [1, 33])
@pytest.mark.parametrize("name,tile", [("graph_forest", 7), ("random_many_roots", 64),
                                       ("grid_trees", 2048), ("star", 1)])
def test_channel_counts(harness, tmp_path, name, tile, c):
    # a lone channel; one full group of 32 and one lane of the next
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, "above_one", seed=26, c=c)
    h = _run(harness, tmp_path, tree, tile, x, w, threads=64, groups_per_block=2,
             backward=False)
    for got, direction in zip(_forward(h), DIRECTIONS):
        want = dense_tree_scan(x, w, tree.parent, direction)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=direction)


@pytest.mark.parametrize("name,tile", [("random_many_roots", 7), ("graph_forest", 64),
                                       ("chain_5000", 64), ("random_3000", 2048)])
def test_float_data_with_double_accumulators(harness, tmp_path, name, tile):
    # rows rounded to the data type, the values later steps read kept in a scratch of
    # accumulators (poisoned with NaN: a value read but never written would show)
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, "unit_interval", seed=27)
    x, w = x.float().double(), w.float().double()
    g = torch.randn(x.shape, generator=_gen(28)).double()
    out = _run(harness, tmp_path, tree, tile, x, w, g=g, threads=64, options="s")
    dense = name != "chain_5000" and name != "random_3000"
    for got, direction in zip(_forward(out), DIRECTIONS):
        want = (dense_tree_scan(x, w, tree.parent, direction) if dense
                else tree_scan(x, w, tree, direction))
        scale = max(1.0, float(want.abs().max()))
        assert float((got - want).abs().max()) <= 1e-5 * scale, direction
    for direction, (gx, gw) in (("down", out[2:4]), ("up", out[4:6]), ("both", out[7:9])):
        want_x, want_w = _reference_backward(tree, x, w, g, direction, dense)
        scale = max(1.0, float(want_x.abs().max()), float(want_w.abs().max()))
        assert float((gx - want_x).abs().max()) <= 1e-5 * scale, direction
        assert float((gw - want_w).abs().max()) <= 1e-5 * scale, direction


def test_deep_boundary_tree(harness, tmp_path):
    # the 5000-chain at tile 8: 625 tiles, each hanging from the one before (the feeder walks
    # and the tile tree 624 deep), the tile tree's sums in global memory too
    tree = _tree("chain_5000")
    x, w = _inputs(tree.num_nodes, "zeros", seed=29, c=2)
    w = w.clamp(max=1.0)
    for options in ("", "g"):
        h = _run(harness, tmp_path, tree, 8, x, w, backward=False, options=options)
        for got, direction in zip(_forward(h), DIRECTIONS):
            torch.testing.assert_close(got, tree_scan(x, w, tree, direction), rtol=1e-9,
                                       atol=1e-9, msg=direction)


def test_non_finite_values_stay_in_their_subtrees(harness, tmp_path):
    tree = _tree("random_many_roots")
    x, w = _inputs(tree.num_nodes, "unit_interval", seed=13)
    x[5, 0] = float("inf")
    down, up, *_ = _run(harness, tmp_path, tree, 7, x, w, backward=False)
    for got, direction in ((down, "down"), (up, "up")):
        want = tree_scan(x, w, tree, direction)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), direction
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-10, atol=1e-10)


def test_cases_include_a_tile_lacking_a_light_depth():
    # a tile may hold light depths d and d + 2 but not d + 1 (an empty level between): the
    # oracle test of "random" at tile 7 runs one
    plan = tile_plan(_tree("random"), 7)
    counts = plan.level_ptr.diff(dim=1)
    assert any(bool((counts[k, :plan.tile_levels[k]] == 0).any())
               for k in range(plan.num_tiles))
