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
// The expansion takes a batch of kBatch consecutive vertices a warp at a time (grid-stride
// over the batches), a lane the row's elements k = lane, lane + 32, ... The other kernels
// split a warp into segments of `segment_lanes` lanes (32 down to the block's channel count
// rounded up to a power of two), each segment its own batch of vertices and a lane of it the
// channels j = lane, lane + lanes, ... with their S states in order, so that a block narrower
// than a warp keeps every lane busy. Every load is issued for the batch's vertices together:
// one vertex's rows are a few loads a lane where W S is small, and the loads in flight, not
// the bytes, bound these kernels. Inputs are read through the read-only path. The read-out
// and its backward take the states as one tensor or as two whose sum they are (h + h2: both's
// parts), and expand's backward its gradient the same way (gx + gx2), so that no pass forms
// the sum. Sums over the channels of a vertex are segment reductions whose total the
// segment's first lane holds (and broadcasts where every lane uses it); sums over the
// vertices are kept per segment in shared memory (each column owned by one lane), added over
// the segments of a block in order and written as the block's row of partial sums, which the
// host adds in order. Every value is computed in one fixed order for a given N, W, S and
// type: bitwise reproducible.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace treessm_cuda {
namespace expansion {

constexpr int kWarps = 4;              // warps of a block in the row kernels
constexpr int kThreads = 32 * kWarps;  // threads of a block
constexpr int kMaxBlocks = 2048;       // blocks of the kernels, at most (a full H200)
constexpr int kBatch = 4;              // vertices a segment takes at a time
// Bytes of a block's columns (W S accumulators) that one warp's partial sums may take (all
// of its segments' together): kWarps times this in shared memory.
constexpr int kMaxColumnBytes = 8192;
// States whose sums over a vertex's channels a lane keeps in registers at a time (for each
// vertex of its batch).
constexpr int kStateChunk = 4;

// Blocks of the kernels: a fixed function of N (the partial sums' rows, and so the order
// of every sum, do not depend on the device).
inline int64_t row_blocks(int64_t n) {
  const int64_t per_block = static_cast<int64_t>(kWarps) * kBatch;
  const int64_t blocks = (n + per_block - 1) / per_block;
  return blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// Lanes of a segment for a block of w channels of s states of `item` bytes: halved from 32
// while half of them still cover the channels and the warp's segments' columns fit in
// kMaxColumnBytes (a function of the problem only, as every sum's order must be).
__host__ __device__ inline int segment_lanes(int w, int s, int item) {
  int lanes = 32;
  while (lanes > 1 && (lanes >> 1) >= w &&
         static_cast<int64_t>(32 / (lanes >> 1)) * w * s * item <= kMaxColumnBytes)
    lanes >>= 1;
  return lanes;
}

// Rows of a block's column sums in shared memory: one per segment.
__host__ __device__ inline int column_rows(int w, int s, int item) {
  return kWarps * (32 / segment_lanes(w, s, item));
}

template <typename A> struct Args {
  // [N, D] rows (row stride D), the block's columns from c0
  const A* __restrict__ u;
  const A* __restrict__ dx;
  const A* __restrict__ de;  // the steps of the edges to the parents
  const A* __restrict__ a;   // [D, S]
  const A* __restrict__ b;   // [N, S]
  const A* __restrict__ c;   // [N, S]
  const A* __restrict__ g;   // [W, S] the normalisation's weight, or null
  int64_t n;
  int d, s, c0, w;
};

// The sum over a segment of `lanes` lanes, in its first lane (the other lanes hold the same
// sum in other orders).
template <typename A>
__device__ __forceinline__ A segment_sum(A v, int lanes) {
  for (int k = lanes >> 1; k >= 1; k >>= 1) v += __shfl_xor_sync(0xffffffffu, v, k);
  return v;
}

__device__ __forceinline__ int64_t warp_index() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}
__device__ __forceinline__ int64_t warp_count() {
  return (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
}

// This lane's segment: its lanes, the lane's place in it, the warp's first batch and the
// stride between a warp's batches (warp-uniform: every lane of a warp loops as often), and
// the segment's batch from there.
struct Segment {
  int lanes;        // lanes of a segment
  int lane;         // this lane's place in its segment
  int first;        // the warp lane of the segment's first lane
  int row;          // the segment's row of the block's column sums
  int64_t start;    // the warp's first batch
  int64_t stride;   // between the warp's batches
  int64_t offset;   // the segment's batch from the warp's
};

__device__ __forceinline__ Segment segment_of(int lanes) {
  Segment g;
  const int lane = threadIdx.x & 31, per_warp = 32 / lanes;
  g.lanes = lanes;
  g.lane = lane & (lanes - 1);
  g.first = lane - g.lane;
  g.row = (threadIdx.x >> 5) * per_warp + lane / lanes;
  g.start = warp_index() * per_warp * kBatch;
  g.stride = warp_count() * per_warp * kBatch;
  g.offset = static_cast<int64_t>(lane / lanes) * kBatch;
  return g;
}

template <typename A>
__device__ __forceinline__ Segment segment_of(const Args<A>& p) {
  return segment_of(segment_lanes(p.w, p.s, static_cast<int>(sizeof(A))));
}

// The segment's sum, its first lane's bits in every lane of it.
template <typename A>
__device__ __forceinline__ A segment_total(A v, const Segment& g) {
  return __shfl_sync(0xffffffffu, segment_sum(v, g.lanes), g.first);
}

// The value of element k of rows h, with the second addend h2 where given (a scan handed
// over as two parts whose sum it is: both's up scan and the down scan of its brackets).
template <typename A>
__device__ __forceinline__ A summed(const A* h, const A* h2, int64_t k) {
  return h2 ? __ldg(h + k) + __ldg(h2 + k) : __ldg(h + k);
}

// The vertices of the batch from v0 that exist (0 past the last; segment-uniform).
template <typename A>
__device__ __forceinline__ int batch_size(const Args<A>& p, int64_t v0) {
  return p.n - v0 >= kBatch ? kBatch : (p.n > v0 ? static_cast<int>(p.n - v0) : 0);
}

// Vertex i of the batch from v0; past the last vertex, the last (loads stay in bounds; what
// they give is not used).
__device__ __forceinline__ int64_t batch_vertex(int64_t v0, int i, int64_t n) {
  return v0 + i < n ? v0 + i : n - 1;
}

// x, w [N, W, S]: a warp a batch of vertices, its lanes along the row (every launch shape
// gives the same values).
template <typename A>
__global__ void __launch_bounds__(kThreads)
expand_kernel(Args<A> p, A* __restrict__ x, A* __restrict__ w) {
  const Segment sg = segment_of(32);
  const int ws = p.w * p.s;
  for (int64_t v0 = sg.start; v0 < p.n; v0 += sg.stride) {
    const int m = batch_size(p, v0);
    for (int k = sg.lane; k < ws; k += 32) {
      const int j = k / p.s, s = k - j * p.s;
      const A as = __ldg(p.a + static_cast<int64_t>(p.c0 + j) * p.s + s);
      A du[kBatch], bs[kBatch], e[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int64_t v = batch_vertex(v0, i, p.n);
        const int64_t row = v * p.d + p.c0 + j;
        du[i] = __ldg(p.dx + row) * __ldg(p.u + row);
        bs[i] = __ldg(p.b + v * p.s + s);
        e[i] = __ldg(p.de + row);
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i)
        if (i < m) {
          x[(v0 + i) * ws + k] = du[i] * bs[i];
          w[(v0 + i) * ws + k] = exp(e[i] * as);
        }
    }
  }
}

// y1 [N, D] (the block's columns), and with moments mean, m2 [N], of the states h (+ h2).
template <typename A>
__global__ void __launch_bounds__(kThreads)
readout_kernel(Args<A> p, const A* __restrict__ h, const A* __restrict__ h2, A* __restrict__ y1,
               A* __restrict__ mean, A* __restrict__ m2) {
  const Segment sg = segment_of(p);
  const int ws = p.w * p.s;
  for (int64_t base = sg.start; base < p.n; base += sg.stride) {
    const int64_t v0 = base + sg.offset;
    const int m = batch_size(p, v0);
    int64_t r[kBatch];  // the vertices' first states
    const A* cv[kBatch];
    A sum[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int64_t v = batch_vertex(v0, i, p.n);
      r[i] = v * ws;
      cv[i] = p.c + v * p.s;
      sum[i] = 0;
    }
    for (int j = sg.lane; j < p.w; j += sg.lanes) {
      A acc[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) acc[i] = 0;
      for (int s = 0; s < p.s; ++s) {
        const A gs = p.g ? __ldg(p.g + j * p.s + s) : A(0);
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          const A hv = summed(h, h2, r[i] + j * p.s + s);
          const A cs = __ldg(cv[i] + s);
          acc[i] += hv * (p.g ? cs * gs : cs);
          sum[i] += hv;
        }
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i)
        if (i < m) y1[(v0 + i) * p.d + p.c0 + j] = acc[i];
    }
    if (mean != nullptr) {
      A mu[kBatch], sq[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        mu[i] = segment_total(sum[i], sg) / A(ws);
        sq[i] = 0;
      }
      for (int k = sg.lane; k < ws; k += sg.lanes) {
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          const A e = summed(h, h2, r[i] + k) - mu[i];
          sq[i] += e * e;
        }
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) sq[i] = segment_sum(sq[i], sg.lanes);
      if (sg.lane == 0)
        for (int i = 0; i < m; ++i) {
          mean[v0 + i] = mu[i];
          m2[v0 + i] = sq[i];
        }
    }
  }
}

// The segment's row of the block's column sums, its columns (j, s) that this lane owns
// (those of its channels) zeroed.
template <typename A>
__device__ __forceinline__ A* owned_columns(const Args<A>& p, const Segment& sg, A* acc) {
  A* mine = acc + static_cast<int64_t>(sg.row) * p.w * p.s;
  for (int j = sg.lane; j < p.w; j += sg.lanes)
    for (int s = 0; s < p.s; ++s) mine[j * p.s + s] = 0;
  return mine;
}

// Zeroes a lane's partial sums of a chunk of states for each vertex of its batch.
template <typename A>
__device__ __forceinline__ void zero_batch_sums(A (&part)[kBatch][kStateChunk]) {
#pragma unroll
  for (int i = 0; i < kBatch; ++i)
#pragma unroll
    for (int t = 0; t < kStateChunk; ++t) part[i][t] = 0;
}

// Sums a chunk of states' per-lane partial sums over the segment for each vertex of the
// batch from v0 (m of them) and writes them (its first lane) to their rows of out [N, S],
// states s0 .. s0 + kStateChunk - 1 that exist, added to what is there with `accumulate`:
// the rows' entries loaded together first, so that their latencies overlap.
template <typename A>
__device__ __forceinline__ void write_batch_sums(const Args<A>& p, const Segment& sg,
                                                 const A (&part)[kBatch][kStateChunk], int s0,
                                                 int64_t v0, int m, bool accumulate,
                                                 A* __restrict__ out) {
  const bool lead = sg.lane == 0;
  A before[kBatch][kStateChunk];
#pragma unroll
  for (int i = 0; i < kBatch; ++i)
#pragma unroll
    for (int t = 0; t < kStateChunk; ++t)
      before[i][t] = lead && accumulate && i < m && s0 + t < p.s
                         ? out[(v0 + i) * p.s + s0 + t] : A(0);
#pragma unroll
  for (int i = 0; i < kBatch; ++i)
#pragma unroll
    for (int t = 0; t < kStateChunk; ++t) {
      if (s0 + t >= p.s) continue;  // the same for every lane of the warp
      const A total = segment_sum(part[i][t], sg.lanes);
      if (lead && i < m) out[(v0 + i) * p.s + s0 + t] = accumulate ? before[i][t] + total : total;
    }
}

// Adds the segments' column sums in shared memory (`rows` rows of `cols`) in row order and
// writes them as the block's row of `out`.
template <typename A>
__device__ __forceinline__ void write_block_columns(const A* acc, int rows, int cols, A* out) {
  __syncthreads();
  for (int k = threadIdx.x; k < cols; k += blockDim.x) {
    A t = acc[k];
    for (int q = 1; q < rows; ++q) t += acc[q * cols + k];
    out[static_cast<int64_t>(blockIdx.x) * cols + k] = t;
  }
}

// gh [N, W, S] from the states h (+ h2); gc [N, S] += the block's share; gg_part
// [gridDim.x, W S] (when p.g) the block's partial sums of gy1 C h. share_mean[v] /
// share_m2[v] are the gradient's shares per state of the vertex's mean and of its squared
// deviations about mu (null: none).
template <typename A>
__global__ void __launch_bounds__(kThreads)
readout_backward_kernel(Args<A> p, const A* __restrict__ gy1, const A* __restrict__ share_mean,
                        const A* __restrict__ share_m2, const A* __restrict__ mu,
                        const A* __restrict__ h, const A* __restrict__ h2, A* __restrict__ gh,
                        A* __restrict__ gc, bool accumulate, A* __restrict__ gg_part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* acc = reinterpret_cast<A*>(smem_raw);
  const Segment sg = segment_of(p);
  const int ws = p.w * p.s;
  A* mine = p.g ? owned_columns(p, sg, acc) : nullptr;
  for (int64_t base = sg.start; base < p.n; base += sg.stride) {
    const int64_t v0 = base + sg.offset;
    const int m = batch_size(p, v0);
    int64_t vi[kBatch];
    A a[kBatch], b[kBatch], mv[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int64_t v = batch_vertex(v0, i, p.n);
      vi[i] = v;
      a[i] = share_mean ? __ldg(share_mean + v) : A(0);
      b[i] = share_m2 ? __ldg(share_m2 + v) : A(0);
      mv[i] = share_m2 ? __ldg(mu + v) : A(0);
    }
    for (int s0 = 0; s0 < p.s; s0 += kStateChunk) {
      A part[kBatch][kStateChunk];
      zero_batch_sums(part);
      for (int j = sg.lane; j < p.w; j += sg.lanes) {
        A gj[kBatch];
#pragma unroll
        for (int i = 0; i < kBatch; ++i) gj[i] = __ldg(gy1 + vi[i] * p.d + p.c0 + j);
#pragma unroll
        for (int t = 0; t < kStateChunk; ++t) {
          const int s = s0 + t;
          if (s >= p.s) continue;
          const int k = j * p.s + s;
          const A gk = p.g ? __ldg(p.g + k) : A(0);
#pragma unroll
          for (int i = 0; i < kBatch; ++i) {
            const A hv = summed(h, h2, vi[i] * ws + k);
            const A cs = __ldg(p.c + vi[i] * p.s + s);
            const A o = (p.g ? gj[i] * (cs * gk) : gj[i] * cs) + a[i] + b[i] * (hv - mv[i]);
            if (i < m) gh[(v0 + i) * ws + k] = o;
            if (p.g) {
              if (i < m) mine[k] += gj[i] * (cs * hv);
              part[i][t] += gj[i] * (gk * hv);
            } else {
              part[i][t] += gj[i] * hv;
            }
          }
        }
      }
      write_batch_sums(p, sg, part, s0, v0, m, accumulate, gc);
    }
  }
  if (p.g)
    write_block_columns(acc, column_rows(p.w, p.s, static_cast<int>(sizeof(A))), ws, gg_part);
}

// gu, gdx, ge [N, D] (the block's columns) from gx (+ gx2) and gw; gb [N, S] += the block's
// share (its first kStateChunk states summed in the same pass over the channels, each later
// chunk in a pass of its own); ga_part [gridDim.x, W S] the block's partial sums of gw w e.
template <typename A>
__global__ void __launch_bounds__(kThreads)
expand_backward_kernel(Args<A> p, const A* __restrict__ gx, const A* __restrict__ gx2,
                       const A* __restrict__ gw, A* __restrict__ gu, A* __restrict__ gdx,
                       A* __restrict__ ge, A* __restrict__ gb, bool accumulate,
                       A* __restrict__ ga_part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* acc = reinterpret_cast<A*>(smem_raw);
  const Segment sg = segment_of(p);
  const int ws = p.w * p.s;
  A* mine = owned_columns(p, sg, acc);
  for (int64_t base = sg.start; base < p.n; base += sg.stride) {
    const int64_t v0 = base + sg.offset;
    const int m = batch_size(p, v0);
    int64_t vi[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) vi[i] = batch_vertex(v0, i, p.n);
    // the sums for gb of the first chunk of states, formed in the pass over the channels;
    // the states past it (more than kStateChunk) take a pass of their own a chunk
    A part[kBatch][kStateChunk];
    zero_batch_sums(part);
    for (int j = sg.lane; j < p.w; j += sg.lanes) {
      const int d = p.c0 + j;
      const A* ad = p.a + static_cast<int64_t>(d) * p.s;
      A e[kBatch], q[kBatch], te[kBatch], dxv[kBatch], uv[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int64_t row = vi[i] * p.d + d;
        e[i] = __ldg(p.de + row);
        dxv[i] = __ldg(p.dx + row);
        uv[i] = __ldg(p.u + row);
        q[i] = 0;
        te[i] = 0;
      }
      // state s of channel j: its shares of q, te and the columns; g its gradient gx
      auto state = [&](int s, A (&g)[kBatch]) {
        const int k = j * p.s + s;
        const A as = __ldg(ad + s);
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          g[i] = summed(gx, gx2, vi[i] * ws + k);
          q[i] += g[i] * __ldg(p.b + vi[i] * p.s + s);
          const A gww = __ldg(gw + vi[i] * ws + k) * exp(e[i] * as);
          te[i] += gww * as;
          if (i < m) mine[k] += gww * e[i];
        }
      };
#pragma unroll
      for (int t = 0; t < kStateChunk; ++t) {
        if (t >= p.s) break;
        A g[kBatch];
        state(t, g);
#pragma unroll
        for (int i = 0; i < kBatch; ++i) part[i][t] += g[i] * (dxv[i] * uv[i]);
      }
      for (int s = kStateChunk; s < p.s; ++s) {
        A g[kBatch];
        state(s, g);
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i)
        if (i < m) {
          const int64_t row = (v0 + i) * p.d + d;
          gu[row] = q[i] * dxv[i];
          gdx[row] = q[i] * uv[i];
          ge[row] = te[i];
        }
    }
    write_batch_sums(p, sg, part, 0, v0, m, accumulate, gb);
    for (int s0 = kStateChunk; s0 < p.s; s0 += kStateChunk) {
      zero_batch_sums(part);
      for (int j = sg.lane; j < p.w; j += sg.lanes) {
        A du[kBatch];
#pragma unroll
        for (int i = 0; i < kBatch; ++i) {
          const int64_t row = vi[i] * p.d + p.c0 + j;
          du[i] = __ldg(p.dx + row) * __ldg(p.u + row);
        }
#pragma unroll
        for (int t = 0; t < kStateChunk; ++t) {
          if (s0 + t >= p.s) continue;
#pragma unroll
          for (int i = 0; i < kBatch; ++i)
            part[i][t] += summed(gx, gx2, vi[i] * ws + j * p.s + s0 + t) * du[i];
        }
      }
      write_batch_sums(p, sg, part, s0, v0, m, accumulate, gb);
    }
  }
  write_block_columns(acc, column_rows(p.w, p.s, static_cast<int>(sizeof(A))), ws, ga_part);
}

}  // namespace expansion
}  // namespace treessm_cuda
