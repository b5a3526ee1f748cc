// Host stand-ins for the CUDA names the kernels use, so that tree_scan_kernels.cuh compiles
// with a plain C++20 compiler and runs one std::thread per CUDA thread (see harness.cpp).
// Only float and double are meaningful here; the half types are float-backed stubs.
#pragma once
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>
using std::min;
using std::max;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim;
inline std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__
#define __align__(n)

#define smem_raw smem_raw_storage
struct __half { float f; };
struct __nv_bfloat16 { float f; };
inline float __half2float(__half h) { return h.f; }
inline float __bfloat162float(__nv_bfloat16 h) { return h.f; }
inline __half __float2half_rn(float f) { return {f}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {f}; }
