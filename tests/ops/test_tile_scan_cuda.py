"""The "tiles" schedule of the CUDA tree scan (torch.ops.treessm.cuda_tree_scan and
cuda_tree_scan_backward along treessm.ops.plan.scan_plan(..., "tiles", tile)) against the
dense oracle and the float64 tree scan, at tile sizes from 1 to the default (skipped without
a GPU)."""
import functools

import pytest
import torch

from oracle import all_roots, chain, dense_tree_scan, empty, random_forest, single_vertex, star
from treessm import GraphTopology, GridTopology, Tree, tree_scan
from treessm.ops.plan import scan_plan

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


def _cpu_scan(x, w, tree, direction):
    """The numba backend's scan in float64 (on CUDA, the automatic schedule of a large tree
    is the one under test)."""
    return tree_scan(x.double().cpu(), w.double().cpu(), tree.cpu(), direction)


def _plan(tree, tile, x):
    p = scan_plan(tree, x.shape[1], x.dtype, "tiles", tile)
    assert p.schedule == "tiles" and p.launch.tile == tile and len(p.tensors) == 18
    return list(p.tensors), p.schedule, list(p.launch)


def _tile_scan(x, w, tree, tile, direction):
    return torch.ops.treessm.cuda_tree_scan(x, w, *_plan(tree, tile, x), direction)


def _tile_backward(g, x, w, h, tree, tile, direction):
    return torch.ops.treessm.cuda_tree_scan_backward(g, x, w, h, *_plan(tree, tile, x),
                                                     direction)


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
    err = float((got.double().cpu() - want.cpu()).abs().max())
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
    _close(got, _cpu_scan(x, w, tree, direction), dtype)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", ["random_many_roots", "chain_5000", "spanning_1e5"])
def test_weights_zero_and_above_one(name, direction):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 4, "signed", seed=11)
    if name != "random_many_roots":
        w = w.clamp(-1.01, 1.01)  # long paths stay finite
    got = _tile_scan(x, w, tree, 64, direction)
    torch.testing.assert_close(got.cpu(), _cpu_scan(x, w, tree, direction), rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["spanning_1e5", "random_many_roots"])
def test_bitwise_run_to_run_and_across_slice_widths(name, dtype):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 8, seed=12)
    x, w = x.to(dtype), w.to(dtype)
    for direction in DIRECTIONS:
        first = _tile_scan(x, w, tree, 2048, direction)
        assert torch.equal(first, _tile_scan(x, w, tree, 2048, direction))
        # one channel runs in slices of one, eight in the widest: the same bits per channel
        for c in (0, 5):
            col = x[:, c:c + 1].contiguous(), w[:, c:c + 1].contiguous()
            assert torch.equal(_tile_scan(*col, tree, 2048, direction)[:, 0], first[:, c])


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name,tile", [("random_many_roots", 7), ("graph_forest", 1),
                                       ("chain_5000", 64), ("spanning_1e5", 2048)])
def test_backward_building_block_matches_autograd(name, tile, direction):
    tree = _tree(name)
    x, w = _inputs(tree.num_nodes, 3, seed=13)
    g = torch.randn(x.shape, dtype=torch.float64, generator=_gen(14)).cuda()
    h = _tile_scan(x, w, tree, tile, direction)
    gx, gw = _tile_backward(g, x, w, h, tree, tile, direction)
    xr, wr = x.cpu().requires_grad_(), w.cpu().requires_grad_()
    want_x, want_w = torch.autograd.grad(tree_scan(xr, wr, tree.cpu(), direction), (xr, wr),
                                         g.cpu())
    torch.testing.assert_close(gx.cpu(), want_x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gw.cpu(), want_w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_tree_scan_with_the_tiles_schedule_matches_the_cpu(direction):
    # the public op: plan from the cache, autograd in C++ and through the custom op that
    # torch.compile traces, against the numba backend
    tree = _tree("spanning_1e5")
    x, w = _inputs(tree.num_nodes, 5, seed=17)
    g = torch.randn(x.shape, dtype=torch.float64, generator=_gen(18)).cuda()
    xr, wr = x.cpu().requires_grad_(), w.cpu().requires_grad_()
    hr = tree_scan(xr, wr, tree.cpu(), direction)
    want = (hr, *torch.autograd.grad(hr, (xr, wr), g.cpu()))
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    ha = tree_scan(xa, wa, tree, direction, schedule="tiles")
    got = (ha, *torch.autograd.grad(ha, (xa, wa), g))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)
    p = scan_plan(tree, 5, torch.float64, "tiles")
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    hb = torch.ops.treessm.tree_scan(xb, wb, tree.order, tree.child_ptr, tree.tree_ptr,
                                     list(p.tensors), p.schedule, list(p.launch), direction,
                                     "cuda")
    assert torch.equal(ha, hb)
    assert all(torch.equal(a, b) for a, b in
               zip(got[1:], torch.autograd.grad(hb, (xb, wb), g)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_both_backward_in_low_precision(dtype):
    tree = _tree("random_20k")
    x, w = _inputs(tree.num_nodes, 8, seed=15)
    g = torch.randn(x.shape, dtype=torch.float64, generator=_gen(16)).cuda()
    xl, wl, gl = x.to(dtype), w.to(dtype), g.to(dtype)
    gx, gw = _tile_backward(gl, xl, wl, _tile_scan(xl, wl, tree, 2048, "both"), tree, 2048,
                            "both")
    assert gx.dtype == gw.dtype == dtype
    xr, wr = xl.double().cpu().requires_grad_(), wl.double().cpu().requires_grad_()
    want_x, want_w = torch.autograd.grad(tree_scan(xr, wr, tree.cpu(), "both"), (xr, wr),
                                         gl.double().cpu())
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


def test_bad_arguments_raise():
    tree = _tree("random")
    x, w = _inputs(tree.num_nodes, 2)
    plan, schedule, launch = _plan(tree, 64, x)
    op, backward = torch.ops.treessm.cuda_tree_scan, torch.ops.treessm.cuda_tree_scan_backward
    with pytest.raises(RuntimeError, match="direction"):
        op(x, w, plan, schedule, launch, "sideways")
    with pytest.raises(RuntimeError, match="direction"):
        backward(x, x, w, x, plan, schedule, launch, "sideways")
    with pytest.raises(RuntimeError, match="plan must hold the 18"):
        op(x, w, plan[:-1], schedule, launch, "down")
    with pytest.raises(RuntimeError, match="plan must hold the 5"):  # a tiled plan as "trees"
        op(x, w, plan, "trees", list(scan_plan(tree, 2, x.dtype, "trees").launch), "down")
    with pytest.raises(RuntimeError, match="weight"):
        op(x, w.float(), plan, schedule, launch, "down")
    with pytest.raises(RuntimeError, match="int32"):
        op(x, w, [t.long() for t in plan], schedule, launch, "down")
    with pytest.raises(RuntimeError, match="launch.tile must be positive"):
        op(x, w, plan, schedule, [0, 0, 0], "down")
    with pytest.raises(RuntimeError, match="launch must hold"):
        op(x, w, plan, schedule, launch[:2], "down")
    with pytest.raises(RuntimeError, match="schedule must be 'trees' or 'tiles'"):
        op(x, w, plan, "phases", launch, "down")
    with pytest.raises(RuntimeError, match="out"):
        backward(x, x, w, x[:-1], plan, schedule, launch, "both")
