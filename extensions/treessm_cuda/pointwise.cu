// Host side of the layers' row-wise operators on CUDA (pointwise_kernels.cuh): argument
// checks, launches and the torch.library registration (CUDA dispatch key; the autograd and
// the choice of kernels or torch composition live in treessm.ops.pointwise). Rows [N, C]
// and vectors [C] of one dtype, float32 or float64, contiguous, on one device.
//
// cuda_silu_mix(u, m, a, b) -> out
// cuda_silu_mix_backward(g, u, m, a, b) -> (gu, gm, ga, gb)
// cuda_norm_gate(y, z, w, b, eps) -> out
// cuda_norm_gate_backward(g, y, z, w, b, eps) -> (gy, gz, gw, gb)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "check.cuh"
#include "host_utils.cuh"
#include "pointwise_kernels.cuh"

namespace treessm_cuda {
namespace {

// Checks the rows x, other [N, C] and the vectors p, q [C] (x's dtype, float32 or
// float64; C within the column budget) and returns N and C.
std::tuple<int64_t, int64_t> check_rows_and_vectors(const at::Tensor& x, const char* xn,
                                                    const at::Tensor& other, const char* on,
                                                    const at::Tensor& p, const char* pn,
                                                    const at::Tensor& q, const char* qn) {
  TREESSM_CHECK(x.is_cuda() && x.dim() == 2, xn, " must be a 2-D CUDA tensor");
  const auto dtype = x.scalar_type();
  TREESSM_CHECK(dtype == at::kFloat || dtype == at::kDouble, xn,
                " must be float32 or float64, got ", dtype);
  const int64_t n = x.size(0), c = x.size(1);
  TREESSM_CHECK(c >= 1 && 2 * c * static_cast<int64_t>(x.element_size()) <=
                              pointwise::kMaxColumnBytes,
                xn, " must have 1 to ", pointwise::kMaxColumnBytes / (2 * x.element_size()),
                " columns, got ", c);
  check_rows(x, xn, n, c, dtype);
  check_rows(other, on, x);
  for (const auto& [t, name] : {std::make_pair(&p, pn), std::make_pair(&q, qn)}) {
    TREESSM_CHECK(t->is_cuda() && t->is_contiguous() && t->dim() == 1 && t->size(0) == c &&
                      t->scalar_type() == dtype && t->device() == x.device(),
                  name, " must be a contiguous ", dtype, " vector of ", c, " entries on ",
                  x.device());
  }
  return {n, c};
}

int64_t element_blocks(int64_t total) {
  const int64_t blocks = (total + pointwise::kElementThreads - 1) / pointwise::kElementThreads;
  return blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks);
}

size_t column_bytes(int64_t c, size_t item) {
  return static_cast<size_t>(pointwise::kWarps) * 2 * c * item;
}

// The blocks' partial sums [blocks, 2, C] added in order: the two gradients [C], each in a
// tensor of its own (a custom operator's outputs may not alias one another).
std::tuple<at::Tensor, at::Tensor> summed_columns(const at::Tensor& part) {
  return {part.select(1, 0).sum(0), part.select(1, 1).sum(0)};
}

}  // namespace

at::Tensor silu_mix_cuda(const at::Tensor& u, const at::Tensor& m, const at::Tensor& a,
                         const at::Tensor& b) {
  const auto [n, c] = check_rows_and_vectors(u, "u", m, "m", a, "a", b, "b");
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out = at::empty_like(u);
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cuda_silu_mix", [&] {
    pointwise::silu_mix_kernel<scalar_t>
        <<<static_cast<unsigned>(element_blocks(n * c)), pointwise::kElementThreads, 0,
           at::cuda::getCurrentCUDAStream()>>>(u.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(),
                                                a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                                out.data_ptr<scalar_t>(), n,
                                                static_cast<int>(c));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> silu_mix_backward_cuda(
    const at::Tensor& g, const at::Tensor& u, const at::Tensor& m, const at::Tensor& a,
    const at::Tensor& b) {
  const auto [n, c] = check_rows_and_vectors(u, "u", m, "m", a, "a", b, "b");
  check_rows(g, "g", u);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor gu = at::empty_like(u), gm = at::empty_like(m);
  if (n == 0) return {gu, gm, at::zeros_like(a), at::zeros_like(b)};
  const int64_t blocks = pointwise::row_blocks(n);
  at::Tensor part = at::empty({blocks, 2, c}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cuda_silu_mix_backward", [&] {
    pointwise::silu_mix_backward_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), pointwise::kThreads, column_bytes(c, sizeof(scalar_t)),
           at::cuda::getCurrentCUDAStream()>>>(
            g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(),
            a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(),
            gm.data_ptr<scalar_t>(), part.data_ptr<scalar_t>(), n, static_cast<int>(c));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto [ga, gb] = summed_columns(part);
  return {gu, gm, ga, gb};
}

at::Tensor norm_gate_cuda(const at::Tensor& y, const at::Tensor& z, const at::Tensor& w,
                          const at::Tensor& b, double eps) {
  const auto [n, c] = check_rows_and_vectors(y, "y", z, "z", w, "weight", b, "bias");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = at::empty_like(y);
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "cuda_norm_gate", [&] {
    pointwise::norm_gate_kernel<scalar_t>
        <<<static_cast<unsigned>(pointwise::row_blocks(n)), pointwise::kThreads, 0,
           at::cuda::getCurrentCUDAStream()>>>(
            y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
            b.data_ptr<scalar_t>(), static_cast<scalar_t>(eps), out.data_ptr<scalar_t>(), n,
            static_cast<int>(c));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_gate_backward_cuda(
    const at::Tensor& g, const at::Tensor& y, const at::Tensor& z, const at::Tensor& w,
    const at::Tensor& b, double eps) {
  const auto [n, c] = check_rows_and_vectors(y, "y", z, "z", w, "weight", b, "bias");
  check_rows(g, "g", y);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor gy = at::empty_like(y), gz = at::empty_like(z);
  if (n == 0) return {gy, gz, at::zeros_like(w), at::zeros_like(b)};
  const int64_t blocks = pointwise::row_blocks(n);
  at::Tensor part = at::empty({blocks, 2, c}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "cuda_norm_gate_backward", [&] {
    pointwise::norm_gate_backward_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), pointwise::kThreads, column_bytes(c, sizeof(scalar_t)),
           at::cuda::getCurrentCUDAStream()>>>(
            g.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
            w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), static_cast<scalar_t>(eps),
            gy.data_ptr<scalar_t>(), gz.data_ptr<scalar_t>(), part.data_ptr<scalar_t>(), n,
            static_cast<int>(c));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto [gw, gb] = summed_columns(part);
  return {gy, gz, gw, gb};
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def("cuda_silu_mix(Tensor u, Tensor m, Tensor a, Tensor b) -> Tensor");
  m.def(
      "cuda_silu_mix_backward(Tensor g, Tensor u, Tensor m, Tensor a, Tensor b) -> (Tensor, "
      "Tensor, Tensor, Tensor)");
  m.def("cuda_norm_gate(Tensor y, Tensor z, Tensor weight, Tensor bias, float eps) -> Tensor");
  m.def(
      "cuda_norm_gate_backward(Tensor g, Tensor y, Tensor z, Tensor weight, Tensor bias, "
      "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) {
  m.impl("cuda_silu_mix", &silu_mix_cuda);
  m.impl("cuda_silu_mix_backward", &silu_mix_backward_cuda);
  m.impl("cuda_norm_gate", &norm_gate_cuda);
  m.impl("cuda_norm_gate_backward", &norm_gate_backward_cuda);
}

}  // namespace treessm_cuda
