"""The layers' row-wise CUDA kernels (``extensions/treessm_cuda/pointwise_kernels.cuh``)
compiled for the host and run with one thread per CUDA thread, against the torch
compositions that define them (``treessm.ops.pointwise``, float64): SiLU(a u + b m) and
LN(y) SiLU(z), their outputs and all four gradients; rows fewer than the warps, more than
the blocks, one channel, channels past a warp; float64 and float32; the same bits for any
launch of the elementwise kernel."""
import subprocess

import numpy as np
import pytest
import torch

from emulation import compile_harness
from treessm.ops import pointwise as pw

EPS = 1e-5


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return compile_harness(tmp_path_factory.mktemp("emu"), "pointwise_harness.cpp")


def _problem(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    u, m = (torch.randn(n, c, dtype=torch.float64, generator=g) * 3 + 1 for _ in range(2))
    a, b = (torch.randn(c, dtype=torch.float64, generator=g) for _ in range(2))
    return u, m, torch.randn(n, c, dtype=torch.float64, generator=g), a, b


NAMES = ("mix", "mix_gu", "mix_gm", "mix_ga", "mix_gb", "gate", "gate_gy", "gate_gz", "gate_gw",
         "gate_gb")


def _run(harness, tmp, inputs, dtype, element_blocks=3):
    u, m, g, a, b = inputs
    n, c = u.shape
    src, dst = tmp / "in.bin", tmp / "out.bin"
    with open(src, "wb") as f:
        np.array([dtype == torch.float32, n, c, round(EPS * 1e9), element_blocks],
                 np.int64).tofile(f)
        for t in (u, m, g, a, b):
            t.numpy().astype(np.float64).tofile(f)
    subprocess.run([str(harness), str(src), str(dst)], check=True)
    out = torch.from_numpy(np.fromfile(dst, np.float64))
    sizes = [n * c] * 3 + [c, c] + [n * c] * 3 + [c, c]
    got = dict(zip(NAMES, out.split(sizes)))
    assert out.numel() == sum(sizes)
    return got


def _expected(inputs):
    u, m, g, a, b = inputs
    want = {}
    for op, prefix, names in ((pw.silu_mix_reference, "mix", ("gu", "gm", "ga", "gb")),
                              (lambda *t: pw.norm_gate_reference(*t, eps=EPS), "gate",
                               ("gy", "gz", "gw", "gb"))):
        ins = [t.clone().requires_grad_() for t in (u, m, a, b)]
        y = op(*ins)
        y.backward(g)
        want[prefix] = y.detach().reshape(-1)
        for name, t in zip(names, ins):
            want[f"{prefix}_{name}"] = t.grad.reshape(-1)
    return want


CASES = [(1, 1), (3, 5), (7, 37), (130, 64), (1100, 3), (40, 200)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_c{}".format(*c))
def test_kernels_match_the_compositions(harness, tmp_path, case, dtype):
    n, c = case
    inputs = _problem(n, c, seed=n + c)
    if dtype == torch.float32:  # the inputs as the float kernels see them
        inputs = tuple(t.float().double() for t in inputs)
    got = _run(harness, tmp_path, inputs, dtype)
    want = _expected(inputs)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name in NAMES:
        scale = max(1.0, float(want[name].abs().max()))
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol * scale, msg=name)


def test_no_rows_writes_nothing_and_sums_nothing(harness, tmp_path):
    got = _run(harness, tmp_path, _problem(0, 6, seed=1), torch.float32)
    for name in NAMES:
        if name.endswith(("ga", "gb", "gw")):
            assert torch.equal(got[name], torch.zeros(6, dtype=torch.float64)), name
        else:
            assert got[name].numel() == 0, name


def test_any_launch_of_the_elementwise_kernel_gives_the_same_bits(harness, tmp_path):
    inputs = tuple(t.float().double() for t in _problem(70, 33, seed=4))
    first = _run(harness, tmp_path, inputs, torch.float32, element_blocks=1)
    again = _run(harness, tmp_path, inputs, torch.float32, element_blocks=5)
    for name in NAMES:
        assert torch.equal(first[name], again[name]), name
