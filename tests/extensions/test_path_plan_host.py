"""The CUDA path-plan kernel, compiled for the host and run with one thread per CUDA thread,
against the tensor construction of treessm.ops.plan (tensor for tensor)."""
import subprocess

import numpy as np
import pytest
import torch

import treessm
from emulation import compile_harness
from oracle import all_roots, chain, random_forest, star
from treessm.ops.plan import MAX_PHASES, level_plan, path_plan


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "plan_harness.cpp")


def _forests():
    g = torch.Generator().manual_seed(8)
    return {
        "single": torch.tensor([-1]),
        "random": random_forest(70, 1, g),
        "many_roots": random_forest(90, 9, g),
        "all_roots": all_roots(5),
        "star": star(40, 6),
        "deep": random_forest(120, 2, g, locality=2),
        "chain": chain(70),
        "single_vertex_trees_between": torch.tensor([-1, -1, 1, -1, 3, 4, -1]),
        "wide": random_forest(300, 3, g, locality=40),
    }


@pytest.mark.parametrize("threads", [32, 64])
@pytest.mark.parametrize("name", list(_forests()))
def test_plan_kernel_matches_torch_plan(harness, tmp_path, name, threads):
    parent = _forests()[name]
    tree = treessm.Tree.from_parent(parent)
    n, T = tree.num_nodes, tree.num_trees
    parent_pos = level_plan(tree).parent_pos
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        np.array([n, T], np.int64).tofile(f)
        for a in (tree.order, tree.child_ptr, tree.tree_ptr, tree.depth, parent_pos):
            a.numpy().astype(np.int64).tofile(f)
    r = subprocess.run([str(harness), str(src), str(dst), str(threads)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    out = np.fromfile(dst, np.int32)
    sizes = [(n + 1) * 4, n, n, n + 1, T * (MAX_PHASES + 1)]
    got = np.split(out, np.cumsum(sizes)[:-1])
    expected = path_plan(tree)
    for name_, g_, e in zip(("rec", "light", "slot", "path_ptr", "phase_path"), got, expected):
        np.testing.assert_array_equal(g_, e.numpy().reshape(-1), err_msg=name_)
