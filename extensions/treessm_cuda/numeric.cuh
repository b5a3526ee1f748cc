// Numeric types shared by the kernels: the accumulation type of an element type, the
// widening conversion of one element to it and the rounding conversion back (Store).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace treessm_cuda {

// Accumulation type: float64 for float64 data, float32 otherwise.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> struct Store {
  template <typename A> __device__ __forceinline__ static T cvt(A v) { return static_cast<T>(v); }
};
template <> struct Store<__half> {
  __device__ __forceinline__ static __half cvt(float v) { return __float2half_rn(v); }
};
template <> struct Store<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace treessm_cuda
