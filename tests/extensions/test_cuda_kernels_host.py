"""The CUDA scan kernels' own source, compiled for the host and run with one thread per CUDA
thread, against the torch reference: catches indexing and synchronisation mistakes in
``extensions/treessm_cuda`` on machines without a GPU. Both schedules, every direction,
forward and backward, with launch shapes that make the chunks, the lane scans and the
carries between chunks all do work."""
import subprocess

import numpy as np
import pytest
import torch

import treessm
from emulation import compile_harness
from oracle import all_roots, chain, random_forest, star
from treessm.ops import reference
from treessm.ops.plan import MAX_PHASES, level_groups, path_plan, phase_plan


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "harness.cpp")


NAMES = ["fwd up", "fwd down", "fwd both", "gx up", "gw up", "gx down", "gw down", "gx both",
         "gw both"]


def problem(parent, C, weights=(0.05, 0.95), zeros=0.0):
    """``(tree, x, w, gout)`` in float64: weights uniform in ``weights``, a fraction
    ``zeros`` of them 0."""
    tree = treessm.Tree.from_parent(parent)
    n = parent.numel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, C, generator=g, dtype=torch.float64)
    lo, hi = weights
    w = lo + (hi - lo) * torch.rand(n, C, generator=g, dtype=torch.float64)
    w[torch.rand(n, C, generator=g) < zeros] = 0.0
    gout = torch.randn(n, C, generator=g, dtype=torch.float64)
    return tree, x, w, gout


def expected(tree, x, w, gout):
    """The torch reference's results in the order of :data:`NAMES`."""
    levels = level_groups(tree)
    out = [reference.forward(x, w, tree.parent, levels, d) for d in ("up", "down", "both")]
    for d, h in zip(("up", "down", "both"), out[:3]):
        out += list(reference.backward(gout, x, w, h, tree.parent, levels, d))
    return out


def _run(harness, tmp, parent, C, lpv, schedule, vec=2, weights=(0.05, 0.95), lanes=32,
         zeros=0.0):
    tree, x, w, gout = problem(parent, C, weights, zeros)
    n = parent.numel()
    pp, ph = path_plan(tree), phase_plan(tree)
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array([n, C, tree.num_trees, lpv], np.int64).tofile(f)
        for a in (x, w, gout):
            a.numpy().tofile(f)
        for a in (*pp, ph.rec, ph.light, ph.slot, ph.phase_ptr):
            a.numpy().astype(np.int32).tofile(f)
    r = subprocess.run([str(harness), str(src), str(dst), schedule, str(vec), str(lanes)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    out = np.fromfile(dst, np.float64).reshape(-1, n, C)
    for name, got, exp in zip(NAMES, out, expected(tree, x, w, gout)):
        np.testing.assert_allclose(got, exp.numpy(), rtol=1e-10, atol=1e-10, err_msg=name)
    return out


def _forests():
    g = torch.Generator().manual_seed(3)
    return {
        "random": random_forest(40, 1, g),
        "many_roots": random_forest(60, 7, g),
        "all_roots": all_roots(9),
        "star": star(30, 4),
        "deep": random_forest(80, 2, g, locality=2),
        "chain": chain(25),
        "single_vertex_trees_between": torch.tensor([-1, -1, 1, -1, 3, 4, -1]),
        "wide": random_forest(300, 3, g, locality=40),
    }


# (channels, threads per position (at most 2: a group of 16 lanes within a warp), channels a
# thread moves, position lanes): block slices of four and one channels, a channel count that
# leaves threads idle, blocks of one and of several lane groups
CONFIGS = [(6, 2, 2, 16), (3, 1, 1, 32)]


@pytest.mark.parametrize("schedule", ["trees", "phases"])
@pytest.mark.parametrize("name", list(_forests()))
def test_kernels_match_reference_on_host(harness, tmp_path, name, schedule):
    parent = _forests()[name]
    for C, lpv, vec, lanes in CONFIGS:
        _run(harness, tmp_path, parent, C, lpv, schedule, vec, lanes=lanes)


def test_long_paths_and_many_chunks_on_host(harness, tmp_path):
    # paths longer than a chunk (128 positions at 32 lanes): the carry between the chunks of
    # one block and across blocks; bushy trees (long light-child lists); a chain
    g = torch.Generator().manual_seed(6)
    for schedule in ("trees", "phases"):
        _run(harness, tmp_path, chain(1300), 2, 1, schedule, vec=1)
        _run(harness, tmp_path, random_forest(1200, 2, g, locality=2), 2, 1, schedule)
        _run(harness, tmp_path, star(600, 7), 2, 1, schedule)


def test_results_do_not_depend_on_the_launch_shape_on_host(harness, tmp_path):
    # the sums run in an order fixed by the positions: every launch shape of a schedule
    # (threads per position, channels a thread moves, lanes of a block) gives the same bits,
    # and the two schedules (chunks cut at other places) the same values
    parent = random_forest(700, 2, torch.Generator().manual_seed(7), locality=3)
    for schedule in ("trees", "phases"):
        runs = [_run(harness, tmp_path, parent, 4, lpv, schedule, vec, lanes=lanes)
                for lpv, vec, lanes in ((2, 2, 16), (1, 2, 32), (1, 1, 64), (2, 1, 128))]
        for other in runs[1:]:
            assert np.array_equal(runs[0], other), schedule


def test_weights_above_one_on_host(harness, tmp_path):
    # no cancellation in both: weights in [1, 1.3) on a long chain and a random forest
    _run(harness, tmp_path, chain(60), 4, 2, "trees", weights=(1.0, 1.3))
    _run(harness, tmp_path, random_forest(120, 2, torch.Generator().manual_seed(8), locality=3),
         4, 2, "phases", weights=(1.0, 1.3))


def _chains(lengths):
    """A forest of chains of the given lengths, one after the other."""
    starts = np.cumsum([0] + list(lengths[:-1]))
    return torch.cat([torch.where(chain(n) >= 0, chain(n) + s, chain(n))
                      for n, s in zip(lengths, starts.tolist())])


def test_carries_across_many_chunks_on_host(harness, tmp_path):
    # "phases" with chunks of 64 positions (16 lanes) and weights near 1, so that the value
    # carried into a chunk reaches far into it: more chunks per phase than a warp of the
    # carry scan takes (256); chains that start exactly at chunk starts and inside chunks;
    # weights 0 (1 in 100) and above 1; against the float64 scan
    g = torch.Generator().manual_seed(11)
    lengths = torch.tensor([64, 128, 192, 100, 28, 37, 27, 64])
    forest = _chains(lengths[torch.randint(0, 8, (250,), generator=g)].tolist())
    assert forest.numel() > 64 * 256
    # (16 lanes of two threads: a warp; three channels: one thread of a slice idle)
    _run(harness, tmp_path, forest, 3, 2, "phases", vec=1, lanes=16, weights=(0.9, 1.1),
         zeros=0.01)
    _run(harness, tmp_path, chain(2000), 3, 2, "phases", vec=1, lanes=16, weights=(1.0, 1.005))
    _run(harness, tmp_path, random_forest(6000, 3, g, locality=3), 3, 2, "phases", vec=1,
         lanes=16, weights=(0.95, 1.05), zeros=0.01)


def _serial_carry(a, b, f):
    """The value entering every chunk, chunk after chunk (row 0: nothing enters chunk 0)."""
    chunks = a.shape[0]
    out = np.full((chunks, b.shape[0], a.shape[1]), np.nan, a.dtype)
    h = np.zeros_like(b[:, 0])
    for j in range(chunks - 1):
        if f[j] or j == 0:
            h = b[:, j].copy()
        else:
            # mul0: the product taken as 0 where the value is 0
            h = np.where(h == 0, 0, a[j] * h) + b[:, j]
        out[j + 1] = h
    return out


def _carry(harness, tmp, a, b, f):
    """The carry kernel on the host: [double, float] x [blocks of 1 to 8 warps]."""
    chunks, C = a.shape
    ns = b.shape[0]
    src, dst = tmp / "carry_in.bin", tmp / "carry_out.bin"
    with open(src, "wb") as fh:
        np.array([chunks, C, ns], np.int64).tofile(fh)
        a.astype(np.float64).tofile(fh)
        b.astype(np.float64).tofile(fh)
        f.astype(np.uint8).tofile(fh)
    r = subprocess.run([str(harness), "carry", str(src), str(dst)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return np.fromfile(dst, np.float64).reshape(2, 8, chunks, ns, C)


@pytest.mark.parametrize("chunks,C,ns", [(2, 1, 1), (3, 3, 2), (41, 5, 1), (257, 2, 2),
                                         (258, 3, 1), (2050, 1, 2), (4700, 3, 1)])
def test_carry_scan_against_the_serial_carry_on_host(harness, tmp_path, chunks, C, ns):
    # the carry kernel against the serial recurrence it replaces: carries (chunks - 1) around
    # a warp's span (256) and a tile of 8 warps (2048), odd channel counts, one and two
    # streams, resets (1 chunk in 20, and chunk 0), weights 0 and above 1; the same bits for
    # every block width, float64 to rounding, float32 within float32 rounding of float64
    rng = np.random.default_rng(chunks * 10 + C)
    a = rng.uniform(0.0, 1.1, (chunks, C))
    a[rng.random((chunks, C)) < 0.05] = 0.0
    b = rng.standard_normal((ns, chunks, C))
    f = rng.random(chunks) < 0.05
    got = _carry(harness, tmp_path, a, b, f)
    for by_width in got:
        for other in by_width[1:]:
            assert np.array_equal(by_width[0], other)
    assert np.all(got[:, :, 0] == -555.0)  # nothing enters chunk 0
    want = _serial_carry(a, b, f)[1:]
    np.testing.assert_allclose(got[0, 0, 1:], want, rtol=1e-12, atol=1e-12)
    want32 = _serial_carry(a.astype(np.float32).astype(np.float64),
                           b.astype(np.float32).astype(np.float64), f)[1:]
    np.testing.assert_allclose(got[1, 0, 1:], want32, rtol=1e-5, atol=1e-5)


def test_carry_scan_propagates_nan_and_overflow_on_host(harness, tmp_path):
    # NaN in a chunk's composite spoils the carries up to the next reset, as chunk after
    # chunk; products of weights that overflow give inf, never NaN (no 0 * inf)
    chunks, C = 600, 2
    rng = np.random.default_rng(5)
    a = rng.uniform(0.5, 1.0, (chunks, C))
    b = rng.standard_normal((1, chunks, C))
    f = np.zeros(chunks, bool)
    f[[100, 300, 301, 520]] = True
    a[50, 0] = np.nan
    b[0, 290, 1] = np.nan
    b[0, 400, 0] = np.nan
    got = _carry(harness, tmp_path, a, b, f)[0, 0, 1:]
    want = _serial_carry(a, b, f)[1:]
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(want).sum() == (100 - 50) + (300 - 290) + (520 - 400)
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-12, atol=1e-12)
    a = np.full((chunks, C), 1e30)
    b = np.ones((1, chunks, C))
    f = np.zeros(chunks, bool)
    got = _carry(harness, tmp_path, a, b, f)[1, :, 1:]  # float32: 1, 1e30, then inf
    assert not np.isnan(got).any()
    assert np.all(got[:, 0] == 1.0) and np.all(np.isfinite(got[:, 1]))
    assert np.all(np.isinf(got[:, 2:]))


def test_phase_plan_is_a_relabelling_of_the_path_plan():
    parent = random_forest(500, 5, torch.Generator().manual_seed(9), locality=7)
    tree = treessm.Tree.from_parent(parent)
    pp, ph = path_plan(tree), phase_plan(tree)
    n = tree.num_nodes
    rec, prec = pp.rec.long(), ph.rec.long()
    assert torch.equal(ph.light[ph.slot[ph.slot >= 0].long()].long(),
                       torch.nonzero(ph.slot >= 0).squeeze(1))
    bounds = ph.phase_ptr.long()
    assert torch.equal(bounds, ph.phase_ptr_host) and int(bounds[-1]) == n
    assert bounds.shape == (MAX_PHASES + 1,)
    # every vertex once; parents kept; a parent lies in an earlier phase or just before
    assert torch.equal(torch.sort(prec[:n, 0]).values, torch.arange(n))
    pos_of = torch.empty(n, dtype=torch.long)
    pos_of[prec[:n, 0]] = torch.arange(n)
    par = parent[prec[:n, 0]]
    want = torch.where(par >= 0, pos_of[par.clamp(min=0)], par)
    assert torch.equal(prec[:n, 1], want)
    phase = torch.bucketize(torch.arange(n), bounds, right=True) - 1
    nonroot = prec[:n, 1] >= 0
    k = torch.arange(n)[nonroot]
    p = prec[:n, 1][nonroot]
    assert torch.all((p == k - 1) | (phase[p] < phase[k]))
    # light lists: the same children per vertex, in the same order
    old_pos = torch.empty(n, dtype=torch.long)
    old_pos[rec[:n, 0]] = torch.arange(n)
    for k in range(n):
        v = int(prec[k, 0])
        ko = int(old_pos[v])
        new_children = prec[ph.light[prec[k, 2]:prec[k, 3]].long(), 0]
        old_children = rec[pp.light[rec[ko, 2]:rec[ko, 3]].long(), 0]
        assert torch.equal(new_children, old_children)
