"""The "columns" scan kernels' own source (``column_kernels.cuh``), compiled for the host,
against the torch reference: every direction, forward and both gradients, in double and
in float, with the columns in shared and in global memory (the same bits), on forests with
single vertices, many roots, stars, deep chains and wide families, with channel counts
that leave threads of a block idle and blocks of several channel groups."""
import subprocess

import numpy as np
import pytest
import torch

from emulation import compile_harness
from oracle import chain, random_forest, single_vertex
from test_cuda_kernels_host import NAMES, expected, problem, _forests as kernel_forests
import treessm
from treessm.ops.plan import level_plan


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "column_harness.cpp")


def _run(harness, tmp, parent, C, weights=(0.05, 0.95)):
    tree, x, w, gout = problem(parent, C, weights, zeros=0.1)  # zero weights cut no sum short
    return _outputs(harness, tmp, tree, x, w, gout)


def _outputs(harness, tmp, tree, x, w, gout):
    """The harness's results ``[double, float][shared, global][NAMES][N, C]``, checked for
    the same bits in shared and global columns and against the torch reference."""
    n, C = x.shape
    largest = int(torch.diff(tree.tree_ptr).max())
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array([n, C, tree.num_trees, largest], np.int64).tofile(f)
        for a in (x, w, gout):
            a.numpy().tofile(f)
        for a in (tree.order, level_plan(tree).parent_pos, tree.tree_ptr):
            a.numpy().astype(np.int32).tofile(f)
    r = subprocess.run([str(harness), str(src), str(dst)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    out = np.fromfile(dst, np.float64).reshape(2, 2, len(NAMES), n, C)  # columns: shared, global
    assert np.array_equal(out[0], out[1])
    want = expected(tree, x, w, gout)
    for got, tol in zip(out[0], (1e-12, 2e-5)):  # double; float (relative to the largest entry)
        for name, g_, e in zip(NAMES, got, want):
            scale = max(1.0, float(e.abs().max())) if tol > 1e-12 else 1.0
            np.testing.assert_allclose(g_, e.numpy(), rtol=tol, atol=tol * scale, err_msg=name)
    return out


def _forests():
    return dict(kernel_forests(), single_vertex=single_vertex(), long_chain=chain(200))


@pytest.mark.parametrize("name", list(_forests()))
def test_column_kernels_match_reference_on_host(harness, tmp_path, name):
    # 3 channels: 29 of a block's 32 threads idle; 37: two channel groups
    for C in (3, 37):
        _run(harness, tmp_path, _forests()[name], C)


def test_column_kernels_weights_above_one_on_host(harness, tmp_path):
    # no subtraction in both: weights in [1, 1.3) on a chain and a random forest
    _run(harness, tmp_path, chain(60), 4, weights=(1.0, 1.3))
    _run(harness, tmp_path, random_forest(120, 2, torch.Generator().manual_seed(8), locality=3),
         4, weights=(1.0, 1.3))


def test_chains_take_the_registers_with_the_bits_of_the_columns(harness, tmp_path):
    """A chain's up and down (and their backward) carry the step before's value in a
    register instead of a column: the same bits as the columns give the same vertices of the
    chain with a leaf added under its root (no longer a chain), wherever the leaf changes
    nothing (every vertex but the root in up, every vertex in down)."""
    L, C = 150, 5
    parent = torch.cat([torch.tensor([-1]), torch.arange(L - 1), torch.tensor([0])])
    tree, x, w, gout = problem(parent, C, zeros=0.1)  # the chain, then the leaf L
    with_leaf = _outputs(harness, tmp_path, tree, x, w, gout)
    chain_only = _outputs(harness, tmp_path, treessm.Tree.from_parent(parent[:L]), x[:L], w[:L],
                          gout[:L])
    same_everywhere = {"fwd down", "gx up"}
    for k, name in enumerate(NAMES):
        if "both" in name:
            continue
        lo = 0 if name in same_everywhere else 1
        assert np.array_equal(chain_only[:, :, k, lo:], with_leaf[:, :, k, lo:L]), name
