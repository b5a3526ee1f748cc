"""The CUDA scan kernels of the "trees" schedule (``scan_kernels.cuh``), their own source
compiled for the host and run with one thread per CUDA thread, against the torch reference:
catches indexing and synchronisation mistakes in ``extensions/treessm_cuda`` on machines
without a GPU. Every direction, forward and backward, with launch shapes that make the
chunks, the lane scans and the carries between chunks all do work. (The "tiles" schedule's
kernels: ``test_tile_scan_host.py``.)"""
import subprocess

import numpy as np
import pytest
import torch

import treessm
from emulation import compile_harness
from oracle import all_roots, chain, random_forest, star
from treessm.ops import reference
from treessm.ops.plan import level_groups, path_plan


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "harness.cpp")


NAMES = ["fwd up", "fwd down", "fwd both", "gx up", "gw up", "gx down", "gw down", "gx both",
         "gw both"]


def _run(harness, tmp, parent, C, lpv, vec=2, weights=(0.05, 0.95), lanes=32):
    tree = treessm.Tree.from_parent(parent)
    n = parent.numel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, C, generator=g, dtype=torch.float64)
    lo, hi = weights
    w = lo + (hi - lo) * torch.rand(n, C, generator=g, dtype=torch.float64)
    gout = torch.randn(n, C, generator=g, dtype=torch.float64)
    levels = level_groups(tree)
    pp = path_plan(tree)
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array([n, C, tree.num_trees, lpv], np.int64).tofile(f)
        for a in (x, w, gout):
            a.numpy().tofile(f)
        for a in pp:
            a.numpy().astype(np.int32).tofile(f)
    r = subprocess.run([str(harness), str(src), str(dst), str(vec), str(lanes)],
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


@pytest.mark.parametrize("name", list(_forests()))
def test_kernels_match_reference_on_host(harness, tmp_path, name):
    parent = _forests()[name]
    for C, lpv, vec, lanes in CONFIGS:
        _run(harness, tmp_path, parent, C, lpv, vec, lanes=lanes)


def test_long_paths_and_many_chunks_on_host(harness, tmp_path):
    # paths longer than a chunk (128 positions at 32 lanes): the carry between the chunks of
    # one block; bushy trees (long light-child lists); a chain
    g = torch.Generator().manual_seed(6)
    _run(harness, tmp_path, chain(1300), 2, 1, vec=1)
    _run(harness, tmp_path, random_forest(1200, 2, g, locality=2), 2, 1)
    _run(harness, tmp_path, star(600, 7), 2, 1)


def test_results_do_not_depend_on_the_launch_shape_on_host(harness, tmp_path):
    # the sums run in an order fixed by the positions: every launch shape (threads per
    # position, channels a thread moves, lanes of a block) gives the same bits
    parent = random_forest(700, 2, torch.Generator().manual_seed(7), locality=3)
    runs = [_run(harness, tmp_path, parent, 4, lpv, vec, lanes=lanes)
            for lpv, vec, lanes in ((2, 2, 16), (1, 2, 32), (1, 1, 64), (2, 1, 128))]
    for other in runs[1:]:
        assert np.array_equal(runs[0], other)


def test_weights_above_one_on_host(harness, tmp_path):
    # no cancellation in both: weights in [1, 1.3) on a long chain and a random forest
    _run(harness, tmp_path, chain(60), 4, 2, weights=(1.0, 1.3))
    _run(harness, tmp_path, random_forest(120, 2, torch.Generator().manual_seed(8), locality=3),
         4, 2, weights=(1.0, 1.3))
