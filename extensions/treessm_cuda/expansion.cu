// Host side of the expanded selective scan's kernels (expansion_kernels.cuh): argument checks,
// launches and the torch.library registration (CUDA dispatch key; the autograd and the loop
// over the blocks of channels live in treessm.ops.expansion_cuda). A block is the W channels
// [c0, c0 + W) of u's D; its rows are [N, W S] in u's dtype, float32 or float64.
//
// cuda_selective_expand(u, dx, de, A, B, c0, width) -> (x, w)   de: the edges' steps
// cuda_selective_readout(h, h2, C, g, c0, moments, y1!) -> (mean, m2)  y1's block columns
// cuda_selective_readout_backward(gy1, share_mean, share_m2, mu, h, h2, C, g, c0, accumulate,
//   gC!) -> (gh, gg)                              gC += the block's share (or = it)
// cuda_selective_expand_backward(gx, gx2, gw, u, dx, de, A, B, c0, accumulate, gu!, gdx!, ge!,
//   gB!) -> gA                                    gu, gdx, ge: block columns; gB += share
// The states h and the gradient gx come whole or as two addends (h2, gx2: None or of the
// same shape), as a scan in two parts gives them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "check.cuh"
#include "expansion_kernels.cuh"
#include "host_utils.cuh"

namespace treessm_cuda {
namespace {

using expansion::Args;

void check_vector(const c10::optional<at::Tensor>& t, const char* name, int64_t n,
                  at::ScalarType dtype) {
  if (!t.has_value()) return;
  TREESSM_CHECK(t->is_cuda() && t->is_contiguous() && t->scalar_type() == dtype &&
                    t->dim() == 1 && t->size(0) == n,
                name, " must be a contiguous CUDA ", dtype, " tensor of ", n, " entries");
}

// The block's problem from u [N, D], A [D, S] and the block's columns; checks the inputs
// every kernel reads.
struct Block {
  int64_t n, d, s, c0, w;
};

Block check_block(const at::Tensor& u, const at::Tensor& dx, const at::Tensor& de,
                  const at::Tensor& A, const at::Tensor& B, int64_t c0, int64_t width) {
  TREESSM_CHECK(u.is_cuda() && u.dim() == 2, "u must be a 2-D CUDA tensor");
  const auto dtype = u.scalar_type();
  TREESSM_CHECK(dtype == at::kFloat || dtype == at::kDouble, "u must be float32 or float64, got ",
                dtype);
  Block b{u.size(0), u.size(1), A.size(1), c0, width};
  TREESSM_CHECK(b.n < (int64_t(1) << 31) && b.d < (int64_t(1) << 31), "too many rows");
  TREESSM_CHECK(c0 >= 0 && width >= 1 && c0 + width <= b.d, "the block [", c0, ", ", c0 + width,
                ") must lie in the ", b.d, " channels");
  TREESSM_CHECK(b.s >= 1, "A must have at least one state");
  TREESSM_CHECK(width * b.s * static_cast<int64_t>(u.element_size()) <=
                    expansion::kMaxColumnBytes,
                "a block's states take at most ", expansion::kMaxColumnBytes,
                " bytes a vertex, got ", width, " channels of ", b.s, " states");
  check_rows(u, "u", b.n, b.d, dtype);
  check_rows(dx, "dx", b.n, b.d, dtype);
  check_rows(de, "de", b.n, b.d, dtype);
  check_rows(A, "A", b.d, b.s, dtype);
  check_rows(B, "B", b.n, b.s, dtype);
  return b;
}

// The block's sizes.
template <typename T>
Args<T> block_args(const Block& b) {
  Args<T> a{};
  a.n = b.n;
  a.d = static_cast<int>(b.d);
  a.s = static_cast<int>(b.s);
  a.c0 = static_cast<int>(b.c0);
  a.w = static_cast<int>(b.w);
  return a;
}

// The arguments the expansion's kernels read: u, the steps, A, B and the block's sizes.
template <typename T>
Args<T> expansion_args(const Block& b, const at::Tensor& u, const at::Tensor& dx,
                       const at::Tensor& de, const at::Tensor& A, const at::Tensor& B) {
  Args<T> a = block_args<T>(b);
  a.u = u.data_ptr<T>();
  a.dx = dx.data_ptr<T>();
  a.de = de.data_ptr<T>();
  a.a = A.data_ptr<T>();
  a.b = B.data_ptr<T>();
  return a;
}

// The arguments the read-out's kernels read: C, g and the block's sizes.
template <typename T>
Args<T> readout_args(const Block& b, const at::Tensor& C, const c10::optional<at::Tensor>& g) {
  Args<T> a = block_args<T>(b);
  a.c = C.data_ptr<T>();
  a.g = optional_ptr<T>(g);
  return a;
}

// The readout's problem: h [N, W S], C [N, S], y1 [N, D] (D from y1), g [W, S] or none.
Block check_readout(const at::Tensor& h, const c10::optional<at::Tensor>& h2, const at::Tensor& C,
                    const c10::optional<at::Tensor>& g, int64_t c0, const at::Tensor& out,
                    const char* out_name) {
  TREESSM_CHECK(h.is_cuda() && h.dim() == 2, "h must be a 2-D CUDA tensor");
  const auto dtype = h.scalar_type();
  TREESSM_CHECK(dtype == at::kFloat || dtype == at::kDouble, "h must be float32 or float64, got ",
                dtype);
  TREESSM_CHECK(C.dim() == 2 && C.size(1) >= 1 && h.size(1) % C.size(1) == 0,
                "C must be [N, S] with S dividing h's columns");
  Block b{h.size(0), out.size(1), C.size(1), c0, h.size(1) / C.size(1)};
  TREESSM_CHECK(c0 >= 0 && c0 + b.w <= b.d, "the block [", c0, ", ", c0 + b.w,
                ") must lie in the ", b.d, " channels of ", out_name);
  TREESSM_CHECK(b.w * b.s * static_cast<int64_t>(h.element_size()) <= expansion::kMaxColumnBytes,
                "a block's states take at most ", expansion::kMaxColumnBytes, " bytes a vertex");
  check_rows(h, "h", b.n, b.w * b.s, dtype);
  if (h2.has_value()) check_rows(*h2, "h2", b.n, b.w * b.s, dtype);
  check_rows(C, "C", b.n, b.s, dtype);
  check_rows(out, out_name, b.n, b.d, dtype);
  if (g.has_value()) check_rows(*g, "g", b.w, b.s, dtype);
  return b;
}

// Shared memory of a block of the backward kernels: a row of W S column sums per segment.
size_t column_bytes(const Block& b, size_t item) {
  return static_cast<size_t>(expansion::column_rows(static_cast<int>(b.w), static_cast<int>(b.s),
                                                    static_cast<int>(item))) *
         b.w * b.s * item;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> selective_expand(const at::Tensor& u, const at::Tensor& dx,
                                                    const at::Tensor& de, const at::Tensor& A,
                                                    const at::Tensor& B, int64_t c0,
                                                    int64_t width) {
  const Block b = check_block(u, dx, de, A, B, c0, width);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor x = at::empty({b.n, b.w * b.s}, u.options());
  at::Tensor w = at::empty({b.n, b.w * b.s}, u.options());
  if (b.n == 0) return {x, w};
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cuda_selective_expand", [&] {
    const auto a = expansion_args<scalar_t>(b, u, dx, de, A, B);
    expansion::expand_kernel<scalar_t>
        <<<static_cast<unsigned>(expansion::row_blocks(b.n)), expansion::kThreads, 0,
           at::cuda::getCurrentCUDAStream()>>>(a, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x, w};
}

std::tuple<at::Tensor, at::Tensor> selective_readout(const at::Tensor& h,
                                                     const c10::optional<at::Tensor>& h2,
                                                     const at::Tensor& C,
                                                     const c10::optional<at::Tensor>& g,
                                                     int64_t c0, bool moments, at::Tensor& y1) {
  const Block b = check_readout(h, h2, C, g, c0, y1, "y1");
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor mean = at::empty({moments ? b.n : 0}, h.options());
  at::Tensor m2 = at::empty({moments ? b.n : 0}, h.options());
  if (b.n == 0) return {mean, m2};
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cuda_selective_readout", [&] {
    const auto a = readout_args<scalar_t>(b, C, g);
    expansion::readout_kernel<scalar_t>
        <<<static_cast<unsigned>(expansion::row_blocks(b.n)), expansion::kThreads, 0,
           at::cuda::getCurrentCUDAStream()>>>(
            a, h.data_ptr<scalar_t>(), optional_ptr<scalar_t>(h2), y1.data_ptr<scalar_t>(),
            moments ? mean.data_ptr<scalar_t>() : nullptr,
            moments ? m2.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, m2};
}

std::tuple<at::Tensor, at::Tensor> selective_readout_backward(
    const at::Tensor& gy1, const c10::optional<at::Tensor>& share_mean,
    const c10::optional<at::Tensor>& share_m2, const c10::optional<at::Tensor>& mu,
    const at::Tensor& h, const c10::optional<at::Tensor>& h2, const at::Tensor& C,
    const c10::optional<at::Tensor>& g, int64_t c0, bool accumulate, at::Tensor& gC) {
  const Block b = check_readout(h, h2, C, g, c0, gy1, "gy1");
  const auto dtype = h.scalar_type();
  check_rows(gC, "gC", b.n, b.s, dtype);
  check_vector(share_mean, "share_mean", b.n, dtype);
  check_vector(share_m2, "share_m2", b.n, dtype);
  check_vector(mu, "mu", b.n, dtype);
  TREESSM_CHECK(!share_m2.has_value() || mu.has_value(), "share_m2 needs mu");
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor gh = at::empty_like(h);
  const int64_t blocks = expansion::row_blocks(b.n);
  at::Tensor part = at::empty({g.has_value() ? blocks : 0, b.w * b.s}, h.options());
  if (b.n == 0) {
    if (!accumulate) gC.zero_();
    return {gh, at::zeros({g.has_value() ? b.w : 0, b.s}, h.options())};
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "cuda_selective_readout_backward", [&] {
    const auto a = readout_args<scalar_t>(b, C, g);
    const size_t smem = g.has_value() ? column_bytes(b, sizeof(scalar_t)) : 0;
    expansion::readout_backward_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), expansion::kThreads, smem,
           at::cuda::getCurrentCUDAStream()>>>(
            a, gy1.data_ptr<scalar_t>(), optional_ptr<scalar_t>(share_mean),
            optional_ptr<scalar_t>(share_m2), optional_ptr<scalar_t>(mu), h.data_ptr<scalar_t>(),
            optional_ptr<scalar_t>(h2), gh.data_ptr<scalar_t>(), gC.data_ptr<scalar_t>(),
            accumulate, g.has_value() ? part.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!g.has_value()) return {gh, at::empty({0, b.s}, h.options())};
  // the blocks' partial sums, added in order
  return {gh, part.sum(0).view({b.w, b.s})};
}

at::Tensor selective_expand_backward(const at::Tensor& gx, const c10::optional<at::Tensor>& gx2,
                                     const at::Tensor& gw,
                                     const at::Tensor& u, const at::Tensor& dx,
                                     const at::Tensor& de, const at::Tensor& A,
                                     const at::Tensor& B, int64_t c0, bool accumulate,
                                     at::Tensor& gu, at::Tensor& gdx, at::Tensor& ge,
                                     at::Tensor& gB) {
  const int64_t width = A.dim() == 2 && A.size(1) > 0 ? gx.size(1) / A.size(1) : 0;
  const Block b = check_block(u, dx, de, A, B, c0, width);
  const auto dtype = u.scalar_type();
  check_rows(gx, "gx", b.n, b.w * b.s, dtype);
  if (gx2.has_value()) check_rows(*gx2, "gx2", b.n, b.w * b.s, dtype);
  check_rows(gw, "gw", b.n, b.w * b.s, dtype);
  check_rows(gu, "gu", b.n, b.d, dtype);
  check_rows(gdx, "gdx", b.n, b.d, dtype);
  check_rows(ge, "ge", b.n, b.d, dtype);
  check_rows(gB, "gB", b.n, b.s, dtype);
  const c10::cuda::CUDAGuard guard(u.device());
  const int64_t blocks = expansion::row_blocks(b.n);
  at::Tensor part = at::empty({blocks, b.w * b.s}, u.options());
  if (b.n == 0) {
    if (!accumulate) gB.zero_();
    return at::zeros({b.w, b.s}, u.options());
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "cuda_selective_expand_backward", [&] {
    const auto a = expansion_args<scalar_t>(b, u, dx, de, A, B);
    expansion::expand_backward_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), expansion::kThreads, column_bytes(b, sizeof(scalar_t)),
           at::cuda::getCurrentCUDAStream()>>>(
            a, gx.data_ptr<scalar_t>(), optional_ptr<scalar_t>(gx2), gw.data_ptr<scalar_t>(),
            gu.data_ptr<scalar_t>(),
            gdx.data_ptr<scalar_t>(), ge.data_ptr<scalar_t>(), gB.data_ptr<scalar_t>(),
            accumulate, part.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return part.sum(0).view({b.w, b.s});
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def(
      "cuda_selective_expand(Tensor u, Tensor dx, Tensor de, Tensor A, Tensor B, int c0, "
      "int width) -> (Tensor, Tensor)");
  m.def(
      "cuda_selective_readout(Tensor h, Tensor? h2, Tensor C, Tensor? g, int c0, bool moments, "
      "Tensor(a!) y1) -> (Tensor, Tensor)");
  m.def(
      "cuda_selective_readout_backward(Tensor gy1, Tensor? share_mean, Tensor? share_m2, "
      "Tensor? mu, Tensor h, Tensor? h2, Tensor C, Tensor? g, int c0, bool accumulate, "
      "Tensor(a!) gC) -> (Tensor, Tensor)");
  m.def(
      "cuda_selective_expand_backward(Tensor gx, Tensor? gx2, Tensor gw, Tensor u, Tensor dx, "
      "Tensor de, Tensor A, Tensor B, int c0, bool accumulate, Tensor(a!) gu, Tensor(b!) gdx, "
      "Tensor(c!) ge, Tensor(d!) gB) -> Tensor");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) {
  m.impl("cuda_selective_expand", &selective_expand);
  m.impl("cuda_selective_readout", &selective_readout);
  m.impl("cuda_selective_readout_backward", &selective_readout_backward);
  m.impl("cuda_selective_expand_backward", &selective_expand_backward);
}

}  // namespace treessm_cuda
