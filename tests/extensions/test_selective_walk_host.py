"""The fused CUDA selective scan (``extensions/treessm_cuda/walk_kernels.cuh``) compiled for
the host and run with one thread per CUDA thread, against the readable reference
:func:`treessm.ops.selective_scan.selective_tree_scan_ref`: outputs, states and every
gradient, on forests whose walks use every flag of the plan (first, middle and last
children, deep stacks, segments that start inside them), with each edge-step rule, incoming
states and requested states, for every number of lanes per channel (the same bits for all
but the gradients of B and C), in float64 and float32. The backward starts from the
checkpoints the forward kept, which the harness checks against those of a walk of their
own. The backward over forests of chains also runs through the chain kernel (parallel in
time)."""
import subprocess

import numpy as np
import pytest
import torch

import treessm
from emulation import compile_harness
from oracle import all_roots, chain, random_forest, star
from treessm.ops.selective_scan import selective_tree_scan_ref
from treessm.ops.walk import _plan, walk_plan

SEGMENT = {torch.float64: 16, torch.float32: 32}  # walk_kernels.cuh: Segment<T>::K
ROWS = 2      # block rows over the trees: each strides over several
#: Gradients summed over the channels of a warp, whose order depends on the lanes per channel.
CHANNEL_SUMS = ("gB", "gC")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "walk_harness.cpp")


def _forests():
    g = torch.Generator().manual_seed(5)
    binary = torch.tensor([-1] + [(i - 1) // 2 for i in range(1, 63)])
    return {
        "single_vertex": torch.tensor([-1]),
        "random": random_forest(45, 1, g),
        "many_roots": random_forest(40, 6, g),
        "all_roots": all_roots(5),
        "star": star(20, 3),
        "deep": random_forest(70, 2, g, locality=2),
        "chain": chain(40, g),
        "binary": binary,
    }


def _pad(s):
    return 1 << (s - 1).bit_length()


def _run(harness, tmp, parent, d, s, rule, with_h0, with_states, seed=0, direction="down",
         lanes=1, dtype=torch.float64, tol=(1e-9, 1e-9), bounded=False, chains=False):
    """The harness's outputs, checked against the float64 reference with ``tol`` (rtol,
    atol); ``lanes`` per channel, states and sums in ``dtype``; ``bounded``: the plan's
    slot count is the host-side bound of a recorded build, not the walk's own; ``chains``:
    the backward by the chain kernel."""
    tree = treessm.Tree.from_parent(parent)
    n, t = parent.numel(), tree.num_trees
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    u = torch.randn(n, d, generator=g, **f64)
    dx = 0.1 + torch.rand(n, d, generator=g, **f64)
    de = 0.1 + torch.rand(n, d, generator=g, **f64)
    A = -torch.rand(d, s, generator=g, **f64) * 2
    B, C = torch.randn(n, s, generator=g, **f64), torch.randn(n, s, generator=g, **f64)
    h0 = torch.randn(t, d, s, generator=g, **f64) if with_h0 else None
    sv = torch.randint(0, n, (5,), generator=g) if with_states else None
    gy = torch.randn(n, d, generator=g, **f64)
    gs = torch.randn(5, d, s, generator=g, **f64) if with_states else None
    plan = _plan(tree, SEGMENT[dtype], bounded=True) if bounded else walk_plan(tree, SEGMENT[dtype])
    from treessm.ops.selective_scan import _state_rows
    srow, snext = _state_rows(sv, n, "cpu")
    k = snext.numel()
    src, dst = tmp / "in.bin", tmp / "out.bin"
    rule_id = ("child", "mean", "given").index(rule)
    zeros = lambda *shape: torch.zeros(*shape, **f64)  # noqa: E731
    with open(src, "wb") as f:
        np.array([_pad(s) // lanes, dtype == torch.float32, n, d, s, t, k, plan.num_slots,
                  rule_id, with_h0, with_states, min(ROWS, t), direction == "up",
                  lanes.bit_length() - 1, chains], np.int64).tofile(f)
        for a in (u, dx, de, A, B, C, h0 if with_h0 else zeros(t, d, s), gy,
                  gs if with_states else zeros(k, d, s)):
            a.contiguous().numpy().tofile(f)
        plan.rec.numpy().astype(np.int32).tofile(f)
        plan.tree_ptr.numpy().astype(np.int32).tofile(f)
        srow.numpy().astype(np.int64).tofile(f)
        snext.numpy().astype(np.int64).tofile(f)
    r = subprocess.run([str(harness), str(src), str(dst)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    out = np.fromfile(dst, np.float64)
    sizes = [n * d, k * d * s, n * d, n * d, n * d, d * s, n * s, n * s, t * d * s, 1]
    got = dict(zip(["y", "states", "gu", "gdx", "gde", "gA", "gB", "gC", "gh0", "kept_same"],
                   np.split(out, np.cumsum(sizes)[:-1])))
    # the checkpoints a forward keeps are those the backward would write itself
    assert got.pop("kept_same").tolist() == [1.0]
    # the reference, and its gradients by autograd
    leaves = [x.clone().requires_grad_() for x in (u, dx, A, B, C)]
    ue, dxe, Ae, Be, Ce = leaves
    dee = de.clone().requires_grad_() if rule == "given" else None
    h0e = h0.clone().requires_grad_() if with_h0 else None
    out_ref = selective_tree_scan_ref(ue, dxe, Ae, Be, Ce, tree, direction=direction,
                                      edge_step=dee if rule == "given" else rule,
                                      initial_state=h0e, state_vertices=sv)
    y_ref, st_ref = out_ref if with_states else (out_ref, None)
    loss = (y_ref * gy).sum() + ((st_ref * gs).sum() if with_states else 0)
    grads = torch.autograd.grad(loss, leaves + [x for x in (dee, h0e) if x is not None],
                                allow_unused=True)
    expected = {"y": y_ref, "gu": grads[0], "gdx": grads[1], "gA": grads[2], "gB": grads[3],
                "gC": grads[4]}
    rest = list(grads[5:])
    if rule == "given":
        expected["gde"] = rest.pop(0)
    if with_h0:
        expected["gh0"] = rest.pop(0)
    if with_states:
        expected["states"] = st_ref
    for name, ref in expected.items():
        ref = np.zeros_like(got[name]) if ref is None else ref.detach().reshape(-1).numpy()
        np.testing.assert_allclose(got[name], ref, rtol=tol[0], atol=tol[1], err_msg=name)
    return got


@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("name", list(_forests()))
def test_walk_matches_reference(harness, tmp_path, name, direction):
    parent = _forests()[name]
    _run(harness, tmp_path, parent, d=3, s=2, rule="child", with_h0=False, with_states=False,
         direction=direction)


@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("rule", ["child", "mean", "given"])
@pytest.mark.parametrize("s", [1, 3, 16])
def test_walk_rules_and_states(harness, tmp_path, rule, s, direction):
    # incoming states enter the roots of a down scan only
    parent = _forests()["many_roots"]
    _run(harness, tmp_path, parent, d=2, s=s, rule=rule, with_h0=direction == "down",
         with_states=True, direction=direction)


@pytest.mark.parametrize("direction", ["down", "up"])
def test_walk_channels_across_blocks_and_idle_lanes(harness, tmp_path, direction):
    # 70 channels: two blocks of 64, the second mostly idle; two warps of partial sums
    parent = _forests()["deep"][:30].clone()
    parent[parent >= 30] = -1
    _run(harness, tmp_path, parent, d=70, s=4, rule="mean", with_h0=False, with_states=True,
         direction=direction)


@pytest.mark.parametrize("direction", ["down", "up"])
def test_walk_is_bitwise_reproducible(harness, tmp_path, direction):
    parent = _forests()["random"]
    h0 = direction == "down"
    a = _run(harness, tmp_path, parent, d=3, s=4, rule="mean", with_h0=h0, with_states=True,
             direction=direction)
    b = _run(harness, tmp_path, parent, d=3, s=4, rule="mean", with_h0=h0, with_states=True,
             direction=direction)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


# P lanes per channel with d_state not a multiple of P (zero states pad it to a power of
# two), channels not a multiple of a block's 64 / P, block rows striding over the trees
LANE_CASES = [(1, 3), (2, 3), (4, 3), (8, 5), (16, 13), (16, 16)]


@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("lanes,s", LANE_CASES)
def test_walk_lanes_match_reference_and_one_lane(harness, tmp_path, lanes, s, direction):
    parent = _forests()["many_roots"]
    kw = dict(d=7, s=s, rule="mean", with_h0=direction == "down", with_states=True,
              direction=direction)
    one = _run(harness, tmp_path, parent, lanes=1, **kw)
    split = _run(harness, tmp_path, parent, lanes=lanes, **kw)
    for key in one:
        if key not in CHANNEL_SUMS:
            assert np.array_equal(one[key], split[key]), key


@pytest.mark.parametrize("direction", ["down", "up"])
def test_walk_lanes_with_channels_across_blocks(harness, tmp_path, direction):
    # 70 channels in blocks of 32 (two lanes each): three blocks, the last mostly idle
    parent = _forests()["deep"][:30].clone()
    parent[parent >= 30] = -1
    _run(harness, tmp_path, parent, d=70, s=4, rule="given", with_h0=direction == "down",
         with_states=True, direction=direction, lanes=2)


@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("lanes", [1, 4, 16])
def test_walk_float32_matches_float64_reference(harness, tmp_path, lanes, direction):
    # w = exp2(de A log2(e)) in float32; the tolerance of the float32 GPU tests
    parent = _forests()["deep"]
    _run(harness, tmp_path, parent, d=5, s=16, rule="mean", with_h0=direction == "down",
         with_states=True, direction=direction, lanes=lanes, dtype=torch.float32,
         tol=(1e-4, 1e-4))


@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("name", ["deep", "binary", "many_roots"])
def test_walk_with_the_bounded_slot_count_of_recorded_plans(harness, tmp_path, name, direction):
    # the checkpoint buffer of a recorded plan holds slot_bound slots: more than the walk
    # uses, the same results
    parent = _forests()[name]
    plan = walk_plan(treessm.Tree.from_parent(parent), SEGMENT[torch.float64])
    bounded = _plan(treessm.Tree.from_parent(parent), SEGMENT[torch.float64], bounded=True)
    assert bounded.num_slots > plan.num_slots
    _run(harness, tmp_path, parent, d=3, s=4, rule="mean", with_h0=direction == "down",
         with_states=True, direction=direction, bounded=True)


def _chains(lengths, seed=0):
    """A forest of chains of the given lengths, vertex ids shuffled within each."""
    g = torch.Generator().manual_seed(seed)
    parts, offset = [], 0
    for n in lengths:
        p = chain(n, g)
        parts.append(torch.where(p >= 0, p + offset, -1))
        offset += n
    return torch.cat(parts)


# chains across pieces of the chain kernel (128 positions in float, 64 in double), one of a
# single vertex
CHAIN_LENGTHS = [1, 5, 300, 33]


@pytest.mark.parametrize("rule,s", [("child", 3), ("mean", 16), ("given", 1)])
def test_chain_kernel_matches_reference(harness, tmp_path, rule, s):
    # the time-parallel backward of "down" over chains, from the walk's checkpoints: outputs,
    # requested states and every gradient against the reference
    parent = _chains(CHAIN_LENGTHS)
    _run(harness, tmp_path, parent, d=5, s=s, rule=rule, with_h0=True, with_states=True,
         lanes=_pad(s), chains=True, tol=(1e-9, 1e-9))


def test_chain_kernel_float32(harness, tmp_path):
    # 9 channels: a second block of one live warp
    parent = _chains([300, 3], seed=1)
    _run(harness, tmp_path, parent, d=9, s=16, rule="child", with_h0=True, with_states=True,
         lanes=16, dtype=torch.float32, tol=(2e-4, 2e-4), chains=True)


def test_chain_kernel_is_bitwise_reproducible(harness, tmp_path):
    parent = _chains(CHAIN_LENGTHS, seed=2)
    kw = dict(d=3, s=4, rule="mean", with_h0=True, with_states=True, lanes=4, chains=True)
    first = _run(harness, tmp_path, parent, **kw)
    again = _run(harness, tmp_path, parent, **kw)
    for k in first:
        assert np.array_equal(first[k], again[k]), k
