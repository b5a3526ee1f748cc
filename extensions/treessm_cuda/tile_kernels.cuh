// Tiled tree-scan kernels: the three phases of docs/cuda.md ("The tiled layout") for the
// down and up recurrences of docs/concepts.md, reading the plan of treessm/ops/tiles.py.
//
//   down: h[v] = x[v] + w[v] h[parent(v)]      up: h[v] = x[v] + sum_c w[c] h[c]
//
// Channels are lanes: a warp takes 32 consecutive channels (a *group*) of one position at
// a time, so every row access is one contiguous segment; lanes past C are masked. A tile
// block stages its tile's plan in shared memory once (13 bytes a position) and loops over
// the channel groups of its slice. Values that a later level or phase reads live in global
// memory, in `store`: h itself when the element type is the accumulation type, else a
// scratch of accumulator rows written only where something reads them later.
//
// Sequences (a light level of a tile, a tile's boundary path) are scanned in chunks of
// kTileChunk elements, the step h = a h' + b with a flag f where a segment starts (its
// value does not depend on the one before). In a round every warp of the block takes one
// chunk: it loads the chunk's elements into registers (every load issued before one is
// used) and composes them per lane,
//   (F, a, b) then (f, a', b') = f ? (1, a', b') : (F, a' a, a' b + b'),
// writes the composite to shared memory; after one barrier each warp carries the value
// entering the round through the composites before its chunk, in order, and reruns its
// chunk from it, writing the values. The value after the round is carried into the next
// one; a sequence ends with a barrier. Nothing is ever divided and a reset never multiplies
// the values before it, so weights of 0, weights above 1 and non-finite values stay in
// their own segments. Chunks start every kTileChunk elements whatever the block width, and
// the carry runs through the chunks in order: the values do not depend on the warps of a
// block nor on the groups a block takes.
//
// A light level is a contiguous range of slots in which every run (heavy path piece) is
// contiguous and in path order; a run head's parent in the tile lies one level lower. The
// *boundary path* of a tile (plan.path) runs from the top of its boundary vertices to the
// deepest of them; it holds them all. Phases (one launch each, or two):
//   down
//     1. tile_down_paths_kernel: along each boundary path, h = A h_in + B with h_in the
//        value entering at the top (A = w there at an entry, 0 at a root); (A, B) written
//        at the boundary vertices, by number (sa, sb).
//     2. tile_down_feed_kernel: for each tile whose path top is an entry, X = the true
//        value at the top's parent f, H[f] = B[f] + A[f] H[feeder(f)], composed from f
//        outwards along the feeders; one warp per (tile, group), no synchronisation.
//     3. tile_down_levels_kernel: each tile's light levels from the lowest; an entry takes
//        the value of its parent j, H[j] = B[j] + A[j] X[tile of j]; writes h.
//   up
//     1. tile_up_levels_kernel: each tile's light levels from the highest, a vertex first
//        adding the shares w[c] h[c] of its light children in the tile (one level higher,
//        in child order), nothing from later tiles: B, final off the boundary paths (h
//        and store); along the path, A[j] = the product of the weights from the top down to
//        boundary vertex j (sa).
//     2. the tile tree: the path top e of tile k hangs from boundary vertex f of an earlier
//        tile p(k). tile_up_gather_kernel: c[j] = the sum over the entries e of j of
//        w[e] B[e] (sb), one warp per (boundary vertex, group); tile_up_tiles_kernel: per
//        tile R0[k] = the sum over its boundary vertices j of A[j] c[j], mu[k] = w[e] A[f];
//        tile_up_tree_kernel: R[k] = R0[k] + the sum over the tiles k' hanging from k of
//        mu[k'] R[k'], tiles from the last (one warp a group, the sums in shared memory
//        where they fit), so that B[e] + R[k] is the true value at e.
//     3. tile_up_paths_kernel: s[j] = c[j] + the sum over the tiles k' whose top e hangs
//        from j of w[e] R[k'] (sb); along the path from its deepest vertex, E = s at a
//        boundary vertex + w[child on the path] E[child]; h = B + E there.
// Every value is written by one lane and every sum is taken in an order fixed by the plan:
// bitwise deterministic, the same for every launch shape. Accumulation is float32
// (float64 for double data).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "numeric.cuh"

namespace treessm_cuda {

// Flags of a position (treessm.ops.tiles).
constexpr int kTileRoot = 1, kTileHead = 2, kTileEntry = 4, kTileBoundary = 8;
// Elements a warp composes in a row; the values depend on it (not on the block width).
// Eight rather than sixteen: the fewer registers a chunk holds, the more warps hide the
// loads' latency (docs/cuda.md, attempts).
constexpr int kTileChunk = 8;
// Channels of a group: the lanes of a warp.
constexpr int kTileLanes = 32;
// Threads of a block at most, and the tile blocks a multiprocessor should hold (their
// register budget: 4 of float accumulators, 64 registers a thread, which the kernels fit
// without spilling; 2 of double).
constexpr int kTileThreads = 256;
template <typename A>
constexpr int tile_min_blocks() { return sizeof(A) == 4 ? 4 : 2; }

struct TileArgs {
  const void* x;  // [N, C] by vertex
  const void* w;  // [N, C] by vertex
  void* h;        // [N, C] by vertex
  void* store;    // [N, C] accumulator rows by vertex; h itself when T is the accumulator
  int64_t C;
  int N, M, tile;
  int groups;            // channel groups of 32: ceil(C / 32)
  int groups_per_block;  // of a tile block; blockIdx.y takes groups [y gpb, (y + 1) gpb)
  // the plan (treessm.ops.tiles.TilePlan), int32
  const int* vertex;
  const int* parent;
  const int* size;
  const int* flags;
  const int* top;
  const int* tile_ptr;
  const int* scan;
  const int* level_ptr;  // [M, L + 1]
  int L;
  const int* tile_levels;
  const int* boundary;
  const int* boundary_pos;
  const int* feeder;
  const int* tile_boundary;  // [M, 2]
  const int* entries;
  const int* entry_ptr;
  const int* path;
  const int* path_ptr;            // [M + 1]
  const int* boundary_level_ptr;  // [M + 1]; its last entry is the number of boundary vertices
  // scratch: rows of C accumulators by boundary number (sa: A, sb: down B, up c then s) and
  // by tile (tv: down X, up R0 then R; tmu: up mu); up: the parent tile of each tile and
  // the tile whose path top each entry is (by entry index)
  void* sa;
  void* sb;
  void* tv;
  void* tmu;
  int* tparent;
  int* etile;
};

// ---------------------------------------------------------------------------- helpers
template <typename T, typename A>
__device__ __forceinline__ A load_as(const void* p, int64_t i) {
  return static_cast<A>(to_acc(static_cast<const T*>(p)[i]));
}

// a b rounded on its own, never fused with the addition that consumes it.
__device__ __forceinline__ float product(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double product(double a, double b) { return __dmul_rn(a, b); }

// The input of a down scan at a vertex of weight wv and row value xv: w x where the rows
// are both's brackets (kScaled), else x.
template <bool kScaled, typename A>
__device__ __forceinline__ A down_input(A xv, A wv) {
  if constexpr (kScaled) return product(wv, xv);
  else return xv;
}

// The last tile k with tile_ptr[k] <= pos.
__device__ __forceinline__ int tile_of(const TileArgs& a, int pos) {
  int lo = 0, hi = a.M;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (a.tile_ptr[mid] <= pos) lo = mid;
    else hi = mid;
  }
  return lo;
}

__host__ __device__ inline int64_t tile_align16(int64_t b) { return (b + 15) / 16 * 16; }

// Shared memory of a sequence scan: per buffer (2), per warp, per lane, a and NL b's; a
// flag per buffer and warp.
template <typename A, int NL>
__host__ __device__ inline int64_t scan_smem_bytes(int warps) {
  return tile_align16(2LL * warps * kTileLanes * (1 + NL) * sizeof(A)) + tile_align16(2LL * warps);
}

// Shared memory of a tile block: the staged plan (13 bytes a position) and a scan's.
template <typename A>
__host__ __device__ inline int64_t tile_smem_bytes(int tile, int warps) {
  return tile_align16(12LL * tile) + tile_align16(tile) + scan_smem_bytes<A, 1>(warps);
}

// Shared memory of a path block: a scan's (two values: down's A and B).
template <typename A>
__host__ __device__ inline int64_t path_smem_bytes(int warps) {
  return scan_smem_bytes<A, 2>(warps);
}

template <typename A, int NL>
struct ScanShared {
  A* a;              // [2][warps][32]
  A* b;              // [2][NL][warps][32]
  unsigned char* f;  // [2][warps]
  int warps;

  __device__ ScanShared(unsigned char* raw, int w) : warps(w) {
    a = reinterpret_cast<A*>(raw);
    b = a + 2 * w * kTileLanes;
    f = raw + tile_align16(2LL * w * kTileLanes * (1 + NL) * sizeof(A));
  }
  __device__ A& at(int buf, int warp, int lane) { return a[(buf * warps + warp) * kTileLanes + lane]; }
  __device__ A& bt(int buf, int l, int warp, int lane) {
    return b[((buf * NL + l) * warps + warp) * kTileLanes + lane];
  }
};

// One segmented scan of `len` elements (block-uniform). get(i, a, b) gives element i for
// this lane's channel: returns its flag (the same on every lane), sets its multiplier and
// NL values; it only reads (a chunk's last element may be read more than once, so that the
// loads of a chunk are issued without a branch between them). put(i, h) takes the NL
// values after element i, once, after every get of its chunk; it may write global memory
// of its element (the barrier at the end makes the writes visible to the next sequence).
template <typename A, int NL, typename Get, typename Put>
__device__ void chunked_scan(ScanShared<A, NL>& sh, int len, Get get, Put put) {
  constexpr int K = kTileChunk;
  const int warps = sh.warps, warp = threadIdx.x / kTileLanes, lane = threadIdx.x % kTileLanes;
  A carry[NL];
  for (int l = 0; l < NL; ++l) carry[l] = A(0);
  int buf = 0;
  for (int base = 0; base < len; base += warps * K) {
    const int lo = base + warp * K;
    const int n = len - lo <= 0 ? 0 : (len - lo < K ? len - lo : K);
    bool f[K];
    A ea[K], eb[K][NL];
    if (n > 0) {
#pragma unroll
      for (int i = 0; i < K; ++i) f[i] = get(lo + (i < n ? i : n - 1), ea[i], eb[i]);
      bool F = false;
      A ca = A(1), cb[NL];
      for (int l = 0; l < NL; ++l) cb[l] = A(0);
#pragma unroll
      for (int i = 0; i < K; ++i) {
        if (i >= n) continue;
        if (f[i]) {
          F = true;
          ca = ea[i];
          for (int l = 0; l < NL; ++l) cb[l] = eb[i][l];
        } else {
          ca = ea[i] * ca;
          for (int l = 0; l < NL; ++l) cb[l] = ea[i] * cb[l] + eb[i][l];
        }
      }
      sh.at(buf, warp, lane) = ca;
      for (int l = 0; l < NL; ++l) sh.bt(buf, l, warp, lane) = cb[l];
      if (lane == 0) sh.f[buf * warps + warp] = F;
    }
    __syncthreads();
    // the value entering each chunk of the round, in chunk order (every warp the same way)
    const int rest = (len - base + K - 1) / K;
    const int chunks = rest < warps ? rest : warps;
    A mine[NL];
    for (int l = 0; l < NL; ++l) mine[l] = carry[l];
    for (int u = 0; u < chunks; ++u) {
      if (u == warp)
        for (int l = 0; l < NL; ++l) mine[l] = carry[l];
      const A ua = sh.at(buf, u, lane);
      const bool uf = sh.f[buf * warps + u] != 0;
      for (int l = 0; l < NL; ++l) {
        const A ub = sh.bt(buf, l, u, lane);
        carry[l] = uf ? ub : ua * carry[l] + ub;
      }
    }
#pragma unroll
    for (int i = 0; i < K; ++i) {
      if (i >= n) continue;
      for (int l = 0; l < NL; ++l) mine[l] = f[i] ? eb[i][l] : ea[i] * mine[l] + eb[i][l];
      put(lo + i, mine);
    }
    buf ^= 1;
  }
  __syncthreads();
}

// The channel of this lane in group g, and whether it exists.
struct Lane {
  int64_t c;
  bool ok;
  __device__ Lane(const TileArgs& a, int g) {
    c = static_cast<int64_t>(g) * kTileLanes + threadIdx.x % kTileLanes;
    ok = c < a.C;
  }
};

// The groups of this tile block: [g0, g1).
__device__ __forceinline__ void block_groups(const TileArgs& a, int& g0, int& g1) {
  g0 = static_cast<int>(blockIdx.y) * a.groups_per_block;
  g1 = g0 + a.groups_per_block < a.groups ? g0 + a.groups_per_block : a.groups;
}

// The plan a tile block stages in shared memory: three int arrays and a byte array of
// `tile` entries each (13 bytes a position), in that order; S (DownStage, UpStage) names
// them.
template <typename S>
__device__ S staged_plan(unsigned char* raw, int tile) {
  int* p = reinterpret_cast<int*>(raw);
  return S{p, p + tile, p + 2 * tile, raw + tile_align16(12LL * tile)};
}

// The shared memory of a tile block's scans, after its staged plan.
template <typename A>
__device__ ScanShared<A, 1> tile_scan_shared(unsigned char* raw, int tile) {
  return ScanShared<A, 1>(raw + tile_align16(12LL * tile) + tile_align16(tile),
                          blockDim.x / kTileLanes);
}

// The positions [start, end) of tile k; false when it is empty (block-uniform).
__device__ __forceinline__ bool tile_range(const TileArgs& a, int k, int& start, int& end) {
  start = a.tile_ptr[k];
  end = a.tile_ptr[k + 1];
#ifdef __CUDA_ARCH__
  if (end - start > a.tile) __trap();  // a plan of larger tiles than the launch
#endif
  return start < end;
}

// ---------------------------------------------------------------------------- down
// Phase 1: (A, B) along the boundary path of tile blockIdx.x, at its boundary vertices.
// kScaled: the input at v is w[v] x[v] (down_input), in every down kernel.
template <typename T, typename A, bool kScaled>
__global__ void tile_down_paths_kernel(const TileArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int k = blockIdx.x;
  const int pb = a.path_ptr[k], pe = a.path_ptr[k + 1];
  if (pb >= pe) return;  // no boundary vertex (block-uniform)
  ScanShared<A, 2> sh(smem_raw, blockDim.x / kTileLanes);
  A* sa = static_cast<A*>(a.sa);
  A* sb = static_cast<A*>(a.sb);
  const bool entry = (a.flags[a.path[pb]] & kTileRoot) == 0;
  int g0, g1;
  block_groups(a, g0, g1);
  for (int g = g0; g < g1; ++g) {
    const Lane ln(a, g);
    // the top: h = w h_in + x at an entry, x at a root; below it h = w h' + x
    auto get = [&](int i, A& ea, A (&eb)[2]) -> bool {
      const int64_t r = static_cast<int64_t>(a.vertex[a.path[pb + i]]) * a.C + ln.c;
      const A xv = ln.ok ? load_as<T, A>(a.x, r) : A(0);
      const A wv = ln.ok ? load_as<T, A>(a.w, r) : A(0);
      ea = wv;
      eb[0] = i == 0 && entry ? wv : A(0);
      eb[1] = down_input<kScaled>(xv, wv);
      return i == 0;
    };
    auto put = [&](int i, const A (&v)[2]) {
      const int p = a.path[pb + i];
      if (!ln.ok || !(a.flags[p] & kTileBoundary)) return;
      const int64_t r = static_cast<int64_t>(a.boundary[p]) * a.C + ln.c;
      sa[r] = v[0];
      sb[r] = v[1];
    };
    chunked_scan<A, 2>(sh, pe - pb, get, put);
  }
}

// Phase 2: X[k] = the true value at the parent of tile k's path top, for the tiles whose
// top is an entry. One warp per (tile, group).
template <typename A>
__global__ void tile_down_feed_kernel(const TileArgs a) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kTileLanes) +
                       threadIdx.x / kTileLanes;
  if (item >= static_cast<int64_t>(a.M) * a.groups) return;
  const int k = static_cast<int>(item / a.groups), g = static_cast<int>(item % a.groups);
  const int b0 = a.tile_boundary[2 * k], b1 = a.tile_boundary[2 * k + 1];
  if (b0 >= b1) return;
  int j = a.feeder[b0];
  if (j < 0) return;  // the top is a root
  const Lane ln(a, g);
  if (!ln.ok) return;
  const A* sa = static_cast<const A*>(a.sa);
  const A* sb = static_cast<const A*>(a.sb);
  // H[f] = B[f] + A[f] (B[f'] + A[f'] (...)), composed from f outwards; eight feeders
  // found at a time, then their rows loaded together
  constexpr int B = 8;
  A m = A(1), v = A(0);
  while (j >= 0) {
    int js[B];
    js[0] = j;
#pragma unroll
    for (int u = 1; u < B; ++u) js[u] = js[u - 1] >= 0 ? a.feeder[js[u - 1]] : -1;
    A bv[B], av[B];
#pragma unroll
    for (int u = 0; u < B; ++u) {
      const int64_t r = static_cast<int64_t>(js[u] >= 0 ? js[u] : 0) * a.C + ln.c;
      bv[u] = js[u] >= 0 ? sb[r] : A(0);
      av[u] = js[u] >= 0 ? sa[r] : A(0);
    }
#pragma unroll
    for (int u = 0; u < B; ++u)
      if (js[u] >= 0) {
        v = v + m * bv[u];
        m = m * av[u];
      }
    j = js[B - 1] >= 0 ? a.feeder[js[B - 1]] : -1;
  }
  static_cast<A*>(a.tv)[static_cast<int64_t>(k) * a.C + ln.c] = v;
}

// The staged plan of a down tile block, by slot: the vertex, the kind (0: along a run,
// 1: a root, 2: a head whose parent is in the tile, 3: an entry; + 4 where a light child
// lies in the tile) and the source of a head's value (its parent's vertex) or an entry's
// (the parent's boundary number, and the tile whose X it takes, -1 for a root's tile).
struct DownStage {
  int* vert;
  int* src;
  int* src2;
  unsigned char* kind;
};

// Phase 3: each tile's light levels from the lowest, writing h.
template <typename T, typename A, bool kScaled>
__global__ void __launch_bounds__(kTileThreads, tile_min_blocks<A>())
tile_down_levels_kernel(const TileArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int k = blockIdx.x;
  int start, end;
  if (!tile_range(a, k, start, end)) return;
  const DownStage st = staged_plan<DownStage>(smem_raw, a.tile);
  ScanShared<A, 1> sh = tile_scan_shared<A>(smem_raw, a.tile);
  for (int s = threadIdx.x; s < end - start; s += blockDim.x) {
    const int pos = a.scan[start + s];
    const int fl = a.flags[pos];
    int kind = 0, src = -1, src2 = -1;
    if (fl & kTileRoot) {
      kind = 1;
    } else if (fl & kTileEntry) {
      kind = 3;
      const int q = a.parent[pos];
      src = a.boundary[q];
      const int t = tile_of(a, q);
      src2 = a.feeder[a.tile_boundary[2 * t]] >= 0 ? t : -1;
    } else if (fl & kTileHead) {
      kind = 2;
      src = a.vertex[a.parent[pos]];
    }
    const int sz = a.size[pos];
    if (sz > 1 && pos + 1 < end) {
      const int light = pos + 1 + a.size[pos + 1];
      if (light < pos + sz && light < end) kind |= 4;
    }
    st.vert[s] = a.vertex[pos];
    st.src[s] = src;
    st.src2[s] = src2;
    st.kind[s] = static_cast<unsigned char>(kind);
  }
  __syncthreads();
  const int levels = a.tile_levels[k];
  const int* lp = a.level_ptr + static_cast<int64_t>(k) * (a.L + 1);
  T* h = static_cast<T*>(a.h);
  A* store = static_cast<A*>(a.store);
  const A* sa = static_cast<const A*>(a.sa);
  const A* sb = static_cast<const A*>(a.sb);
  const A* tv = static_cast<const A*>(a.tv);
  int g0, g1;
  block_groups(a, g0, g1);
  for (int g = g0; g < g1; ++g) {
    const Lane ln(a, g);
    for (int j = 0; j < levels; ++j) {
      const int s0 = lp[j] - start;
      // every load predicated, none behind a branch
      auto get = [&](int i, A& ea, A (&eb)[1]) -> bool {
        const int s = s0 + i, kind = st.kind[s] & 3, src = st.src[s], src2 = st.src2[s];
        const int64_t r = static_cast<int64_t>(st.vert[s]) * a.C + ln.c;
        const int64_t rs = static_cast<int64_t>(src < 0 ? 0 : src) * a.C + ln.c;
        const int64_t rt = static_cast<int64_t>(src2 < 0 ? 0 : src2) * a.C + ln.c;
        const A xv = ln.ok ? load_as<T, A>(a.x, r) : A(0);
        const A wv = ln.ok ? load_as<T, A>(a.w, r) : A(0);
        const A hp = ln.ok && kind == 2 ? store[rs] : A(0);     // the parent's h
        const A hb = ln.ok && kind == 3 ? sb[rs] : A(0);        // the parent's B
        const bool fed = ln.ok && kind == 3 && src2 >= 0;
        const A ha = fed ? sa[rs] : A(0), hx = fed ? tv[rt] : A(0);  // A, X of its tile
        const A in = kind == 2 ? hp : (fed ? hb + ha * hx : hb);
        const A xin = down_input<kScaled>(xv, wv);
        ea = wv;
        eb[0] = kind >= 2 ? xin + wv * in : xin;
        return kind != 0;
      };
      auto put = [&](int i, const A (&v)[1]) {
        if (!ln.ok) return;
        const int s = s0 + i;
        const int64_t r = static_cast<int64_t>(st.vert[s]) * a.C + ln.c;
        h[r] = Store<T>::cvt(v[0]);
        if constexpr (!std::is_same<T, A>::value)
          if (st.kind[s] & 4) store[r] = v[0];
      };
      chunked_scan<A, 1>(sh, lp[j + 1] - lp[j], get, put);
    }
  }
}

// ---------------------------------------------------------------------------- up
// The staged plan of an up tile block: the position of each slot, and by position the
// vertex, the subtree size and bits (1: the next position continues its run; 2: a later
// step reads its value: a light child in the tile, an entry, a vertex of the path).
struct UpStage {
  int* pos;
  int* vert;
  int* size;
  unsigned char* bits;
};

// Phase 1: each tile's light levels from the highest without the later tiles (h = B; store
// where read later), then A along the boundary path.
template <typename T, typename A>
__global__ void __launch_bounds__(kTileThreads, tile_min_blocks<A>())
tile_up_levels_kernel(const TileArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int k = blockIdx.x;
  int start, end;
  if (!tile_range(a, k, start, end)) return;
  const int len = end - start;
  const UpStage st = staged_plan<UpStage>(smem_raw, a.tile);
  ScanShared<A, 1> sh = tile_scan_shared<A>(smem_raw, a.tile);
  constexpr int kStarts = kTileRoot | kTileHead | kTileEntry;
  for (int p = threadIdx.x; p < len; p += blockDim.x) {
    const int pos = start + p;
    const int fl = a.flags[pos];
    st.pos[p] = a.scan[pos] - start;  // slot p's position
    st.vert[p] = a.vertex[pos];
    st.size[p] = a.size[pos];
    int bits = 0;
    if (p + 1 < len && !(a.flags[pos + 1] & kStarts)) bits |= 1;
    if ((fl & kTileEntry) || ((fl & kTileHead) && !(fl & kTileRoot))) bits |= 2;
    st.bits[p] = static_cast<unsigned char>(bits);
  }
  const int pb = a.path_ptr[k], pe = a.path_ptr[k + 1];
  __syncthreads();
  for (int i = pb + static_cast<int>(threadIdx.x); i < pe; i += blockDim.x)
    st.bits[a.path[i] - start] |= 2;
  __syncthreads();
  const int levels = a.tile_levels[k];
  const int* lp = a.level_ptr + static_cast<int64_t>(k) * (a.L + 1);
  T* h = static_cast<T*>(a.h);
  A* store = static_cast<A*>(a.store);
  A* sa = static_cast<A*>(a.sa);
  int g0, g1;
  block_groups(a, g0, g1);
  for (int g = g0; g < g1; ++g) {
    const Lane ln(a, g);
    auto row = [&](int p) { return static_cast<int64_t>(st.vert[p]) * a.C + ln.c; };
    for (int j = levels - 1; j >= 0; --j) {
      const int s0 = lp[j] - start, n = lp[j + 1] - lp[j];
      // element i: slot s0 + n - 1 - i, along runs from their last vertex
      // the shares of the light children in the tile are added in child order; the first
      // child's loads are predicated beside the others, the rest follow in a loop
      auto get = [&](int i, A& ea, A (&eb)[1]) -> bool {
        const int p = st.pos[s0 + n - 1 - i];
        const bool next = st.bits[p] & 1;
        const int stop = p + st.size[p] < len ? p + st.size[p] : len;
        const int c0 = p + 1 < stop ? p + 1 + st.size[p + 1] : stop;  // the first light child
        const bool has = ln.ok && c0 < stop;
        const int64_t rn = row(next ? p + 1 : p), r0 = row(has ? c0 : p);
        ea = next && ln.ok ? load_as<T, A>(a.w, rn) : A(0);
        const A xv = ln.ok ? load_as<T, A>(a.x, row(p)) : A(0);
        const A w0 = has ? load_as<T, A>(a.w, r0) : A(0), h0 = has ? store[r0] : A(0);
        A v = has ? xv + w0 * h0 : xv;
        if (has)
          for (int ch = c0 + st.size[c0]; ch < stop; ch += st.size[ch]) {
            const int64_t r = row(ch);
            v = v + load_as<T, A>(a.w, r) * store[r];
          }
        eb[0] = v;
        return !next;
      };
      auto put = [&](int i, const A (&v)[1]) {
        if (!ln.ok) return;
        const int p = st.pos[s0 + n - 1 - i];
        const int64_t r = row(p);
        h[r] = Store<T>::cvt(v[0]);
        if constexpr (!std::is_same<T, A>::value)
          if (st.bits[p] & 2) store[r] = v[0];
      };
      chunked_scan<A, 1>(sh, n, get, put);
    }
    if (pb >= pe) continue;
    // A: the product of the weights from the top (1 there) down the path
    auto get = [&](int i, A& ea, A (&eb)[1]) -> bool {
      ea = i > 0 && ln.ok ? load_as<T, A>(a.w, row(a.path[pb + i] - start)) : A(0);
      eb[0] = i == 0 ? A(1) : A(0);
      return i == 0;
    };
    auto put = [&](int i, const A (&v)[1]) {
      const int p = a.path[pb + i];
      if (ln.ok && (a.flags[p] & kTileBoundary))
        sa[static_cast<int64_t>(a.boundary[p]) * a.C + ln.c] = v[0];
    };
    chunked_scan<A, 1>(sh, pe - pb, get, put);
  }
}

// Phase 2, the gathers: c[j] for every boundary vertex j (sb), and the tile whose path
// top each entry is (etile, by entry index, -1 for the others; group 0 writes it). Warps
// over (boundary vertex, group), striding over the grid (the count is read on the device).
template <typename T, typename A>
__global__ void tile_up_gather_kernel(const TileArgs a) {
  const int64_t nb = a.boundary_level_ptr[a.M];
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kTileLanes);
  const A* store = static_cast<const A*>(a.store);
  A* sb = static_cast<A*>(a.sb);
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kTileLanes) +
                      threadIdx.x / kTileLanes;
       item < nb * a.groups; item += warps) {
    const int j = static_cast<int>(item / a.groups), g = static_cast<int>(item % a.groups);
    const Lane ln(a, g);
    const int e0 = a.entry_ptr[j], e1 = a.entry_ptr[j + 1];
    A c = A(0);
    for (int e = e0; e < e1; e += 4) {  // four entries' loads at a time, summed in order
      A wv[4], hv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const bool in = ln.ok && e + u < e1;
        const int64_t r = static_cast<int64_t>(in ? a.vertex[a.entries[e + u]] : 0) * a.C + ln.c;
        wv[u] = in ? load_as<T, A>(a.w, r) : A(0);
        hv[u] = in ? store[r] : A(0);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (e + u < e1) c = c + wv[u] * hv[u];
    }
    if (ln.ok) sb[static_cast<int64_t>(j) * a.C + ln.c] = c;
    if (g == 0 && threadIdx.x % kTileLanes == 0)
      for (int i = e0; i < e1; ++i) {
        const int e = a.entries[i], t = tile_of(a, e);
        const int lo = a.tile_boundary[2 * t];
        a.etile[i] = lo < a.tile_boundary[2 * t + 1] && a.top[a.boundary_pos[lo]] == e ? t : -1;
      }
  }
}

// Phase 2, per tile: R0[k] = the sum over its boundary vertices j of A[j] c[j] (tv),
// mu[k] (tmu) and the parent tile (tparent, -1 where the top is a root or the tile has no
// boundary vertex; group 0 writes it). One warp per (tile, group).
template <typename T, typename A>
__global__ void tile_up_tiles_kernel(const TileArgs a) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kTileLanes) +
                       threadIdx.x / kTileLanes;
  if (item >= static_cast<int64_t>(a.M) * a.groups) return;
  const int k = static_cast<int>(item / a.groups), g = static_cast<int>(item % a.groups);
  const int b0 = a.tile_boundary[2 * k], b1 = a.tile_boundary[2 * k + 1];
  const Lane ln(a, g);
  const int f = b0 < b1 ? a.feeder[b0] : -1;
  if (g == 0 && threadIdx.x % kTileLanes == 0)
    a.tparent[k] = f >= 0 ? tile_of(a, a.boundary_pos[f]) : -1;
  if (b0 >= b1 || !ln.ok) return;
  const A* sa = static_cast<const A*>(a.sa);
  const A* sb = static_cast<const A*>(a.sb);
  constexpr int B = 8;
  A acc = A(0);
  for (int j = b0; j < b1; j += B) {  // B boundary vertices' loads at a time, summed in order
    A av[B], cv[B];
#pragma unroll
    for (int u = 0; u < B; ++u) {
      const int64_t r = static_cast<int64_t>(j + u < b1 ? j + u : j) * a.C + ln.c;
      av[u] = sa[r];
      cv[u] = sb[r];
    }
#pragma unroll
    for (int u = 0; u < B; ++u)
      if (j + u < b1) acc = acc + av[u] * cv[u];
  }
  const int64_t rk = static_cast<int64_t>(k) * a.C + ln.c;
  static_cast<A*>(a.tv)[rk] = acc;
  if (f >= 0) {
    const int e = a.top[a.boundary_pos[b0]];
    static_cast<A*>(a.tmu)[rk] =
        load_as<T, A>(a.w, static_cast<int64_t>(a.vertex[e]) * a.C + ln.c) *
        sa[static_cast<int64_t>(f) * a.C + ln.c];
  }
}

// Shared memory of the tile tree: R of every tile for one group, when it fits.
template <typename A>
__host__ __device__ inline int64_t tile_tree_smem_bytes(int M) {
  return static_cast<int64_t>(M) * kTileLanes * sizeof(A);
}

// Phase 2, the tile tree: one block per group; R[p(k)] += mu[k] R[k] for k from the last
// tile down (a tile hangs from an earlier one, so R[k] is complete when k is reached), by
// one warp, the parents and mu of 32 tiles loaded at a time. `in_smem`: R staged in shared
// memory (else updated in tv).
template <typename A>
__global__ void tile_up_tree_kernel(const TileArgs a, bool in_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int g = blockIdx.x;
  const Lane ln(a, g);
  const int lane = threadIdx.x % kTileLanes, warp = threadIdx.x / kTileLanes;
  const int warps = blockDim.x / kTileLanes;
  A* tv = static_cast<A*>(a.tv);
  const A* mu = static_cast<const A*>(a.tmu);
  A* smem = reinterpret_cast<A*>(smem_raw);
  auto rrow = [&](int k) -> A& {
    return in_smem ? smem[static_cast<int64_t>(k) * kTileLanes + lane]
                   : tv[static_cast<int64_t>(k) * a.C + ln.c];
  };
  if (in_smem && ln.ok)
    for (int k = warp; k < a.M; k += warps) rrow(k) = tv[static_cast<int64_t>(k) * a.C + ln.c];
  __syncthreads();
  if (warp == 0 && ln.ok) {
    constexpr int B = 32;
    for (int hi = a.M - 1; hi >= 1; hi -= B) {  // tiles hi, hi - 1, ..., down to 1
      int p[B];
      A m[B];
#pragma unroll
      for (int i = 0; i < B; ++i) p[i] = hi - i >= 1 ? a.tparent[hi - i] : -1;
#pragma unroll
      for (int i = 0; i < B; ++i)  // beside the parents' loads (unused where there is none)
        m[i] = mu[static_cast<int64_t>(hi - i >= 1 ? hi - i : hi) * a.C + ln.c];
#pragma unroll
      for (int i = 0; i < B; ++i)
        if (p[i] >= 0) {
          A& rp = rrow(p[i]);
          rp = rp + m[i] * rrow(hi - i);
        }
    }
  }
  __syncthreads();
  if (in_smem && ln.ok)
    for (int k = warp; k < a.M; k += warps) tv[static_cast<int64_t>(k) * a.C + ln.c] = rrow(k);
}

// Phase 3: s at the boundary vertices of tile blockIdx.x, then E along its path from the
// deepest vertex; h = B + E on the path.
template <typename T, typename A>
__global__ void tile_up_paths_kernel(const TileArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int k = blockIdx.x;
  const int pb = a.path_ptr[k], pe = a.path_ptr[k + 1];
  if (pb >= pe) return;  // no boundary vertex (block-uniform)
  const int b0 = a.tile_boundary[2 * k], b1 = a.tile_boundary[2 * k + 1];
  ScanShared<A, 1> sh(smem_raw, blockDim.x / kTileLanes);
  const int warp = threadIdx.x / kTileLanes, warps = blockDim.x / kTileLanes;
  A* sb = static_cast<A*>(a.sb);
  const A* tv = static_cast<const A*>(a.tv);
  T* h = static_cast<T*>(a.h);
  const A* store = static_cast<const A*>(a.store);
  int g0, g1;
  block_groups(a, g0, g1);
  for (int g = g0; g < g1; ++g) {
    const Lane ln(a, g);
    // s[j] = c[j] + w[e] R[k'] for each tile k' whose top e hangs from j, in entry order
    for (int j = b0 + warp; j < b1 && ln.ok; j += warps) {
      const int64_t rj = static_cast<int64_t>(j) * a.C + ln.c;
      A s = sb[rj];
      for (int i = a.entry_ptr[j]; i < a.entry_ptr[j + 1]; ++i) {
        const int t = a.etile[i];
        if (t < 0) continue;
        s = s + load_as<T, A>(a.w, static_cast<int64_t>(a.vertex[a.entries[i]]) * a.C + ln.c) *
                    tv[static_cast<int64_t>(t) * a.C + ln.c];
      }
      sb[rj] = s;
    }
    __syncthreads();
    // E from the deepest vertex up: element i is path[pe - 1 - i]
    auto get = [&](int i, A& ea, A (&eb)[1]) -> bool {
      const int p = a.path[pe - 1 - i];
      ea = i > 0 && ln.ok
               ? load_as<T, A>(a.w, static_cast<int64_t>(a.vertex[a.path[pe - i]]) * a.C + ln.c)
               : A(0);
      eb[0] = ln.ok && (a.flags[p] & kTileBoundary)
                  ? sb[static_cast<int64_t>(a.boundary[p]) * a.C + ln.c]
                  : A(0);
      return i == 0;
    };
    auto put = [&](int i, const A (&v)[1]) {
      if (!ln.ok) return;
      const int64_t r = static_cast<int64_t>(a.vertex[a.path[pe - 1 - i]]) * a.C + ln.c;
      h[r] = Store<T>::cvt(store[r] + v[0]);
    };
    chunked_scan<A, 1>(sh, pe - pb, get, put);
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
// of w[s] up[s] (0 at roots): out is the down scan of w[v] inner[v], inner[v] = x[p] +
// sib(v), with the same weights (the down kernels' kScaled). The sibling sums are an exclusive
// prefix over the children in position order plus an exclusive suffix (never a total minus
// the vertex's own share).

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

// Children of a position that a bracket thread holds in registers.
constexpr int kBracketChildren = 4;

// inner[v] for the children v of each position p (0 at roots). One thread per (position,
// channel). Up to kBracketChildren children: their positions first, along the size chain,
// then their rows, the prefix and the suffix formed in registers. More: the exclusive
// prefix forwards, then the suffix added backwards along the prev links. Each share
// w[s] up[s] is rounded on its own in both ways. Rows by vertex, in the accumulation type.
template <typename A>
__global__ void tile_bracket_kernel(const A* __restrict__ x, const A* __restrict__ w,
                                    const A* __restrict__ up, A* __restrict__ inner,
                                    const int* __restrict__ vertex,
                                    const int* __restrict__ parent,
                                    const int* __restrict__ size,
                                    const int* __restrict__ prev, int64_t N, int64_t C) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * C) return;
  const int pos = static_cast<int>(idx / C);
  const int64_t c = idx % C;
  if (parent[pos] < 0) inner[static_cast<int64_t>(vertex[pos]) * C + c] = 0;
  const int stop = pos + size[pos];
  if (pos + 1 >= stop) return;  // a leaf
  const A xp = x[static_cast<int64_t>(vertex[pos]) * C + c];
  constexpr int K = kBracketChildren;
  int row[K];  // the children's positions, then their vertices (the first `count`)
  int count = 0, next = pos + 1;
#pragma unroll
  for (int i = 0; i < K; ++i)
    if (next < stop) {
      row[i] = next;
      next += size[next];
      count = i + 1;
    }
  if (next >= stop) {
    A share[K];
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (i < count) row[i] = vertex[row[i]];
#pragma unroll
    for (int i = 0; i < K; ++i)
      if (i < count) {
        const int64_t r = static_cast<int64_t>(row[i]) * C + c;
        share[i] = product(w[r], up[r]);
      }
    A after = 0;  // the suffix; the prefix of child i is summed afresh (K is small)
#pragma unroll
    for (int i = K - 1; i >= 0; --i)
      if (i < count) {
        A before = 0;
#pragma unroll
        for (int u = 0; u < i; ++u) before = before + share[u];
        inner[static_cast<int64_t>(row[i]) * C + c] = xp + (before + after);
        after = after + share[i];
      }
    return;
  }
  A run = 0;
  int last = pos + 1;
  for (int ch = pos + 1; ch < stop; ch += size[ch]) {
    const int64_t r = static_cast<int64_t>(vertex[ch]) * C + c;
    inner[r] = run;
    run = run + product(w[r], up[r]);
    last = ch;
  }
  run = 0;
  for (int ch = last; ch >= 0; ch = prev[ch]) {
    const int64_t r = static_cast<int64_t>(vertex[ch]) * C + c;
    inner[r] = xp + (inner[r] + run);
    run = run + product(w[r], up[r]);
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
