// Tree-scan kernels: the recurrences of docs/concepts.md as segmented parallel scans along
// heavy paths, phase by phase (layout: path_layout.cuh; plan and launch choices:
// treessm/ops/plan.py).
//
// Along a heavy path every recurrence is one step h = a * h' + b per vertex (h' the value
// of the previous vertex in scan order), whose composition (a0, b0) then (a1, b1) =
// (a1 a0, a1 b0 + b1) is associative; a segment flag marks where a path starts in scan
// order (its head root-first, its tail leaf-first). The paths of one phase are independent
// given the phases before it, so a phase is one segmented scan over a contiguous run of
// positions:
//   - leaf-first passes ("up" modes) take phases from the deepest to 0 and positions
//     downwards; b[k] = input + the shares w[c] up[c] of k's light children, which each
//     light child left in its slot of the light list (`contrib`) in an earlier phase, summed
//     in list order; a[k] = w of the heavy child k + 1;
//   - root-first passes take phases from 0 and positions upwards; a head reads its
//     parent's value, left by an earlier phase.
// "both" is up, then the part of the tree outside each subtree: out[k] = w[k] br[k] with
// the bracket br[k] = out[p] + x[p] + sum over the siblings s of k of w[s] up[s]. Along a
// path the bracket is out[k-1] + loc[k-1] (loc: the input plus light children's shares, left
// by the up pass); a parent forms its light children's brackets from its input, its heavy
// child's share and prefix and suffix sums over their slots, so no share is ever subtracted
// back out.
//
// A thread block scans a chunk of kLanes * kRun positions of one phase for one slice of
// channels: kLanes position lanes (G threads each, V channels a thread) take kRun
// consecutive positions each; pass 1 loads them into registers (every load of a stage
// issued before any is used) and composes the lane's run; a scan of the lane composites
// (warp shuffles in groups of 16 lanes, group totals in order) gives every lane its
// incoming value;
// pass 2 runs the recurrence through the registers and writes. Chunks start every
// kLanes * kRun positions from the phase's start and carry the value after them into the
// next one. Two schedules drive the chunks:
//   - "trees": one block per (tree, channel slice) walks its tree's phases and chunks in
//     order (__syncthreads between phases);
//   - "phases": per phase of the whole forest, chunks in parallel over the device; a
//     first launch composes each chunk, a second carries values across chunks in order,
//     a third rescans every chunk from its carried-in value.
// Every value is written by one thread and every sum is taken in a fixed order that
// depends on the positions alone (not on the channels a block takes): results are bitwise
// deterministic and the same for every launch shape. Accumulation is float32 (float64 for
// double).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "numeric.cuh"
#include "path_layout.cuh"

namespace treessm_cuda {

template <typename T> struct Store {
  template <typename A> __device__ __forceinline__ static T cvt(A v) { return static_cast<T>(v); }
};
template <> struct Store<__half> {
  __device__ __forceinline__ static __half cvt(float v) { return __float2half_rn(v); }
};
template <> struct Store<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};

// V elements moved as one aligned access (16 bytes where the row layout allows).
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

// The integer vector of the size of a Pack, for read-only loads through the texture path.
template <int BYTES> struct Word;
template <> struct Word<2> { using type = unsigned short; };
template <> struct Word<4> { using type = unsigned int; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };

// Rows of data the kernels never write (x, g, w, h): read-only loads.
template <int V, typename T, typename A>
__device__ __forceinline__ void load_ro(const T* __restrict__ p, A (&o)[V]) {
  using P = Pack<T, V>;
  using Wd = typename Word<sizeof(P)>::type;
  static_assert(sizeof(P) <= 16, "at most 16 bytes per access");
  const Wd raw = __ldg(reinterpret_cast<const Wd*>(p));
  P k;
  static_assert(sizeof(Wd) == sizeof(P), "word and pack of one size");
  memcpy(&k, &raw, sizeof(P));
#pragma unroll
  for (int q = 0; q < V; ++q) o[q] = static_cast<A>(to_acc(k.v[q]));
}

// Rows the kernels write and read back (values handed between phases).
template <int V, typename A>
__device__ __forceinline__ void load_acc(const A* p, A (&o)[V]) {
  const Pack<A, V> k = *reinterpret_cast<const Pack<A, V>*>(p);
#pragma unroll
  for (int q = 0; q < V; ++q) o[q] = k.v[q];
}

template <int V, typename T, typename A>
__device__ __forceinline__ void store(T* p, const A (&o)[V]) {
  Pack<T, V> k;
#pragma unroll
  for (int q = 0; q < V; ++q) k.v[q] = Store<T>::cvt(o[q]);
  *reinterpret_cast<Pack<T, V>*>(p) = k;
}

__device__ __forceinline__ PathRec load_rec(const PathRec* p) {
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
  return PathRec{static_cast<int>(r.x), static_cast<int>(r.y), static_cast<int>(r.z),
                 static_cast<int>(r.w)};
}

enum ScanMode {
  M_UP = 0,       // up(x) -> out (when set); up, loc, heavy share (when set); slots
  M_UP2 = 1,      // up(x), up(g) together: the first pass of both's backward
  M_UP_GW = 2,    // backward of down: gx = up(g) -> out, gw = gx[v] h[parent]
  M_DOWN = 3,     // down(x) -> out
  M_DOWN_GW = 4,  // backward of up: gx = down(g) -> out, gw = h[v] gx[parent]
  M_BOTH = 5,     // both(x) = up + outside -> out, after M_UP
  M_BOTH2 = 6,    // backward of both: gx = both(g), gw = up(x) br_g + up(g) br_x, after M_UP2
};

constexpr int kLanes = 128;  // position lanes of a block
constexpr int kRun = 4;      // positions of a lane: a chunk is kLanes * kRun positions
constexpr int kGroup = 16;   // lanes scanned by shuffles; groups are composed in order

template <int MODE> struct ModeTraits {
  static constexpr bool UP = MODE <= M_UP_GW;  // leaf-first: phases and positions downwards
  static constexpr bool BOTH = MODE >= M_BOTH;
  static constexpr int NS = (MODE == M_UP2 || MODE == M_BOTH2) ? 2 : 1;  // streams
};

// The tensors of one pass; pointers a mode does not use are null. Vertex-space tensors are
// [N, C] by vertex id; position-space ones [N, C] by layout position; slot-space ones
// [N, C] by index in the light list.
struct ScanIO {
  const void* in[2];  // T: x (and g for two streams), or g
  const void* w;      // T
  const void* h;      // T: the forward output (M_UP_GW, M_DOWN_GW)
  void* out;          // T: the scan, or dL/dx
  void* gw;           // T: dL/dw
  void* up[2];        // A by position: up values (the both modes read them)
  void* loc[2];       // A by position: input plus light children's shares
  void* share[2];     // A by position: the heavy child's share w[k+1] up[k+1], where k has
                      // light children
  void* contrib[2];   // A by slot: the share w[c] up[c] of every light child c
  void* br[2];        // A by position: brackets of light heads (both modes)
  void* val;          // A by position: root-first values of vertices with light children
};

struct ScanArgs {
  ScanIO io;
  const PathRec* rec;    // [N + 1]
  const int* light;      // light children's positions, grouped by parent
  const int* slot;       // [N]: each light child's index in `light`
  int64_t C;
  int lpv;               // G: threads per position (one row of G * V channels)
  // "trees": the tree's phases
  const int* path_ptr;   // [N + 1]
  const int* phase_path; // [T][kMaxPhases + 1]
  // "phases": one phase's positions [s, e), its chunks, their composites and carries
  int s, e;
  void* agg;             // A [chunks][2 * NS][C]: (a, b...) of every chunk
  unsigned char* aggf;   // [chunks]: whether the chunk holds a segment start
  const void* carry;     // A [chunks][NS][C]: value entering each chunk
};

// Shared memory of a block: the group totals of the lane scan, then the tree's phase bounds
// ("trees").
template <int MODE>
__host__ __device__ inline int64_t scan_smem_bytes(int lpv, int V, int a_size) {
  constexpr int NS = ModeTraits<MODE>::NS;
  const int64_t per = (int64_t)V * (1 + NS) + 1;
  return (int64_t)(kLanes / kGroup) * lpv * per * a_size + (kMaxPhases + 2) * 4;
}

// x * y, taken as 0 when y is 0 (an overflowed product of weights times a zero value)
template <typename A>
__device__ __forceinline__ A mul0(A x, A y) { return y == A(0) ? A(0) : x * y; }

// A composite of consecutive steps: h_out = a h_in + b for every stream, or h_out = b when
// f (a segment starts inside).
template <typename A, int V, int NS> struct Affine {
  A a[V];
  A b[NS][V];
  bool f;
  __device__ __forceinline__ void identity() {
#pragma unroll
    for (int q = 0; q < V; ++q) {
      a[q] = A(1);
#pragma unroll
      for (int s = 0; s < NS; ++s) b[s][q] = A(0);
    }
    f = false;
  }
  // this, then `n`
  __device__ __forceinline__ void then(const Affine& n) {
    if (n.f) {
      *this = n;
      return;
    }
#pragma unroll
    for (int q = 0; q < V; ++q) {
#pragma unroll
      for (int s = 0; s < NS; ++s) b[s][q] = mul0(n.a[q], b[s][q]) + n.b[s][q];
      a[q] = n.a[q] * a[q];
    }
  }
  __device__ __forceinline__ void shfl_up(unsigned delta) {
#pragma unroll
    for (int q = 0; q < V; ++q) {
      a[q] = __shfl_up_sync(0xffffffffu, a[q], delta);
#pragma unroll
      for (int s = 0; s < NS; ++s) b[s][q] = __shfl_up_sync(0xffffffffu, b[s][q], delta);
    }
    f = __shfl_up_sync(0xffffffffu, static_cast<int>(f), delta) != 0;
  }
  __device__ __forceinline__ void put(A* p) const {
#pragma unroll
    for (int q = 0; q < V; ++q) {
      p[q] = a[q];
#pragma unroll
      for (int s = 0; s < NS; ++s) p[(1 + s) * V + q] = b[s][q];
    }
    p[(1 + NS) * V] = f ? A(1) : A(0);
  }
  __device__ __forceinline__ void get(const A* p) {
#pragma unroll
    for (int q = 0; q < V; ++q) {
      a[q] = p[q];
#pragma unroll
      for (int s = 0; s < NS; ++s) b[s][q] = p[(1 + s) * V + q];
    }
    f = p[(1 + NS) * V] != A(0);
  }
};

// One chunk of one phase: stream indices [i0, i1) of the positions [s, e) (stream index i is
// position s + i root-first, e - 1 - i leaf-first), for this block's slice of channels.
template <typename T, typename A, int V, int MODE>
struct ChunkScan {
  using Tr = ModeTraits<MODE>;
  static constexpr int NS = Tr::NS;
  static constexpr int R = kRun;
  static constexpr int CHUNK = kLanes * R;
  using Aff = Affine<A, V, NS>;

  const ScanArgs& args;
  A* lanes;  // shared: [kLanes / kGroup][G] group totals
  int G, g, q, per;
  int64_t c;
  bool active;

  // the lane's run: its records, steps (a; b or, in the both modes, the bracket term r
  // with b = a r) and segment starts
  PathRec rk[R];
  A ra[R][V];
  A rb[NS][R][V];
  unsigned rf;

  __device__ ChunkScan(const ScanArgs& a, unsigned char* smem, int cgroup) : args(a) {
    G = a.lpv;
    g = threadIdx.x % G;
    q = threadIdx.x / G;
    per = V * (1 + NS) + 1;
    c = ((int64_t)cgroup * G + g) * V;
    active = c < a.C;
    lanes = reinterpret_cast<A*>(smem);
  }

  __device__ __forceinline__ const T* row(const void* base, int v) const {
    return reinterpret_cast<const T*>(base) + (int64_t)v * args.C + c;
  }
  __device__ __forceinline__ T* row_out(void* base, int v) const {
    return reinterpret_cast<T*>(base) + (int64_t)v * args.C + c;
  }
  __device__ __forceinline__ A* acc(void* base, int k) const {
    return reinterpret_cast<A*>(base) + (int64_t)k * args.C + c;
  }
  __device__ __forceinline__ static bool head(const PathRec& r, int k) {
    return r.parent < 0 || r.parent != k - 1;
  }
  __device__ __forceinline__ int pos(int s, int e, int i) const { return Tr::UP ? e - 1 - i : s + i; }

  // Pass 1: the run's steps into registers; `acc` receives the lane's composite.
  __device__ __forceinline__ void load_run(int s, int e, int i0, int i1, Aff& cmp) {
    const int first = i0 + q * R;
    int n = i1 - first;
    n = n < 0 ? 0 : (n > R ? R : n);
    if (!active) n = 0;
    // stage 1: records
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r < n) rk[r] = load_rec(args.rec + pos(s, e, first + r));
    PathRec next{-1, -1, 0, 0};  // leaf-first: the record after the run's first position
    if (Tr::UP && n > 0) next = load_rec(args.rec + pos(s, e, first) + 1);
    // stage 2: rows
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= n) continue;
      const int k = pos(s, e, first + r);
      if constexpr (Tr::UP) {
        const PathRec& nx = r == 0 ? next : rk[r - 1];
        const bool heavy = nx.parent == k;
        if (heavy) load_ro<V>(row(args.io.w, nx.v), ra[r]);
        else {
#pragma unroll
          for (int u = 0; u < V; ++u) ra[r][u] = A(0);
        }
        if (!heavy) rf |= 1u << r;
#pragma unroll
        for (int st = 0; st < NS; ++st) load_ro<V>(row(args.io.in[st], rk[r].v), rb[st][r]);
      } else {
        const bool hd = head(rk[r], k);
        const int p = rk[r].parent;
        if (p >= 0) load_ro<V>(row(args.io.w, rk[r].v), ra[r]);
        else {
#pragma unroll
          for (int u = 0; u < V; ++u) ra[r][u] = A(0);
        }
        if (hd) rf |= 1u << r;
        if constexpr (Tr::BOTH) {
#pragma unroll
          for (int st = 0; st < NS; ++st) {
            if (!hd) load_acc<V>(acc(args.io.loc[st], k - 1), rb[st][r]);
            else if (p >= 0) load_acc<V>(acc(args.io.br[st], k), rb[st][r]);
            else {
#pragma unroll
              for (int u = 0; u < V; ++u) rb[st][r][u] = A(0);
            }
          }
        } else {
          load_ro<V>(row(args.io.in[0], rk[r].v), rb[0][r]);
        }
      }
    }
    // stage 3: light children's shares (leaf-first), the parent's value at a head
    // (root-first): their addresses come from the records alone, so these loads go out
    // with the rows above, before any of them is used
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= n) continue;
      if constexpr (Tr::UP) {
        for (int j = rk[r].light_start; j < rk[r].light_end; ++j) {
#pragma unroll
          for (int st = 0; st < NS; ++st) {
            A sh[V];
            load_acc<V>(acc(args.io.contrib[st], j), sh);
#pragma unroll
            for (int u = 0; u < V; ++u) rb[st][r][u] += sh[u];
          }
        }
      } else if constexpr (!Tr::BOTH) {
        const int k = pos(s, e, first + r);
        if (head(rk[r], k) && rk[r].parent >= 0) {
          A pv[V];
          load_acc<V>(acc(args.io.val, rk[r].parent), pv);
#pragma unroll
          for (int u = 0; u < V; ++u) rb[0][r][u] += ra[r][u] * pv[u];
        }
      }
    }
    // stage 4: the composite
    cmp.identity();
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= n) continue;
      Aff el;
      el.f = (rf >> r) & 1u;
#pragma unroll
      for (int u = 0; u < V; ++u) {
        el.a[u] = ra[r][u];
#pragma unroll
        for (int st = 0; st < NS; ++st)
          el.b[st][u] = Tr::BOTH ? ra[r][u] * rb[st][r][u] : rb[st][r][u];
      }
      cmp.then(el);
    }
  }

  // Scan of the lane composites: Kogge-Stone by warp shuffles inside each group of kGroup
  // lanes, then the group totals (shared memory) composed in order. `excl` = composite of
  // the lanes before this one (identity for the first), `total` = composite of the whole
  // chunk. The grouping is the same whatever G is, so the bits are.
  __device__ __forceinline__ void lane_scan(Aff& incl, Aff& excl, Aff& total) {
    const int ql = q % kGroup;  // lane within its group
    const int grp = q / kGroup;
#pragma unroll
    for (int d = 1; d < kGroup; d <<= 1) {
      Aff prev = incl;
      prev.shfl_up(static_cast<unsigned>(d * G));
      if (ql >= d) {
        prev.then(incl);
        incl = prev;
      }
    }
    __syncthreads();  // the previous chunk's readers are done with the totals
    if (ql == kGroup - 1) incl.put(lanes + ((int64_t)grp * G + g) * per);
    __syncthreads();
    Aff pre;
    pre.identity();
    for (int j = 0; j < grp; ++j) {
      Aff t;
      t.get(lanes + ((int64_t)j * G + g) * per);
      pre.then(t);
    }
    total = pre;
    for (int j = grp; j < kLanes / kGroup; ++j) {
      Aff t;
      t.get(lanes + ((int64_t)j * G + g) * per);
      total.then(t);
    }
    Aff full = pre;
    full.then(incl);
    excl = full;
    excl.shfl_up(static_cast<unsigned>(G));
    if (ql == 0) excl = pre;
  }

  // Composite of stream indices [i0, i1) (the "phases" schedule's first launch).
  __device__ void aggregate(int s, int e, int i0, int i1, Aff& total) {
    rf = 0;
    Aff incl, excl;
    load_run(s, e, i0, i1, incl);
    lane_scan(incl, excl, total);
  }

  // The value after a composite entered with h (the phase carry kernel takes the same
  // expression).
  __device__ __forceinline__ static A enter(const Aff& t, A h, bool has, int st, int u) {
    return (t.f || !has) ? t.b[st][u] : mul0(t.a[u], h) + t.b[st][u];
  }

  // Scan of stream indices [i0, i1) entering with `carry` (when `has_carry`); on return
  // `carry` holds the value after the chunk. The writes become visible to the block at its
  // next barrier.
  __device__ void apply(int s, int e, int i0, int i1, A (&carry)[NS][V], bool has_carry) {
    rf = 0;
    Aff incl, excl, total;
    load_run(s, e, i0, i1, incl);
    lane_scan(incl, excl, total);
    A hp[NS][V];
#pragma unroll
    for (int st = 0; st < NS; ++st)
#pragma unroll
      for (int u = 0; u < V; ++u) {
        hp[st][u] = enter(excl, carry[st][u], has_carry, st, u);
        carry[st][u] = enter(total, carry[st][u], has_carry, st, u);
      }
    const int first = i0 + q * R;
    int n = i1 - first;
    n = n < 0 ? 0 : (n > R ? R : n);
    if (!active) n = 0;
    finish(s, e, first, n, hp);
  }

  // Pass 2: the recurrence through the registers, and the outputs of the mode. Loads that
  // the outputs need are issued for the whole run first.
  __device__ __forceinline__ void finish(int s, int e, int first, int n, A (&hp)[NS][V]) {
    if constexpr (Tr::UP) {
      // a light child's own weight (its share), the forward output at its parent (M_UP_GW)
      A xw[R][V], wown[R][V];
      int pv[R];
      if constexpr (MODE == M_UP_GW) {
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (r < n && rk[r].parent >= 0) pv[r] = load_rec(args.rec + rk[r].parent).v;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r >= n) continue;
        const int k = pos(s, e, first + r);
        if (MODE == M_UP_GW && rk[r].parent >= 0) load_ro<V>(row(args.io.h, pv[r]), xw[r]);
        if (head(rk[r], k) && rk[r].parent >= 0) load_ro<V>(row(args.io.w, rk[r].v), wown[r]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r >= n) continue;
        const int k = pos(s, e, first + r);
        const bool f = (rf >> r) & 1u;
        A v[NS][V];
#pragma unroll
        for (int st = 0; st < NS; ++st) {
          A hs[V];
#pragma unroll
          for (int u = 0; u < V; ++u) {
            hs[u] = f ? A(0) : ra[r][u] * hp[st][u];
            v[st][u] = f ? rb[st][r][u] : hs[u] + rb[st][r][u];
          }
          if (args.io.up[st] != nullptr) store<V>(acc(args.io.up[st], k), v[st]);
          if (args.io.loc[st] != nullptr) store<V>(acc(args.io.loc[st], k), rb[st][r]);
          if (args.io.share[st] != nullptr && rk[r].light_start < rk[r].light_end)
            store<V>(acc(args.io.share[st], k), hs);
          if (head(rk[r], k) && rk[r].parent >= 0) {
            A sh[V];
#pragma unroll
            for (int u = 0; u < V; ++u) sh[u] = wown[r][u] * v[st][u];
            store<V>(acc(args.io.contrib[st], __ldg(args.slot + k)), sh);
          }
        }
        if (args.io.out != nullptr) store<V>(row_out(args.io.out, rk[r].v), v[0]);
        if constexpr (MODE == M_UP_GW) {
          A gwv[V];
#pragma unroll
          for (int u = 0; u < V; ++u) gwv[u] = rk[r].parent >= 0 ? v[0][u] * xw[r][u] : A(0);
          store<V>(row_out(args.io.gw, rk[r].v), gwv);
        }
#pragma unroll
        for (int st = 0; st < NS; ++st)
#pragma unroll
          for (int u = 0; u < V; ++u) hp[st][u] = v[st][u];
      }
    } else if constexpr (!Tr::BOTH) {
      // M_DOWN, M_DOWN_GW: the forward output at the vertex, the parent's value at a head
      A hv[R][V], pv[R][V];
      if constexpr (MODE == M_DOWN_GW) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (r >= n) continue;
          const int k = pos(s, e, first + r);
          if (rk[r].parent < 0) continue;
          load_ro<V>(row(args.io.h, rk[r].v), hv[r]);
          if (head(rk[r], k)) load_acc<V>(acc(args.io.val, rk[r].parent), pv[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r >= n) continue;
        const int k = pos(s, e, first + r);
        const bool f = (rf >> r) & 1u;
        A v[V];
#pragma unroll
        for (int u = 0; u < V; ++u) v[u] = f ? rb[0][r][u] : ra[r][u] * hp[0][u] + rb[0][r][u];
        store<V>(row_out(args.io.out, rk[r].v), v);
        if constexpr (MODE == M_DOWN_GW) {
          A gwv[V];
#pragma unroll
          for (int u = 0; u < V; ++u)
            gwv[u] = rk[r].parent >= 0 ? hv[r][u] * (f ? pv[r][u] : hp[0][u]) : A(0);
          store<V>(row_out(args.io.gw, rk[r].v), gwv);
        }
        if (rk[r].light_start < rk[r].light_end) store<V>(acc(args.io.val, k), v);  // for light heads
#pragma unroll
        for (int u = 0; u < V; ++u) hp[0][u] = v[u];
      }
    } else {
      // M_BOTH, M_BOTH2: up at the vertex for the output
      A uv[NS][R][V];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r >= n) continue;
        const int k = pos(s, e, first + r);
#pragma unroll
        for (int st = 0; st < NS; ++st) load_acc<V>(acc(args.io.up[st], k), uv[st][r]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r >= n) continue;
        const int k = pos(s, e, first + r);
        const bool f = (rf >> r) & 1u;
        A v[NS][V], brk[NS][V];
#pragma unroll
        for (int st = 0; st < NS; ++st)
#pragma unroll
          for (int u = 0; u < V; ++u) {
            brk[st][u] = f ? rb[st][r][u] : hp[st][u] + rb[st][r][u];
            v[st][u] = ra[r][u] * brk[st][u];
          }
        if constexpr (MODE == M_BOTH) {
          A o[V];
#pragma unroll
          for (int u = 0; u < V; ++u) o[u] = uv[0][r][u] + v[0][u];
          store<V>(row_out(args.io.out, rk[r].v), o);
        } else {
          A o[V], gwv[V];
#pragma unroll
          for (int u = 0; u < V; ++u) {
            o[u] = uv[1][r][u] + v[1][u];
            gwv[u] = rk[r].parent >= 0 ? uv[0][r][u] * brk[1][u] + uv[1][r][u] * brk[0][u] : A(0);
          }
          store<V>(row_out(args.io.out, rk[r].v), o);
          store<V>(row_out(args.io.gw, rk[r].v), gwv);
        }
        if (rk[r].light_start < rk[r].light_end) brackets(k, rk[r], v);
#pragma unroll
        for (int st = 0; st < NS; ++st)
#pragma unroll
          for (int u = 0; u < V; ++u) hp[st][u] = v[st][u];
      }
    }
  }

  // The brackets of k's light children: out[k] + in[k] + the heavy child's share + the
  // shares of the other light children, by an exclusive prefix sum forwards and the suffix
  // added backwards.
  __device__ __forceinline__ void brackets(int k, const PathRec& rkk, const A (&o)[NS][V]) {
#pragma unroll
    for (int st = 0; st < NS; ++st) {
      A run[V], xin[V], hs[V];
      load_ro<V>(row(args.io.in[st], rkk.v), xin);
      load_acc<V>(acc(args.io.share[st], k), hs);
#pragma unroll
      for (int u = 0; u < V; ++u) run[u] = (o[st][u] + xin[u]) + hs[u];
      for (int j = rkk.light_start; j < rkk.light_end; ++j) {
        A* bj = acc(args.io.br[st], __ldg(args.light + j));
        A sh[V];
        load_acc<V>(acc(args.io.contrib[st], j), sh);
#pragma unroll
        for (int u = 0; u < V; ++u) {
          bj[u] = run[u];
          run[u] += sh[u];
        }
      }
#pragma unroll
      for (int u = 0; u < V; ++u) run[u] = A(0);
      for (int j = rkk.light_end - 1; j >= rkk.light_start; --j) {
        A* bj = acc(args.io.br[st], __ldg(args.light + j));
        A sh[V];
        load_acc<V>(acc(args.io.contrib[st], j), sh);
#pragma unroll
        for (int u = 0; u < V; ++u) {
          bj[u] = bj[u] + run[u];
          run[u] += sh[u];
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------- "trees"
// One block per (tree, channel slice): every phase of the tree in order, each in chunks of
// kLanes * kRun positions chained by their carries.
template <typename T, typename A, int V, int MODE>
__global__ void __launch_bounds__(kLanes * 2, 2) tree_scan_kernel(const ScanArgs args) {
  using Tr = ModeTraits<MODE>;
  using CS = ChunkScan<T, A, V, MODE>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  CS cs(args, smem_raw, blockIdx.y);
  int* prow = reinterpret_cast<int*>(reinterpret_cast<A*>(smem_raw) + (kLanes / kGroup) * cs.G * cs.per);
  const int t = blockIdx.x;
  for (int i = threadIdx.x; i <= kMaxPhases; i += blockDim.x)
    prow[i] = args.path_ptr[args.phase_path[(int64_t)t * (kMaxPhases + 1) + i]];
  __syncthreads();
  A carry[Tr::NS][V] = {};
  for (int n = 0; n < kMaxPhases; ++n) {
    const int p = Tr::UP ? kMaxPhases - 1 - n : n;
    const int s = prow[p], e = prow[p + 1];
    if (s >= e) continue;  // block-uniform
    const int m = e - s;
    for (int i0 = 0; i0 < m; i0 += CS::CHUNK) cs.apply(s, e, i0, min(i0 + CS::CHUNK, m), carry, i0 > 0);
    __syncthreads();  // the phase's writes are visible to the next phase
  }
}

// ---------------------------------------------------------------------------- "phases"
// One phase [s, e) of the whole forest in chunks, one block per (chunk, channel slice).
template <typename T, typename A, int V, int MODE>
__global__ void __launch_bounds__(kLanes * 2, 2) phase_aggregate_kernel(const ScanArgs args) {
  using Tr = ModeTraits<MODE>;
  using CS = ChunkScan<T, A, V, MODE>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  CS cs(args, smem_raw, blockIdx.y);
  const int m = args.e - args.s;
  const int i0 = blockIdx.x * CS::CHUNK;
  typename CS::Aff total;
  cs.aggregate(args.s, args.e, i0, min(i0 + CS::CHUNK, m), total);
  if (cs.q == 0 && cs.active) {  // one thread per channel group of the slice
    A* dst = reinterpret_cast<A*>(args.agg) + (int64_t)blockIdx.x * 2 * Tr::NS * args.C + cs.c;
#pragma unroll
    for (int u = 0; u < V; ++u) {
      dst[u] = total.a[u];
#pragma unroll
      for (int st = 0; st < Tr::NS; ++st) dst[(1 + st) * args.C + u] = total.b[st][u];
    }
    if (cs.c == 0) args.aggf[blockIdx.x] = total.f ? 1 : 0;
  }
}

// The value entering every chunk of a phase, chunk after chunk: one thread per (stream,
// channel).
template <typename A, int NS>
__global__ void phase_carry_kernel(const void* agg, const unsigned char* aggf, void* carry,
                                   int chunks, int64_t C) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= NS * C) return;
  const int st = static_cast<int>(idx / C);
  const int64_t c = idx % C;
  const A* ag = reinterpret_cast<const A*>(agg);
  A* out = reinterpret_cast<A*>(carry);
  A h = A(0);
  for (int j = 0; j + 1 < chunks; ++j) {
    const A* row = ag + (int64_t)j * 2 * NS * C;
    const A a = row[c];
    const A b = row[(1 + st) * C + c];
    h = (aggf[j] || j == 0) ? b : mul0(a, h) + b;
    out[((int64_t)(j + 1) * NS + st) * C + c] = h;
  }
}

template <typename T, typename A, int V, int MODE>
__global__ void __launch_bounds__(kLanes * 2, 2) phase_apply_kernel(const ScanArgs args) {
  using Tr = ModeTraits<MODE>;
  using CS = ChunkScan<T, A, V, MODE>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  CS cs(args, smem_raw, blockIdx.y);
  const int m = args.e - args.s;
  const int j = blockIdx.x;
  const int i0 = j * CS::CHUNK;
  A carry[Tr::NS][V];
  if (j > 0 && cs.active) {
    const A* src = reinterpret_cast<const A*>(args.carry) + (int64_t)j * Tr::NS * args.C + cs.c;
#pragma unroll
    for (int st = 0; st < Tr::NS; ++st)
#pragma unroll
      for (int u = 0; u < V; ++u) carry[st][u] = src[st * args.C + u];
  } else {
#pragma unroll
    for (int st = 0; st < Tr::NS; ++st)
#pragma unroll
      for (int u = 0; u < V; ++u) carry[st][u] = A(0);
  }
  cs.apply(args.s, args.e, i0, min(i0 + CS::CHUNK, m), carry, j > 0);
}

}  // namespace treessm_cuda
