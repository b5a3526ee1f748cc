// Kernels of the layers' row-wise operators on CUDA (treessm/ops/pointwise.py), rows
// [N, C] and per-channel vectors [C] of one dtype (float32 or float64):
//
//   silu_mix            out = SiLU(t),  t = a u + b m
//   silu_mix_backward   gt = g SiLU'(t): gu = gt a, gm = gt b;  partial sums over rows of
//                       gt u and gt m (the gradients of a and b)
//   norm_gate           out = (xhat w + b) SiLU(z),  xhat = (y - mean) / sqrt(var + eps)
//                       over the row's C channels (biased variance, as a LayerNorm)
//   norm_gate_backward  gn = g SiLU(z): gz = g (xhat w + b) SiLU'(z),
//                       gy = (gn w - mean(gn w) - xhat mean(gn w xhat)) / sqrt(var + eps);
//                       partial sums over rows of gn xhat and gn (w's and b's gradients)
//
// The forward of the mixing is elementwise (a thread an element, grid-stride). The other
// kernels take a row a warp at a time (grid-stride over the rows), a lane the channels
// k = lane, lane + 32, ...; a row's sums over its channels are warp reductions whose total
// lane 0 holds, broadcast from it. The backward ones write each row's gradients in the same
// pass that recomputes what the forward formed (the pre-activation; the row's moments), and
// keep the sums over rows per warp in shared memory (each column owned by one lane), added
// over the warps of a block in order and written as the block's row of partial sums, which
// the host adds in order: every value in one fixed order for a given N and C.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace treessm_cuda {
namespace pointwise {

constexpr int kWarps = 4;              // warps of a block in the row kernels
constexpr int kThreads = 32 * kWarps;  // threads of a block
constexpr int kMaxBlocks = 2048;       // blocks of the row kernels, at most (a full H200)
constexpr int kElementThreads = 256;   // threads of a block of the elementwise kernel
// Bytes of shared memory that one warp's two columns of partial sums may take (kWarps times
// this a block): rows of more channels take the torch composition.
constexpr int kMaxColumnBytes = 12288;

// Blocks of the row kernels: a fixed function of N (the partial sums' rows, and so the
// order of every sum, do not depend on the device).
inline int64_t row_blocks(int64_t n) {
  const int64_t blocks = (n + kWarps - 1) / kWarps;
  return blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

template <typename A>
__device__ __forceinline__ A sigmoid(A t) {
  return A(1) / (A(1) + exp(-t));
}

// SiLU'(t) = s (1 + t (1 - s)), s the sigmoid of t.
template <typename A>
__device__ __forceinline__ A silu_slope(A t, A s) {
  return s * (A(1) + t * (A(1) - s));
}

// The warp's sum, lane 0's bits in every lane.
template <typename A>
__device__ __forceinline__ A warp_total(A v) {
  for (int k = 16; k >= 1; k >>= 1) v += __shfl_xor_sync(0xffffffffu, v, k);
  return __shfl_sync(0xffffffffu, v, 0);
}

__device__ __forceinline__ int64_t warp_index() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}
__device__ __forceinline__ int64_t warp_count() {
  return (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
}

// The block's kWarps pairs of columns of C sums in its dynamic shared memory.
template <typename A>
__device__ __forceinline__ A* block_columns() {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  return reinterpret_cast<A*>(smem_raw);
}

// This warp's two columns of C sums, zeroed by the lanes that own them.
template <typename A>
__device__ __forceinline__ A* warp_columns(int c) {
  A* mine = block_columns<A>() + (threadIdx.x >> 5) * 2 * c;
  for (int k = threadIdx.x & 31; k < c; k += 32) mine[k] = mine[c + k] = A(0);
  return mine;
}

// Adds the warps' two columns of C sums in shared memory in warp order and writes them as
// the block's row [2, C] of `part`.
template <typename A>
__device__ __forceinline__ void write_block_columns(int c, A* part) {
  __syncthreads();
  const A* cols = block_columns<A>();
  for (int k = threadIdx.x; k < 2 * c; k += blockDim.x) {
    A t = cols[k];
    for (int q = 1; q < kWarps; ++q) t += cols[q * 2 * c + k];
    part[static_cast<int64_t>(blockIdx.x) * 2 * c + k] = t;
  }
}

// out [N, C] = SiLU(a u + b m).
template <typename A>
__global__ void __launch_bounds__(kElementThreads)
silu_mix_kernel(const A* __restrict__ u, const A* __restrict__ m, const A* __restrict__ a,
                const A* __restrict__ b, A* __restrict__ out, int64_t n, int c) {
  const int64_t total = n * c;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int k = static_cast<int>(i % c);
    const A t = __ldg(a + k) * __ldg(u + i) + __ldg(b + k) * __ldg(m + i);
    out[i] = t * sigmoid(t);
  }
}

// gu, gm [N, C] and part [gridDim.x, 2, C] (the block's sums of gt u, then of gt m).
template <typename A>
__global__ void __launch_bounds__(kThreads)
silu_mix_backward_kernel(const A* __restrict__ g, const A* __restrict__ u,
                         const A* __restrict__ m, const A* __restrict__ a,
                         const A* __restrict__ b, A* __restrict__ gu, A* __restrict__ gm,
                         A* __restrict__ part, int64_t n, int c) {
  const int lane = threadIdx.x & 31;
  A* sa = warp_columns<A>(c);
  A* sb = sa + c;
  for (int64_t r = warp_index(); r < n; r += warp_count()) {
    for (int k = lane; k < c; k += 32) {
      const int64_t i = r * c + k;
      const A uv = __ldg(u + i), mv = __ldg(m + i), ak = __ldg(a + k), bk = __ldg(b + k);
      const A t = ak * uv + bk * mv;
      const A gt = __ldg(g + i) * silu_slope(t, sigmoid(t));
      gu[i] = gt * ak;
      gm[i] = gt * bk;
      sa[k] += gt * uv;
      sb[k] += gt * mv;
    }
  }
  write_block_columns(c, part);
}

// The row's mean and 1 / sqrt(var + eps) (lane 0's bits in every lane).
template <typename A>
__device__ __forceinline__ void row_moments(const A* __restrict__ y, int c, A eps, A& mean,
                                            A& rstd) {
  const int lane = threadIdx.x & 31;
  A s = 0;
  for (int k = lane; k < c; k += 32) s += __ldg(y + k);
  mean = warp_total(s) / A(c);
  A q = 0;
  for (int k = lane; k < c; k += 32) {
    const A d = __ldg(y + k) - mean;
    q += d * d;
  }
  rstd = A(1) / sqrt(warp_total(q) / A(c) + eps);
}

// out [N, C] = LN(y) SiLU(z).
template <typename A>
__global__ void __launch_bounds__(kThreads)
norm_gate_kernel(const A* __restrict__ y, const A* __restrict__ z, const A* __restrict__ w,
                 const A* __restrict__ b, A eps, A* __restrict__ out, int64_t n, int c) {
  const int lane = threadIdx.x & 31;
  for (int64_t r = warp_index(); r < n; r += warp_count()) {
    const A* yr = y + r * c;
    A mean, rstd;
    row_moments(yr, c, eps, mean, rstd);
    for (int k = lane; k < c; k += 32) {
      const A zv = __ldg(z + r * c + k);
      const A normed = (__ldg(yr + k) - mean) * rstd * __ldg(w + k) + __ldg(b + k);
      out[r * c + k] = normed * (zv * sigmoid(zv));
    }
  }
}

// gy, gz [N, C] and part [gridDim.x, 2, C] (the block's sums of gn xhat, then of gn).
template <typename A>
__global__ void __launch_bounds__(kThreads)
norm_gate_backward_kernel(const A* __restrict__ g, const A* __restrict__ y,
                          const A* __restrict__ z, const A* __restrict__ w,
                          const A* __restrict__ b, A eps, A* __restrict__ gy,
                          A* __restrict__ gz, A* __restrict__ part, int64_t n, int c) {
  const int lane = threadIdx.x & 31;
  A* sw = warp_columns<A>(c);
  A* sb = sw + c;
  for (int64_t r = warp_index(); r < n; r += warp_count()) {
    const A* yr = y + r * c;
    A mean, rstd;
    row_moments(yr, c, eps, mean, rstd);
    A s1 = 0, s2 = 0;  // sums of gn w and gn w xhat over the row
    for (int k = lane; k < c; k += 32) {
      const int64_t i = r * c + k;
      const A zv = __ldg(z + i), gv = __ldg(g + i), wk = __ldg(w + k);
      const A sz = sigmoid(zv);
      const A xhat = (__ldg(yr + k) - mean) * rstd;
      const A gn = gv * (zv * sz);
      gz[i] = gv * (xhat * wk + __ldg(b + k)) * silu_slope(zv, sz);
      sw[k] += gn * xhat;
      sb[k] += gn;
      const A gx = gn * wk;
      s1 += gx;
      s2 += gx * xhat;
    }
    const A m1 = warp_total(s1) / A(c), m2 = warp_total(s2) / A(c);
    for (int k = lane; k < c; k += 32) {
      const int64_t i = r * c + k;
      const A zv = __ldg(z + i);
      const A xhat = (__ldg(yr + k) - mean) * rstd;
      const A gx = __ldg(g + i) * (zv * sigmoid(zv)) * __ldg(w + k);
      gy[i] = rstd * ((gx - m1) - xhat * m2);
    }
  }
  write_block_columns(c, part);
}

}  // namespace pointwise
}  // namespace treessm_cuda
