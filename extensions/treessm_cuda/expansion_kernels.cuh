// Kernels of the selective tree scan's expanded path on CUDA (treessm/ops/expansion_cuda.py):
// a block of W channels [c0, c0 + W) of u's D, with S states each, is expanded, scanned by
// the tree-scan kernels and read out, and its gradients are reduced, each in one pass over
// the block's [N, W, S] rows (torch's broadcasts took a dozen passes each way).
//
//   expand           x[v, j, s] = (dx[v, d] u[v, d]) B[v, s],  w[v, j, s] = exp(e[v, d] A[d, s])
//                    with d = c0 + j and e[v, d] the step of the edge (v, parent(v))
//   readout          y1[v, d] = sum_s h[v, j, s] (C[v, s] g[j, s])  (g = 1 where absent); with
//                    moments the row's mean and sum of squared deviations (two passes)
//   readout_backward gh = gy1 (C g) + a[v] + b[v] (h - mu[v]) (a, b: the moments' shares);
//                    gC[v, s] += sum_j gy1 g h;  partial sums over vertices of gy1 C h (g's)
//   expand_backward  q = sum_s gx B: gu = q dx, gdx = q u;  ge = sum_s gw w A;
//                    gB[v, s] += sum_j gx dx u;  partial sums over vertices of gw w e (A's)
//
// A warp takes one vertex at a time in every kernel (grid-stride over the vertices), a lane
// the channels j = lane, lane + 32, ... with their S states in order (the expansion: the
// row's elements k = lane, lane + 32, ...). Inputs are read through the read-only path, so
// that a vertex's loads are issued together. Sums over the channels
// of a vertex are warp reductions whose total lane 0 holds (and broadcasts where every lane
// uses it); sums over the vertices are kept per warp in shared memory (each column owned by
// one lane), added over the warps of a block in order and written as the block's row of
// partial sums, which the host adds in order. Every value is computed in one fixed order
// for a given N: bitwise reproducible.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace treessm_cuda {
namespace expansion {

constexpr int kWarps = 4;              // warps of a block in the row kernels
constexpr int kThreads = 32 * kWarps;  // threads of a block
constexpr int kMaxBlocks = 2048;       // blocks of the kernels, at most (a full H200)
// Bytes of a block's columns (W S accumulators) that one warp's partial sums may take:
// kWarps times this in shared memory.
constexpr int kMaxColumnBytes = 8192;
// States whose sums over a vertex's channels a lane keeps in registers at a time.
constexpr int kStateChunk = 8;

template <typename A> struct Args {
  // [N, D] rows (row stride D), the block's columns from c0
  const A* u;
  const A* dx;
  const A* de;               // the steps of the edges to the parents
  const A* a;                // [D, S]
  const A* b;                // [N, S]
  const A* c;                // [N, S]
  const A* g;                // [W, S] the normalisation's weight, or null
  int64_t n;
  int d, s, c0, w;
};

// The warp's sum, in lane 0 (the other lanes hold the same sum in other orders).
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int k = 16; k >= 1; k >>= 1) v += __shfl_xor_sync(0xffffffffu, v, k);
  return v;
}
// The warp's sum, lane 0's bits in every lane.
template <typename A>
__device__ __forceinline__ A warp_total(A v) {
  return __shfl_sync(0xffffffffu, warp_sum(v), 0);
}

__device__ __forceinline__ int64_t warp_index() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}
__device__ __forceinline__ int64_t warp_count() {
  return (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
}

// x, w [N, W, S]: a warp a vertex, its lanes along the row (every launch shape gives the
// same values).
template <typename A>
__global__ void __launch_bounds__(kThreads) expand_kernel(Args<A> p, A* x, A* w) {
  const int ws = p.w * p.s;
  for (int64_t v = warp_index(); v < p.n; v += warp_count()) {
    const int64_t row0 = v * p.d + p.c0;
    const A* bv = p.b + v * p.s;
    for (int k = threadIdx.x & 31; k < ws; k += 32) {
      const int j = k / p.s, s = k - j * p.s;
      const int64_t row = row0 + j;
      x[v * ws + k] = (__ldg(p.dx + row) * __ldg(p.u + row)) * __ldg(bv + s);
      const A as = __ldg(p.a + static_cast<int64_t>(p.c0 + j) * p.s + s);
      w[v * ws + k] = exp(__ldg(p.de + row) * as);
    }
  }
}

// y1 [N, D] (the block's columns), and with moments mean, m2 [N].
template <typename A>
__global__ void __launch_bounds__(kThreads) readout_kernel(Args<A> p, const A* h, A* y1, A* mean,
                                                           A* m2) {
  const int lane = threadIdx.x & 31;
  const int ws = p.w * p.s;
  for (int64_t v = warp_index(); v < p.n; v += warp_count()) {
    const A* r = h + v * ws;
    const A* cv = p.c + v * p.s;
    A sum = 0;
    for (int j = lane; j < p.w; j += 32) {
      A acc = 0;
      for (int s = 0; s < p.s; ++s) {
        const A hv = __ldg(r + j * p.s + s);
        const A read = p.g ? __ldg(cv + s) * __ldg(p.g + j * p.s + s) : __ldg(cv + s);
        acc += hv * read;
        sum += hv;
      }
      y1[v * p.d + p.c0 + j] = acc;
    }
    if (mean != nullptr) {
      const A mu = warp_total(sum) / A(ws);
      A sq = 0;
      for (int k = lane; k < ws; k += 32) {
        const A e = __ldg(r + k) - mu;
        sq += e * e;
      }
      sq = warp_total(sq);
      if (lane == 0) {
        mean[v] = mu;
        m2[v] = sq;
      }
    }
  }
}

// Zeroes the columns (j, s) of a warp's sums that this lane owns: those of its channels.
template <typename A>
__device__ __forceinline__ void zero_owned_columns(const Args<A>& p, A* mine) {
  for (int j = threadIdx.x & 31; j < p.w; j += 32)
    for (int s = 0; s < p.s; ++s) mine[j * p.s + s] = 0;
}

// Sums a chunk of states' per-lane partial sums over the warp and writes them (lane 0) to
// row v of out [N, S], states s0 .. s0 + kStateChunk - 1 that exist, added to what is
// there with `accumulate`.
template <typename A>
__device__ __forceinline__ void write_chunk_sums(const Args<A>& p, const A (&part)[kStateChunk],
                                                 int s0, int64_t v, bool accumulate, A* out) {
#pragma unroll
  for (int t = 0; t < kStateChunk; ++t) {
    if (s0 + t < p.s) {  // the same for every lane of the warp
      const A total = warp_sum(part[t]);
      if ((threadIdx.x & 31) == 0) {
        const int64_t q = v * p.s + s0 + t;
        out[q] = accumulate ? out[q] + total : total;
      }
    }
  }
}

// Adds the warps' column sums in shared memory (kWarps rows of `cols`) in warp order and
// writes them as the block's row of `out`.
template <typename A>
__device__ __forceinline__ void write_block_columns(const A* acc, int cols, A* out) {
  __syncthreads();
  for (int k = threadIdx.x; k < cols; k += blockDim.x) {
    A t = acc[k];
    for (int q = 1; q < kWarps; ++q) t += acc[q * cols + k];
    out[static_cast<int64_t>(blockIdx.x) * cols + k] = t;
  }
}

// gh [N, W, S]; gc [N, S] += the block's share; gg_part [gridDim.x, W S] (when p.g) the
// block's partial sums of gy1 C h. share_mean[v] / share_m2[v] are the gradient's shares
// per state of the vertex's mean and of its squared deviations about mu (null: none).
template <typename A>
__global__ void __launch_bounds__(kThreads)
readout_backward_kernel(Args<A> p, const A* gy1, const A* share_mean, const A* share_m2,
                        const A* mu, const A* h, A* gh, A* gc, bool accumulate, A* gg_part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* acc = reinterpret_cast<A*>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ws = p.w * p.s;
  A* mine = acc + warp * ws;
  if (p.g) zero_owned_columns(p, mine);
  for (int64_t v = warp_index(); v < p.n; v += warp_count()) {
    const A* __restrict__ r = h + v * ws;
    A* __restrict__ o = gh + v * ws;
    const A* cv = p.c + v * p.s;
    const A* gyv = gy1 + v * p.d + p.c0;
    const A a = share_mean ? __ldg(share_mean + v) : A(0);
    const A b = share_m2 ? __ldg(share_m2 + v) : A(0);
    const A m = share_m2 ? __ldg(mu + v) : A(0);
    for (int s0 = 0; s0 < p.s; s0 += kStateChunk) {
      A part[kStateChunk];
#pragma unroll
      for (int t = 0; t < kStateChunk; ++t) part[t] = 0;
      for (int j = lane; j < p.w; j += 32) {
        const A gj = __ldg(gyv + j);
#pragma unroll
        for (int t = 0; t < kStateChunk; ++t) {
          const int s = s0 + t;
          if (s < p.s) {
            const int k = j * p.s + s;
            const A hv = __ldg(r + k);
            const A cs = __ldg(cv + s);
            if (p.g) {
              const A gk = __ldg(p.g + k);
              o[k] = gj * (cs * gk) + a + b * (hv - m);
              mine[k] += gj * (cs * hv);
              part[t] += gj * (gk * hv);
            } else {
              o[k] = gj * cs + a + b * (hv - m);
              part[t] += gj * hv;
            }
          }
        }
      }
      write_chunk_sums(p, part, s0, v, accumulate, gc);
    }
  }
  if (p.g) write_block_columns(acc, ws, gg_part);
}

// gu, gdx, ge [N, D] (the block's columns); gb [N, S] += the block's share; ga_part
// [gridDim.x, W S] the block's partial sums of gw w e.
template <typename A>
__global__ void __launch_bounds__(kThreads)
expand_backward_kernel(Args<A> p, const A* gx, const A* gw, A* gu, A* gdx, A* ge, A* gb,
                       bool accumulate, A* ga_part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* acc = reinterpret_cast<A*>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int ws = p.w * p.s;
  A* mine = acc + warp * ws;
  zero_owned_columns(p, mine);
  for (int64_t v = warp_index(); v < p.n; v += warp_count()) {
    const A* __restrict__ gxr = gx + v * ws;
    const A* __restrict__ gwr = gw + v * ws;
    const A* bv = p.b + v * p.s;
    for (int j = lane; j < p.w; j += 32) {
      const int d = p.c0 + j;
      const int64_t row = v * p.d + d;
      const A e = __ldg(p.de + row);
      const A* ad = p.a + static_cast<int64_t>(d) * p.s;
      A q = 0, te = 0;
      for (int s = 0; s < p.s; ++s) {
        const int k = j * p.s + s;
        const A as = __ldg(ad + s);
        q += __ldg(gxr + k) * __ldg(bv + s);
        const A gww = __ldg(gwr + k) * exp(e * as);
        te += gww * as;
        mine[k] += gww * e;
      }
      gu[row] = q * __ldg(p.dx + row);
      gdx[row] = q * __ldg(p.u + row);
      ge[row] = te;
    }
    for (int s0 = 0; s0 < p.s; s0 += kStateChunk) {
      A part[kStateChunk];
#pragma unroll
      for (int t = 0; t < kStateChunk; ++t) part[t] = 0;
      for (int j = lane; j < p.w; j += 32) {
        const int64_t row = v * p.d + p.c0 + j;
        const A du = __ldg(p.dx + row) * __ldg(p.u + row);
#pragma unroll
        for (int t = 0; t < kStateChunk; ++t) {
          if (s0 + t < p.s) part[t] += __ldg(gxr + j * p.s + s0 + t) * du;
        }
      }
      write_chunk_sums(p, part, s0, v, accumulate, gb);
    }
  }
  write_block_columns(acc, ws, ga_part);
}

}  // namespace expansion
}  // namespace treessm_cuda
