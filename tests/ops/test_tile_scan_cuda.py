"""The tiled CUDA tree scan (torch.ops.treessm.cuda_tile_scan and its backward building
block) against the dense oracle and the float64 tree scan (skipped without a GPU)."""
import functools

import pytest
import torch

from oracle import all_roots, chain, dense_tree_scan, empty, random_forest, single_vertex, star
from treessm import GraphTopology, GridTopology, Tree, tree_scan
from treessm.ops.tiles import tile_plan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DIRECTIONS = ["down", "up", "both"]

# error bounds relative to the largest reference value (at least 1)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module", autouse=True)
def _extension():
    from treessm.typing import load_cuda_extension

    load_cuda_extension()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _spanning(n, e, seed):
    g = _gen(seed)
    edge_index = torch.randint(0, n, (2, e), generator=g)
    return GraphTopology()(torch.randn(n, 4, generator=g), edge_index).parent


SMALL = {  # dense oracle
    "single_vertex": single_vertex,
    "empty": empty,
    "many_roots": lambda: all_roots(11),
    "random": lambda: random_forest(150, 1, _gen(0)),
    "random_many_roots": lambda: random_forest(160, 17, _gen(1)),
    "deep": lambda: random_forest(140, 2, _gen(2), locality=3),
    "star": lambda: star(90, center=13),
    "grid_trees": lambda: GridTopology()(torch.randn(2, 7, 6, 4, generator=_gen(3))).parent,
    "graph_forest": lambda: _spanning(180, 260, 4),
}
LARGE = {  # the float64 tree scan
    "chain_5000": lambda: chain(5000, _gen(6)),
    "wide_star": lambda: star(6000, center=7),
    "random_20k": lambda: random_forest(20000, 30, _gen(8)),
    "spanning_1e5": lambda: _spanning(10 ** 5, 5 * 10 ** 5, 9),
}


@functools.lru_cache(maxsize=None)
def _tree(name):
    return Tree.from_parent({**SMALL, **LARGE}[name]()).to("cuda")


def _tile_scan(x, w, tree, tile, direction):
    plan = tile_plan(tree, tile)
    return torch.ops.treessm.cuda_tile_scan(x, w, plan.op_tensors(), direction)


def _tile_backward(g, w, h, tree, tile, direction, x=None):
    plan = tile_plan(tree, tile)
    return torch.ops.treessm.cuda_tile_scan_backward(g, w, h, plan.op_tensors(), direction, x)


def _inputs(n, c, weights="unit_interval", seed=10):
    g = _gen(seed)
    x = torch.randn(n, c, dtype=torch.float64, generator=g)
    if weights == "unit_interval":
        w = torch.rand(n, c, dtype=torch.float64, generator=g)
    else:  # magnitudes up to 1.6, both signs, exact zeros
        w = (torch.rand(n, c, dtype=torch.float64, generator=g) * 2 - 1) * 1.6
        w[torch.rand(n, c, generator=g) < 0.1] = 0.0
    return x.cuda(), w.cuda()


def _close(got, want, dtype):
    want = want.double()
    if want.numel() == 0:
        assert got.shape == want.shape
        return
    err = float((got.double() - want).abs().max())
    scale = max(1.0, float(want.abs().max()))
    assert err <= TOL[dtype] * scale, (err, scale)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("tile", [1, 7, 64, 2048])
@pytest.mark.parametrize("name", list(SMALL))
def test_matches_the_dense_oracle(name, tile, direction):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 3, "signed")
    got = _tile_scan(x, w, tree, tile, direction)
    want = dense_tree_scan(x.cpu(), w.cpu(), tree.parent.cpu(), direction)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("tile,name", [(64, "chain_5000"), (2048, "chain_5000"),
                                       (256, "wide_star"), (2048, "random_20k"),
                                       (2048, "spanning_1e5"), (64, "spanning_1e5")])
def test_matches_the_float64_scan(name, tile, direction, dtype):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 8)
    if name == "wide_star" and direction != "down":
        x = x / 64  # keep the sums over 6000 children within float16
    x, w = x.to(dtype), w.to(dtype)
    got = _tile_scan(x, w, tree, tile, direction)
    assert got.dtype == dtype
    _close(got, tree_scan(x.double(), w.double(), tree, direction), dtype)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", ["random_many_roots", "chain_5000", "spanning_1e5"])
def test_weights_zero_and_above_one(name, direction):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 4, "signed", seed=11)
    if name != "random_many_roots":
        w = w.clamp(-1.01, 1.01)  # long paths stay finite
    got = _tile_scan(x, w, tree, 64, direction)
    torch.testing.assert_close(got, tree_scan(x, w, tree, direction), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["spanning_1e5", "random_many_roots"])
def test_bitwise_run_to_run_and_across_channel_counts(name, dtype):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 70, seed=12)  # three groups of 32 lanes, the last partial
    x, w = x.to(dtype), w.to(dtype)
    for direction in DIRECTIONS:
        first = _tile_scan(x, w, tree, 2048, direction)
        assert torch.equal(first, _tile_scan(x, w, tree, 2048, direction))
        # a channel alone, or among others (other groups, blocks taking other groups): the
        # same bits
        for c in (0, 37, 69):
            col = x[:, c:c + 1].contiguous(), w[:, c:c + 1].contiguous()
            assert torch.equal(_tile_scan(*col, tree, 2048, direction)[:, 0], first[:, c])


@pytest.mark.parametrize("c", [1, 3, 33, 70])
@pytest.mark.parametrize("name,tile", [("graph_forest", 7), ("random_many_roots", 64),
                                       ("grid_trees", 2048), ("star", 1)])
def test_channel_counts(name, tile, c):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, c, "signed", seed=17)
    for direction in DIRECTIONS:
        got = _tile_scan(x, w, tree, tile, direction)
        want = dense_tree_scan(x.cpu(), w.cpu(), tree.parent.cpu(), direction)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("tile", [8, 4096])
def test_deep_boundary_tree(direction, tile):
    # the 5000-chain at tile 8: 625 tiles, each hanging from the one before (the feeder
    # walks and the tile tree 624 deep)
    tree = _tree("chain_5000")
    x, w = _inputs(tree.num_nodes, 40, seed=18)
    got = _tile_scan(x, w, tree, tile, direction)
    torch.testing.assert_close(got, tree_scan(x, w, tree, direction), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name,tile", [("random_many_roots", 7), ("graph_forest", 1),
                                       ("chain_5000", 64), ("spanning_1e5", 2048)])
def test_backward_building_block_matches_autograd(name, tile, direction):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 3, seed=13)
    g = torch.randn(x.shape, dtype=torch.float64, generator=_gen(14)).cuda()
    h = _tile_scan(x, w, tree, tile, direction)
    gx, gw = _tile_backward(g, w, h, tree, tile, direction, x)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want_x, want_w = torch.autograd.grad(tree_scan(xr, wr, tree, direction), (xr, wr), g)
    torch.testing.assert_close(gx, want_x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gw, want_w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_both_backward_in_low_precision(dtype):
    tree = _tree("random_20k")
    x, w = _inputs(tree.num_nodes, 8, seed=15)
    g = torch.randn(x.shape, dtype=torch.float64, generator=_gen(16)).cuda()
    xl, wl, gl = x.to(dtype), w.to(dtype), g.to(dtype)
    gx, gw = _tile_backward(gl, wl, _tile_scan(xl, wl, tree, 2048, "both"), tree, 2048, "both",
                            xl)
    assert gx.dtype == gw.dtype == dtype
    xr, wr = xl.double().requires_grad_(), wl.double().requires_grad_()
    want_x, want_w = torch.autograd.grad(tree_scan(xr, wr, tree, "both"), (xr, wr), gl.double())
    _close(gx, want_x, dtype)
    _close(gw, want_w, dtype)


@pytest.mark.parametrize("tile", [1, 2048])
def test_both_with_large_weights_takes_no_differences(tile):
    # x = one-hot at the leaf of a chain of 3 with weights 1e4: exactly [1e8, 1e4, 1]
    tree = Tree.from_parent(chain(3)).to("cuda")
    x = torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64, device="cuda")
    w = torch.full_like(x, 1e4)
    got = _tile_scan(x, w, tree, tile, "both")
    assert got[:, 0].tolist() == [1e8, 1e4, 1.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile,name", [(7, "graph_forest"), (2048, "spanning_1e5"),
                                       (64, "chain_5000"), (2048, "empty")])
def test_both_parts_give_the_same_bits(name, tile, dtype):
    # both with its parts kept: the same h, and the backward from the parts the same
    # gradients as the backward that scans x again
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 33, "signed")
    x, w = x.to(dtype), w.to(dtype)
    g = torch.randn_like(x)
    plan = tile_plan(tree, tile)
    tensors = plan.op_tensors()
    up, inner, out = torch.ops.treessm.cuda_tile_scan_both_parts(x, w, tensors)
    h = (up + out).to(dtype)
    assert torch.equal(h, _tile_scan(x, w, tree, tile, "both"))
    assert up.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    g_up, g_out, gw = torch.ops.treessm.cuda_tile_scan_both_backward(g, w, up, inner, out,
                                                                      tensors)
    assert g_up.dtype == g_out.dtype == up.dtype
    want_x, want_w = _tile_backward(g, w, h, tree, tile, "both", x)
    assert torch.equal((g_up + g_out).to(dtype), want_x)
    assert torch.equal(gw, want_w)
    if tree.num_nodes:
        with pytest.raises(RuntimeError, match="inner must have shape"):
            torch.ops.treessm.cuda_tile_scan_both_backward(g, w, up, inner[:-1], out, tensors)


def test_bad_arguments_raise():
    tree = _tree("random")
    x, w = _inputs(tree.num_nodes, 2)
    plan = tile_plan(tree, 64)
    tensors = plan.op_tensors()
    with pytest.raises(RuntimeError, match="direction"):
        torch.ops.treessm.cuda_tile_scan(x, w, tensors, "sideways")
    with pytest.raises(RuntimeError, match="needs the forward's input x"):
        torch.ops.treessm.cuda_tile_scan_backward(x, w, x, tensors, "both")
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.treessm.cuda_tile_scan(x, w.float(), tensors, "down")
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.treessm.cuda_tile_scan(x, w, [t.long() for t in plan[3:]] + tensors[-1:], "down")
    # the tile size comes with the plan, on the host: a device tensor or another dtype is
    # refused before any kernel stages the plan
    for tile in (tensors[-1].cuda(), tensors[-1].int(), torch.tensor([64, 64])):
        with pytest.raises(RuntimeError, match="tile size"):
            torch.ops.treessm.cuda_tile_scan(x, w, tensors[:-1] + [tile], "down")


_SHORT_PLAN = """
import torch
from treessm import Tree
from treessm.ops.tiles import tile_plan
from treessm.typing import load_cuda_extension
load_cuda_extension()
tree = Tree.from_parent([-1, 0, 0, 1, 1, 3]).to("cuda")
x = torch.ones(6, 2, device="cuda")
plan = tile_plan(tree, 4).op_tensors()
for short in (plan[:-1], plan[:1], []):
    for direction in ("down", "both"):
        for call in (lambda: torch.ops.treessm.cuda_tile_scan(x, x, short, direction),
                     lambda: torch.ops.treessm.cuda_tile_scan_backward(x, x, x, short,
                                                                       direction, x)):
            try:
                call()
            except RuntimeError as exc:
                print("raised:", str(exc).splitlines()[0])
"""


def test_a_short_plan_raises():
    # in a child process, so that a crash fails this test instead of ending the run; every
    # entry point checks the plan before it reads one of its tensors (both's sibling links
    # once read plan[1] and plan[2] first)
    import os
    import subprocess
    import sys

    import treessm

    root = os.path.dirname(os.path.dirname(os.path.abspath(treessm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-c", _SHORT_PLAN], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("raised:")]
    assert len(lines) == 12 and all("plan must hold" in ln for ln in lines), proc.stdout
