"""The Euler tours' pointer jumping (``euler_tour_kernels.cuh``), compiled for the host and
run with one thread per CUDA thread, against the tensor rounds of
``treessm.ops.pointer_jump.pointer_jump``: suffix sums along lists and minima around
cycles, on lists in shuffled order, one long list, many short ones, several launch shapes
and too few rounds as well."""

import pytest
import torch

from emulation import compile_harness, run_int64_harness
from treessm.topology.boruvka import ceil_log2
from treessm.ops.pointer_jump import pointer_jump


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "euler_harness.cpp")


def emulate(harness, tmp, succ, value, rounds, combine, blocks, threads):
    header = [succ.shape[0], rounds, combine, blocks, threads]
    return run_int64_harness(harness, tmp, header, (succ, value))


def _lists(name, gen):
    """``(succ, longest)``: lists over shuffled ids, each ending at an element of its own."""
    m = 3000
    if name == "empty":
        return torch.zeros(0, dtype=torch.long), 1
    lengths = {"one": [m], "many": [7] * (m // 7), "mixed": [1, 2, 1500, 40, 999, 458]}[name]
    order = torch.randperm(sum(lengths), generator=gen)
    succ = torch.empty(sum(lengths), dtype=torch.long)
    start = 0
    for length in lengths:
        ids = order[start:start + length]
        succ[ids[:-1]] = ids[1:]
        succ[ids[-1]] = ids[-1]  # the end: its own successor
        start += length
    return succ, max(lengths)


@pytest.mark.parametrize("blocks,threads", [(1, 32), (3, 64), (50, 32)])
@pytest.mark.parametrize("name", ["empty", "one", "many", "mixed"])
@pytest.mark.parametrize("combine", [torch.add, torch.minimum])
def test_pointer_jump_kernel_matches_the_tensor_rounds(harness, tmp_path, name, combine, blocks,
                                                       threads):
    gen = torch.Generator().manual_seed(4)
    succ, longest = _lists(name, gen)
    m = succ.shape[0]
    value = torch.randint(-50, 50, (m,), generator=gen)
    ends = succ == torch.arange(m)
    # a list's end holds the identity: 0 for sums, above every value for minima
    value[ends] = 0 if combine is torch.add else 1000
    code = 0 if combine is torch.add else 1
    for rounds in sorted({ceil_log2(longest), 2}):  # enough rounds, and too few
        want = pointer_jump(succ, value, rounds, combine)
        got = emulate(harness, tmp_path, succ, value, rounds, code, blocks, threads)
        assert torch.equal(got, want)
    if name == "one" and combine is torch.add:  # enough rounds: suffix sums to the end
        order = [int(torch.nonzero(~torch.isin(torch.arange(m), succ[~ends])).squeeze())]
        while not ends[order[-1]]:
            order.append(int(succ[order[-1]]))
        suffix = value[order].flip(0).cumsum(0).flip(0)
        assert torch.equal(want[order], suffix)
