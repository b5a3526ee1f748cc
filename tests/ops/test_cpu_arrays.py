"""The CPU kernels' arrays start on a cache line (numpy's large arrays start 16 bytes into
their block, which splits every 64-byte vector load of a row across two lines)."""
import numpy as np
import pytest
import torch

import treessm
from treessm.ops import cpu_arrays


@pytest.mark.parametrize("shape", [0, 1, 7, (0, 5), (3, 5), (1000, 128), (2, 3, 4), 1 << 22])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8])
def test_empty_and_zeros_start_on_a_cache_line(shape, dtype):
    for make in (cpu_arrays.empty, cpu_arrays.zeros):
        a = make(shape, dtype)
        want = (shape,) if isinstance(shape, int) else shape
        assert a.shape == want and a.dtype == np.dtype(dtype) and a.flags.c_contiguous
        assert a.size == 0 or a.ctypes.data % cpu_arrays.LINE == 0  # an empty one has no start
    assert not cpu_arrays.zeros(shape, dtype).any()


def test_the_scans_outputs_and_gradients_start_on_a_cache_line():
    g = torch.Generator().manual_seed(0)
    n, d, s = 5000, 40, 3
    tree = treessm.Tree.from_parent(torch.cat([torch.tensor([-1]), torch.arange(n - 1)]))
    u, dl = (torch.randn(n, d, generator=g, requires_grad=True) for _ in range(2))
    A = (-torch.rand(d, s, generator=g)).requires_grad_()
    B, C = (torch.randn(n, s, generator=g, requires_grad=True) for _ in range(2))
    y = treessm.selective_tree_scan(u, dl, A, B, C, tree, delta_softplus=True,
                                    state_norm=True, backend="numba")
    y.backward(torch.ones_like(y))
    x, w = torch.randn(n, d, generator=g), torch.rand(n, d, generator=g)
    h = treessm.tree_scan(x, w, tree, backend="numba")
    for t in (y, u.grad, dl.grad, h):
        assert t.data_ptr() % cpu_arrays.LINE == 0


def test_sum_rows_in_order_adds_the_rows_first_to_last():
    # in float32 (1e8 + 1) - 1e8 is 0 and (1e8 - 1e8) + 1 is 1: the rows go first to last
    # whatever their values (the order is the contract: thread counts never change the bits)
    p = np.array([[1e8], [1.0], [-1e8]], np.float32)
    assert cpu_arrays.sum_rows_in_order(p)[0] == 0.0
    assert cpu_arrays.sum_rows_in_order(p[::-1].copy())[0] == 0.0
    q = np.array([[1.0], [1e8], [-1e8]], np.float32)
    assert cpu_arrays.sum_rows_in_order(q)[0] == 0.0
    r = np.array([[1e8], [-1e8], [1.0]], np.float32)
    assert cpu_arrays.sum_rows_in_order(r)[0] == 1.0
    one = np.arange(6.0).reshape(1, 2, 3)
    out = cpu_arrays.sum_rows_in_order(one)
    assert np.array_equal(out, one[0]) and out.base is None  # a copy, not a view
