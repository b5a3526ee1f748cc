"""The CPU kernels' arrays start on a cache line (numpy's large arrays start 16 bytes into
their block, which splits every 64-byte vector load of a row across two lines), and their
internal arrays come from a workspace kept between calls that no result shares."""
import threading

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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_workspace_arrays_start_on_a_cache_line_and_are_kept_by_name(dtype):
    cpu_arrays.release_workspace()
    a = cpu_arrays.workspace("test.a", (100, 3), dtype)
    assert a.shape == (100, 3) and a.dtype == np.dtype(dtype) and a.flags.c_contiguous
    assert a.ctypes.data % cpu_arrays.LINE == 0
    a.fill(7)
    smaller = cpu_arrays.workspace("test.a", 10, dtype)  # fits: the same memory again
    assert smaller.ctypes.data == a.ctypes.data and (smaller == 7).all()
    assert not cpu_arrays.workspace("test.a", 10, dtype, zero=True).any()
    other = cpu_arrays.workspace("test.b", 10, dtype)  # another name, other memory
    assert not np.shares_memory(other, a)
    held = cpu_arrays.workspace_bytes()
    before = a.copy()
    larger = cpu_arrays.workspace("test.a", (1000, 3), dtype)  # grows
    assert larger.shape == (1000, 3) and larger.ctypes.data % cpu_arrays.LINE == 0
    assert cpu_arrays.workspace_bytes() > held
    cpu_arrays.release_workspace()
    assert cpu_arrays.workspace_bytes() == 0
    assert np.array_equal(a, before)  # an array in use keeps its old buffer


def test_each_thread_has_its_own_workspace():
    cpu_arrays.release_workspace()
    mine = cpu_arrays.workspace("test.t", 64, np.float32)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(
        cpu_arrays.workspace("test.t", 64, np.float32)))
    thread.start()
    thread.join()
    assert not np.shares_memory(mine, theirs[0])
    cpu_arrays.release_workspace()


def _scans(n, seed):
    """Outputs and gradients of the fused selective scan (``both``, moments, ``mean``
    steps) and of the tree scan (``both``) on a random tree."""
    g = torch.Generator().manual_seed(seed)
    d, s = 40, 3
    parent = (torch.rand(n, generator=g) * torch.arange(n)).long()
    parent[0] = -1
    tree = treessm.Tree.from_parent(parent)
    u, dl = (torch.randn(n, d, generator=g, requires_grad=True) for _ in range(2))
    A = (-torch.rand(d, s, generator=g)).requires_grad_()
    B, C = (torch.randn(n, s, generator=g, requires_grad=True) for _ in range(2))
    y = treessm.selective_tree_scan(u, dl, A, B, C, tree, delta_softplus=True,
                                    edge_step="mean", state_norm=True, backend="numba")
    y.backward(torch.randn(y.shape, generator=g))
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.rand(n, d, generator=g, requires_grad=True)
    h = treessm.tree_scan(x, w, tree, backend="numba")
    h.backward(torch.randn(h.shape, generator=g))
    return [t.detach() for t in (y, u.grad, dl.grad, A.grad, B.grad, C.grad, h, x.grad,
                                 w.grad)]


def test_results_share_no_memory_with_the_workspace_and_do_not_depend_on_it():
    # the workspace's buffers are dirty from earlier calls of other sizes; every result must
    # be the same bits as from a released (fresh) workspace, and later calls must not change
    # the results of earlier ones
    fresh = {}
    for n in (300, 5000, 1):
        cpu_arrays.release_workspace()
        fresh[n] = _scans(n, n)
    for n in (5000, 300, 5000, 1):
        first = _scans(n, n)
        _scans(2000, 0)  # writes over every buffer a scan of n used
        for got, want in zip(first, fresh[n]):
            assert torch.equal(got, want)
    assert cpu_arrays.workspace_bytes() > 0
    cpu_arrays.release_workspace()
