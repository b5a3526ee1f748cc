"""Inputs with more than 2^31 elements: the scan indexes them with 64 bits. Each test needs
tens of GiB (GPU memory, or host memory for the CPU backend), so it runs only with
``--runslow`` and skips where the memory is not there."""
import gc

import pytest
import torch

from oracle import dense_tree_scan
from treessm import Tree, tree_scan

CHANNELS = 8
TREE = 4  # vertices per tree: a star, vertex 0 of each group its root
# just above 2^31 elements per tensor
NUM_NODES = (2 ** 31 // CHANNELS // TREE + 1) * TREE


def _available_gib(device: str) -> float:
    if device == "cuda":
        gc.collect()  # what an earlier test left to the caching allocator is free too
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        return free / 2 ** 30
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2 ** 20


def _stars(n: int) -> Tree:
    v = torch.arange(n)
    return Tree.from_parent(torch.where(v % TREE == 0, -1, v - v % TREE), validate=False)


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("direction", ["up", "down", "both"])  # the largest last
def test_scan_beyond_2_31_elements(device, direction):
    # "both" runs on 16-bit inputs (the indexing is the same). Its backward keeps, besides
    # x, w, out, their gradients and the incoming one, float32 accumulators of x's shape:
    # the up sums of x and of the gradient and what "both" reads of them, twelve in the
    # kernels' passes and more around them; it ran out of a 140-GiB H200 (sixteen
    # accumulators is the bound used here). One direction keeps one accumulator.
    dtype = torch.bfloat16 if direction == "both" else torch.float32
    elements = NUM_NODES * CHANNELS
    accumulators = 16 if direction == "both" else 1
    need = (elements * (6 * dtype.itemsize + 4 * accumulators)) / 2 ** 30 * 1.05
    if _available_gib(device) < need:
        pytest.skip(f"needs about {need:.0f} GiB free on {device}")
    # drawn on the device that scans them: about twenty seconds a tensor on one host core
    gen = torch.Generator(device).manual_seed(0)
    tree = _stars(NUM_NODES).to(device)
    x, w = (torch.rand(NUM_NODES, CHANNELS, generator=gen, device=device).to(dtype)
            .requires_grad_() for _ in range(2))
    out = tree_scan(x, w, tree, direction)
    assert x.numel() > 2 ** 31
    out.sum().backward()
    parent = [-1] + [0] * (TREE - 1)
    # the first and the last trees, whose rows lie below and beyond 2^31 elements
    for start in (0, NUM_NODES - TREE):
        rows = slice(start, start + TREE)
        xs = x.detach()[rows].double().cpu().requires_grad_()
        ws = w.detach()[rows].double().cpu().requires_grad_()
        ref = dense_tree_scan(xs, ws, parent, direction)
        ref.sum().backward()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # 16-bit results are rounded
        torch.testing.assert_close(out[rows].double().cpu(), ref.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(x.grad[rows].double().cpu(), xs.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(w.grad[rows].double().cpu(), ws.grad, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("direction", ["down", "up"])
def test_selective_scan_beyond_2_31_elements(direction):
    # the fused walk on CUDA: rows of u, delta, y and their gradients past 2^31 elements
    from treessm import selective_tree_scan
    from treessm.ops.selective_scan import selective_tree_scan_ref

    need = 10 * NUM_NODES * CHANNELS * 4 / 2 ** 30
    if _available_gib("cuda") < need:
        pytest.skip(f"needs about {need:.0f} GiB free on cuda")
    gen = torch.Generator("cuda").manual_seed(1)  # drawn on the device, as above
    tree = _stars(NUM_NODES).to("cuda")

    def draw(fn, *shape):
        return fn(*shape, generator=gen, device="cuda")

    u = draw(torch.randn, NUM_NODES, CHANNELS).requires_grad_()
    delta = (draw(torch.rand, NUM_NODES, CHANNELS) * 0.5).requires_grad_()
    A = (-draw(torch.rand, CHANNELS, 2)).requires_grad_()
    B = draw(torch.randn, NUM_NODES, 2).requires_grad_()
    C = draw(torch.randn, NUM_NODES, 2).requires_grad_()
    y = selective_tree_scan(u, delta, A, B, C, tree, direction=direction)
    assert u.numel() > 2 ** 31
    y.backward(torch.ones_like(y))
    for start in (0, NUM_NODES - TREE):
        rows = slice(start, start + TREE)
        small = Tree.from_parent(torch.tensor([-1] + [0] * (TREE - 1)))
        leaves = [t.detach()[rows].double().cpu().requires_grad_() for t in (u, delta, B, C)]
        a = A.detach().double().cpu()
        ref = selective_tree_scan_ref(leaves[0], leaves[1], a, leaves[2], leaves[3], small,
                                      direction=direction)
        ref.sum().backward()
        torch.testing.assert_close(y[rows].double().cpu(), ref.detach(), rtol=1e-5, atol=1e-5)
        for got, leaf in zip((u, delta, B, C), leaves):
            torch.testing.assert_close(got.grad[rows].double().cpu(), leaf.grad, rtol=1e-5,
                                       atol=1e-5)
