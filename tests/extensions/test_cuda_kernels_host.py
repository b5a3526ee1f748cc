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


def _run(harness, tmp, parent, C, lpv, schedule, vec=2, weights=(0.05, 0.95), lanes=32):
    tree = treessm.Tree.from_parent(parent)
    n = parent.numel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, C, generator=g, dtype=torch.float64)
    lo, hi = weights
    w = lo + (hi - lo) * torch.rand(n, C, generator=g, dtype=torch.float64)
    gout = torch.randn(n, C, generator=g, dtype=torch.float64)
    levels = level_groups(tree)
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
    expected = [reference.forward(x, w, parent, levels, d) for d in ("up", "down", "both")]
    for d, h in zip(("up", "down", "both"), expected[:3]):
        expected += list(reference.backward(gout, x, w, h, parent, levels, d))
    for name, got, exp in zip(NAMES, out, expected):
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
