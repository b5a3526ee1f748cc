"""selective_tree_scan: the fused CPU kernels against the torch reference, the reference
against tree_scan on the expanded tensors and against the dense oracle."""
import functools
import math

import numba
import pytest
import torch

import treessm
from oracle import all_roots, chain, dense_tree_scan, empty, random_forest, single_vertex, star
from saved import saved_storages, storages
from treessm import Tree, selective_tree_scan, tree_scan
from treessm.ops.selective_scan import reference_tree_scan, selective_tree_scan_ref

DIRECTIONS = ("both", "up", "down")
RULES = ("child", "mean", "given")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


FORESTS = {
    "single_vertex": lambda: single_vertex(),
    "two_vertices": lambda: torch.tensor([1, -1]),
    "random_three_trees": lambda: random_forest(30, 3, _gen(2)),
    "all_roots": lambda: all_roots(9),
    "deep_chain": lambda: random_forest(60, 1, _gen(3), locality=2),
    "star": lambda: star(13, center=5),
    "many_trees": lambda: random_forest(1600, 40, _gen(4)),  # more than one work item
}


def _problem(parent, d=35, s=3, dtype=torch.float64, seed=0, rule="child", direction="both",
             skip=True, bias=True, initial=False):
    """Leaf tensors of one call and its keyword arguments."""
    g = _gen(seed)
    n = parent.shape[0]
    tree = Tree.from_parent(parent)
    t = {"u": torch.randn(n, d, generator=g, dtype=dtype),
         "delta": torch.randn(n, d, generator=g, dtype=dtype) - 1,
         "A": -torch.rand(d, s, generator=g, dtype=dtype) * 2,
         "B": torch.randn(n, s, generator=g, dtype=dtype),
         "C": torch.randn(n, s, generator=g, dtype=dtype)}
    if skip:
        t["D"] = torch.randn(d, generator=g, dtype=dtype)
    if bias:
        t["delta_bias"] = torch.randn(d, generator=g, dtype=dtype) * 0.5
    if rule == "given":
        t["edge_step"] = torch.randn(n, d, generator=g, dtype=dtype) - 1
    if initial:
        t["initial_state"] = torch.randn(tree.num_trees, d, s, generator=g, dtype=dtype)
    kw = {"direction": direction, "delta_softplus": True}
    if rule != "given":
        kw["edge_step"] = rule
    return tree, {k: v.requires_grad_() for k, v in t.items()}, kw


def _value_and_grads(fn, tree, leaves, kw, seed=1):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    out = fn(tree=tree, **leaves, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    g = _gen(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)
                .to(o.device)).sum() for o in outs)
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return outs, {k: torch.zeros_like(leaves[k]) if gr is None else gr
                  for k, gr in zip(names, grads)}


def _assert_same(got, want, rtol=1e-9, atol=1e-11):
    (go, gg), (wo, wg) = got, want
    for a, b in zip(go, wo):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for k in wg:
        torch.testing.assert_close(gg[k], wg[k], rtol=rtol, atol=atol, msg=f"gradient of {k}")


# ---------------------------------------------------------------------------- by hand
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_two_vertex_path_by_hand(backend):
    # 0 <- 1; steps 1 everywhere, A = log(1/2): w = 1/2; B = 1, so x = u = (1, 2); C = (1, 2)
    tree = Tree.from_parent(torch.tensor([-1, 0]))
    u = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    delta = torch.ones(2, 1, dtype=torch.float64)
    A = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    B = torch.ones(2, 1, dtype=torch.float64)
    C = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    expected = {"down": [1.0, 2 * (2 + 0.5 * 1)],      # h = (1, 2.5)
                "up": [1 + 0.5 * 2, 2 * 2.0],          # h = (2, 2)
                "both": [1 + 0.5 * 2, 2 * (2 + 0.5)]}  # h = (2, 2.5)
    for direction, want in expected.items():
        y = selective_tree_scan(u, delta, A, B, C, tree, direction=direction, backend=backend)
        assert y.squeeze(1).tolist() == pytest.approx(want, abs=1e-12), direction
    y = selective_tree_scan(u, delta, A, B, C, tree, D=torch.tensor([10.0], dtype=torch.float64),
                            backend=backend)
    assert y.squeeze(1).tolist() == pytest.approx([12.0, 25.0], abs=1e-12)


# ---------------------------------------------------------------------------- reference
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("forest", ["single_vertex", "random_three_trees", "all_roots",
                                    "deep_chain", "star"])
def test_reference_scan_matches_dense_oracle(forest, direction):
    parent = FORESTS[forest]()
    tree = Tree.from_parent(parent)
    g = _gen(5)
    x = torch.randn(parent.shape[0], 4, generator=g, dtype=torch.float64)
    # weights above 1 too: the "both" form adds no term only to take it back
    w = torch.rand(parent.shape[0], 4, generator=g, dtype=torch.float64) * 2.5
    gout = torch.randn(x.shape, generator=g, dtype=torch.float64)
    results = []
    for fn in (reference_tree_scan, lambda a, b, t, dr: dense_tree_scan(a, b, parent, dr)):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        h = fn(xa, wa, tree, direction)
        grads = torch.autograd.grad(h, (xa, wa), gout, allow_unused=True)
        results.append([h] + [torch.zeros_like(x) if gr is None else gr for gr in grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_reference_both_stays_accurate_with_large_weights():
    # on a long chain with w = 1.5 the subtractive recurrence of "both" loses all digits in
    # float32; the sibling-sum form does not
    n = 60
    parent = chain(n)
    tree = Tree.from_parent(parent)
    x = torch.randn(n, 2, generator=_gen(6), dtype=torch.float64)
    w = torch.full((n, 2), 1.5, dtype=torch.float64)
    want = dense_tree_scan(x, w, parent, "both")
    got = reference_tree_scan(x.float(), w.float(), tree, "both").double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_reference_is_the_expanded_scan(direction):
    tree, leaves, kw = _problem(random_forest(25, 2, _gen(7)), d=4, s=3, rule="mean",
                                direction=direction, initial=direction == "down")
    y = selective_tree_scan_ref(tree=tree, **leaves, **kw)
    # the definition written out: expand, scan with tree_scan and with the dense oracle
    delta = torch.nn.functional.softplus(leaves["delta"] + leaves["delta_bias"])
    p = torch.where(tree.parent >= 0, tree.parent, torch.arange(25))
    edge = 0.5 * (delta + delta[p])
    x = delta[:, :, None] * leaves["B"][:, None, :] * leaves["u"][:, :, None]
    w = torch.exp(edge[:, :, None] * leaves["A"])
    if direction == "down":
        x = x.index_add(0, tree.roots, w[tree.roots] * leaves["initial_state"])
    for h in (tree_scan(x, w, tree, direction, backend="torch"),
              tree_scan(x, w, tree, direction, backend="numba"),
              dense_tree_scan(x, w, tree.parent, direction)):
        want = (h * leaves["C"][:, None, :]).sum(-1) + leaves["D"] * leaves["u"]
        torch.testing.assert_close(y, want)


# ---------------------------------------------------------------------------- fused vs reference
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("forest", list(FORESTS))
def test_fused_matches_reference(forest, direction, rule):
    tree, leaves, kw = _problem(FORESTS[forest](), rule=rule, direction=direction)
    want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
    got = _value_and_grads(lambda **a: selective_tree_scan(**a, backend="numba"), tree, leaves, kw)
    _assert_same(got, want)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_softplus_steps_keep_only_their_output(backend, dtype, monkeypatch):
    """With delta_softplus the backward keeps the steps after their softplus (which the
    scan keeps anyway), not the steps before it, and its gradients are those of torch's
    softplus, for steps from -60 to 60 (beyond torch's threshold of 20 the softplus is the
    identity). Off the CPU large steps take this softplus; here it is asked for."""
    from treessm.ops import recompute

    monkeypatch.setattr(recompute, "keeps_less", lambda x, *others: x.requires_grad)
    tree, leaves, kw = _problem(FORESTS["random_three_trees"](), dtype=dtype, bias=False)
    with torch.no_grad():
        leaves["delta"].copy_(torch.linspace(-60, 60, leaves["delta"].numel(), dtype=dtype)
                              .view_as(leaves["delta"]))
    run = functools.partial(selective_tree_scan, backend=backend)
    kept, _ = saved_storages(run, tree=tree, **leaves, **kw)
    assert storages(leaves["u"]) <= kept  # the hook sees the leaves
    assert not storages(leaves["delta"]) & kept
    got = _value_and_grads(run, tree, leaves, kw)

    def with_torch_softplus(delta, **a):
        return run(delta=torch.nn.functional.softplus(delta), **a)

    want = _value_and_grads(with_torch_softplus, tree, leaves, dict(kw, delta_softplus=False))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    _assert_same(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fused_norm_states_and_initial_state(direction):
    tree, leaves, kw = _problem(random_forest(40, 3, _gen(8)), d=19, s=5, rule="mean",
                                direction=direction, initial=direction == "down")
    g = _gen(9)
    leaves["norm_weight"] = torch.randn(19, 5, generator=g, dtype=torch.float64).requires_grad_()
    leaves["norm_bias"] = torch.randn(19 * 5, generator=g, dtype=torch.float64).requires_grad_()
    kw.update(state_norm=True, state_vertices=torch.tensor([4, 0, 39, 4]))
    want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
    got = _value_and_grads(lambda **a: selective_tree_scan(**a, backend="numba"), tree, leaves, kw)
    _assert_same(got, want)
    (y, states), _ = got
    assert states.shape == (4, 19, 5) and torch.equal(states[0], states[3])


@pytest.mark.parametrize("skip", [True, False])
def test_fused_norm_without_affine(skip):
    tree, leaves, kw = _problem(random_forest(20, 1, _gen(10)), d=6, s=2, skip=skip)
    kw["state_norm"] = True
    want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
    got = _value_and_grads(lambda **a: selective_tree_scan(**a, backend="numba"), tree, leaves, kw)
    _assert_same(got, want)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("d", [5, 37])
def test_normalised_readout_kernels_and_torch_formulas(affine, d):
    # the read-out of normalised states: numba's forward and backward and the written-out
    # torch derivative (the path of other devices) against autograd of the torch formula;
    # 37 channels: the kernels' sums over channels in sixteen lanes, then the rest
    from treessm.ops.selective_scan import (_readout_backward_reference, _readout_reference,
                                            selective_scan_cpu)
    g = _gen(30)
    n, s = 9, 3
    t = [torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g,
         dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64) * 20,
         torch.randn(n, s, generator=g, dtype=torch.float64)]
    t += [torch.randn(d, s, generator=g, dtype=torch.float64) if affine else None] * 2
    t += [torch.randn(n, d, generator=g, dtype=torch.float64),
          torch.randn(d, generator=g, dtype=torch.float64) if affine else None]
    leaves = [None if v is None else v.clone().requires_grad_() for v in t]
    want = _readout_reference(*leaves, 1e-5)
    gy = torch.randn(n, d, generator=g, dtype=torch.float64)
    present = [v for v in leaves if v is not None]
    want_grads = iter(torch.autograd.grad(want, present, gy, allow_unused=True))
    want_grads = [None if v is None else next(want_grads) for v in leaves]
    torch.testing.assert_close(selective_scan_cpu.normalised_readout(*t, 1e-5), want.detach())
    for got in (selective_scan_cpu.normalised_readout_backward(gy, *t, 1e-5),
                _readout_backward_reference(gy, *t, 1e-5)):
        for a, b in zip(got, want_grads):
            assert (a is None) == (b is None)
            if b is not None:
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_float32_many_states_deep_chain(direction):
    # nine states run in chunks; a chain of 150 and a bushy tree; float32 against float64
    parent = torch.cat([chain(150), random_forest(100, 1, _gen(11)) + 150])
    parent[150] = -1
    tree64, leaves, kw = _problem(parent, d=40, s=9, rule="mean", direction=direction)
    kw.update(state_norm=True, state_vertices=torch.tensor([149, 151]))
    want = _value_and_grads(selective_tree_scan_ref, tree64, leaves, kw)
    leaves32 = {k: v.detach().float() for k, v in leaves.items()}
    got = _value_and_grads(lambda **a: selective_tree_scan(**a, backend="numba"), tree64,
                           leaves32, kw)
    for a, b in zip(got[0], want[0]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    for k in want[1]:
        b = want[1][k]
        torch.testing.assert_close(got[1][k].double(), b, rtol=1e-3,
                                   atol=1e-4 * b.abs().max().item(), msg=k)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_float32_one_state_wide_blocks(direction):
    # one state per channel: blocks of 96 channels (three 32-lane groups) per vertex
    tree64, leaves, kw = _problem(random_forest(80, 2, _gen(21)), d=70, s=1, rule="child",
                                  direction=direction)
    kw["state_norm"] = True
    want = _value_and_grads(selective_tree_scan_ref, tree64, leaves, kw)
    leaves32 = {k: v.detach().float() for k, v in leaves.items()}
    got = _value_and_grads(lambda **a: selective_tree_scan(**a, backend="numba"), tree64,
                           leaves32, kw)
    torch.testing.assert_close(got[0][0].double(), want[0][0], rtol=1e-4, atol=1e-4)
    for k in want[1]:
        b = want[1][k]
        torch.testing.assert_close(got[1][k].double(), b, rtol=1e-3,
                                   atol=1e-4 * b.abs().max().item(), msg=k)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_float32_states_chunked_by_the_scratch_budget(direction, monkeypatch):
    # a budget of about one [N, D] array: four states of 32 channels do not fit a lane row
    # of the backward, which takes two states of 16 channels (40 channels: a short last
    # block), and a large tree's layout on a small one
    from treessm.ops import selective_scan_cpu

    monkeypatch.setattr(selective_scan_cpu, "_SCRATCH_MIN", 1)
    lanes = []
    chosen = selective_scan_cpu._lanes
    monkeypatch.setattr(selective_scan_cpu, "_lanes",
                        lambda *a: lanes.append(chosen(*a)) or lanes[-1])
    tree64, leaves, kw = _problem(random_forest(300, 2, _gen(31)), d=40, s=4, rule="mean",
                                  direction=direction)
    kw.update(state_norm=True, state_vertices=torch.tensor([3, 150]))
    want = _value_and_grads(selective_tree_scan_ref, tree64, leaves, kw)
    leaves32 = {k: v.detach().float() for k, v in leaves.items()}
    got = _value_and_grads(lambda **a: selective_tree_scan(**a, backend="numba"), tree64,
                           leaves32, kw)
    assert (2, 16, 3) in lanes  # the backward's chunks
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    for k in want[1]:
        b = want[1][k]
        torch.testing.assert_close(got[1][k].double(), b, rtol=1e-3,
                                   atol=1e-4 * b.abs().max().item(), msg=k)


def test_lanes_halve_the_blocks_only_where_the_budget_cuts_the_states():
    from treessm.ops.selective_scan_cpu import _lanes

    big = 1 << 40
    assert _lanes(4, 128, 4, 1000, big) == (4, 32, 4)  # whole
    assert _lanes(16, 1536, 4, 1000, big) == (4, 32, 48)  # lane cap, not the budget
    rows = 5 * 10 ** 5
    assert _lanes(4, 128, 4, rows, rows * 32 * 4) == (2, 16, 8)  # one state of 32 fits
    assert _lanes(4, 128, 4, rows, rows * 64 * 4) == (4, 16, 8)  # two states of 32 fit
    assert _lanes(4, 128, 8, rows, rows * 16 * 8) == (1, 16, 8)  # float64: 16 is the least
    assert _lanes(1, 70, 4, rows, 1) == (1, 32, 3)  # one state: nothing to gain


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_run_in_float32(dtype):
    tree, leaves, kw = _problem(random_forest(30, 2, _gen(12)), d=8, s=4, rule="mean")
    half = {k: v.detach().to(dtype) for k, v in leaves.items()}
    kw["state_vertices"] = torch.tensor([0])
    got = _value_and_grads(lambda **a: selective_tree_scan(**a, backend="numba"), tree, half, kw)
    want = _value_and_grads(selective_tree_scan_ref, tree, half, kw)
    (y, states), grads = got
    assert y.dtype == dtype and states.dtype == torch.float32
    assert all(grads[k].dtype == dtype for k in grads)
    torch.testing.assert_close(y.float(), want[0][0].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(states, want[0][1], rtol=1e-5, atol=1e-5)
    for k in grads:
        scale = want[1][k].float().abs().max().item()
        torch.testing.assert_close(grads[k].float(), want[1][k].float(), rtol=5e-2,
                                   atol=3e-2 * scale, msg=k)


# ---------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_gradcheck(direction):
    tree, leaves, kw = _problem(random_forest(7, 2, _gen(13)), d=3, s=2, rule="mean",
                                direction=direction, initial=direction == "down")
    g = _gen(14)
    leaves["norm_weight"] = torch.randn(3, 2, generator=g, dtype=torch.float64).requires_grad_()
    leaves["norm_bias"] = torch.randn(3, 2, generator=g, dtype=torch.float64).requires_grad_()
    kw.update(state_norm=True, state_vertices=torch.tensor([1, 1, 6]))
    names = list(leaves)

    def f(*values):
        y, states = selective_tree_scan(tree=tree, **dict(zip(names, values)), **kw,
                                        backend="numba")
        return y, states

    assert torch.autograd.gradcheck(f, tuple(leaves[k] for k in names))


@pytest.mark.parametrize("name", list(FORESTS) + ["empty"])
def test_children_sums_match_the_definition(name):
    # each vertex's children summed (a sparse product in a fixed order),
    # against a loop over the parent array; roots and leaves get exact zeros
    from treessm.ops.selective_scan import children_sums

    parent = empty() if name == "empty" else FORESTS[name]()
    tree = Tree.from_parent(parent)
    values = torch.randn(tree.num_nodes, 3, generator=_gen(50), dtype=torch.float64)
    want = torch.zeros_like(values)
    for v, p in enumerate(parent.tolist()):
        if p >= 0:
            want[p] += values[v]
    got = children_sums(values, tree)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    leaves = torch.ones(tree.num_nodes, dtype=torch.bool)
    leaves[parent[parent >= 0]] = False
    assert torch.equal(got[leaves], torch.zeros_like(got[leaves]))
    assert children_sums(values.float(), tree).dtype == torch.float32


def test_gradcheck_given_edge_steps():
    tree, leaves, kw = _problem(random_forest(6, 1, _gen(15)), d=2, s=2, rule="given",
                                direction="both")
    names = list(leaves)
    assert torch.autograd.gradcheck(
        lambda *v: selective_tree_scan(tree=tree, **dict(zip(names, v)), **kw, backend="numba"),
        tuple(leaves[k] for k in names))


# ---------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_empty_input(backend):
    tree, leaves, kw = _problem(empty(), d=5, s=2)
    y = selective_tree_scan(tree=tree, **leaves, **kw, backend=backend)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert leaves["u"].grad.shape == (0, 5) and leaves["A"].grad.shape == (5, 2)
    assert torch.all(leaves["A"].grad == 0)


def test_no_states_is_the_skip_alone():
    tree, leaves, kw = _problem(random_forest(10, 1, _gen(16)), d=3, s=0)
    y = selective_tree_scan(tree=tree, **leaves, **kw)
    torch.testing.assert_close(y, leaves["D"] * leaves["u"])


def test_bitwise_deterministic_with_any_thread_count(monkeypatch):
    from treessm.ops import selective_scan_cpu

    # threads share this problem's work items (its states are fewer than a thread's minimum)
    monkeypatch.setattr(selective_scan_cpu, "_STATES_PER_THREAD", 1)
    tree, leaves, kw = _problem(torch.cat([random_forest(1500, 1, _gen(17)),
                                           random_forest(1500, 30, _gen(18)) + 1500]),
                                d=40, s=3, dtype=torch.float32, rule="mean")
    kw.update(state_norm=True)
    fn = lambda **a: selective_tree_scan(**a, backend="numba")  # noqa: E731
    first = _value_and_grads(fn, tree, leaves, kw)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = _value_and_grads(fn, tree, leaves, kw)
    finally:
        numba.set_num_threads(threads)
    again = _value_and_grads(fn, tree, leaves, kw)
    for other in (single, again):
        for a, b in zip(first[0], other[0]):
            assert torch.equal(a, b)
        for k in first[1]:
            assert torch.equal(first[1][k], other[1][k]), k


@pytest.mark.parametrize("case", ["both_moments_states", "up_gamma", "down_initial_given"])
def test_blocks_in_batches_give_the_same_bits(case, monkeypatch):
    # past _BATCH_BYTES the kernels take the blocks of channels a few at a time (as many as
    # threads, one with one thread); every output and gradient must be the same bits as
    # all blocks at once: each block's work is its own, and the sums over blocks run in the
    # same order (70 channels: three blocks of 32, the last one short)
    from treessm.ops import selective_scan_cpu

    parent = torch.cat([random_forest(400, 1, _gen(40)), random_forest(300, 20, _gen(41)) + 400])
    direction, rule = {"both_moments_states": ("both", "mean"), "up_gamma": ("up", "child"),
                       "down_initial_given": ("down", "given")}[case]
    tree, leaves, kw = _problem(parent, d=70, s=3, dtype=torch.float32, rule=rule,
                                direction=direction, initial=direction == "down")
    if case == "both_moments_states":
        kw.update(state_norm=True, state_vertices=torch.tensor([5, 450, 5]))
    if case == "up_gamma":
        kw.update(state_norm=True, norm_weight=torch.randn(70, 3, generator=_gen(42)))
    fn = lambda **a: selective_tree_scan(**a, backend="numba")  # noqa: E731
    whole = _value_and_grads(fn, tree, leaves, kw)
    batches = []
    run_batches = selective_scan_cpu._Run.batches
    monkeypatch.setattr(selective_scan_cpu, "_BATCH_BYTES", 1)
    monkeypatch.setattr(selective_scan_cpu._Run, "batches",
                        lambda self: batches.append(list(run_batches(self))) or batches[-1])
    threads = numba.get_num_threads()
    try:
        for count in (1, threads):
            numba.set_num_threads(count)
            batched = _value_and_grads(fn, tree, leaves, kw)
            for a, b in zip(whole[0], batched[0]):
                assert torch.equal(a, b)
            for k in whole[1]:
                assert torch.equal(whole[1][k], batched[1][k]), k
    finally:
        numba.set_num_threads(threads)
    assert [(0, 1), (1, 1), (2, 1)] in batches  # one block at a time with one thread


def test_torch_compile_fullgraph():
    tree, leaves, kw = _problem(random_forest(30, 3, _gen(19)), d=6, s=3, dtype=torch.float32,
                                rule="mean")
    kw.update(state_norm=True, state_vertices=torch.tensor([2, 5]))

    def f(**a):
        y, states = selective_tree_scan(**a, backend="numba")
        return y.sin(), states * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    want = _value_and_grads(f, tree, leaves, kw)
    got = _value_and_grads(compiled, tree, leaves, kw)
    _assert_same(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_cuda_matches_reference(direction):
    tree, leaves, kw = _problem(random_forest(50, 3, _gen(20)), d=7, s=3, rule="mean",
                                direction=direction, initial=direction == "down")
    kw.update(state_norm=True, state_vertices=torch.tensor([0, 7]))
    want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
    cuda = {k: v.detach().cuda() for k, v in leaves.items()}
    kw_cuda = {**kw, "state_vertices": kw["state_vertices"].cuda()}
    got = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw_cuda)
    _assert_same(([o.cpu() for o in got[0]], {k: v.cpu() for k, v in got[1].items()}), want)


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_forests():
    g = _gen(40)
    return {"single_vertex": torch.tensor([-1]), "many_roots": random_forest(60, 9, g),
            "star": star(40, 5), "deep": random_forest(300, 2, g, locality=2),
            "long_chain": chain(2500, g), "random": random_forest(200, 1, g)}


@_CUDA
@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("rule", ["child", "mean", "given"])
@pytest.mark.parametrize("name", list(_cuda_forests()))
def test_cuda_fused_walk_matches_reference(name, rule, direction, monkeypatch):
    # the fused walk kernels (never the expanded path), with requested states and (down)
    # incoming states
    from treessm.ops import selective_scan as module

    def expanded(*args, **kwargs):
        raise AssertionError("the fused CUDA kernels should run this problem")

    monkeypatch.setattr(module, "expanded_in_blocks", expanded)
    parent = _cuda_forests()[name]
    tree, leaves, kw = _problem(parent, d=70, s=5, rule=rule, direction=direction,
                                initial=direction == "down")
    kw["state_vertices"] = torch.tensor([0, parent.numel() - 1, 0])
    want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
    cuda = {k: v.detach().cuda() for k, v in leaves.items()}
    kw_cuda = {**kw, "state_vertices": kw["state_vertices"].cuda()}
    got = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw_cuda)
    _assert_same(([o.cpu() for o in got[0]], {k: v.cpu() for k, v in got[1].items()}), want)


def test_lanes_per_channel_fills_the_device_up_to_the_padded_states():
    from treessm.ops.selective_scan_cuda import WARPS_PER_SM, lanes_per_channel
    # 4 trees of 1536 channels on 132 multiprocessors: 192 warps per lane
    assert lanes_per_channel(4, 1536, 16, 132) == 8
    assert lanes_per_channel(4, 1536, 16, 132 // 8) == 1
    assert lanes_per_channel(1, 1536, 16, 132) == 16
    assert lanes_per_channel(4, 1536, 3, 132) == 4      # at most d_state padded
    assert lanes_per_channel(4, 1536, 1, 132) == 1
    assert lanes_per_channel(3000, 40, 16, 132) == 1    # block rows stop at 2048
    # the smallest power of two that reaches the target
    def warps(trees, channels, lanes):  # blocks of two warps, 64 / lanes channels each
        return trees * 2 * -(-channels * lanes // 64)

    for trees, channels, sms in [(1, 70, 132), (2, 300, 16), (9, 64, 8), (1, 1, 1)]:
        p = lanes_per_channel(trees, channels, 16, sms)
        assert p == 16 or warps(trees, channels, p) >= WARPS_PER_SM * sms
        assert p == 1 or warps(trees, channels, p // 2) < WARPS_PER_SM * sms


@_CUDA
@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("lanes", [1, 2, 4, 8, 16])
def test_cuda_fused_walk_lanes_match_reference_and_one_lane(lanes, direction, monkeypatch):
    # every lane count, 13 states (not a multiple of 2..16), 70 channels (not a multiple of
    # a block's 64 / lanes); all but the gradients of B and C (sums over a warp's channels)
    # are the same bits for every lane count
    from treessm.ops import selective_scan_cuda

    parent = _cuda_forests()["deep"]
    tree, leaves, kw = _problem(parent, d=70, s=13, rule="mean", direction=direction,
                                initial=direction == "down")
    kw["state_vertices"] = torch.tensor([0, parent.numel() - 1, 0])
    cuda = {k: v.detach().cuda() for k, v in leaves.items()}
    kw_cuda = {**kw, "state_vertices": kw["state_vertices"].cuda()}
    tree_cuda = tree.cuda()

    def run(p):
        monkeypatch.setattr(selective_scan_cuda, "lanes_per_channel", lambda *args: p)
        return _value_and_grads(selective_tree_scan, tree_cuda, cuda, kw_cuda)

    got, one = run(lanes), run(1)
    want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
    _assert_same(([o.cpu() for o in got[0]], {k: v.cpu() for k, v in got[1].items()}), want)
    for a, b in zip(got[0], one[0]):
        assert torch.equal(a, b)
    for k in got[1]:
        if k not in ("B", "C"):
            assert torch.equal(got[1][k], one[1][k]), k


def test_kept_checkpoints_take_no_more_memory_than_u():
    from treessm.ops.selective_scan_cuda import kept_rows
    from treessm.ops.walk import slot_bound
    # 4 sequences of 2,048 tokens in float32: one slot a segment of 32; the bound of a
    # forest built on the GPU is 12 times that
    assert kept_rows([256, 1], 8192, 1536, 16) == 256
    assert kept_rows([slot_bound(8192, 4, 2048, 32), 0], 8192, 1536, 16) == 0
    assert kept_rows([512, 0], 8192, 1536, 16) == 512   # as many bytes as u
    assert kept_rows([513, 0], 8192, 1536, 16) == 0
    assert kept_rows([0, 0], 0, 1536, 16) == kept_rows([5, 0], 10, 0, 1) == 0


@_CUDA
@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_fused_walk_backward_from_kept_checkpoints(direction, dtype, monkeypatch):
    # chains: the forward keeps the backward's checkpoints; the gradients are the bits of a
    # backward that walks the tree for them itself, and match the reference
    from treessm.ops import selective_scan_cuda

    second = chain(300, _gen(4))
    parent = torch.cat([chain(700, _gen(3)), torch.where(second >= 0, second + 700, -1)])
    tree, leaves, kw = _problem(parent, d=40, s=8, dtype=dtype, rule="child",
                                direction=direction, initial=direction == "down")
    cuda = {k: v.detach().cuda() for k, v in leaves.items()}
    kept, real = [], selective_scan_cuda.kept_rows
    monkeypatch.setattr(selective_scan_cuda, "kept_rows",
                        lambda *a: kept.append(real(*a)) or kept[-1])
    got = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw)
    assert kept and kept[-1] > 0
    monkeypatch.setattr(selective_scan_cuda, "kept_rows", lambda *a: 0)
    again = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw)
    for a, b in zip(got[0], again[0]):
        assert torch.equal(a, b)
    for k in got[1]:
        assert torch.equal(got[1][k], again[1][k]), k
    if dtype == torch.float64:
        want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
        _assert_same(([o.cpu() for o in got[0]], {k: v.cpu() for k, v in got[1].items()}), want)


@_CUDA
@pytest.mark.parametrize("rule", ["child", "mean", "given"])
def test_cuda_chain_kernel_matches_the_walk_and_the_reference(rule, monkeypatch):
    # the backward of "down" over a forest of chains runs by the time-parallel chain kernel:
    # the reference's gradients (float64), incoming and requested states, chains longer than
    # a piece of 64 positions and of one vertex; the walk's outputs, its gradients but for
    # rounding
    from treessm.ops import selective_scan_cuda

    g = _gen(8)
    parts, offset = [], 0
    for n in (600, 1, 40, 300):
        p = chain(n, g)
        parts.append(torch.where(p >= 0, p + offset, -1))
        offset += n
    parent = torch.cat(parts)
    tree, leaves, kw = _problem(parent, d=21, s=5, rule=rule, direction="down", initial=True)
    kw["state_vertices"] = torch.tensor([0, 599, 640, 5])
    cuda = {k: v.detach().cuda() for k, v in leaves.items()}
    kw_cuda = {**kw, "state_vertices": kw["state_vertices"].cuda()}
    assert selective_scan_cuda.layout(tree.cuda(), torch.float64)[1][1] == 1  # chains
    got = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw_cuda)
    want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
    _assert_same(([o.cpu() for o in got[0]], {k: v.cpu() for k, v in got[1].items()}), want)
    real = selective_scan_cuda.layout
    monkeypatch.setattr(selective_scan_cuda, "layout",
                        lambda t, dt: (real(t, dt)[0], [real(t, dt)[1][0], 0]))
    walked = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw_cuda)
    for a, b in zip(got[0], walked[0]):
        assert torch.equal(a, b)
    for k in got[1]:
        torch.testing.assert_close(got[1][k], walked[1][k], rtol=1e-12, atol=1e-12)


@_CUDA
@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_walk_low_precision_and_many_trees(dtype, direction):
    # 3000 trees: block rows stride over the trees; 16 states; float32 state for 16-bit input
    g = _gen(41)
    parent = random_forest(9000, 3000, g)
    tree, leaves, kw = _problem(parent, d=40, s=16, dtype=dtype, direction=direction)
    cuda = {k: v.detach().cuda() for k, v in leaves.items()}
    got = _value_and_grads(selective_tree_scan, tree.cuda(), cuda, kw)
    got = ([o.cpu() for o in got[0]], {k: v.cpu() for k, v in got[1].items()})
    if dtype == torch.float32:
        want = _value_and_grads(selective_tree_scan_ref, tree, leaves, kw)
        _assert_same(got, want, rtol=1e-4, atol=1e-4)
        return
    # 16-bit: against the float32 reference on the same rounded inputs, in norm (a rounded
    # result is off by about 2^-9 of its size; elementwise, near-zero entries dominate)
    want = _value_and_grads(selective_tree_scan_ref, tree,
                            {k: v.detach().float() for k, v in leaves.items()}, kw)
    pairs = list(zip(got[0], want[0])) + [(got[1][k], want[1][k]) for k in want[1]]
    for a, b in pairs:
        assert a.shape == b.shape
        assert ((a.float() - b).norm() / b.norm()).item() < 8e-3


@_CUDA
@pytest.mark.parametrize("direction", ["down", "up"])
def test_cuda_fused_walk_is_bitwise_reproducible_and_matches_numba_at_scale(direction):
    g = _gen(42)
    parent = random_forest(100_000, 4, g, locality=50)
    tree, leaves, kw = _problem(parent, d=64, s=4, dtype=torch.float32, rule="mean",
                                direction=direction)
    cuda = {k: v.detach().cuda() for k, v in leaves.items()}
    tree_cuda = tree.cuda()
    first = _value_and_grads(selective_tree_scan, tree_cuda, cuda, kw)
    again = _value_and_grads(selective_tree_scan, tree_cuda, cuda, kw)
    for a, b in zip(first[0], again[0]):
        assert torch.equal(a, b)
    for k in first[1]:
        assert torch.equal(first[1][k], again[1][k]), k
    cpu = _value_and_grads(selective_tree_scan, tree, leaves, kw)
    _assert_same(([o.cpu() for o in first[0]], {k: v.cpu() for k, v in first[1].items()}), cpu,
                 rtol=1e-3, atol=1e-3)


@_CUDA
@pytest.mark.parametrize("direction", ["down", "up"])
def test_cuda_fused_walk_gradcheck(direction):
    tree, leaves, kw = _problem(random_forest(12, 2, _gen(43)), d=3, s=2, rule="mean",
                                direction=direction, initial=direction == "down")
    assert_cuda_gradcheck(tree, leaves, kw)


def assert_cuda_gradcheck(tree, leaves, kw):
    """``gradcheck`` of :func:`selective_tree_scan` on CUDA in every leaf tensor."""
    tree = tree.cuda()
    names = list(leaves)
    args = [leaves[k].detach().cuda().requires_grad_() for k in names]

    def f(*xs):
        return selective_tree_scan(tree=tree, **dict(zip(names, xs)), **kw)

    assert torch.autograd.gradcheck(f, args)


def test_exported():
    assert treessm.selective_tree_scan is selective_tree_scan
    assert treessm.ops.selective_tree_scan is selective_tree_scan
