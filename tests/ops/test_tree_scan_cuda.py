"""CUDA backend of tree_scan against the dense oracle and the CPU backend (skipped without a GPU)."""
import pytest
import torch

import treessm
from treessm.ops.plan import SCHEDULES
from captured_step import check_captured_step
from oracle import all_roots, chain, dense_tree_scan, random_forest, single_vertex, star

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DIRECTIONS = ("both", "up", "down")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module", autouse=True)
def _extension():
    from treessm.typing import load_cuda_extension

    load_cuda_extension()


def _scan_with(tree, x, w, gout, direction, schedule, **launch):
    """Forward and both gradients through the CUDA ops with the schedule's plan, ``launch``
    overriding launch parameters."""
    from treessm.ops import cuda, plan

    p = plan.scan_plan(tree, x.shape[1], x.dtype, schedule)
    if launch:
        p = p._replace(launch=p.launch._replace(**launch))
    h = cuda.forward(x, w, p, direction)
    gx, gw = cuda.backward(gout, x, w, h, p, direction)
    return h, gx, gw




def _forests():
    g = torch.Generator().manual_seed(7)
    return {
        "single": single_vertex(),
        "random": random_forest(40, 1, g),
        "many_roots": random_forest(60, 9, g),
        "all_roots": all_roots(13),
        "star": star(33, center=5),
        "deep": random_forest(50, 2, g, locality=2),
        "chain_shuffled": chain(45, g),
    }


def _inputs(n, c, dtype, g, device="cuda"):
    x = torch.randn(n, c, generator=g, dtype=torch.float64)
    w = torch.rand(n, c, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return x.to(device, dtype), w.to(device, dtype)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", list(_forests()))
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("c", [1, 6, 8])
def test_cuda_matches_dense_oracle(name, direction, c, schedule):
    parent = _forests()[name]
    n = parent.numel()
    g = torch.Generator().manual_seed(n * 31 + c)
    x, w = _inputs(n, c, torch.float64, g)
    tree = treessm.Tree.from_parent(parent.cuda())
    gout = torch.randn(n, c, generator=g, dtype=torch.float64)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h = treessm.tree_scan(xg, wg, tree, direction, backend="cuda", schedule=schedule)
    gx, gw = torch.autograd.grad(h, (xg, wg), gout.cuda())
    xr = x.detach().cpu().requires_grad_(True)
    wr = w.detach().cpu().requires_grad_(True)
    hr = dense_tree_scan(xr, wr, parent, direction)
    assert torch.allclose(h.cpu(), hr, atol=1e-10, rtol=1e-10)
    gxr, gwr = torch.autograd.grad(hr, (xr, wr), gout, allow_unused=True)
    gwr = torch.zeros_like(wr) if gwr is None else gwr * (parent >= 0).double()[:, None]
    assert torch.allclose(gx.cpu(), gxr, atol=1e-10, rtol=1e-10)
    assert torch.allclose(gw.cpu(), gwr, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cuda_dtypes_match_cpu(dtype, direction):
    g = torch.Generator().manual_seed(3)
    parent = random_forest(3000, 5, g, locality=50)
    n, c = parent.numel(), 64
    x, w = _inputs(n, c, dtype, g)
    tree = treessm.Tree.from_parent(parent).cuda()
    cpu_tree = treessm.Tree.from_parent(parent)
    h = treessm.tree_scan(x, w, tree, direction)
    assert h.dtype == dtype
    ref = treessm.tree_scan(x.double().cpu(), w.double().cpu(), cpu_tree, direction)
    err = (h.double().cpu() - ref).norm() / ref.norm()
    assert err < TOL[dtype], err
    gout = torch.randn(n, c, generator=g).to("cuda", dtype)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx, gw = torch.autograd.grad(treessm.tree_scan(xg, wg, tree, direction), (xg, wg), gout)
    xc = x.double().cpu().requires_grad_()
    wc = w.double().cpu().requires_grad_()
    gxr, gwr = torch.autograd.grad(treessm.tree_scan(xc, wc, cpu_tree, direction), (xc, wc),
                                   gout.double().cpu())
    assert (gx.double().cpu() - gxr).norm() / gxr.norm() < TOL[dtype]
    assert (gw.double().cpu() - gwr).norm() / gwr.norm() < TOL[dtype]


def test_cuda_grid_trees_and_deep_chain():
    g = torch.Generator().manual_seed(11)
    feat = torch.randn(4, 20, 20, 8, generator=g).cuda()
    tree = treessm.GridTopology()(feat)
    x, w = _inputs(tree.num_nodes, 32, torch.float32, g)
    for direction in DIRECTIONS:
        h = treessm.tree_scan(x, w, tree, direction)
        ref = treessm.tree_scan(x.cpu(), w.cpu(), tree.cpu(), direction)
        assert torch.allclose(h.cpu(), ref, atol=1e-4, rtol=1e-4)
    parent = chain(100_000)
    tree = treessm.Tree.from_parent(parent).cuda()
    x = torch.randn(100_000, 4, device="cuda")
    w = torch.full_like(x, 0.5)
    h = treessm.tree_scan(x, w, tree, "down")
    ref = treessm.tree_scan(x.cpu(), w.cpu(), tree.cpu(), "down")
    assert torch.allclose(h.cpu(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cuda_bitwise_deterministic(direction, schedule):
    g = torch.Generator().manual_seed(5)
    parent = random_forest(20000, 3, g, locality=100)
    tree = treessm.Tree.from_parent(parent).cuda()
    x, w = _inputs(parent.numel(), 96, torch.float32, g)
    gout = torch.randn_like(x)
    runs = []
    for _ in range(2):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        h = treessm.tree_scan(xg, wg, tree, direction, schedule=schedule)
        gx, gw = torch.autograd.grad(h, (xg, wg), gout)
        runs.append((h, gx, gw))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cuda_empty_and_zero_channels():
    tree = treessm.Tree.from_parent(torch.zeros(0, dtype=torch.long)).cuda()
    x = torch.zeros(0, 4, device="cuda", requires_grad=True)
    h = treessm.tree_scan(x, torch.zeros(0, 4, device="cuda"), tree)
    assert h.shape == (0, 4)
    tree = treessm.Tree.from_parent(torch.tensor([-1, 0, 0])).cuda()
    h = treessm.tree_scan(torch.zeros(3, 0, device="cuda"), torch.zeros(3, 0, device="cuda"), tree)
    assert h.shape == (3, 0)


@pytest.mark.parametrize("schedule", (None,) + SCHEDULES)
def test_cuda_ops_registered_and_compile(schedule):
    # every schedule's plan (the tiled one holds its tile size as a CPU tensor, the
    # columns one its largest tree) goes through the custom operator that dynamo traces
    assert hasattr(torch.ops.treessm, "tree_scan")
    assert hasattr(torch.ops.treessm, "cuda_tree_scan")
    assert hasattr(torch.ops.treessm, "cuda_tree_scan_backward")
    g = torch.Generator().manual_seed(2)
    parent = random_forest(500, 2, g)
    tree = treessm.Tree.from_parent(parent).cuda()
    x, w = _inputs(500, 16, torch.float32, g)

    def f(x, w):
        return treessm.tree_scan(x * 2, w, tree, "both", schedule=schedule).sin().sum()

    compiled = torch.compile(f, fullgraph=True)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    out_c = compiled(xa, wa)
    out_e = f(xb, wb)
    out_c.backward()
    out_e.backward()
    assert torch.allclose(out_c, out_e, rtol=1e-5, atol=1e-4)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(wa.grad, wb.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cuda_results_do_not_depend_on_the_launch_shape(direction):
    # the sums run in an order fixed by the layout's positions: every block width and lane
    # count gives the same bits; the schedules (chunks cut at other places) agree to rounding; a star
    # (one long light-child list), a deep chain (many chunks per phase), a forest, one tree
    g = torch.Generator().manual_seed(22)
    forests = [star(5000, center=17), chain(3000, g), random_forest(20000, 7, g, locality=30),
               random_forest(3000, 1, g)]
    for parent in forests:
        n = parent.numel()
        tree = treessm.Tree.from_parent(parent).cuda()
        x, w = _inputs(n, 40, torch.float32, g)
        gout = torch.randn(n, 40, generator=g).cuda()
        for schedule in SCHEDULES:
            shapes = [(32, 128), (4, 128), (16, 64), (64, 16), (128, 32), (32, 16), (4, 16)]
            runs = {sh: _scan_with(tree, x, w, gout, direction, schedule, row_bytes=sh[0],
                                   lanes=sh[1]) for sh in shapes}
            for sh in runs:
                for a, b in zip(runs[shapes[0]], runs[sh]):
                    assert torch.equal(a, b), (schedule, sh)
        trees = _scan_with(tree, x, w, gout, direction, "trees")
        phases = _scan_with(tree, x, w, gout, direction, "phases")
        for a, b in zip(trees, phases):
            err = (a - b).double().norm() / b.double().norm()
            assert err < TOL[torch.float32], err
        ref = treessm.tree_scan(x.double().cpu(), w.double().cpu(), tree.cpu(), direction)
        err = (trees[0].double().cpu() - ref).norm() / ref.norm()
        assert err < TOL[torch.float32], err


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cuda_weights_above_one_and_overflow(direction):
    # no cancellation: weights in [1, 2) within float32 rounding of float64, element by
    # element; overflow gives inf, never NaN
    g = torch.Generator().manual_seed(26)
    for parent in (chain(50), random_forest(3000, 3, g, locality=4)):
        n = parent.numel()
        tree = treessm.Tree.from_parent(parent).cuda()
        x = torch.rand(n, 8, generator=g, dtype=torch.float64) + 0.1
        w = torch.rand(n, 8, generator=g, dtype=torch.float64) * 0.05 + 1.0
        ref = treessm.tree_scan(x, w, tree.cpu(), direction)
        for schedule in SCHEDULES:
            h = treessm.tree_scan(x.float().cuda(), w.float().cuda(), tree, direction,
                                  schedule=schedule)
            torch.testing.assert_close(h.double().cpu(), ref, rtol=1e-4, atol=0)
    tree = treessm.Tree.from_parent(chain(12)).cuda()
    h = treessm.tree_scan(torch.ones(12, 2, device="cuda"), torch.full((12, 2), 1e30, device="cuda"),
                          tree, direction)
    assert not torch.isnan(h).any() and torch.isinf(h).any()


@pytest.mark.parametrize("schedule", ["phases", "tiles"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cuda_one_large_tree_and_singletons_match_the_cpu(direction, schedule):
    # one tree of 300,000 vertices beside 40 isolated vertices, phase by phase over the device
    # (the heavy-path phases) and in tiles (the automatic choice at this size): outputs and
    # gradients against the numba backend in float64, bitwise repeatable
    from treessm.ops import plan

    g = torch.Generator().manual_seed(24)
    parent = torch.cat([random_forest(300_000, 1, g, locality=2000), torch.full((40,), -1)])
    tree = treessm.Tree.from_parent(parent).cuda()
    assert plan.choose_schedule(tree) == "tiles"
    x, w = _inputs(parent.numel(), 16, torch.float64, g)
    gout = torch.randn(parent.numel(), 16, generator=g, dtype=torch.float64)
    cpu_tree = treessm.Tree.from_parent(parent)
    runs = []
    for _ in range(2):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        h = treessm.tree_scan(xg, wg, tree, direction, schedule=schedule)
        runs.append((h, *torch.autograd.grad(h, (xg, wg), gout.cuda())))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    xc, wc = x.cpu().requires_grad_(), w.cpu().requires_grad_()
    hc = treessm.tree_scan(xc, wc, cpu_tree, direction)
    ref = (hc, *torch.autograd.grad(hc, (xc, wc), gout))
    for a, b in zip(runs[0], ref):
        assert torch.allclose(a.cpu(), b, rtol=1e-9, atol=1e-9)


def test_cuda_path_plan_kernel_matches_tensor_plan():
    # one block per tree on the GPU, tensor for tensor equal to the tensor construction
    from treessm.ops.plan import level_plan, path_plan, path_plan_tensors

    g = torch.Generator().manual_seed(23)
    feats = torch.randn(3, 20, 17, 5, generator=g)
    forests = [random_forest(5000, 40, g), random_forest(4000, 2, g, locality=3), star(300, 9),
               chain(700, g), torch.tensor([-1, -1, 1, -1, 3, 4, -1]),
               treessm.GridTopology(connectivity=4, distance="cosine")(feats).parent]
    for parent in forests:
        tree = treessm.Tree.from_parent(parent)
        args = (tree.order, tree.child_ptr, tree.tree_ptr, tree.depth, level_plan(tree).parent_pos)
        expected = path_plan_tensors(*args)
        got = torch.ops.treessm.cuda_path_plan(*(a.cuda() for a in args))
        for a, b in zip(got, expected):
            assert torch.equal(a.cpu(), b)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(path_plan(tree.cuda()), expected))
        assert all(torch.equal(a.cpu(), b)
                   for a, b in zip(path_plan_tensors(*(a.cuda() for a in args)), expected))


def test_cuda_unaligned_rows():
    # rows that start 4 bytes past a 16-byte boundary: narrower vector accesses
    g = torch.Generator().manual_seed(4)
    parent = random_forest(700, 3, g)
    n, c = parent.numel(), 8
    tree = treessm.Tree.from_parent(parent).cuda()
    base = torch.randn(n * c + 1, generator=g).cuda()
    x = base[1:].view(n, c)
    w = (torch.rand(n * c + 1, generator=g) * 0.9 + 0.05).cuda()[1:].view(n, c)
    assert x.data_ptr() % 16 != 0
    for direction in DIRECTIONS:
        h = treessm.tree_scan(x, w, tree, direction)
        ref = treessm.tree_scan(x.cpu(), w.cpu(), tree.cpu(), direction)
        assert torch.allclose(h.cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cuda_columns_of_long_chains_in_global_memory(direction, dtype):
    # trees too long for shared-memory columns: chains carry the step before's value in a
    # register, the other trees of the same launch (a chain with a leaf under its root, a
    # deep random tree) read their global columns; all against the float64 CPU backend,
    # gradients too, bitwise repeatable
    g = torch.Generator().manual_seed(28)
    forked = chain(2600)
    forked = torch.cat([forked, torch.tensor([0])])  # a leaf under the root: not a chain
    parts = [chain(3000, g), chain(2500), forked, random_forest(2800, 1, g, locality=3)]
    offsets = torch.tensor([0] + [p.numel() for p in parts]).cumsum(0)
    parent = torch.cat([torch.where(p >= 0, p + o, p) for p, o in zip(parts, offsets)])
    n = parent.numel()
    tree = treessm.Tree.from_parent(parent).cuda()
    x, w = _inputs(n, 40, dtype, g)
    gout = torch.randn(n, 40, generator=g, dtype=dtype).cuda()
    runs = [_scan_with(tree, x, w, gout, direction, "columns") for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    xc, wc = x.double().cpu().requires_grad_(), w.double().cpu().requires_grad_()
    hc = treessm.tree_scan(xc, wc, tree.cpu(), direction)
    ref = (hc, *torch.autograd.grad(hc, (xc, wc), gout.double().cpu()))
    tol = 1e-10 if dtype == torch.float64 else TOL[torch.float32]
    for a, b in zip(runs[0], ref):
        err = (a.double().cpu() - b).norm() / b.norm()
        assert err < tol, err


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cuda_lean_path_equals_the_custom_op(schedule):
    # eager CUDA calls go through torch.ops.treessm.cuda_tree_scan (autograd in C++); the
    # Python custom op that torch.compile traces gives the same bits
    from treessm.ops import plan

    g = torch.Generator().manual_seed(25)
    parent = random_forest(4000, 6, g, locality=20)
    tree = treessm.Tree.from_parent(parent).cuda()
    x, w = _inputs(parent.numel(), 24, torch.float32, g)
    gout = torch.randn(parent.numel(), 24, generator=g).cuda()
    p = plan.scan_plan(tree, 24, torch.float32, schedule)
    for direction in DIRECTIONS:
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        ha = treessm.tree_scan(xa, wa, tree, direction, schedule=schedule)
        ga = torch.autograd.grad(ha, (xa, wa), gout)
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        hb = torch.ops.treessm.tree_scan(xb, wb, tree.order, tree.child_ptr, tree.tree_ptr,
                                         list(p.tensors), p.schedule, list(p.launch), direction,
                                         "cuda")
        gb = torch.autograd.grad(hb, (xb, wb), gout)
        assert torch.equal(ha, hb) and all(torch.equal(a, b) for a, b in zip(ga, gb))
        assert ha.grad_fn is not None
    with torch.no_grad():
        assert treessm.tree_scan(x, w, tree, "both", schedule=schedule).grad_fn is None


def test_cuda_tiled_both_keeps_its_parts_not_x():
    # under "tiles", "both" keeps its forward's parts for the backward, not x: x may change
    # in place after the forward (autograd would refuse a saved x), and the gradients are
    # those of the custom op, which scans x again in its backward
    from treessm.ops import plan

    g = torch.Generator().manual_seed(26)
    parent = random_forest(5000, 3, g, locality=30)
    tree = treessm.Tree.from_parent(parent).cuda()
    x, w = _inputs(parent.numel(), 40, torch.float32, g)
    gout = torch.randn(parent.numel(), 40, generator=g).cuda()
    p = plan.scan_plan(tree, 40, torch.float32, "tiles")
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    hb = torch.ops.treessm.tree_scan(xb, wb, tree.order, tree.child_ptr, tree.tree_ptr,
                                     list(p.tensors), p.schedule, list(p.launch), "both", "cuda")
    expected = torch.autograd.grad(hb, (xb, wb), gout)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    leaf = xa * 1  # a non-leaf the scan reads, changed in place below
    ha = treessm.tree_scan(leaf, wa, tree, "both", schedule="tiles")
    with torch.no_grad():
        leaf.mul_(3)
    got = torch.autograd.grad(ha, (xa, wa), gout)
    assert torch.equal(ha, hb) and all(torch.equal(a, b) for a, b in zip(got, expected))
    # "up" and "down" keep the weights and the output: changing the weights in place is
    # caught by autograd
    wc = w.clone().requires_grad_()
    wl = wc * 1
    hc = treessm.tree_scan(x, wl, tree, "down", schedule="tiles")
    with torch.no_grad():
        wl.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(hc, wc, gout)


def test_cuda_graph_capture_of_a_step():
    # a whole step (grid tree built from features on the device, its layout, the scan and its
    # backward) is captured in a CUDA graph; replays for new inputs equal eager runs
    g = torch.Generator().manual_seed(27)
    feat = torch.randn(4, 16, 16, 8, generator=g).cuda()
    topo = treessm.GridTopology()
    x = torch.randn(4 * 256, 32, generator=g).cuda().requires_grad_()
    w = (torch.rand(4 * 256, 32, generator=g) * 0.9 + 0.05).cuda().requires_grad_()
    fresh = [torch.randn(4 * 256, 32, generator=g).cuda() for _ in range(2)]
    check_captured_step(lambda x: treessm.tree_scan(x, w, topo(feat), "both").square().sum(),
                        x, [w], fresh)
