// List ranking by pointer jumping for the Euler tours of treessm/topology/euler_tour.py: one
// round of
//   value'[i] = combine(value[i], value[succ[i]]),   succ'[i] = succ[succ[i]]
// over every element, from one pair of arrays into another (the launcher alternates them),
// so no round reads what it writes. A list ends at an element that is its own successor and
// holds the combine's identity, so walking past the end changes nothing. combine: 0 adds
// (suffix sums: tour ranks), 1 takes the minimum (the least key around a cycle). Every value
// is one thread's, computed in a fixed order: the same on every run and launch shape.
// The source also compiles for the host against tests/extensions/host_emulation.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace treessm_cuda {
namespace euler {

constexpr int kThreads = 256;
constexpr int kAdd = 0, kMin = 1;

__global__ void __launch_bounds__(kThreads) pointer_jump_kernel(
    const int64_t* __restrict__ succ, const int64_t* __restrict__ value,
    int64_t* __restrict__ succ_out, int64_t* __restrict__ value_out, int64_t n, int combine) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t s = succ[i];
    const int64_t a = value[i], b = value[s];
    succ_out[i] = succ[s];
    value_out[i] = combine == kAdd ? a + b : (b < a ? b : a);
  }
}

}  // namespace euler
}  // namespace treessm_cuda
