"""Borůvka's kernels, compiled for the host and run with one thread per CUDA thread: the
selection step (the lightest edge leaving each component) against the tensor version of
``treessm.topology.boruvka.lightest_edges``, and all rounds as ``cuda_boruvka`` launches
them against the tensor version of ``treessm.topology.boruvka.boruvka`` (chosen edges and
labels)."""

import pytest
import torch

from emulation import compile_harness, run_int64_harness
from treessm.topology.boruvka import _NO_EDGE, boruvka, ceil_log2, edge_keys, lightest_edges


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "boruvka_harness.cpp")


def emulate(harness, tmp, edge_index, key, comp, sentinel, blocks, threads):
    header = [comp.shape[0], key.shape[0], sentinel, blocks, threads]
    return run_int64_harness(harness, tmp, header, (edge_index, key, comp))


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


def emulate_forest(harness, tmp, edge_index, key, num_nodes, rounds, blocks, threads):
    e = key.shape[0]
    header = [num_nodes, e, _NO_EDGE | e, blocks, threads, rounds]
    out = run_int64_harness(harness, tmp, header, (edge_index, key), "forest")
    return out[:e].bool(), out[e:e + num_nodes], out[e + num_nodes:]


def _graph(name, gen):
    """``(edge_index, num_nodes)`` of a named graph."""
    if name == "empty":
        return torch.zeros(2, 0, dtype=torch.long), 5
    if name == "single":
        return torch.zeros(2, 0, dtype=torch.long), 1
    if name == "random":  # self-loops, repeated edges, isolated vertices, several components
        return torch.randint(0, 300, (2, 900), generator=gen), 320
    if name == "chain":  # one deep path, listed in random order and direction
        n = 700
        ei = torch.stack([torch.arange(n - 1), torch.arange(1, n)])
        ei = ei[:, torch.randperm(n - 1, generator=gen)]
        flip = torch.rand(n - 1, generator=gen) < 0.5
        return torch.where(flip, ei.flip(0), ei), n
    if name == "star":
        n = 400
        return torch.stack([torch.zeros(n - 1, dtype=torch.long), torch.arange(1, n)]), n
    if name == "components":  # edges inside groups of 6 consecutive ids, never between
        group = torch.randint(0, 100, (1500,), generator=gen)
        return group * 6 + torch.randint(0, 6, (2, 1500), generator=gen), 600
    raise KeyError(name)


@pytest.mark.parametrize("blocks,threads", [(1, 32), (3, 64), (64, 32)])
@pytest.mark.parametrize("name", ["empty", "single", "random", "chain", "star", "components",
                                  "ties"])
def test_fused_rounds_match_the_tensor_rounds(harness, tmp_path, name, blocks, threads):
    gen = torch.Generator().manual_seed(11)
    ei, n = _graph("random" if name == "ties" else name, gen)
    cost = torch.randn(ei.shape[1], generator=gen)
    if name == "ties":  # equal costs, broken by edge index inside the keys
        cost = torch.randint(0, 3, (ei.shape[1],), generator=gen).float()
    key = edge_keys(cost)
    rounds = ceil_log2(n)
    want_chosen, want_comp = boruvka(ei, key, n, n)  # the tensor rounds, on the CPU
    chosen, comp, active = emulate_forest(harness, tmp_path, ei, key, n, rounds, blocks, threads)
    assert torch.equal(chosen, want_chosen) and torch.equal(comp, want_comp)
    # every round after the last merge returned at once
    assert active[0] == 1 and (active[1:].diff() <= 0).all()
    if name in ("chain", "star") and ei.shape[1]:
        assert int(chosen.sum()) == n - 1 and (comp == comp[0]).all()  # one tree
