"""The grid-cost kernel's own source, compiled for the host and run with one thread per CUDA
thread, against ``grid_costs_torch``: catches indexing, edge-order, reduction and alignment
mistakes in ``extensions/treessm_cuda/grid_costs_kernels.cuh`` on machines without a GPU
(AddressSanitizer and UBSan flag out-of-bounds and misaligned vector loads)."""
import subprocess

import numpy as np
import pytest
import torch

from emulation import compile_harness
from treessm.topology.distance import EPS, grid_costs_torch, kind_code
from treessm.topology.grid import grid_edges


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "grid_costs_harness.cpp")


def emulate(harness, tmp, feat, b, h, w, connectivity, distance, threads=32, blocks=0,
            group=0, scalar=False, offset=0):
    """Costs from the emulated kernel and its launch report (pack, group, blocks)."""
    wide = feat.dtype == torch.float64
    c = feat.shape[-1]
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array([b, h, w, c, connectivity, kind_code(distance), int(wide), threads, blocks,
                  group, int(scalar), offset], np.int64).tofile(f)
        np.array([EPS], np.float64).tofile(f)
        feat.numpy().astype(np.float64 if wide else np.float32).tofile(f)
    r = subprocess.run([str(harness), str(src), str(dst)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    got = torch.from_numpy(np.fromfile(dst, np.float64 if wide else np.float32))
    report = dict(kv.split("=") for kv in r.stdout.split())
    return got, {k: int(v) for k, v in report.items()}


def check(harness, tmp, feat, b, h, w, connectivity, distance, rtol=None, **launch):
    got, report = emulate(harness, tmp, feat, b, h, w, connectivity, distance, **launch)
    ref = grid_costs_torch(feat.reshape(b * h * w, feat.shape[-1]), b, h, w, connectivity, distance)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert not torch.isnan(got).any(), "a cost was never written"
    if rtol is None:
        rtol = 1e-12 if feat.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol,
                               msg=lambda m: f"{b}x{h}x{w}x{feat.shape[-1]}, {connectivity}, "
                                             f"{distance}, {launch}: {m}")
    return report


SHAPES = [(1, 1, 1), (3, 1, 1), (2, 1, 6), (2, 5, 1), (2, 2, 2), (3, 7, 5), (1, 4, 9),
          (1, 9, 4), (2, 6, 6)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_matches_torch(harness, tmp_path, dtype, connectivity, distance):
    gen = torch.Generator().manual_seed(3 + connectivity + 7 * (distance == "l2"))
    for i, (b, h, w) in enumerate(SHAPES):
        for c in (1, 3, 5, 8, 12):
            if (i + c) % 2:  # half of the combinations keep the test fast
                continue
            feat = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64).to(dtype)
            check(harness, tmp_path, feat, b, h, w, connectivity, distance)


def test_edge_order_by_hand(harness, tmp_path):
    # l2 of scalar features x = pixel id: |u - v| is the id difference of the edge's ends,
    # so the output spells out the order of grid_edges
    b, h, w = 2, 3, 4
    feat = torch.arange(b * h * w, dtype=torch.float64).reshape(b, h, w, 1)
    for connectivity in (4, 8):
        got, _ = emulate(harness, tmp_path, feat, b, h, w, connectivity, "l2")
        ei = torch.from_numpy(grid_edges(b, h, w, connectivity))
        assert torch.equal(got, (ei[1] - ei[0]).abs().double())


def test_pack_and_group_choice(harness, tmp_path):
    """16-byte packs when the rows allow them, single elements otherwise (odd C, misaligned
    rows); every group size and a grid smaller than the pixels (strided loop)."""
    gen = torch.Generator().manual_seed(11)
    b, h, w = 2, 5, 7
    for dtype, c, pack in [(torch.float32, 8, 4), (torch.float32, 40, 4), (torch.float32, 6, 1),
                           (torch.float64, 6, 2), (torch.float64, 3, 1)]:
        feat = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64).to(dtype)
        for distance in ("cosine", "l2"):
            report = check(harness, tmp_path, feat, b, h, w, 8, distance)
            assert report["pack"] == pack, (dtype, c, report)
    feat = torch.randn(b, h, w, 8, generator=gen)
    # rows shifted by one element: no longer 16-byte aligned, so single elements
    report = check(harness, tmp_path, feat, b, h, w, 4, "cosine", offset=1)
    assert report["pack"] == 1
    # forced scalar loads, every group size, two warps, a strided grid of two blocks
    for group in (1, 2, 4, 8, 16, 32):
        for scalar in (False, True):
            report = check(harness, tmp_path, feat, b, h, w, 8, "cosine", group=group,
                           scalar=scalar, threads=64, blocks=2)
            assert report["group"] == group and report["blocks"] == 2


def test_long_rows(harness, tmp_path):
    # more packs than a warp's lanes: several rounds per lane, with a partial last round
    gen = torch.Generator().manual_seed(12)
    b, h, w, c = 1, 3, 4, 4 * 41
    feat = torch.randn(b, h, w, c, generator=gen)
    for distance in ("cosine", "l2"):
        for group in (0, 32, 4):
            check(harness, tmp_path, feat, b, h, w, 8, distance, group=group)


def test_zero_and_scaled_features(harness, tmp_path):
    # zero vectors have cosine 0 with everything (cost 1); costs do not depend on scale
    gen = torch.Generator().manual_seed(13)
    b, h, w, c = 1, 4, 5, 4
    feat = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64)
    feat[0, 1, 2] = 0.0
    feat[0, 3, :] = 0.0
    check(harness, tmp_path, feat, b, h, w, 8, "cosine")
    got, _ = emulate(harness, tmp_path, feat, b, h, w, 4, "cosine")
    big, _ = emulate(harness, tmp_path, feat * 1e100, b, h, w, 4, "cosine")
    torch.testing.assert_close(big, got, rtol=1e-12, atol=1e-12)
    ei = torch.from_numpy(grid_edges(b, h, w, 4))
    zero = (feat.reshape(-1, c) == 0).all(1)
    touches = zero[ei[0]] | zero[ei[1]]
    assert torch.equal(got[touches], torch.ones(int(touches.sum()), dtype=torch.float64))
    # rows whose squared norm overflows are scaled first, as the torch path scales them:
    # two equal rows near the float32 maximum have cosine 1
    huge = torch.full((1, 1, 2, 2), 3e38)
    got, _ = emulate(harness, tmp_path, huge, 1, 1, 2, 4, "cosine")
    assert got.tolist() == [torch.exp(torch.tensor(-1.0)).item()]


def test_empty(harness, tmp_path):
    for b, h, w, c in [(0, 3, 3, 4), (2, 1, 1, 3), (2, 3, 3, 0)]:
        feat = torch.randn(b, h, w, c, dtype=torch.float64)
        for distance in ("cosine", "l2"):
            check(harness, tmp_path, feat, b, h, w, 8, distance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_cosine_of_rows_of_any_scale(harness, tmp_path, dtype, connectivity):
    # squared norms outside the safe range (overflow, underflow, subnormal rows) take the
    # scaled sums: the cosine is that of the rows near 1, as the torch path scales them
    b, h, w, c = 2, 5, 6, 12
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(b, h, w, c, generator=gen, dtype=torch.float64)
    big, small = (1e200, 1e-200) if dtype == torch.float64 else (1e30, 1e-30)
    rows = torch.logspace(-1, 1, b * h * w, dtype=torch.float64)
    rows[::3] *= big
    rows[1::3] *= small
    feat = (base * rows[torch.randperm(b * h * w, generator=gen)].reshape(b, h, w, 1)).to(dtype)
    feat[0, 1, 2] = 0  # a zero row: cosine 0 with its neighbours
    check(harness, tmp_path, feat, b, h, w, connectivity, "cosine")
    # every row at one extreme scale: the costs of the rows near 1
    near_one, _ = emulate(harness, tmp_path, base.to(dtype), b, h, w, connectivity, "cosine")
    # (normal numbers whose squares overflow or underflow)
    for scale in (2.0 ** 120, 2.0 ** -120) if dtype == torch.float32 else (2.0 ** 1000, 2.0 ** -1000):
        scaled = base.to(dtype) * scale
        check(harness, tmp_path, scaled, b, h, w, connectivity, "cosine")
        got, _ = emulate(harness, tmp_path, scaled, b, h, w, connectivity, "cosine")
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(got, near_one, rtol=tol, atol=tol)
