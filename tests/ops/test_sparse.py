"""Sparse CSR products (treessm.ops.sparse): ``csr_matmul`` against torch's product and a
dense one, on the CPU and on a GPU (the extension's kernel), its bits on repeated calls at
a size where cuSPARSE's product changed them, and the layers' uses of it."""
import pytest
import torch

from treessm.ops.sparse import csr_matmul, square_csr

_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _matrix(rows, per_row, dtype, index_dtype=torch.int64, device="cpu", seed=0):
    """A random square CSR matrix with ``per_row`` entries a row on average, some rows
    empty."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 2 * per_row + 1, (rows,), generator=g)
    counts[::7] = 0  # empty rows
    crow = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    nnz = int(crow[-1])
    col = torch.randint(0, max(rows, 1), (nnz,), generator=g)
    values = torch.rand(nnz, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return square_csr(crow.to(index_dtype).to(device), col.to(index_dtype).to(device),
                      values.to(device), rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_dense_product_on_the_cpu(dtype):
    m = _matrix(50, 4, dtype)
    x = torch.randn(50, 9, dtype=dtype)
    torch.testing.assert_close(csr_matmul(m, x), m.to_dense() @ x)


@_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("rows,channels", [(300, 70), (1, 1), (0, 5), (40, 0), (257, 32)])
def test_cuda_kernel_matches_the_dense_product(dtype, index_dtype, rows, channels):
    m = _matrix(rows, 5, dtype, index_dtype, "cuda")
    x = torch.randn(rows, channels, dtype=dtype, device="cuda")
    got = csr_matmul(m, x)
    assert got.shape == (rows, channels) and got.dtype == dtype
    want = m.to(torch.float64).to_dense() @ x.double() if rows else got.new_zeros(0, channels)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want.double(), **tol)


@_CUDA
def test_cuda_kernel_adds_a_row_in_its_stored_order():
    # a row of 1e8, 1, -1e8 in float32: in order, 1e8 + 1 rounds to 1e8 and the row sums
    # to 0; any other order of the three gives 1 or 0 by chance of the order only
    crow = torch.tensor([0, 3, 6], device="cuda")
    col = torch.tensor([0, 1, 2, 2, 1, 0], device="cuda")
    values = torch.tensor([1e8, 1.0, -1e8, -1e8, 1.0, 1e8], device="cuda")
    m = torch.sparse_csr_tensor(crow, col, values, (2, 3))
    got = csr_matmul(m, torch.ones(3, 1, device="cuda"))
    assert got[:, 0].tolist() == [0.0, 0.0]


@_CUDA
def test_cuda_large_product_repeats_its_bits():
    # 10^6 rows, about 10 entries a row, 64 channels: torch's product (cuSPARSE) gave other
    # bits on a second call at this size; the kernel gives the same
    m = _matrix(10**6, 10, torch.float32, device="cuda", seed=3)
    x = torch.randn(10**6, 64, device="cuda")
    first = csr_matmul(m, x)
    for _ in range(3):
        assert torch.equal(csr_matmul(m, x), first)


@_CUDA
def test_cuda_rejects_mismatched_arguments():
    m = _matrix(20, 3, torch.float32, device="cuda")
    ops = torch.ops.treessm
    x = torch.randn(20, 4, device="cuda")
    with pytest.raises(RuntimeError, match="dense must be float32 or float64"):
        ops.cuda_csr_matmul(m.crow_indices(), m.col_indices(), m.values(), x.half())
    with pytest.raises(RuntimeError, match="values must be a contiguous vector"):
        ops.cuda_csr_matmul(m.crow_indices(), m.col_indices(), m.values().double(), x)
    with pytest.raises(RuntimeError, match="col must be a contiguous vector of crow's dtype"):
        ops.cuda_csr_matmul(m.crow_indices(), m.col_indices().int(), m.values(), x)
    with pytest.raises(RuntimeError, match="must be on"):
        ops.cuda_csr_matmul(m.crow_indices().cpu(), m.col_indices(), m.values(), x)
