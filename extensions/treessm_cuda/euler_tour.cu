// Host side of the Euler tours' list ranking (euler_tour_kernels.cuh): argument checks, the
// launches and the torch.library registration of torch.ops.treessm.cuda_pointer_jump (CUDA
// dispatch key).
//
// cuda_pointer_jump(succ, value, rounds, combine) -> value': `rounds` rounds of pointer
// jumping over the lists whose successors are `succ` (int64 [M], every entry in [0, M); a
// list ends at an element that is its own successor, whose value is the identity of the
// combine: 0 for sums, above every other value for minima), combining values with `combine`
// (0: sum, 1: minimum). After ceil(log2 L) rounds every element holds the combine of the
// values from it to the end of its list (lists of at most L elements). Ids are the caller's
// responsibility (checking them would wait for the device). One launch per round from here,
// none of which waits for the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "check.cuh"
#include "euler_tour_kernels.cuh"

namespace treessm_cuda {

at::Tensor pointer_jump(const at::Tensor& succ, const at::Tensor& value, int64_t rounds,
                        int64_t combine) {
  TREESSM_CHECK(succ.is_cuda() && value.device() == succ.device(),
              "succ and value must be on one CUDA device, got ", succ.device(), " and ",
              value.device());
  TREESSM_CHECK(succ.scalar_type() == at::kLong && value.scalar_type() == at::kLong,
              "succ and value must be int64 tensors, got ", succ.scalar_type(), " and ",
              value.scalar_type());
  TREESSM_CHECK(succ.dim() == 1 && value.dim() == 1 && succ.size(0) == value.size(0),
              "succ and value must be 1-D of one length, got ", succ.sizes(), " and ",
              value.sizes());
  TREESSM_CHECK(rounds >= 0, "rounds must be >= 0, got ", rounds);
  TREESSM_CHECK(combine == euler::kAdd || combine == euler::kMin,
              "combine must be 0 (sum) or 1 (minimum), got ", combine);
  const c10::cuda::CUDAGuard guard(succ.device());
  const int64_t n = succ.size(0);
  const at::Tensor succ_in = succ.contiguous(), value_in = value.contiguous();
  if (rounds == 0 || n == 0) return value_in.clone();
  // round r writes pair r % 2; the inputs are read only by the first round
  at::Tensor out_succ[2] = {at::empty_like(succ_in), at::empty_like(succ_in)};
  at::Tensor out_value[2] = {at::empty_like(value_in), at::empty_like(value_in)};
  const int64_t need = (n + euler::kThreads - 1) / euler::kThreads;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(need, 1 << 16));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* read_succ = succ_in.data_ptr<int64_t>();
  const int64_t* read_value = value_in.data_ptr<int64_t>();
  for (int64_t r = 0; r < rounds; ++r) {
    at::Tensor& to_succ = out_succ[r % 2];
    at::Tensor& to_value = out_value[r % 2];
    euler::pointer_jump_kernel<<<blocks, euler::kThreads, 0, stream>>>(
        read_succ, read_value, to_succ.data_ptr<int64_t>(), to_value.data_ptr<int64_t>(), n,
        static_cast<int>(combine));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    read_succ = to_succ.data_ptr<int64_t>();
    read_value = to_value.data_ptr<int64_t>();
  }
  return out_value[(rounds - 1) % 2];
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def("cuda_pointer_jump(Tensor succ, Tensor value, int rounds, int combine) -> Tensor");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) { m.impl("cuda_pointer_jump", &pointer_jump); }

}  // namespace treessm_cuda
