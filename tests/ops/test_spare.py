"""Scatters with spare slots and run pre-reduction (treessm.ops.spare) against plain
``scatter_reduce``."""
import pytest
import torch

from treessm.ops.spare import RUN, SPARE_SLOTS, kept_or_spare, scatter_reduce_runs

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not torch.cuda.is_available(),
                                                      reason="needs a CUDA GPU")])


def plain(index, src, size, fill, reduce):
    out = torch.full((size,), fill, dtype=src.dtype, device=src.device)
    return out.scatter_reduce_(0, index, src, reduce)


def labels(n, size, gen, kind):
    if kind == "random":
        return torch.randint(0, size, (n,), generator=gen)
    if kind == "one":  # every element at one target: the contended case
        return torch.full((n,), size - 1, dtype=torch.long)
    # runs of random lengths (1 .. 3 RUN), crossing the blocks' boundaries, with a few
    # strays inside runs
    out = torch.repeat_interleave(torch.randint(0, size, (n,), generator=gen),
                                  torch.randint(1, 3 * RUN, (n,), generator=gen))[:n]
    stray = torch.rand(n, generator=gen) < 0.02
    return torch.where(stray, torch.randint(0, size, (n,), generator=gen), out)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("reduce", ["amin", "amax"])
@pytest.mark.parametrize("kind", ["random", "one", "runs"])
@pytest.mark.parametrize("n", [0, 1, RUN - 1, RUN, RUN + 1, 5 * RUN + 7, 4000])
def test_scatter_reduce_runs_matches_scatter_reduce(device, reduce, kind, n):
    gen = torch.Generator().manual_seed(n + 7 * len(kind))
    for size in (1, 3, 50):
        index = labels(n, size, gen, kind)
        for src in (torch.randint(-10 ** 12, 10 ** 12, (n,), generator=gen),
                    torch.randn(n, generator=gen, dtype=torch.float64)):
            fill = 0 if reduce == "amax" and src.dtype == torch.long else 5
            got = scatter_reduce_runs(index.to(device), src.to(device), size, fill, reduce)
            want = plain(index, src, size, fill, reduce)
            assert got.device.type == device and got.dtype == src.dtype
            assert torch.equal(got.cpu(), want), (kind, n, size)


def test_scatter_reduce_runs_checks_the_reduction():
    with pytest.raises(ValueError, match="reduce must be 'amin' or 'amax'"):
        scatter_reduce_runs(torch.zeros(3, dtype=torch.long), torch.ones(3), 1, 0, "sum")


def test_kept_or_spare_spreads_dropped_elements():
    index = torch.arange(3 * SPARE_SLOTS)
    keep = index % 3 == 0
    out = kept_or_spare(index, keep, 10)
    assert torch.equal(out[keep], index[keep])
    dropped = out[~keep]
    assert bool(((dropped >= 10) & (dropped < 10 + SPARE_SLOTS)).all())
    assert dropped.unique().numel() == SPARE_SLOTS  # every spare slot takes some
