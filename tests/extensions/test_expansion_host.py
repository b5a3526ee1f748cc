"""The expanded selective scan's kernels (``extensions/treessm_cuda/expansion_kernels.cuh``)
compiled for the host and run with one thread per CUDA thread, for one block of channels,
against their definitions written out in torch (float64): the expansion, the read-out and
the state moments, and the backward of each; the columns outside the block untouched; the
blocks' sums over vertices for every number of row blocks; float64 and float32."""
import subprocess

import numpy as np
import pytest
import torch

from emulation import compile_harness

POISON = -777.0


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "expansion_harness.cpp")


def _problem(n, d, s, c0, w, seed):
    g = torch.Generator().manual_seed(seed)
    f = dict(dtype=torch.float64, generator=g)
    t = dict(u=torch.randn(n, d, **f), dx=0.1 + torch.rand(n, d, **f),
             de=0.1 + torch.rand(n, d, **f), A=-2 * torch.rand(d, s, **f),
             B=torch.randn(n, s, **f), C=torch.randn(n, s, **f), g=torch.randn(w, s, **f),
             h=torch.randn(n, w * s, **f), gy1=torch.randn(n, d, **f),
             share_mean=torch.randn(n, **f), share_m2=torch.randn(n, **f),
             mu=torch.randn(n, **f), gx=torch.randn(n, w * s, **f),
             gw=torch.randn(n, w * s, **f), gC=torch.randn(n, s, **f), gB=torch.randn(n, s, **f),
             y1=torch.randn(n, d, **f), h2=torch.randn(n, w * s, **f),
             gx2=torch.randn(n, w * s, **f))
    t["h"][: n // 3] += 3.0  # rows far from zero mean
    return t


NAMES = ("x", "w", "y1", "mean", "m2", "gh", "gC", "gg", "gu", "gdx", "ge", "gB", "gA")


def _run(harness, tmp, t, n, d, s, c0, w, has_g, moments, accumulate, dtype, expand_blocks=3,
         two=False):
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array([dtype == torch.float32, n, d, s, c0, w, has_g, moments, accumulate,
                  expand_blocks, two], np.int64).tofile(f)
        for k in ("u", "dx", "de", "A", "B", "C", "g", "h", "gy1", "share_mean", "share_m2",
                  "mu", "gx", "gw", "gC", "gB", "y1", "h2", "gx2"):
            t[k].numpy().astype(np.float64).tofile(f)
    subprocess.run([str(harness), str(src), str(dst)], check=True)
    out = torch.from_numpy(np.fromfile(dst, np.float64))
    k = w * s
    sizes = dict(x=n * k, w=n * k, y1=n * d, mean=n, m2=n, gh=n * k, gC=n * s, gg=k, gu=n * d,
                 gdx=n * d, ge=n * d, gB=n * s, gA=k)
    got, at = {}, 0
    for name in NAMES:
        got[name] = out[at:at + sizes[name]]
        at += sizes[name]
    assert at == out.numel()
    return got


def _expected(t, n, d, s, c0, w, has_g, moments, accumulate, two=False):
    if two:  # the states and the gradient as two addends each
        t = dict(t, h=t["h"] + t["h2"], gx=t["gx"] + t["gx2"])
    blk = slice(c0, c0 + w)
    u, dx, de = t["u"][:, blk], t["dx"][:, blk], t["de"][:, blk]
    A, B, C = t["A"][blk], t["B"], t["C"]
    h = t["h"].view(n, w, s)
    read = C[:, None, :] * (t["g"] if has_g else 1.0)
    e = {}
    e["x"] = ((dx * u)[:, :, None] * B[:, None, :]).reshape(-1)
    wt = torch.exp(de[:, :, None] * A)
    e["w"] = wt.reshape(-1)
    y1 = t["y1"].clone()
    y1[:, blk] = (h * read).sum(-1)
    e["y1"] = y1.reshape(-1)
    flat = t["h"]
    e["mean"] = flat.mean(1) if moments else torch.full((n,), POISON, dtype=torch.float64)
    e["m2"] = ((flat - flat.mean(1, keepdim=True)) ** 2).sum(1) if moments else \
        torch.full((n,), POISON, dtype=torch.float64)
    gy1 = t["gy1"][:, blk]
    gh = gy1[:, :, None] * read
    if moments:
        gh = gh + t["share_mean"][:, None, None] + t["share_m2"][:, None, None] * (
            h - t["mu"][:, None, None])
    e["gh"] = gh.reshape(-1)
    gC = (gy1[:, :, None] * (t["g"] if has_g else 1.0) * h).sum(1)
    e["gC"] = (gC + t["gC"] if accumulate else gC).reshape(-1)
    e["gg"] = (gy1[:, :, None] * C[:, None, :] * h).sum(0).reshape(-1) if has_g else \
        torch.zeros(w * s, dtype=torch.float64)
    gx, gw = t["gx"].view(n, w, s), t["gw"].view(n, w, s)
    q = (gx * B[:, None, :]).sum(-1)
    for name, cols in (("gu", q * dx), ("gdx", q * u), ("ge", (gw * wt * A).sum(-1))):
        full = torch.full((n, d), POISON, dtype=torch.float64)
        full[:, blk] = cols
        e[name] = full.reshape(-1)
    gB = (gx * (dx * u)[:, :, None]).sum(1)
    e["gB"] = (gB + t["gB"] if accumulate else gB).reshape(-1)
    e["gA"] = (gw * wt * de[:, :, None]).sum(0).reshape(-1)
    return e


CASES = [  # n, d, s, c0, w: one state, partial warps, more than 32 channels, one vertex
    (1, 3, 4, 0, 3),
    (5, 7, 1, 2, 4),
    (37, 40, 3, 3, 35),
    (130, 9, 5, 0, 9),
    (0, 4, 2, 1, 2),
    (9, 6, 11, 1, 5),  # states in two chunks of registers, the second partial
    (70, 20, 4, 3, 16),  # two segments of 16 lanes a warp (TreeSSMConv's blocks)
    (45, 4, 16, 1, 2),  # sixteen segments of two lanes, four chunks of states
    (23, 2, 1, 1, 1),  # a lane a segment, one state
    (6, 3, 500, 0, 2),  # segments kept at 32 lanes: two would not fit their column sums
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_d{}_s{}_c{}_w{}".format(*c))
def test_kernels_match_their_definitions(harness, tmp_path, case, dtype):
    n, d, s, c0, w = case
    for i, (has_g, moments, accumulate) in enumerate([(True, True, False), (False, False, True),
                                                      (True, False, True), (False, True, False)]):
        t = _problem(n, d, s, c0, w, seed=10 * i + n)
        if dtype == torch.float32:  # the inputs as the float kernels see them
            t = {k: v.float().double() for k, v in t.items()}
        two = i >= 2  # the states and the gradient as two addends
        got = _run(harness, tmp_path, t, n, d, s, c0, w, has_g, moments, accumulate, dtype,
                   two=two)
        want = _expected(t, n, d, s, c0, w, has_g, moments, accumulate, two)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else \
            dict(rtol=2e-5, atol=2e-5)
        for name in NAMES:
            torch.testing.assert_close(got[name], want[name], **tol, msg=name)


def test_sums_do_not_depend_on_the_expand_launch_and_repeat_bitwise(harness, tmp_path):
    n, d, s, c0, w = 300, 12, 4, 4, 8
    t = _problem(n, d, s, c0, w, seed=3)
    t = {k: v.float().double() for k, v in t.items()}
    first = _run(harness, tmp_path, t, n, d, s, c0, w, True, True, False, torch.float32, 1)
    again = _run(harness, tmp_path, t, n, d, s, c0, w, True, True, False, torch.float32, 7)
    for name in NAMES:
        assert torch.equal(first[name], again[name]), name


def test_two_addends_give_the_bits_of_their_sum(harness, tmp_path):
    # the kernels add h + h2 (and gx + gx2) as they read them: the same bits as the sum
    # formed first in the kernels' type and handed over whole
    n, d, s, c0, w = 130, 12, 4, 4, 8
    t = {k: v.float().double() for k, v in _problem(n, d, s, c0, w, seed=5).items()}
    split = _run(harness, tmp_path, t, n, d, s, c0, w, True, True, False, torch.float32,
                 two=True)
    whole = dict(t, h=(t["h"].float() + t["h2"].float()).double(),
                 gx=(t["gx"].float() + t["gx2"].float()).double())
    joined = _run(harness, tmp_path, whole, n, d, s, c0, w, True, True, False, torch.float32)
    for name in NAMES:
        assert torch.equal(split[name], joined[name]), name
