// The product of a sparse CSR matrix with a dense matrix, each row's entries added in their
// stored order, and its torch.library registration (CUDA dispatch key):
//   torch.ops.treessm.cuda_csr_matmul(crow, col, values, dense) -> out
//       out[r, :] = sum over e in [crow[r], crow[r + 1]) of values[e] dense[col[e], :]
// crow [R + 1] and col [nnz] int32 or int64 (the same), values [nnz] and dense [K, C]
// float32 or float64 (the same), all on one CUDA device. Used for the graph layers'
// neighbour mean and the selective scan's sums over children (treessm.ops.sparse): the
// same bits on every run, which cuSPARSE's SpMM (torch's product) does not give for large
// products. A warp takes 32 channels of one row; its lanes add the row's entries in order,
// four entries' loads issued at a time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "check.cuh"

namespace treessm_cuda {
namespace {

constexpr int kCsrThreads = 256;
constexpr int kCsrUnroll = 4;  // entries whose loads a lane issues together

template <typename T, typename I>
__global__ void __launch_bounds__(kCsrThreads)
csr_matmul_kernel(const I* __restrict__ crow, const I* __restrict__ col,
                  const T* __restrict__ values, const T* __restrict__ dense,
                  T* __restrict__ out, int64_t rows, int64_t C, int64_t groups) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t row = warp / groups;
  if (row >= rows) return;
  const int64_t c = (warp - row * groups) * 32 + (threadIdx.x & 31);
  const bool ok = c < C;
  const int64_t e0 = crow[row], e1 = crow[row + 1];
  T acc = T(0);
  for (int64_t e = e0; e < e1; e += kCsrUnroll) {
    T v[kCsrUnroll], x[kCsrUnroll];
#pragma unroll
    for (int u = 0; u < kCsrUnroll; ++u) {
      const bool in = e + u < e1;
      const int64_t k = in ? static_cast<int64_t>(col[e + u]) : 0;
      v[u] = in ? values[e + u] : T(0);
      x[u] = in && ok ? dense[k * C + c] : T(0);
    }
#pragma unroll
    for (int u = 0; u < kCsrUnroll; ++u)
      if (e + u < e1) acc += v[u] * x[u];
  }
  if (ok) out[row * C + c] = acc;
}

at::Tensor csr_matmul_cuda(const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, const at::Tensor& dense) {
  TREESSM_CHECK(dense.is_cuda() && dense.dim() == 2 && dense.is_contiguous(),
                "dense must be a contiguous 2-D CUDA tensor");
  const auto dtype = dense.scalar_type();
  TREESSM_CHECK(dtype == at::kFloat || dtype == at::kDouble,
                "dense must be float32 or float64, got ", dtype);
  TREESSM_CHECK(crow.is_cuda() && col.is_cuda() && values.is_cuda() &&
                    crow.device() == dense.device() && col.device() == dense.device() &&
                    values.device() == dense.device(),
                "crow, col and values must be on ", dense.device());
  TREESSM_CHECK(crow.dim() == 1 && crow.size(0) >= 1 && crow.is_contiguous(),
                "crow must be a contiguous vector of R + 1 row offsets");
  TREESSM_CHECK(crow.scalar_type() == at::kInt || crow.scalar_type() == at::kLong,
                "crow must be int32 or int64, got ", crow.scalar_type());
  TREESSM_CHECK(col.scalar_type() == crow.scalar_type() && col.dim() == 1 && col.is_contiguous(),
                "col must be a contiguous vector of crow's dtype");
  TREESSM_CHECK(values.scalar_type() == dtype && values.dim() == 1 && values.is_contiguous() &&
                    values.size(0) == col.size(0),
                "values must be a contiguous vector of dense's dtype, one per column index");
  const int64_t rows = crow.size(0) - 1, C = dense.size(1);
  at::Tensor out = at::empty({rows, C}, dense.options());
  if (rows == 0 || C == 0) return out;
  const c10::cuda::CUDAGuard guard(dense.device());
  const int64_t groups = (C + 31) / 32;
  const int64_t warps_per_block = kCsrThreads / 32;
  const int64_t blocks = (rows * groups + warps_per_block - 1) / warps_per_block;
  TREESSM_CHECK(blocks <= 2147483647LL, "too many rows and channels for one launch");
  AT_DISPATCH_FLOATING_TYPES(dtype, "cuda_csr_matmul", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "cuda_csr_matmul_index", [&] {
      csr_matmul_kernel<scalar_t, index_t>
          <<<static_cast<unsigned>(blocks), kCsrThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              crow.data_ptr<index_t>(), col.data_ptr<index_t>(), values.data_ptr<scalar_t>(),
              dense.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, C, groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def("cuda_csr_matmul(Tensor crow, Tensor col, Tensor values, Tensor dense) -> Tensor");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) { m.impl("cuda_csr_matmul", &csr_matmul_cuda); }

}  // namespace treessm_cuda
