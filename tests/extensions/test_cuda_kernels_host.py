"""The CUDA kernels' own source, compiled for the host and run with one thread per CUDA
thread, against the torch reference: catches indexing and synchronisation mistakes in
``extensions/treessm_cuda`` on machines without a GPU."""
import subprocess

import numpy as np
import pytest
import torch

import treessm
from emulation import compile_harness
from oracle import all_roots, chain, random_forest, star
from treessm.ops import reference
from treessm.ops.plan import level_groups, level_plan, path_plan


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "harness.cpp")


NAMES = ["fwd up", "fwd down", "fwd both", "gx up", "gw up", "gx down", "gw down", "gx both",
         "gw both"]


def _run(harness, tmp, parent, C, lpv, threads, cap, ring, copies="deferred", parts=1):
    """``ring``: R (level kernels) or "path" (path kernels, ``cap`` plan records in shared
    memory, ``parts`` blocks per tree)."""
    tree = treessm.Tree.from_parent(parent)
    n = parent.numel()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, C, generator=g, dtype=torch.float64)
    w = torch.rand(n, C, generator=g, dtype=torch.float64)
    gout = torch.randn(n, C, generator=g, dtype=torch.float64)
    levels = level_groups(tree)
    h_both = reference.forward(x, w, parent, levels, "both")
    lp = level_plan(tree)
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array([n, C, tree.num_trees, lp.level_pos.numel() - 1, lpv, threads], np.int64).tofile(f)
        for a in (x, w, gout, h_both):
            a.numpy().tofile(f)
        for a in (tree.order, tree.child_ptr, *lp):
            a.numpy().astype(np.int64).tofile(f)
        for a in path_plan(tree):
            a.numpy().astype(np.int32).tofile(f)
    args = [str(harness), str(src), str(dst), str(cap), str(ring), copies, str(parts)]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    out = np.fromfile(dst, np.float64).reshape(-1, n, C)
    expected = [reference.forward(x, w, parent, levels, d) for d in ("up", "down", "both")]
    for d in ("up", "down", "both"):
        h = reference.forward(x, w, parent, levels, d)
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


# staged kernels: (channels, threads per row, threads per block, shared rows per level,
# staged positions R). R = 16 is narrower than the wide forest's levels (rows read
# directly) and makes the rings wrap many times on the deep ones; cap 0 and 1 spill values.
STAGED_CONFIGS = [(4, 2, 32, 64, 16), (6, 2, 64, 3, 32), (8, 4, 32, 1, 256), (10, 2, 32, 0, 16)]


# Asynchronous copies land either as late as allowed (at the wait that covers them: reads
# of rows not yet waited for see poison) or as early as possible (at issue: a slot that is
# overwritten while still in use shows the new row).
@pytest.mark.parametrize("copies", ["deferred", "eager"])
@pytest.mark.parametrize("name", list(_forests()))
def test_staged_kernels_match_reference_on_host(harness, tmp_path, name, copies):
    parent = _forests()[name]
    for C, lpv, threads, cap, ring in STAGED_CONFIGS:
        _run(harness, tmp_path, parent, C, lpv, threads, cap, ring=ring, copies=copies)


def test_staged_kernels_deep_chain_on_host(harness, tmp_path):
    # more levels than the level ring holds (128), so it is refilled many times
    for copies in ("deferred", "eager"):
        _run(harness, tmp_path, chain(300), 4, 2, 32, 8, ring=16, copies=copies)
        _run(harness, tmp_path, random_forest(400, 3, torch.Generator().manual_seed(5),
                                              locality=2), 2, 1, 32, 4, ring=32, copies=copies)


# path kernels: (channels, threads per row, threads per block, plan records in shared
# memory): 0 reads the records from global memory; 4096 stages every tree's records
PATH_CONFIGS = [(4, 2, 32, 4096), (6, 2, 64, 0), (8, 4, 32, 4096), (10, 2, 32, 16)]


@pytest.mark.parametrize("copies", ["deferred", "eager"])
@pytest.mark.parametrize("name", list(_forests()))
def test_path_kernels_match_reference_on_host(harness, tmp_path, name, copies):
    parent = _forests()[name]
    for C, lpv, threads, rec_cap in PATH_CONFIGS:
        _run(harness, tmp_path, parent, C, lpv, threads, rec_cap, ring="path", copies=copies)


def test_path_kernels_long_paths_and_bushy_trees_on_host(harness, tmp_path):
    g = torch.Generator().manual_seed(6)
    for copies in ("deferred", "eager"):
        _run(harness, tmp_path, chain(300), 4, 2, 32, 4096, ring="path", copies=copies)
        _run(harness, tmp_path, random_forest(400, 3, g, locality=2), 2, 1, 32, 4096,
             ring="path", copies=copies)
        _run(harness, tmp_path, star(50, 7), 4, 2, 64, 4096, ring="path", copies=copies)


@pytest.mark.parametrize("name", ["random", "many_roots", "deep", "chain", "wide"])
def test_path_kernels_spread_over_blocks_on_host(harness, tmp_path, name):
    # several blocks per tree, one launch per phase: the same bits as one block per tree
    parent = _forests()[name]
    one = _run(harness, tmp_path, parent, 4, 2, 32, 0, ring="path")
    for parts, copies in ((2, "deferred"), (5, "eager")):
        spread = _run(harness, tmp_path, parent, 4, 2, 32, 0, ring="path", copies=copies,
                      parts=parts)
        assert np.array_equal(one, spread)
