// Heavy-path plan of a forest on the GPU: the tensors of treessm/path_plan.py, built by one
// thread block per tree without a host round-trip.
//
// Everything follows from the breadth-first layout (children of a position are a run of
// positions) by pointer doubling, so the number of block-wide steps grows with log2 of the
// tree size, not with its depth:
//   1. subtree sizes: the descendants of position i at distance j are the positions
//      [C^j(i), C^j(i + 1)) with C = child_ptr, so size(i) = F(i + 1) - F(i) for
//      F(a) = sum_j C^j(a) (the tree's end is a fixed point of C; sums wrap modulo 2^32,
//      differences stay exact);
//   2. heavy child of each position: the first child of largest subtree;
//   3. phase (light edges above) and path head by doubling towards the root;
//   4. layout: per phase, a block-wide prefix sum over the heads (in position order) of
//      their path lengths places every path; light children are placed by a prefix sum of
//      their counts over positions, and each light child records its slot among them.
// The work arrays live in a global workspace (a tree's part is touched by its block only),
// and __syncthreads orders the steps.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "path_layout.cuh"

namespace treessm_cuda {

struct PathPlanArgs {
  const int64_t* order;       // [N]
  const int64_t* child_ptr;   // [N + 1]
  const int64_t* tree_ptr;    // [T + 1]
  const int64_t* depth;       // [N] per vertex
  const int64_t* parent_pos;  // [N]
  PathRec* rec;               // [N + 1]
  int* light;                 // [N]
  int* slot;                  // [N]
  int* path_ptr;              // [N + 1]
  int* phase_path;            // [T][kMaxPhases + 1]
  unsigned* work;             // 4 * (N + T) + 9 * N words
  int64_t N;
  int64_t T;
};

// Exclusive prefix sum of one value per thread over the block (blockDim.x a multiple of 32,
// at most 1024); `total` receives the block's sum. Every thread must call it.
__device__ inline unsigned long long block_exclusive_scan(unsigned long long v,
                                                          unsigned long long* warp_sums,
                                                          unsigned long long& total) {
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  const int nw = blockDim.x >> 5;
  unsigned long long x = v;
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) warp_sums[wid] = x;
  __syncthreads();
  if (wid == 0) {
    unsigned long long s = lane < nw ? warp_sums[lane] : 0ULL;
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < nw) warp_sums[lane] = s;
  }
  __syncthreads();
  const unsigned long long before = wid > 0 ? warp_sums[wid - 1] : 0ULL;
  total = warp_sums[nw - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + x - v;
}

constexpr int kPathPlanSmem = 32 * 8 + 16;  // dynamic shared memory of path_plan_kernel

__global__ void path_plan_kernel(const PathPlanArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned long long* warp_sums = reinterpret_cast<unsigned long long*>(smem_raw);  // [32]
  int& neg_max_phase = *reinterpret_cast<int*>(smem_raw + 32 * 8);
  const int t = blockIdx.x;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int64_t ts = a.tree_ptr[t];
  const int n = static_cast<int>(a.tree_ptr[t + 1] - ts);
  const int64_t N = a.N;
  if (t == a.T - 1 && tid == 0) {
    a.rec[N] = PathRec{-1, -1, static_cast<int>(N), static_cast<int>(N)};
    a.path_ptr[N] = static_cast<int>(N);
  }
  if (n <= 0) return;  // block-uniform
  if (tid == 0) neg_max_phase = 0;
  const int base = static_cast<int>(ts);
  // workspace: [N + T] ping-pong pairs for F and M, nine [N] arrays; this tree's slices
  unsigned* F = a.work + ts + t;
  unsigned* Fn = F + (N + a.T);
  int* M = reinterpret_cast<int*>(a.work + 2 * (N + a.T)) + ts + t;
  int* Mn = M + (N + a.T);
  int* w9 = reinterpret_cast<int*>(a.work + 4 * (N + a.T)) + ts;
  int* heavy = w9;
  int* U = w9 + N;
  int* Un = w9 + 2 * N;
  int* P = w9 + 3 * N;
  int* Pn = w9 + 4 * N;
  int* Hd = w9 + 5 * N;
  int* Hn = w9 + 6 * N;
  int* len = w9 + 7 * N;  // subtree size, then path length at heads
  int* aux = w9 + 8 * N;  // first path index of heads, then light counts and starts by k

  auto cstart = [&](int i) {
    const int64_t c = a.child_ptr[ts + i] - ts;
    return static_cast<int>(c < n ? c : n);
  };
  auto cend = [&](int i) {
    const int64_t c = a.child_ptr[ts + i + 1] - ts;
    return static_cast<int>(c < n ? c : n);
  };
  auto par = [&](int i) {
    const int64_t p = a.parent_pos[ts + i];
    return p >= 0 ? static_cast<int>(p - ts) : -1;
  };
  int K = 1;  // doubling rounds: 2^K > n > depth
  while ((1LL << K) <= n) ++K;

  // 1. subtree sizes
  for (int x = tid; x <= n; x += nt) {
    F[x] = static_cast<unsigned>(x);
    M[x] = x < n ? cstart(x) : n;
  }
  __syncthreads();
  for (int r = 0; r < K; ++r) {
    for (int x = tid; x <= n; x += nt) {
      const int m = M[x];
      Fn[x] = F[x] + F[m];
      Mn[x] = M[m];
    }
    __syncthreads();
    unsigned* tf = F;
    F = Fn;
    Fn = tf;
    int* tm = M;
    M = Mn;
    Mn = tm;
  }
  for (int i = tid; i < n; i += nt) len[i] = static_cast<int>(F[i + 1] - F[i]);
  __syncthreads();
  // 2. heavy child: first child of largest subtree
  for (int i = tid; i < n; i += nt) {
    const int c1 = cend(i);
    int h = -1, best = -1;
    for (int c = cstart(i); c < c1; ++c) {
      if (len[c] > best) {
        best = len[c];
        h = c;
      }
    }
    heavy[i] = h;
  }
  __syncthreads();
  // 3. phase and head
  for (int i = tid; i < n; i += nt) {
    const int p = par(i);
    const bool hv = p >= 0 && heavy[p] == i;
    U[i] = p >= 0 ? p : i;
    P[i] = (p >= 0 && !hv) ? 1 : 0;
    Hd[i] = hv ? p : i;
  }
  __syncthreads();
  for (int r = 0; r < K; ++r) {
    for (int i = tid; i < n; i += nt) {
      const int u = U[i];
      Pn[i] = P[i] + P[u];
      Un[i] = U[u];
      Hn[i] = Hd[Hd[i]];
    }
    __syncthreads();
    int* s = P; P = Pn; Pn = s;
    s = U; U = Un; Un = s;
    s = Hd; Hd = Hn; Hn = s;
  }
  // 4. steps below the head (kept in U), path lengths at the heads, number of phases
  int my_max = 0;
  for (int i = tid; i < n; i += nt) {
    const int along = static_cast<int>(a.depth[a.order[ts + i]] - a.depth[a.order[ts + Hd[i]]]);
    U[i] = along;
    if (heavy[i] < 0) len[Hd[i]] = along + 1;  // a path's tail is a leaf
    my_max = P[i] > my_max ? P[i] : my_max;
  }
  atomicMin(&neg_max_phase, -my_max);
  __syncthreads();
  const int phases = 1 - neg_max_phase;
  // 5. place the paths: phase by phase, heads in position order
  int* phase_row = a.phase_path + (int64_t)t * (kMaxPhases + 1);
  unsigned long long kbase = 0, jbase = 0;
  for (int p = 0; p < phases; ++p) {
    if (tid == 0) phase_row[p] = base + static_cast<int>(jbase);
    for (int c0 = 0; c0 < n; c0 += nt) {
      const int i = c0 + tid;
      const bool head = i < n && Hd[i] == i && P[i] == p;
      const unsigned long long v = head ? ((static_cast<unsigned long long>(len[i]) << 32) | 1ULL) : 0ULL;
      unsigned long long tot;
      const unsigned long long ex = block_exclusive_scan(v, warp_sums, tot);
      if (head) {
        const int k = static_cast<int>(kbase + (ex >> 32));
        aux[i] = k;
        a.path_ptr[base + static_cast<int>(jbase + (ex & 0xffffffffULL))] = base + k;
      }
      kbase += tot >> 32;
      jbase += tot & 0xffffffffULL;
    }
  }
  const int npaths = static_cast<int>(jbase);
  for (int p = phases + tid; p <= kMaxPhases; p += nt) phase_row[p] = base + npaths;
  for (int j = npaths + tid; j < n; j += nt) a.path_ptr[base + j] = base + n;
  __syncthreads();
  // 6. path index of every position (kept in Un)
  int* kpos = Un;
  for (int i = tid; i < n; i += nt) kpos[i] = aux[Hd[i]] + U[i];
  __syncthreads();
  // 7. light children: counts by path index, then their starts
  for (int i = tid; i < n; i += nt) aux[kpos[i]] = cend(i) - cstart(i) - (heavy[i] >= 0 ? 1 : 0);
  __syncthreads();
  unsigned long long lbase = 0;
  for (int c0 = 0; c0 < n; c0 += nt) {
    const int k = c0 + tid;
    const unsigned long long v = k < n ? static_cast<unsigned long long>(aux[k]) : 0ULL;
    unsigned long long tot;
    const unsigned long long ex = block_exclusive_scan(v, warp_sums, tot);
    if (k < n) Pn[k] = static_cast<int>(lbase + ex);  // reads of aux[k] are done
    lbase += tot;
  }
  __syncthreads();
  // 8. records, light lists and the slot of every light child in them
  for (int k = tid; k < n; k += nt) a.slot[base + k] = -1;
  __syncthreads();
  for (int i = tid; i < n; i += nt) {
    const int k = kpos[i];
    const int p = par(i);
    const int ls = base + Pn[k];
    const int h = heavy[i];
    const int c1 = cend(i);
    int r = 0;
    for (int c = cstart(i); c < c1; ++c) {
      if (c == h) continue;
      const int kc = base + kpos[c];
      a.light[ls + r] = kc;
      a.slot[kc] = ls + r;
      ++r;
    }
    a.rec[base + k] = PathRec{static_cast<int>(a.order[ts + i]), p >= 0 ? base + kpos[p] : -1, ls,
                              ls + r};
  }
  for (int m = (npaths > 0 ? npaths - 1 : 0) + tid; m < n; m += nt) a.light[base + m] = -1;
}

}  // namespace treessm_cuda
