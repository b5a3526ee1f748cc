"""The edge-cost kernel's own source (``edge_costs_kernel`` in
``extensions/treessm_cuda/grid_costs_kernels.cuh``), compiled for the host and run with one
thread per CUDA thread, against ``edge_cost`` (the torch path): catches indexing, reduction
and alignment mistakes on machines without a GPU (AddressSanitizer and UBSan flag
out-of-bounds and misaligned vector loads)."""
import subprocess

import numpy as np
import pytest
import torch

from emulation import compile_harness
from treessm.topology.distance import EPS, edge_cost, kind_code


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "edge_costs_harness.cpp")


def emulate(harness, tmp, feat, edge_index, distance, threads=32, blocks=0, group=0,
            scalar=False, offset=0):
    """Costs from the emulated kernel and its launch report (pack, group, blocks)."""
    wide = feat.dtype == torch.float64
    n, c = feat.shape
    e = edge_index.shape[1]
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array([n, c, e, kind_code(distance), int(wide), threads, blocks, group, int(scalar),
                  offset], np.int64).tofile(f)
        np.array([EPS], np.float64).tofile(f)
        feat.numpy().astype(np.float64 if wide else np.float32).tofile(f)
        edge_index.numpy().astype(np.int64).tofile(f)
    r = subprocess.run([str(harness), str(src), str(dst)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    got = torch.from_numpy(np.fromfile(dst, np.float64 if wide else np.float32))
    report = dict(kv.split("=") for kv in r.stdout.split())
    return got, {k: int(v) for k, v in report.items()}


def check(harness, tmp, feat, edge_index, distance, rtol=None, **launch):
    got, report = emulate(harness, tmp, feat, edge_index, distance, **launch)
    ref = edge_cost(feat, edge_index, distance)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert not torch.isnan(got).any(), "a cost was never written"
    if rtol is None:
        rtol = 1e-12 if feat.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol,
                               msg=lambda m: f"{list(feat.shape)}, {distance}, {launch}: {m}")
    return report


def random_edges(gen, n, e):
    # random ends, with self-loops and repeated edges among them
    ei = torch.randint(0, n, (2, e), generator=gen)
    if e >= 4:
        ei[:, 1] = ei[0, 1]            # a self-loop
        ei[:, 3] = ei[:, 2]            # a repeated edge
    return ei


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_matches_torch(harness, tmp_path, dtype, distance):
    gen = torch.Generator().manual_seed(5 + 3 * (distance == "l2"))
    for n, e in [(1, 1), (2, 3), (7, 20), (40, 150)]:
        for c in (1, 3, 8, 12, 33):
            feat = torch.randn(n, c, generator=gen, dtype=torch.float64).to(dtype)
            check(harness, tmp_path, feat, random_edges(gen, n, e), distance)


def test_edge_order_by_hand(harness, tmp_path):
    # l2 of scalar features x = vertex id: each cost is the id difference of its edge's ends
    feat = torch.arange(10, dtype=torch.float64).reshape(10, 1)
    ei = torch.tensor([[0, 9, 3, 4, 7], [5, 1, 3, 8, 2]])
    got, _ = emulate(harness, tmp_path, feat, ei, "l2")
    assert got.tolist() == [5.0, 8.0, 0.0, 4.0, 5.0]


def test_pack_and_group_choice(harness, tmp_path):
    """16-byte packs when the rows allow them, single elements otherwise; every group size
    and a grid smaller than the edges (strided loop)."""
    gen = torch.Generator().manual_seed(21)
    n, e = 30, 90
    ei = random_edges(gen, n, e)
    for dtype, c, pack in [(torch.float32, 8, 4), (torch.float32, 40, 4), (torch.float32, 6, 1),
                           (torch.float64, 6, 2), (torch.float64, 3, 1)]:
        feat = torch.randn(n, c, generator=gen, dtype=torch.float64).to(dtype)
        for distance in ("cosine", "l2"):
            report = check(harness, tmp_path, feat, ei, distance)
            assert report["pack"] == pack, (dtype, c, report)
    feat = torch.randn(n, 8, generator=gen)
    report = check(harness, tmp_path, feat, ei, "cosine", offset=1)  # misaligned rows
    assert report["pack"] == 1
    for group in (1, 2, 4, 8, 16, 32):
        for scalar in (False, True):
            report = check(harness, tmp_path, feat, ei, "cosine", group=group, scalar=scalar,
                           threads=64, blocks=2)
            assert report["group"] == group and report["blocks"] == 2
    # long rows: several rounds per lane, a partial last round
    long = torch.randn(n, 4 * 41, generator=gen)
    for distance in ("cosine", "l2"):
        for group in (0, 32, 4):
            check(harness, tmp_path, long, ei, distance, group=group)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cosine_of_zero_rows_and_rows_of_any_scale(harness, tmp_path, dtype):
    gen = torch.Generator().manual_seed(22)
    n, c = 40, 12
    base = torch.randn(n, c, generator=gen, dtype=torch.float64)
    big, small = (1e200, 1e-200) if dtype == torch.float64 else (1e30, 1e-30)
    rows = torch.logspace(-1, 1, n, dtype=torch.float64)
    rows[::3] *= big
    rows[1::3] *= small
    feat = (base * rows[torch.randperm(n, generator=gen)].reshape(n, 1)).to(dtype)
    feat[5] = 0  # a zero row: cost 1 with every row
    ei = random_edges(gen, n, 120)
    ei[0, :4] = 5
    check(harness, tmp_path, feat, ei, "cosine")
    costs, _ = emulate(harness, tmp_path, feat, ei, "cosine")
    assert torch.equal(costs[:4], torch.ones(4, dtype=dtype))
    near_one, _ = emulate(harness, tmp_path, base.to(dtype), ei, "cosine")
    for scale in (2.0 ** 120, 2.0 ** -120) if dtype == torch.float32 else (2.0 ** 1000, 2.0 ** -1000):
        scaled, _ = emulate(harness, tmp_path, base.to(dtype) * scale, ei, "cosine")
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(scaled, near_one, rtol=tol, atol=tol)


def test_empty(harness, tmp_path):
    for n, c, e in [(3, 4, 0), (3, 0, 5), (1, 2, 0)]:
        feat = torch.randn(n, c, dtype=torch.float64)
        ei = torch.zeros(2, e, dtype=torch.long)
        for distance in ("cosine", "l2"):
            check(harness, tmp_path, feat, ei, distance)
