// Tiled tree-scan kernels: the three phases of docs/cuda.md ("The tiled layout") for the
// down and up recurrences of docs/concepts.md, reading the plan of treessm/ops/tiles.py.
//
//   down: h[v] = x[v] + w[v] h[parent(v)]      up: h[v] = x[v] + sum_c w[c] h[c]
//
// A block takes one tile and one slice of S channels. It stages the tile's x and w rows in
// shared memory (indexed by position inside the tile) and walks the tile's light levels:
// down from the lowest, up from the highest. A level is a contiguous range of slots in which
// every run (heavy path piece) is contiguous and in path order, so one level is one
// segmented scan of the step h = a h' + b, composed by
//   (f0, a0, b0) then (f1, a1, b1) = f1 ? (f1, a1, b1) : (f0, a1 a0, a1 b0 + b1),
// where f marks a run's first element in scan order (down: a run head, whose value is
// known from its parent one level lower or from outside the tile; up: a run's last vertex).
// Nothing is ever divided and a reset never multiplies the values before it, so weights of
// 0, weights above 1 and non-finite values stay in their own runs.
// A level's scan: thread t composes the elements [t chunk, (t + 1) chunk) of the level, the
// block scans the composites (Kogge-Stone over threads), then every thread runs the
// recurrence through its elements from the value before them. For `up`, a level first adds
// to each vertex the shares w[c] h[c] of its light children inside the tile (one level
// higher, final), in child order.
//
// Phases (one launch each, on one stream):
//   1. down: per tile, (A, B) with h = A h_in + B for h_in the value entering at the
//      vertex's top; written for the tile's boundary vertices (numbered i: sa[i], sb[i]).
//      up: per tile, the up values without the later tiles (B), written for the tile's
//      entries (by their index in `entries`: se[j]), and the product of weights from the
//      top to each boundary vertex (A, sa[i]).
//   2. the boundary tree, one block per channel, depth by depth inside the block:
//      down (shallowest first): H[i] = B[i] + A[i] H[feeder[i]] (H[i] = B[i] at a root's
//      tile), written over sb.
//      up (deepest first): s[i] = sum over the entries e of i, in `entries` order, of
//      w[e] (B[e] + sum over the boundary vertices j hanging below e, shallowest first,
//      of A[j] s[j]), written to ss.
//   3. per tile again with the true values: down, an entry takes h_in = H[boundary of its
//      parent]; up, a boundary vertex i starts from x + s[i]. Writes h in the input dtype.
// Every value is written by one thread, every sum is taken in an order fixed by the plan
// (not by the slice width or the grid): bitwise deterministic, the same for every S.
// Accumulation is float32 (float64 for double data).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "numeric.cuh"

namespace treessm_cuda {

// Flags of a position (treessm.ops.tiles).
constexpr int kTileRoot = 1, kTileHead = 2, kTileEntry = 4, kTileBoundary = 8;

struct TileArgs {
  const void* x;  // [N, C] by vertex
  const void* w;  // [N, C] by vertex
  void* h;        // [N, C] by vertex (phase 3)
  int64_t C;
  int N, M, L, tile;
  // the plan (treessm.ops.tiles.TilePlan), int32
  const int* vertex;
  const int* parent;
  const int* size;
  const int* flags;
  const int* top;
  const int* tile_ptr;
  const int* scan;
  const int* level_ptr;  // [M, L + 1]
  const int* tile_levels;
  const int* boundary;
  const int* boundary_pos;
  const int* feeder;
  const int* boundary_level_ptr;  // [M + 1]
  const int* tile_boundary;       // [M, 2]
  const int* entries;
  const int* entry_ptr;
  // scratch rows of C accumulators: down sa = A, sb = B then H (by boundary number);
  // up sa = A (by boundary number), se = B (by entry index), ss = s (by boundary number)
  void* sa;
  void* sb;
  void* se;
  void* ss;
};

// Shared memory of a tile block: three value arrays of tile * S, the slot -> position map
// and the flags of the tile (ints), the composites of `threads` threads (a, two b's, flag).
template <typename A, int S>
__host__ __device__ inline int64_t tile_smem_bytes(int tile, int threads) {
  const int64_t vals = (3LL * tile + 3LL * threads) * S * sizeof(A);
  return vals + 2LL * tile * sizeof(int) + threads;
}

template <typename A, int S>
struct TileBlock {
  A* val;  // [tile, S]: x, then h (down, up) / B (phase 1)
  A* mul;  // [tile, S]: w
  A* aux;  // [tile, S]: A of phase 1
  A* agga;  // [threads, S]
  A* aggb;  // [2, threads, S]
  int* spos;  // slot - start -> position - start
  int* sflag;  // flags by position - start
  unsigned char* aggf;  // [threads]
  int start, len, nc, nt;
  int64_t c0;

  __device__ TileBlock(unsigned char* raw, int tile, int s, int e, int64_t C) {
#ifdef __CUDA_ARCH__
    if (e - s > tile) __trap();  // a plan of larger tiles than the shared memory holds
#endif
    nt = blockDim.x;
    val = reinterpret_cast<A*>(raw);
    mul = val + static_cast<int64_t>(tile) * S;
    aux = mul + static_cast<int64_t>(tile) * S;
    agga = aux + static_cast<int64_t>(tile) * S;
    aggb = agga + static_cast<int64_t>(nt) * S;
    spos = reinterpret_cast<int*>(aggb + 2LL * nt * S);
    sflag = spos + tile;
    aggf = reinterpret_cast<unsigned char*>(sflag + tile);
    start = s;
    len = e - s;
    c0 = static_cast<int64_t>(blockIdx.y) * S;
    nc = static_cast<int>(C - c0 < S ? C - c0 : S);
  }
};

// One segmented scan of `len` elements in scan direction (none when a tile holds no
// position of that light depth, between two it holds). elem(i, c, a, b) gives element
// i of channel c: returns its flag, sets its multiplier a and its NL values b; out(i, c, h)
// takes the results. Elements may read only their own values and finished levels; out may
// overwrite an element's own values (elem is called again after every thread composed).
template <typename A, int S, int NL, typename Elem, typename Out>
__device__ void level_scan(TileBlock<A, S>& tb, int len, Elem elem, Out out) {
  if (len <= 0) return;  // a light depth the tile lacks (block-uniform)
  const int nt = tb.nt, t = threadIdx.x;
  const int chunk = (len + nt - 1) / nt;
  const int nact = (len + chunk - 1) / chunk;
  const int lo = t * chunk < len ? t * chunk : len;
  const int hi = lo + chunk < len ? lo + chunk : len;
  // 1. compose the thread's elements
  for (int c = 0; c < tb.nc; ++c) {
    bool f = false;
    A a = 1, b[NL];
    for (int l = 0; l < NL; ++l) b[l] = 0;
    for (int i = lo; i < hi; ++i) {
      A ea, eb[NL];
      if (elem(i, c, ea, eb)) {
        f = true;
        a = ea;
        for (int l = 0; l < NL; ++l) b[l] = eb[l];
      } else {
        a = ea * a;
        for (int l = 0; l < NL; ++l) b[l] = ea * b[l] + eb[l];
      }
    }
    tb.agga[t * S + c] = a;
    for (int l = 0; l < NL; ++l) tb.aggb[(l * nt + t) * S + c] = b[l];
    if (c == 0) tb.aggf[t] = f;
  }
  __syncthreads();
  // 2. inclusive scan of the composites over the active threads
  for (int off = 1; off < nact; off <<= 1) {
    const bool act = t < nact && t >= off;
    bool f = false;
    A a[S], b[NL][S];
    if (act) {
      const bool fl = tb.aggf[t - off], fm = tb.aggf[t];
      f = fm || fl;
      for (int c = 0; c < tb.nc; ++c) {
        const A am = tb.agga[t * S + c];
        if (fm) {
          a[c] = am;
          for (int l = 0; l < NL; ++l) b[l][c] = tb.aggb[(l * nt + t) * S + c];
        } else {
          a[c] = am * tb.agga[(t - off) * S + c];
          for (int l = 0; l < NL; ++l)
            b[l][c] = am * tb.aggb[(l * nt + t - off) * S + c] + tb.aggb[(l * nt + t) * S + c];
        }
      }
    }
    __syncthreads();
    if (act) {
      tb.aggf[t] = f;
      for (int c = 0; c < tb.nc; ++c) {
        tb.agga[t * S + c] = a[c];
        for (int l = 0; l < NL; ++l) tb.aggb[(l * nt + t) * S + c] = b[l][c];
      }
    }
    __syncthreads();
  }
  // 3. the recurrence through the thread's elements from the value before them (a level
  // starts with a flagged element, so thread 0 needs none)
  for (int c = 0; c < tb.nc; ++c) {
    A h[NL];
    for (int l = 0; l < NL; ++l) h[l] = t > 0 && lo < hi ? tb.aggb[(l * nt + t - 1) * S + c] : A(0);
    for (int i = lo; i < hi; ++i) {
      A ea, eb[NL];
      if (elem(i, c, ea, eb)) {
        for (int l = 0; l < NL; ++l) h[l] = eb[l];
      } else {
        for (int l = 0; l < NL; ++l) h[l] = ea * h[l] + eb[l];
      }
      out(i, c, h);
    }
  }
  __syncthreads();
}

// Stages the tile's rows: val = x (+ s of boundary vertices when `ss` is set), mul = w,
// the slot map and the flags. Returns whether any position of the tile has one of `any`.
template <typename T, typename A, int S>
__device__ bool stage_tile(TileBlock<A, S>& tb, const TileArgs& a, const A* ss, int any) {
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  int found = 0;
  for (int p = threadIdx.x; p < tb.len; p += tb.nt) {
    const int pos = tb.start + p;
    const int64_t row = static_cast<int64_t>(a.vertex[pos]) * a.C + tb.c0;
    const int fl = a.flags[pos];
    tb.sflag[p] = fl;
    tb.spos[p] = a.scan[pos] - tb.start;
    found |= fl & any;
    for (int c = 0; c < tb.nc; ++c) {
      A xv = static_cast<A>(to_acc(x[row + c]));
      if (ss != nullptr && (fl & kTileBoundary))
        xv = xv + ss[static_cast<int64_t>(a.boundary[pos]) * a.C + tb.c0 + c];
      tb.val[p * S + c] = xv;
      tb.mul[p * S + c] = static_cast<A>(to_acc(w[row + c]));
    }
  }
  return __syncthreads_or(found) != 0;
}

// The down recurrence over the tile's levels, lowest first. NL = 2 (phase 1): val = B and
// aux = A of h = A h_in + B; NL = 1 (phase 3): val = h, an entry reading h_in from H.
template <typename A, int S, int NL>
__device__ void down_levels(TileBlock<A, S>& tb, const TileArgs& a, int k, const A* H) {
  const int levels = a.tile_levels[k];
  const int* lp = a.level_ptr + static_cast<int64_t>(k) * (a.L + 1);
  for (int j = 0; j < levels; ++j) {
    const int s0 = lp[j] - tb.start, len = lp[j + 1] - lp[j];
    auto elem = [&](int i, int c, A& ea, A (&eb)[NL]) -> bool {
      const int p = tb.spos[s0 + i];
      const int fl = tb.sflag[p];
      const A wv = tb.mul[p * S + c], xv = tb.val[p * S + c];
      ea = wv;
      if (fl & kTileRoot) {
        eb[0] = xv;
        if (NL == 2) eb[NL - 1] = 0;
        return true;
      }
      if (fl & kTileEntry) {
        if (NL == 2) {
          eb[0] = xv;
          eb[NL - 1] = wv;
        } else {
          const int64_t b = a.boundary[a.parent[tb.start + p]];
          eb[0] = xv + wv * H[b * a.C + tb.c0 + c];
        }
        return true;
      }
      if (fl & kTileHead) {
        const int q = a.parent[tb.start + p] - tb.start;
        eb[0] = xv + wv * tb.val[q * S + c];
        if (NL == 2) eb[NL - 1] = wv * tb.aux[q * S + c];
        return true;
      }
      eb[0] = xv;
      if (NL == 2) eb[NL - 1] = 0;
      return false;
    };
    auto out = [&](int i, int c, const A (&h)[NL]) {
      const int p = tb.spos[s0 + i];
      tb.val[p * S + c] = h[0];
      if (NL == 2) tb.aux[p * S + c] = h[NL - 1];
    };
    level_scan<A, S, NL>(tb, len, elem, out);
  }
}

// Phase 1 of up's A: the product of the weights from each vertex's top (exclusive) down to
// it, into aux (a down recurrence with 1 at tops and 0 elsewhere).
template <typename A, int S>
__device__ void top_products(TileBlock<A, S>& tb, const TileArgs& a, int k) {
  const int levels = a.tile_levels[k];
  const int* lp = a.level_ptr + static_cast<int64_t>(k) * (a.L + 1);
  for (int j = 0; j < levels; ++j) {
    const int s0 = lp[j] - tb.start, len = lp[j + 1] - lp[j];
    auto elem = [&](int i, int c, A& ea, A (&eb)[1]) -> bool {
      const int p = tb.spos[s0 + i];
      const int fl = tb.sflag[p];
      const A wv = tb.mul[p * S + c];
      ea = wv;
      if (fl & (kTileRoot | kTileEntry)) {
        eb[0] = 1;
        return true;
      }
      if (fl & kTileHead) {
        eb[0] = wv * tb.aux[(a.parent[tb.start + p] - tb.start) * S + c];
        return true;
      }
      eb[0] = 0;
      return false;
    };
    auto out = [&](int i, int c, const A (&h)[1]) { tb.aux[tb.spos[s0 + i] * S + c] = h[0]; };
    level_scan<A, S, 1>(tb, len, elem, out);
  }
}

// The up recurrence over the tile's levels, highest first, into val (children in later
// tiles left out; phase 3 staged their sums into x).
template <typename A, int S>
__device__ void up_levels(TileBlock<A, S>& tb, const TileArgs& a, int k) {
  const int levels = a.tile_levels[k];
  const int* lp = a.level_ptr + static_cast<int64_t>(k) * (a.L + 1);
  const int end = tb.start + tb.len;
  for (int j = levels - 1; j >= 0; --j) {
    const int s0 = lp[j] - tb.start, len = lp[j + 1] - lp[j];
    // the shares of light children in the tile (one level higher, final), in child order
    for (int i = threadIdx.x; i < len; i += tb.nt) {
      const int p = tb.spos[s0 + i];
      const int pos = tb.start + p;
      const int stop = min(pos + a.size[pos], end);
      if (pos + 1 >= stop) continue;
      for (int ch = pos + 1 + a.size[pos + 1]; ch < stop; ch += a.size[ch]) {
        const int q = ch - tb.start;
        for (int c = 0; c < tb.nc; ++c) tb.val[p * S + c] = tb.val[p * S + c] + tb.mul[q * S + c] * tb.val[q * S + c];
      }
    }
    __syncthreads();
    // along runs from their last vertex: element i is slot s0 + len - 1 - i
    auto elem = [&](int i, int c, A& ea, A (&eb)[1]) -> bool {
      const int p = tb.spos[s0 + len - 1 - i];
      eb[0] = tb.val[p * S + c];
      const bool next = p + 1 < tb.len &&
                        !(tb.sflag[p + 1] & (kTileRoot | kTileHead | kTileEntry));
      ea = next ? tb.mul[(p + 1) * S + c] : A(0);
      return !next;
    };
    auto out = [&](int i, int c, const A (&h)[1]) {
      tb.val[tb.spos[s0 + len - 1 - i] * S + c] = h[0];
    };
    level_scan<A, S, 1>(tb, len, elem, out);
  }
}

// The index of entry position e in `entries` (its group, the entries of e's parent's
// boundary number, is sorted by position).
__device__ __forceinline__ int entry_index(const TileArgs& a, int e) {
  const int i = a.boundary[a.parent[e]];
  int lo = a.entry_ptr[i], hi = a.entry_ptr[i + 1];
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a.entries[mid] < e) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// ---------------------------------------------------------------------------- phase 1
template <typename T, typename A, int S, bool UP>
__global__ void tile_phase1_kernel(const TileArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int k = blockIdx.x;
  const int s = a.tile_ptr[k], e = a.tile_ptr[k + 1];
  const int b0 = a.tile_boundary[2 * k], b1 = a.tile_boundary[2 * k + 1];
  if (s >= e) return;  // block-uniform
  if (!UP && b0 >= b1) return;  // nothing leaves the tile
  TileBlock<A, S> tb(smem_raw, a.tile, s, e, a.C);
  A* sa = static_cast<A*>(a.sa);
  if (!UP) {
    stage_tile<T, A, S>(tb, a, nullptr, 0);
    down_levels<A, S, 2>(tb, a, k, nullptr);
    A* sb = static_cast<A*>(a.sb);
    for (int i = b0 + static_cast<int>(threadIdx.x); i < b1; i += tb.nt) {
      const int p = a.boundary_pos[i] - s;
      for (int c = 0; c < tb.nc; ++c) {
        sa[static_cast<int64_t>(i) * a.C + tb.c0 + c] = tb.aux[p * S + c];
        sb[static_cast<int64_t>(i) * a.C + tb.c0 + c] = tb.val[p * S + c];
      }
    }
    return;
  }
  if (!stage_tile<T, A, S>(tb, a, nullptr, kTileEntry | kTileBoundary)) return;
  up_levels<A, S>(tb, a, k);
  if (b0 < b1) top_products<A, S>(tb, a, k);
  A* se = static_cast<A*>(a.se);
  for (int p = threadIdx.x; p < tb.len; p += tb.nt) {
    if (!(tb.sflag[p] & kTileEntry)) continue;
    const int64_t j = entry_index(a, s + p);
    for (int c = 0; c < tb.nc; ++c) se[j * a.C + tb.c0 + c] = tb.val[p * S + c];
  }
  for (int i = b0 + static_cast<int>(threadIdx.x); i < b1; i += tb.nt) {
    const int p = a.boundary_pos[i] - s;
    for (int c = 0; c < tb.nc; ++c) sa[static_cast<int64_t>(i) * a.C + tb.c0 + c] = tb.aux[p * S + c];
  }
}

// ---------------------------------------------------------------------------- phase 2
// One block per channel; the boundary tree depth by depth inside it.
__device__ __forceinline__ int tile_of(const TileArgs& a, int pos) {
  int lo = 0, hi = a.M;  // the last k with tile_ptr[k] <= pos
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (a.tile_ptr[mid] <= pos) lo = mid;
    else hi = mid;
  }
  return lo;
}

template <typename T, typename A, bool UP>
__global__ void tile_phase2_kernel(const TileArgs a) {
  const int64_t c = blockIdx.x;
  const int* blp = a.boundary_level_ptr;
  const int nb = blp[a.M];
  int depths = 0;  // nonempty depths: 0 .. depths - 1
  while (depths < a.M && blp[depths] < nb) ++depths;
  A* sa = static_cast<A*>(a.sa);
  if (!UP) {
    A* sb = static_cast<A*>(a.sb);
    for (int d = 0; d < depths; ++d) {
      for (int i = blp[d] + static_cast<int>(threadIdx.x); i < blp[d + 1]; i += blockDim.x) {
        const int f = a.feeder[i];
        const int64_t r = static_cast<int64_t>(i) * a.C + c;
        if (f >= 0) sb[r] = sb[r] + sa[r] * sb[static_cast<int64_t>(f) * a.C + c];
      }
      __syncthreads();
    }
    return;
  }
  const T* w = static_cast<const T*>(a.w);
  const A* se = static_cast<const A*>(a.se);
  A* ss = static_cast<A*>(a.ss);
  for (int d = depths - 1; d >= 0; --d) {
    for (int i = blp[d] + static_cast<int>(threadIdx.x); i < blp[d + 1]; i += blockDim.x) {
      A sum = 0;
      for (int j = a.entry_ptr[i]; j < a.entry_ptr[i + 1]; ++j) {
        const int e = a.entries[j];
        A value = se[static_cast<int64_t>(j) * a.C + c];
        const int k = tile_of(a, e);
        const int lo = a.tile_boundary[2 * k], hi = a.tile_boundary[2 * k + 1];
        if (lo < hi && a.top[a.boundary_pos[lo]] == e)
          for (int b = lo; b < hi; ++b)
            value = value + sa[static_cast<int64_t>(b) * a.C + c] * ss[static_cast<int64_t>(b) * a.C + c];
        sum = sum + static_cast<A>(to_acc(w[static_cast<int64_t>(a.vertex[e]) * a.C + c])) * value;
      }
      ss[static_cast<int64_t>(i) * a.C + c] = sum;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------- phase 3
template <typename T, typename A, int S, bool UP>
__global__ void tile_phase3_kernel(const TileArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int k = blockIdx.x;
  const int s = a.tile_ptr[k], e = a.tile_ptr[k + 1];
  if (s >= e) return;  // block-uniform
  TileBlock<A, S> tb(smem_raw, a.tile, s, e, a.C);
  if (UP) {
    stage_tile<T, A, S>(tb, a, static_cast<const A*>(a.ss), 0);
    up_levels<A, S>(tb, a, k);
  } else {
    stage_tile<T, A, S>(tb, a, nullptr, 0);
    down_levels<A, S, 1>(tb, a, k, static_cast<const A*>(a.sb));
  }
  T* h = static_cast<T*>(a.h);
  for (int p = threadIdx.x; p < tb.len; p += tb.nt) {
    const int64_t row = static_cast<int64_t>(a.vertex[s + p]) * a.C + tb.c0;
    for (int c = 0; c < tb.nc; ++c) h[row + c] = Store<T>::cvt(tb.val[p * S + c]);
  }
}

// ---------------------------------------------------------------------------- backward
// The backward of h = scan(x, w): grad_x is the other direction's scan of grad with the
// same weights; the gradient of the weights: down, gw[v] = gx[v] h[parent(v)];
// up, gw[v] = h[v] gx[parent(v)]; 0 at roots. One thread per (position, channel).
template <typename T, typename A>
__global__ void tile_grad_weight_kernel(const T* gx, const T* h, T* gw, const int* vertex,
                                        const int* parent, int64_t N, int64_t C, bool up) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * C) return;
  const int64_t pos = idx / C, c = idx % C;
  const int64_t v = vertex[pos];
  const int q = parent[pos];
  A r = 0;
  if (q >= 0) {
    const int64_t pv = vertex[q];
    r = up ? static_cast<A>(to_acc(h[v * C + c])) * static_cast<A>(to_acc(gx[pv * C + c]))
           : static_cast<A>(to_acc(gx[v * C + c])) * static_cast<A>(to_acc(h[pv * C + c]));
  }
  gw[v * C + c] = Store<T>::cvt(r);
}

// ---------------------------------------------------------------------------- both
// both = up + out with out[v] = w[v] br[v], br[v] = out[p] + x[p] + sum over v's siblings s
// of w[s] up[s] (0 at roots): out is the down scan of b[v] = w[v] (x[p] + sib(v)) with the
// same weights. The sibling sums are an exclusive prefix over the children in position
// order plus an exclusive suffix (never a total minus the vertex's own share).

// prev[c] = the position of c's previous sibling (-1 for a first child and for a root).
// One thread per position, for its children.
__global__ void tile_sibling_links_kernel(const int* parent, const int* size, int* prev,
                                                 int N) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pos >= N) return;
  if (parent[pos] < 0) prev[pos] = -1;
  const int stop = static_cast<int>(pos) + size[pos];
  int last = -1;
  for (int ch = static_cast<int>(pos) + 1; ch < stop; ch += size[ch]) {
    prev[ch] = last;
    last = ch;
  }
}

// For each vertex v below p: inner[v] = x[p] + sib(v) and b[v] = w[v] inner[v]; 0 at roots.
// One thread per (position, channel) writes the rows of the position's children: the
// exclusive prefix of w up forwards, then the suffix added backwards (prev links). Rows by
// vertex, all in the accumulation type.
template <typename A>
__global__ void tile_bracket_kernel(const A* x, const A* w, const A* up, A* inner, A* b,
                                    const int* vertex, const int* parent, const int* size,
                                    const int* prev, int64_t N, int64_t C) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * C) return;
  const int pos = static_cast<int>(idx / C);
  const int64_t c = idx % C;
  if (parent[pos] < 0) {
    const int64_t r = static_cast<int64_t>(vertex[pos]) * C + c;
    inner[r] = 0;
    b[r] = 0;
  }
  const int stop = pos + size[pos];
  if (pos + 1 >= stop) return;  // a leaf
  const A xp = x[static_cast<int64_t>(vertex[pos]) * C + c];
  A run = 0;
  int last = pos + 1;
  for (int ch = pos + 1; ch < stop; ch += size[ch]) {
    const int64_t r = static_cast<int64_t>(vertex[ch]) * C + c;
    inner[r] = run;
    run = run + w[r] * up[r];
    last = ch;
  }
  run = 0;
  for (int ch = last; ch >= 0; ch = prev[ch]) {
    const int64_t r = static_cast<int64_t>(vertex[ch]) * C + c;
    const A q = xp + (inner[r] + run);
    inner[r] = q;
    b[r] = w[r] * q;
    run = run + w[r] * up[r];
  }
}

// The weights' gradient of both at grad g: gw[v] = up(x)[v] br_g[v] + up(g)[v] br_x[v],
// br[v] = out[p] + inner[v] (of x, of g); 0 at roots. One thread per (position, channel).
template <typename T, typename A>
__global__ void tile_both_grad_weight_kernel(const A* up_x, const A* inner_x, const A* out_x,
                                             const A* up_g, const A* inner_g, const A* out_g,
                                             T* gw, const int* vertex, const int* parent,
                                             int64_t N, int64_t C) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * C) return;
  const int64_t pos = idx / C, c = idx % C;
  const int64_t r = static_cast<int64_t>(vertex[pos]) * C + c;
  const int q = parent[pos];
  A g = 0;
  if (q >= 0) {
    const int64_t pr = static_cast<int64_t>(vertex[q]) * C + c;
    const A br_x = out_x[pr] + inner_x[r], br_g = out_g[pr] + inner_g[r];
    g = up_x[r] * br_g + up_g[r] * br_x;
  }
  gw[r] = Store<T>::cvt(g);
}

}  // namespace treessm_cuda
