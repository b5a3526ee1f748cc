"""Borůvka's kernels, compiled for the host and run with one thread per CUDA thread: the
selection step (the lightest edge leaving each component) against the tensor version of
``treessm.topology.boruvka.lightest_edges``, and the roots of the hook trees against
pointer jumping."""
import subprocess

import numpy as np
import pytest
import torch

from emulation import compile_harness
from treessm.topology.boruvka import _NO_EDGE, edge_keys, lightest_edges


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "boruvka_harness.cpp")


def emulate(harness, tmp, edge_index, key, comp, sentinel, blocks, threads):
    src, dst = tmp / "in.bin", tmp / "out.bin"
    n, e = comp.shape[0], key.shape[0]
    with open(src, "wb") as f:
        np.array([n, e, sentinel, blocks, threads], np.int64).tofile(f)
        for t in (edge_index, key, comp):
            t.numpy().astype(np.int64).tofile(f)
    subprocess.run([str(harness), str(src), str(dst)], check=True)
    return torch.from_numpy(np.fromfile(dst, np.int64))


def _case(name, gen):
    """(edge_index, comp) of a named case; keys come from random costs."""
    n = 60
    if name == "empty":
        return torch.zeros(2, 0, dtype=torch.long), torch.arange(n)
    ei = torch.randint(0, n, (2, 400), generator=gen)
    if name == "singletons":  # round one: every vertex its own component, self-loops too
        return ei, torch.arange(n)
    if name == "two_components":  # nearly all edges point at the same two slots
        return ei, torch.where(torch.arange(n) < 45, 0, 50)
    if name == "one_component":  # nothing leaves any component
        return ei, torch.zeros(n, dtype=torch.long)
    if name == "labels":  # components labelled by their lowest vertex, as boruvka leaves them
        comp = torch.arange(n) // 7 * 7
        return ei, comp
    raise KeyError(name)


@pytest.mark.parametrize("blocks,threads", [(1, 32), (3, 64), (40, 32)])
@pytest.mark.parametrize("name", ["empty", "singletons", "two_components", "one_component",
                                  "labels"])
def test_lightest_edges_kernel_matches_tensors(harness, tmp_path, name, blocks, threads):
    gen = torch.Generator().manual_seed(3)
    ei, comp = _case(name, gen)
    cost = torch.randn(ei.shape[1], generator=gen)  # negative costs give negative keys
    cost[::5] = 0.5  # ties, broken by edge index inside the keys
    key = edge_keys(cost)
    sentinel = _NO_EDGE | ei.shape[1]
    want = lightest_edges(ei, key, comp, sentinel)
    got = emulate(harness, tmp_path, ei, key, comp, sentinel, blocks, threads)
    assert torch.equal(got, want)
    if name == "one_component":
        assert (got == sentinel).all()
    if name == "two_components":  # both sides hold the one lightest edge between them
        between = comp[ei[0]] != comp[ei[1]]
        assert got[0] == got[50] == key[between].min()


def emulate_roots(harness, tmp, parent, blocks, threads):
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array([parent.shape[0], blocks, threads], np.int64).tofile(f)
        parent.numpy().astype(np.int64).tofile(f)
    subprocess.run([str(harness), str(src), str(dst), "roots"], check=True)
    return torch.from_numpy(np.fromfile(dst, np.int64))


def _forest(name, gen):
    """Parent pointers (``parent[r] == r`` at a root) of a named forest."""
    n = 3000
    if name == "empty":
        return torch.zeros(0, dtype=torch.long)
    if name == "roots":  # every vertex its own root
        return torch.arange(n)
    if name == "chain_down":  # v -> v - 1: one path as deep as the forest, walked bottom up
        return (torch.arange(n) - 1).clamp(min=0)
    if name == "chain_up":  # v -> v + 1, rooted at the last vertex
        return (torch.arange(n) + 1).clamp(max=n - 1)
    if name == "shuffled_chain":  # one path through the vertices in random order
        order = torch.randperm(n, generator=gen)
        parent = torch.empty(n, dtype=torch.long)
        parent[order[1:]] = order[:-1]
        parent[order[0]] = order[0]
        return parent
    if name == "random":  # random recursive trees, several roots
        parent = torch.arange(n)
        for v in range(1, n):
            if torch.rand(1, generator=gen) > 0.01:
                parent[v] = torch.randint(0, v, (1,), generator=gen)
        perm = torch.randperm(n, generator=gen)  # ids shuffled
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n)
        return inv[parent[perm]]
    raise KeyError(name)


def _jumped(parent):
    out = parent.clone()
    while not torch.equal(out[out], out):
        out = out[out]
    return out


@pytest.mark.parametrize("blocks,threads", [(1, 32), (3, 64), (200, 32)])
@pytest.mark.parametrize("name", ["empty", "roots", "chain_down", "chain_up", "shuffled_chain",
                                  "random"])
def test_find_roots_kernel_matches_pointer_jumping(harness, tmp_path, name, blocks, threads):
    parent = _forest(name, torch.Generator().manual_seed(8))
    got = emulate_roots(harness, tmp_path, parent, blocks, threads)
    assert torch.equal(got, _jumped(parent))
