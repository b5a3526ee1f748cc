"""tree_scan on the CPU: every backend and direction against the dense oracle."""
import numpy as np
import pytest
import torch

from treessm import Tree, tree_scan
from treessm.ops import available_backends
from oracle import all_roots, chain, dense_tree_scan, empty, random_forest, single_vertex, star

BACKENDS = available_backends("cpu")
DIRECTIONS = ("both", "up", "down")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(n, c, dtype=torch.float64, seed=0, requires_grad=False):
    g = _gen(seed)
    x = torch.randn(n, *c, generator=g, dtype=dtype) if isinstance(c, tuple) else \
        torch.randn(n, c, generator=g, dtype=dtype)
    w = torch.rand(x.shape, generator=g, dtype=dtype) * 0.9 + 0.05
    gout = torch.randn(x.shape, generator=g, dtype=dtype)
    if requires_grad:
        x.requires_grad_(True)
        w.requires_grad_(True)
    return x, w, gout


def _value_and_grads(fn, x, w, gout):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    h = fn(x, w)
    gx, gw = torch.autograd.grad(h, (x, w), gout, allow_unused=True)
    gx = torch.zeros_like(x) if gx is None else gx
    gw = torch.zeros_like(w) if gw is None else gw
    return h.detach(), gx, gw


FORESTS = {
    "single_vertex": lambda: single_vertex(),
    "two_vertices": lambda: torch.tensor([1, -1]),
    "random_one_tree": lambda: random_forest(24, 1, _gen(1)),
    "random_three_trees": lambda: random_forest(30, 3, _gen(2)),
    "random_deep": lambda: random_forest(25, 2, _gen(3), locality=2),
    "all_roots": lambda: all_roots(9),
    "star": lambda: star(13, center=5),
    "chain_shuffled": lambda: chain(17, _gen(4)),
}


# ---------------------------------------------------------------------------- hand-checked
@pytest.mark.parametrize("backend", BACKENDS)
def test_three_vertex_path_by_hand(backend):
    # path 0 - 1 - 2 rooted at 0; w[1] = 1/2, w[2] = 1/4; w[0] belongs to no edge
    tree = Tree.from_parent(torch.tensor([-1, 0, 1]))
    x = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    w = torch.tensor([[9.0], [0.5], [0.25]], dtype=torch.float64)
    # S(0,1) = 1/2, S(1,2) = 1/4, S(0,2) = 1/8
    expected = {
        "down": [1.0, 2.0 + 0.5 * 1.0, 4.0 + 0.25 * 2.5],            # 1, 2.5, 4.625
        "up": [1.0 + 0.5 * 3.0, 2.0 + 0.25 * 4.0, 4.0],              # 2.5, 3, 4
        "both": [1 + 0.5 * 2 + 0.125 * 4, 0.5 * 1 + 2 + 0.25 * 4,    # 2.5, 3.5, 4.625
                 0.125 * 1 + 0.25 * 2 + 4],
    }
    for direction, want in expected.items():
        h = tree_scan(x, w, tree, direction, backend=backend)
        assert h.squeeze(1).tolist() == pytest.approx(want, abs=1e-12), direction

    # L = sum(down scan): dL/dx = up(1) = [1 + 1/2 * 5/4, 1 + 1/4, 1];
    # dL/dw[e] = up(1)[e] * h[parent(e)]: w1 -> 5/4 * h0 = 5/4, w2 -> 1 * h1 = 5/2, w0 -> 0
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    tree_scan(xr, wr, tree, "down", backend=backend).sum().backward()
    assert xr.grad.squeeze(1).tolist() == pytest.approx([1.625, 1.25, 1.0], abs=1e-12)
    assert wr.grad.squeeze(1).tolist() == pytest.approx([0.0, 1.25, 2.5], abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_star_both_by_hand(backend):
    # root 0 with leaves 1 (w = 1/2) and 2 (w = 1/4): S(1, 2) = 1/8
    tree = Tree.from_parent(torch.tensor([-1, 0, 0]))
    x = torch.tensor([[1.0], [2.0], [4.0]], dtype=torch.float64)
    w = torch.tensor([[0.0], [0.5], [0.25]], dtype=torch.float64)
    h = tree_scan(x, w, tree, "both", backend=backend)
    assert h.squeeze(1).tolist() == pytest.approx([1 + 1 + 1, 0.5 + 2 + 0.5, 0.25 + 0.25 + 4])


# ---------------------------------------------------------------------------- against the oracle
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("forest", list(FORESTS))
def test_matches_dense_oracle(backend, direction, forest):
    parent = FORESTS[forest]()
    tree = Tree.from_parent(parent)
    x, w, gout = _inputs(parent.shape[0], 3, seed=len(forest))
    h, gx, gw = _value_and_grads(lambda a, b: tree_scan(a, b, tree, direction, backend=backend),
                                 x, w, gout)
    h0, gx0, gw0 = _value_and_grads(lambda a, b: dense_tree_scan(a, b, parent, direction),
                                    x, w, gout)
    torch.testing.assert_close(h, h0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gx0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, gw0, rtol=1e-10, atol=1e-12)
    roots = parent < 0
    assert torch.all(gw[roots] == 0), "weights of roots take no part and get no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_trailing_dims(backend, direction):
    parent = random_forest(20, 2, _gen(5))
    tree = Tree.from_parent(parent)
    x, w, gout = _inputs(20, (2, 3), seed=6)
    h, gx, gw = _value_and_grads(lambda a, b: tree_scan(a, b, tree, direction, backend=backend),
                                 x, w, gout)
    assert h.shape == (20, 2, 3)
    h0, gx0, gw0 = _value_and_grads(lambda a, b: dense_tree_scan(a, b, parent, direction),
                                    x, w, gout)
    torch.testing.assert_close(h, h0)
    torch.testing.assert_close(gx, gx0)
    torch.testing.assert_close(gw, gw0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matrix_inputs_add_no_view_to_the_graph(backend):
    # [N, C] inputs reach the operator as they are: no reshape node for autograd to walk
    # in every backward (a small scan's backward costs the host per node)
    tree = Tree.from_parent(random_forest(12, 2, _gen(8)))
    x, w, _ = _inputs(12, 3, seed=9, requires_grad=True)
    h = tree_scan(x, w, tree, "both", backend=backend)
    assert "View" not in type(h.grad_fn).__name__
    assert all("View" not in type(f).__name__ for f, _ in h.grad_fn.next_functions if f)
    v = tree_scan(x[:, 0], w[:, 0], tree, "both", backend=backend)  # [N] in, [N] out
    assert v.shape == (12,)
    torch.testing.assert_close(v, h[:, 0])  # the channels scan independently


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck(backend, direction):
    tree = Tree.from_parent(random_forest(8, 2, _gen(7)))
    x, w, _ = _inputs(8, 2, seed=8, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tree_scan(a, b, tree, direction, backend=backend),
                                    (x, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    tree = Tree.from_parent(empty())
    x, w, _ = _inputs(0, 4, requires_grad=True)
    h = tree_scan(x, w, tree, backend=backend)
    assert h.shape == (0, 4)
    h.sum().backward()
    assert x.grad.shape == (0, 4) and w.grad.shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forest_without_edges_is_the_identity(backend, direction, dtype):
    # every vertex a root: h = x whatever the weights (NaN, inf), the gradient of x is the
    # incoming one, that of the weights a zero tensor; the output is a new tensor
    tree = Tree.from_parent(all_roots(11))
    x = torch.randn(11, 2, 3, generator=_gen(40)).to(dtype).requires_grad_()
    w = torch.full((11, 2, 3), float("nan"), dtype=dtype)
    w[0] = float("inf")
    w.requires_grad_()
    h = tree_scan(x, w, tree, direction, backend=backend)
    assert torch.equal(h, x) and h.data_ptr() != x.data_ptr()
    g = torch.randn(11, 2, 3, generator=_gen(41)).to(dtype)
    h.backward(g)
    assert torch.equal(x.grad, g)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_kernels_degenerate_sizes(direction, dtype):
    # called directly, below the dispatcher that short-cuts empty tensors
    from treessm.ops import cpu

    for n, c in [(0, 3), (5, 0), (0, 0)]:
        tree = Tree.from_parent(random_forest(n, min(n, 2) or 0, _gen(9)) if n else empty())
        x = torch.zeros(n, c, dtype=dtype)
        layout = (tree.order, tree.child_ptr, tree.tree_ptr)
        h = cpu.forward(x, x, *layout, direction)
        gx, gw = cpu.backward(x, x, x, h, *layout, direction)
        assert h.shape == gx.shape == gw.shape == (n, c)
        assert h.dtype == gx.dtype == gw.dtype == dtype


# ---------------------------------------------------------------------------- deep chains
def _chain_loops(x, w):
    """O(N) scans of the chain 0 <- 1 <- ... <- n-1 by plain recurrences."""
    n = x.shape[0]
    down = [x[0]]
    for t in range(1, n):
        down.append(x[t] + w[t] * down[-1])
    up = [x[n - 1]]
    for t in range(n - 2, -1, -1):
        up.append(x[t] + w[t + 1] * up[-1])
    down = torch.stack(down)
    up = torch.stack(up[::-1])
    # on a path, every u lies on the root side or the leaf side of v
    return {"down": down, "up": up, "both": down + up - x}


@pytest.mark.parametrize("backend", BACKENDS)
def test_deep_chain_against_loops(backend):
    n = 2500
    x, w, gout = _inputs(n, 2, seed=10)
    tree = Tree.from_parent(chain(n))
    assert tree.max_depth == n - 1
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loops = _chain_loops(xr, wr)
    for direction in DIRECTIONS:
        h, gx, gw = _value_and_grads(
            lambda a, b: tree_scan(a, b, tree, direction, backend=backend), x, w, gout)
        gx0, gw0 = torch.autograd.grad(loops[direction], (xr, wr), gout, retain_graph=True)
        torch.testing.assert_close(h, loops[direction].detach())
        torch.testing.assert_close(gx, gx0)
        torch.testing.assert_close(gw, gw0)


def test_million_vertex_chain_numba():
    # closed form for x = 1, w = a on the path 0 <- 1 <- ... <- n-1:
    # both[t] = (1 - a^(t+1)) / (1 - a) + (1 - a^(n-t)) / (1 - a) - 1, and both is self-adjoint
    n, a = 10**6, 0.75
    tree = Tree.from_parent(torch.arange(-1, n - 1))
    x = torch.ones(n, 2, dtype=torch.float64, requires_grad=True)
    w = torch.full((n, 2), a, dtype=torch.float64, requires_grad=True)
    h = tree_scan(x, w, tree, "both", backend="numba")
    h.backward(torch.ones_like(h))
    t = np.arange(n, dtype=np.float64)
    want = (1 - a ** (t + 1)) / (1 - a) + (1 - a ** (n - t)) / (1 - a) - 1
    np.testing.assert_allclose(h[:, 0].detach().numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(x.grad[:, 1].numpy(), want, rtol=1e-12)
    assert torch.isfinite(w.grad).all() and w.grad[0].abs().sum() == 0
    for direction in ("up", "down"):
        hd = tree_scan(x.detach(), w.detach(), tree, direction, backend="numba")
        assert float(hd.max()) == pytest.approx(1 / (1 - a), rel=1e-12)


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_float32_close_to_float64(backend, direction):
    parent = random_forest(400, 4, _gen(11), locality=30)
    tree = Tree.from_parent(parent)
    x, w, gout = _inputs(400, 8, seed=12)
    fn = lambda a, b: tree_scan(a, b, tree, direction, backend=backend)  # noqa: E731
    ref = _value_and_grads(fn, x, w, gout)
    got = _value_and_grads(fn, x.float(), w.float(), gout.float())
    for r, g in zip(ref, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types(backend, dtype):
    parent = random_forest(60, 2, _gen(13))
    tree = Tree.from_parent(parent)
    x, w, gout = _inputs(60, 5, dtype=torch.float32, seed=14)
    x, w, gout = x.to(dtype), w.to(dtype), gout.to(dtype)
    for direction in DIRECTIONS:
        fn = lambda a, b: tree_scan(a, b, tree, direction, backend=backend)  # noqa: E731
        got = _value_and_grads(fn, x, w, gout)
        ref = _value_and_grads(fn, x.float(), w.float(), gout.float())  # same rounded inputs
        eps = torch.finfo(dtype).eps
        for r, g in zip(ref, got):
            assert g.dtype == dtype
            torch.testing.assert_close(g.float(), r, rtol=2 * eps,
                                       atol=2 * eps * float(r.abs().max()))


# ---------------------------------------------------------------------------- any finite weight
@pytest.mark.parametrize("backend", BACKENDS)
def test_both_exact_for_large_weights_by_hand(backend):
    # chain 0 <- 1 <- 2 with w = 1e4 and x = e_2: both = [S(2, 0), S(2, 1), 1] = [1e8, 1e4, 1];
    # a formula that removes a subtree's share by subtraction cancels it to [1e8, 0, -1e8]
    tree = Tree.from_parent(torch.tensor([-1, 0, 1]))
    x = torch.tensor([[0.0], [0.0], [1.0]])
    w = torch.tensor([[7.0], [1e4], [1e4]])
    h = tree_scan(x, w, tree, "both", backend=backend)
    assert h.squeeze(1).tolist() == [1e8, 1e4, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_float32_accurate_for_weights_above_one(backend, direction):
    # a chain of 50 and a random forest with weights in [1, 2): every direction and both
    # gradients within a few float32 roundings of the float64 oracle, element by element
    for parent, seed in ((chain(50), 31), (random_forest(60, 3, _gen(32)), 33)):
        tree = Tree.from_parent(parent)
        x, _, gout = _inputs(parent.shape[0], 2, seed=seed)
        x, gout = x.abs() + 0.1, gout.abs() + 0.1  # positive: no cancellation in the sums
        w = 1 + torch.rand(x.shape, generator=_gen(seed + 1), dtype=torch.float64)
        ref = _value_and_grads(lambda a, b: dense_tree_scan(a, b, parent, direction), x, w, gout)
        got = _value_and_grads(lambda a, b: tree_scan(a, b, tree, direction, backend=backend),
                               x.float(), w.float(), gout.float())
        for r, g in zip(ref, got):
            torch.testing.assert_close(g.double(), r, rtol=2e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_gives_inf_like_up_and_down(backend):
    # float32 overflow: the sums are +inf in every direction, never NaN
    tree = Tree.from_parent(chain(12))
    x = torch.ones(12, 2)
    w = torch.full((12, 2), 1e30)
    for direction in DIRECTIONS:
        h = tree_scan(x, w, tree, direction, backend=backend)
        assert not torch.isnan(h).any(), direction
        assert torch.isinf(h).any(), direction


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_unused_root_weights_do_not_leak(backend, direction):
    # the weights of roots belong to no edge: NaN or inf there changes nothing, and their
    # gradient is zero
    parent = random_forest(20, 3, _gen(34))
    tree = Tree.from_parent(parent)
    x, w, gout = _inputs(20, 3, seed=35)
    roots = parent < 0
    w_bad = w.clone()
    w_bad[roots] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=w.dtype)
    fn = lambda a, b: tree_scan(a, b, tree, direction, backend=backend)  # noqa: E731
    ref = _value_and_grads(fn, x, w, gout)
    got = _value_and_grads(fn, x, w_bad, gout)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


# ---------------------------------------------------------------------------- backends agree
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_backends_agree_on_grid_like_forest(direction):
    # larger than the oracle can take: a batch of random trees, checked backend against backend
    if len(BACKENDS) < 2:
        pytest.skip("only one CPU backend")
    n = 3000
    parent = random_forest(n, 7, _gen(15))  # shallow: the reference loops over levels
    tree = Tree.from_parent(parent)
    x, w, gout = _inputs(n, 33, seed=16)
    results = [_value_and_grads(lambda a, b: tree_scan(a, b, tree, direction, backend=be), x, w,
                                gout) for be in BACKENDS]
    for other in results[1:]:
        for r, g in zip(results[0], other):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- errors
def test_errors_at_public_boundary():
    tree = Tree.from_parent(random_forest(6, 1, _gen(17)))
    x = torch.randn(6, 3)
    w = torch.rand(6, 3)
    with pytest.raises(TypeError, match="x must be a Tensor"):
        tree_scan(x.tolist(), w, tree)
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        tree_scan(x, 0.5, tree)
    with pytest.raises(TypeError, match="tree must be a treessm.Tree"):
        tree_scan(x, w, tree.parent)
    with pytest.raises(ValueError, match="direction must be one of"):
        tree_scan(x, w, tree, "sideways")
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        tree_scan(x, w.double(), tree)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        tree_scan(x.long(), w.long(), tree)
    with pytest.raises(ValueError, match=r"weight must have the same shape as x, got \[6, 4\]"):
        tree_scan(x, torch.rand(6, 4), tree)
    with pytest.raises(ValueError, match=r"x must have one row per tree vertex \(6\), got 7"):
        tree_scan(torch.randn(7, 3), torch.rand(7, 3), tree)
    with pytest.raises(ValueError, match="backend must be one of"):
        tree_scan(x, w, tree, backend="fortran")
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors"):
        tree_scan(x, w, tree, backend="cuda")


def test_numba_backend_rejects_bad_direction():
    from treessm.ops import cpu

    tree = Tree.from_parent(star(4))
    with pytest.raises(ValueError, match="direction must be one of"):
        cpu.forward(torch.ones(4, 1), torch.ones(4, 1), tree.order, tree.child_ptr,
                    tree.tree_ptr, "left")


# ---------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_numba():
    tree = Tree.from_parent(random_forest(40, 3, _gen(18)))
    x, w, gout = _inputs(40, 4, dtype=torch.float32, seed=19)

    def f(a, b):
        return tree_scan(a * 2, b, tree, "both", backend="numba").sin()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    ref = _value_and_grads(f, x, w, gout)
    got = _value_and_grads(compiled, x, w, gout)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r)


def test_cuda_readiness_runs_outside_a_trace(monkeypatch):
    # the first CUDA call of a process may come inside torch.compile(fullgraph=True): the
    # readiness check loads the library and registers fake kernels, which dynamo cannot
    # trace, so it runs eagerly at trace time
    import importlib

    module = importlib.import_module("treessm.ops.tree_scan")
    lib = torch.library.Library("treessm_readiness_test", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: 2 * x, "CPU")

    def register():
        @torch.library.register_fake("treessm_readiness_test::twice")
        def _(x):
            return torch.empty_like(x)

    monkeypatch.setattr(module, "cuda_extension_available", lambda: True)
    monkeypatch.setattr(module, "_register_fakes", register)

    def f(x):
        if module._cuda_ready(False):
            return torch.ops.treessm_readiness_test.twice(x).sum()
        return x.sum()

    torch._dynamo.reset()
    assert float(torch.compile(f, fullgraph=True)(torch.ones(3))) == 6.0


def test_cuda_extension_check_runs_outside_a_trace(monkeypatch):
    # cuda_extension_available loads the library the first time (a lock, a library load),
    # which dynamo cannot trace; a graph layer's first forward may come inside a
    # fullgraph compile
    import threading

    import treessm.typing as typing

    lock = threading.Lock()

    def load():
        with lock:
            pass

    monkeypatch.setattr(typing, "load_cuda_extension", load)

    def f(x):
        return x * 2 if typing.cuda_extension_available() else x

    torch._dynamo.reset()
    assert torch.compile(f, fullgraph=True)(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_numba_same_bits_with_any_thread_count(direction):
    # the work split follows the threads: one item (one thread, or a small input), trees
    # cut into groups (a forest) or channels into blocks (one large tree); every split gives
    # the same bits
    numba = pytest.importorskip("numba")
    cases = [(random_forest(1500, 30, _gen(3)), 48),  # two groups of trees at two threads
             (random_forest(1200, 1, _gen(5)), 96),  # two blocks of channels
             (random_forest(40, 1, _gen(6)), 3)]  # one item
    threads = numba.get_num_threads()
    for parent, c in cases:
        tree = Tree.from_parent(parent)
        x, w, gout = _inputs(parent.numel(), c, torch.float32, seed=7)
        fn = lambda a, b: tree_scan(a, b, tree, direction, backend="numba")  # noqa: E731
        runs = []
        for t in sorted({1, threads}):
            numba.set_num_threads(t)
            try:
                runs.append(_value_and_grads(fn, x, w, gout))
            finally:
                numba.set_num_threads(threads)
        runs.append(_value_and_grads(fn, x, w, gout))
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b)
        if parent.numel() <= 100:  # the one-item path against the oracle too
            want = dense_tree_scan(x.double(), w.double(), parent, direction)
            torch.testing.assert_close(runs[0][0].double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("grad", [True, False])
def test_tiled_autograd_sums_the_addends_and_keeps_the_parts(monkeypatch, direction, grad):
    # _TiledScan (the eager path of "tiles" on a GPU) on the CPU, treessm.ops.cuda's calls
    # replaced by the torch reference (the plan is the tree): the output is the sum of the
    # forward's addends ("both" as two halves here, as its up scan and down scan there);
    # "both"'s backward takes the kept parts, not x nor the output; the others' take the
    # output; the gradients are autograd's through the reference
    from treessm.ops import cuda
    from treessm.ops.tree_scan import _TiledScan

    def reference(x, w, tree, direction):
        return tree_scan(x, w, tree, direction, backend="torch")

    def grads(g, x, w, tree, direction):
        with torch.enable_grad():
            xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
            return torch.autograd.grad(reference(xs, ws, tree, direction), (xs, ws), g)

    def forward_with_parts(x, w, tree, direction):
        h = reference(x, w, tree, direction)
        if direction == "both":
            return [h / 2, h / 2], [x.clone()]
        return [h], None

    def backward_from_parts(g, x, w, h, parts, tree, direction):
        if parts is not None:
            assert x is None and h is None
            gx, gw = grads(g, parts[0], w, tree, direction)
            return [gx / 2, gx / 2], gw
        assert torch.equal(h, reference(xr, w, tree, direction))
        gx, gw = grads(g, xr, w, tree, direction)
        return [gx], gw

    monkeypatch.setattr(cuda, "forward", reference)
    monkeypatch.setattr(cuda, "forward_with_parts", forward_with_parts)
    monkeypatch.setattr(cuda, "backward_from_parts", backward_from_parts)
    tree = Tree.from_parent(random_forest(60, 3, _gen(7)))
    xr, w, gout = _inputs(60, 5, seed=8)
    want = _value_and_grads(lambda a, b: reference(a, b, tree, direction), xr, w, gout)
    if not grad:
        assert torch.equal(_TiledScan.apply(xr, w, tree, direction), want[0])
        return
    x = xr.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    out = _TiledScan.apply(x, wg, tree, direction)
    torch.testing.assert_close(out, want[0], rtol=1e-12, atol=1e-12)
    if direction == "both":  # the kept parts, not x: x may change after the forward
        with torch.no_grad():
            x.add_(1.0)
    gx, gw = torch.autograd.grad(out, (x, wg), gout)
    torch.testing.assert_close(gx, want[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, want[2], rtol=1e-12, atol=1e-12)
