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
// by the up pass); a light head takes out[p] from its parent, the heavy child's share of p
// and, from its slot, x[p] plus its light siblings' shares, which the up pass formed by
// prefix and suffix sums over the slots: no share is ever subtracted back out.
//
// A thread block scans a chunk of lanes * kRun positions of one phase for one slice of
// channels: position lanes (G threads each, V channels a thread) take kRun consecutive
// positions each; pass 1 loads them into registers (every load whose address the records
// give issued before any is used) and composes the lane's run; groups of kGroup lanes scan
// their composites by warp shuffles, and the value entering each group is carried through
// the groups before it, in order; pass 2 runs the recurrence through the registers and
// writes. Chunks start every lanes * kRun positions from the phase's start and carry the
// value after them into the next one. Two schedules drive the chunks:
//   - "trees": one block per (tree, channel slice) walks its tree's phases and chunks in
//     order (__syncthreads between phases);
//   - "phases": per phase of the whole forest, chunks in parallel over the device; a
//     first launch composes each chunk, a second scans the chunks' composites for the value
//     entering each chunk (in parallel, in an order fixed by the chunk count), a third
//     rescans every chunk from its carried-in value.
// Every value is written by one thread and every sum is taken in a fixed order that
// depends on the positions alone (not on the lanes or channels a block takes): results are
// bitwise deterministic and the same for every launch shape of a schedule. Accumulation is
// float32 (float64 for double).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "numeric.cuh"
#include "path_layout.cuh"

namespace treessm_cuda {

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
  M_UP = 0,       // up(x) -> out (when set); up, loc, heavy share, siblings (when set); slots
  M_UP2 = 1,      // up(x), up(g) together: the first pass of both's backward
  M_UP_GW = 2,    // backward of down: gx = up(g) -> out, gw = gx[v] h[parent]
  M_DOWN = 3,     // down(x) -> out
  M_DOWN_GW = 4,  // backward of up: gx = down(g) -> out, gw = h[v] gx[parent]
  M_BOTH = 5,     // both(x) = up + outside -> out, after M_UP
  M_BOTH2 = 6,    // backward of both: gx = both(g), gw = up(x) br_g + up(g) br_x, after M_UP2
};

constexpr int kMaxLanes = 128;  // position lanes of a block, at most
constexpr int kRun = 4;         // positions of a lane: a chunk is lanes * kRun positions
constexpr int kGroup = 16;      // lanes scanned by shuffles: a group of kGroup * kRun positions
constexpr int kMaxThreads = 256;

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
  void* sib[2];       // A by slot: the parent's input plus the shares of the light child's
                      // light siblings (prefix and suffix sums: nothing subtracted)
  void* val[2];       // A by position: root-first values of vertices with light children
                      // (down: the scan; both: the part outside the subtree)
};

struct ScanArgs {
  ScanIO io;
  const PathRec* rec;    // [N + 1]
  const int* slot;       // [N]: each light child's index in the light list
  int64_t C;
  int lpv;               // G: threads per position (one row of G * V channels)
  int lanes;             // position lanes of a block (a multiple of kGroup)
  int64_t groups;        // channel slices
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
__host__ __device__ inline int64_t scan_smem_bytes(int lanes, int lpv, int V, int a_size) {
  constexpr int NS = ModeTraits<MODE>::NS;
  const int64_t per = (int64_t)V * (1 + NS) + 1;
  return (int64_t)(lanes / kGroup) * lpv * per * a_size + (kMaxPhases + 2) * 4;
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
  // The value after these steps entered with h (`has`: h is defined; at a phase's start
  // it is not).
  __device__ __forceinline__ A enter(A h, bool has, int s, int q) const {
    return (f || !has) ? b[s][q] : mul0(a[q], h) + b[s][q];
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
//
// Every value a position receives is fixed by groups of kGroup * kRun positions counted
// from the phase's start: a lane composes its run, a group scans its lanes' composites by
// shuffles (always the same kGroup lanes), and the value entering a group is the value
// entering the one before it carried through that group's composite, group after group.
// Chunks hold whole groups, so neither the lanes of a block nor its threads per position
// change a bit of the results.
template <typename T, typename A, int V, int MODE>
struct ChunkScan {
  using Tr = ModeTraits<MODE>;
  static constexpr int NS = Tr::NS;
  static constexpr int R = kRun;
  using Aff = Affine<A, V, NS>;

  const ScanArgs& args;
  A* totals;  // shared: [lanes / kGroup][G] group composites
  int G, g, q, per, lanes;
  int64_t c;
  bool active;

  // the lane's run: records, slots, steps (a; b or, in the both modes, the bracket term r
  // with b = a r), segment starts, and the loads its outputs need
  PathRec rk[R];
  int sl[R];
  A ra[R][V];
  A rb[NS][R][V];
  A xtra[NS][R][V];  // up modes: the first light child's share; both: up at the position;
                     // down: the parent's value at a head
  A wown[R][V];      // up modes: a head's own weight; M_DOWN_GW: h at the vertex
  A hpar[R][V];      // M_UP_GW: h at the parent
  unsigned rf;

  __device__ ChunkScan(const ScanArgs& a, unsigned char* smem, int64_t cgroup) : args(a) {
    G = a.lpv;
    lanes = a.lanes;
    g = threadIdx.x % G;
    q = threadIdx.x / G;
    per = V * (1 + NS) + 1;
    c = (cgroup * G + g) * V;
    active = c < a.C;
    totals = reinterpret_cast<A*>(smem);
  }

  __device__ __forceinline__ int chunk() const { return lanes * R; }
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
  __device__ __forceinline__ int run_length(int first, int i1) const {
    int n = i1 - first;
    n = n < 0 ? 0 : (n > R ? R : n);
    return active ? n : 0;
  }

  // Pass 1: the run's steps into registers; `cmp` receives the lane's composite. Every load
  // whose address the records give is issued before any loaded value is used.
  __device__ __forceinline__ void load_run(int s, int e, int first, int n, Aff& cmp) {
    rf = 0;
    // stage 1: records and slots
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r < n) {
        const int k = pos(s, e, first + r);
        rk[r] = load_rec(args.rec + k);
        if constexpr (!Tr::UP && !Tr::BOTH) sl[r] = -1;
        else sl[r] = __ldg(args.slot + k);
      }
    PathRec next{-1, -1, 0, 0};  // leaf-first: the record after the run's first position
    if (Tr::UP && n > 0) next = load_rec(args.rec + pos(s, e, first) + 1);
    int hv[R];                   // M_UP_GW: the parent's vertex
    if constexpr (MODE == M_UP_GW) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r < n && rk[r].parent >= 0) hv[r] = load_rec(args.rec + rk[r].parent).v;
    }
    // stage 2: rows
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= n) continue;
      const int k = pos(s, e, first + r);
      const PathRec& rr = rk[r];
      const bool hd = head(rr, k);
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
        for (int st = 0; st < NS; ++st) {
          load_ro<V>(row(args.io.in[st], rr.v), rb[st][r]);
          if (rr.light_start < rr.light_end) load_acc<V>(acc(args.io.contrib[st], rr.light_start), xtra[st][r]);
        }
        if (hd && rr.parent >= 0) load_ro<V>(row(args.io.w, rr.v), wown[r]);
        if (MODE == M_UP_GW && rr.parent >= 0) load_ro<V>(row(args.io.h, hv[r]), hpar[r]);
      } else {
        const int p = rr.parent;
        if (p >= 0) load_ro<V>(row(args.io.w, rr.v), ra[r]);
        else {
#pragma unroll
          for (int u = 0; u < V; ++u) ra[r][u] = A(0);
        }
        if (hd) rf |= 1u << r;
        if constexpr (Tr::BOTH) {
#pragma unroll
          for (int st = 0; st < NS; ++st) {
            load_acc<V>(acc(args.io.up[st], k), xtra[st][r]);
            if (!hd) load_acc<V>(acc(args.io.loc[st], k - 1), rb[st][r]);
            else if (p >= 0) load_acc<V>(acc(args.io.val[st], p), rb[st][r]);
            else {
#pragma unroll
              for (int u = 0; u < V; ++u) rb[st][r][u] = A(0);
            }
          }
        } else {
          load_ro<V>(row(args.io.in[0], rr.v), rb[0][r]);
          if (hd && p >= 0) load_acc<V>(acc(args.io.val[0], p), xtra[0][r]);
          if (MODE == M_DOWN_GW && p >= 0) load_ro<V>(row(args.io.h, rr.v), wown[r]);
        }
      }
    }
    // stage 3: sums. Leaf-first: the light children's shares (and their siblings' sums,
    // when kept); root-first: a head's term from its parent.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= n) continue;
      const int k = pos(s, e, first + r);
      const PathRec& rr = rk[r];
      if constexpr (Tr::UP) {
        if (rr.light_start < rr.light_end) {
#pragma unroll
          for (int st = 0; st < NS; ++st) light_sums(rr, rb[st][r], xtra[st][r], st);
        }
      } else if constexpr (Tr::BOTH) {
        // a light head: out[p] + (x[p] + its light siblings' shares) + the heavy share of p
        if (head(rr, k) && rr.parent >= 0) {
#pragma unroll
          for (int st = 0; st < NS; ++st) {
            A sx[V], hs[V];
            load_acc<V>(acc(args.io.sib[st], sl[r]), sx);
            load_acc<V>(acc(args.io.share[st], rr.parent), hs);
#pragma unroll
            for (int u = 0; u < V; ++u) rb[st][r][u] = (rb[st][r][u] + sx[u]) + hs[u];
          }
        }
      } else {
        if (head(rr, k) && rr.parent >= 0) {
#pragma unroll
          for (int u = 0; u < V; ++u) rb[0][r][u] += ra[r][u] * xtra[0][r][u];
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

  // The input plus the shares of the light children of `rr` (in list order) into `x`, whose
  // first share `c0` is loaded; with siblings kept, each light child's slot receives the
  // input plus its light siblings' shares: a prefix sum forwards, the suffix added backwards.
  __device__ __forceinline__ void light_sums(const PathRec& rr, A (&x)[V], const A (&c0)[V], int st) {
    const int ls = rr.light_start, le = rr.light_end;
    A* sib = args.io.sib[st] ? acc(args.io.sib[st], ls) : nullptr;
    if (le - ls == 1) {
      if (sib) store<V>(sib, x);
#pragma unroll
      for (int u = 0; u < V; ++u) x[u] += c0[u];
      return;
    }
    A pre[V];
#pragma unroll
    for (int u = 0; u < V; ++u) pre[u] = x[u];
    for (int j = ls; j < le; ++j) {
      A cj[V];
      load_acc<V>(acc(args.io.contrib[st], j), cj);
      if (sib) store<V>(acc(args.io.sib[st], j), pre);
#pragma unroll
      for (int u = 0; u < V; ++u) pre[u] += cj[u];
    }
#pragma unroll
    for (int u = 0; u < V; ++u) x[u] = pre[u];
    if (!sib) return;
    A suf[V];
    load_acc<V>(acc(args.io.contrib[st], le - 1), suf);
    for (int j = le - 2; j >= ls; --j) {
      A* sj = acc(args.io.sib[st], j);
      A cj[V], pj[V];
      load_acc<V>(sj, pj);
      load_acc<V>(acc(args.io.contrib[st], j), cj);
#pragma unroll
      for (int u = 0; u < V; ++u) {
        pj[u] += suf[u];
        suf[u] += cj[u];
      }
      store<V>(sj, pj);
    }
  }

  // Scan of the lane composites inside each group of kGroup lanes (Kogge-Stone by warp
  // shuffles): `excl` = composite of the group's lanes before this one (identity for the
  // first); the group composites go to shared memory, visible to the block on return.
  __device__ __forceinline__ void group_scan(Aff& incl, Aff& excl) {
    const int ql = q % kGroup;
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
    excl = incl;
    excl.shfl_up(static_cast<unsigned>(G));
    if (ql == 0) excl.identity();
    __syncthreads();  // the previous chunk's readers are done with the composites
    if (ql == kGroup - 1) incl.put(totals + ((int64_t)grp * G + g) * per);
    __syncthreads();
  }

  // Composite of stream indices [i0, i1) (the "phases" schedule's first launch): the group
  // composites composed in order.
  __device__ void aggregate(int s, int e, int i0, int i1, Aff& total) {
    const int first = i0 + q * R;
    Aff incl, excl;
    load_run(s, e, first, run_length(first, i1), incl);
    group_scan(incl, excl);
    total.identity();
    for (int j = 0; j < lanes / kGroup; ++j) {
      Aff t;
      t.get(totals + ((int64_t)j * G + g) * per);
      total.then(t);
    }
  }

  // Scan of stream indices [i0, i1) entering with `carry` (when `has_carry`); on return
  // `carry` holds the value after the chunk. The writes become visible to the block at its
  // next barrier.
  __device__ void apply(int s, int e, int i0, int i1, A (&carry)[NS][V], bool has_carry) {
    const int first = i0 + q * R;
    const int n = run_length(first, i1);
    Aff incl, excl;
    load_run(s, e, first, n, incl);
    group_scan(incl, excl);
    // the value entering this lane's group, then the one leaving the chunk: group after group
    const int grp = q / kGroup;
    A hg[NS][V];
    bool has_g = has_carry;
    for (int j = 0; j < lanes / kGroup; ++j) {
      if (j == grp) {
        has_g = has_carry;
#pragma unroll
        for (int st = 0; st < NS; ++st)
#pragma unroll
          for (int u = 0; u < V; ++u) hg[st][u] = carry[st][u];
      }
      Aff t;
      t.get(totals + ((int64_t)j * G + g) * per);
#pragma unroll
      for (int st = 0; st < NS; ++st)
#pragma unroll
        for (int u = 0; u < V; ++u) carry[st][u] = t.enter(carry[st][u], has_carry, st, u);
      has_carry = true;
    }
    A hp[NS][V];
#pragma unroll
    for (int st = 0; st < NS; ++st)
#pragma unroll
      for (int u = 0; u < V; ++u) hp[st][u] = excl.enter(hg[st][u], has_g, st, u);
    finish(s, e, first, n, hp);
  }

  // Pass 2: the recurrence through the registers, and the outputs of the mode.
  __device__ __forceinline__ void finish(int s, int e, int first, int n, A (&hp)[NS][V]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= n) continue;
      const int k = pos(s, e, first + r);
      const PathRec& rr = rk[r];
      const bool f = (rf >> r) & 1u;
      const bool lights = rr.light_start < rr.light_end;
      if constexpr (Tr::UP) {
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
          if (args.io.share[st] != nullptr && lights) store<V>(acc(args.io.share[st], k), hs);
          if (head(rr, k) && rr.parent >= 0) {
            A sh[V];
#pragma unroll
            for (int u = 0; u < V; ++u) sh[u] = wown[r][u] * v[st][u];
            store<V>(acc(args.io.contrib[st], sl[r]), sh);
          }
        }
        if (args.io.out != nullptr) store<V>(row_out(args.io.out, rr.v), v[0]);
        if constexpr (MODE == M_UP_GW) {
          A gwv[V];
#pragma unroll
          for (int u = 0; u < V; ++u) gwv[u] = rr.parent >= 0 ? v[0][u] * hpar[r][u] : A(0);
          store<V>(row_out(args.io.gw, rr.v), gwv);
        }
#pragma unroll
        for (int st = 0; st < NS; ++st)
#pragma unroll
          for (int u = 0; u < V; ++u) hp[st][u] = v[st][u];
      } else if constexpr (!Tr::BOTH) {
        A v[V];
#pragma unroll
        for (int u = 0; u < V; ++u) v[u] = f ? rb[0][r][u] : ra[r][u] * hp[0][u] + rb[0][r][u];
        store<V>(row_out(args.io.out, rr.v), v);
        if constexpr (MODE == M_DOWN_GW) {
          A gwv[V];
#pragma unroll
          for (int u = 0; u < V; ++u)
            gwv[u] = rr.parent >= 0 ? wown[r][u] * (f ? xtra[0][r][u] : hp[0][u]) : A(0);
          store<V>(row_out(args.io.gw, rr.v), gwv);
        }
        if (lights) store<V>(acc(args.io.val[0], k), v);  // for light heads
#pragma unroll
        for (int u = 0; u < V; ++u) hp[0][u] = v[u];
      } else {
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
          for (int u = 0; u < V; ++u) o[u] = xtra[0][r][u] + v[0][u];
          store<V>(row_out(args.io.out, rr.v), o);
        } else {
          A o[V], gwv[V];
#pragma unroll
          for (int u = 0; u < V; ++u) {
            o[u] = xtra[1][r][u] + v[1][u];
            gwv[u] = rr.parent >= 0 ? xtra[0][r][u] * brk[1][u] + xtra[1][r][u] * brk[0][u] : A(0);
          }
          store<V>(row_out(args.io.out, rr.v), o);
          store<V>(row_out(args.io.gw, rr.v), gwv);
        }
        if (lights) {
#pragma unroll
          for (int st = 0; st < NS; ++st) store<V>(acc(args.io.val[st], k), v[st]);
        }
#pragma unroll
        for (int st = 0; st < NS; ++st)
#pragma unroll
          for (int u = 0; u < V; ++u) hp[st][u] = v[st][u];
      }
    }
  }
};

// ---------------------------------------------------------------------------- "trees"
// One block per (tree, channel slice), channel slices of a tree in consecutive blocks: every
// phase of the tree in order, each in chunks chained by their carries.
template <typename T, typename A, int V, int MODE>
__global__ void __launch_bounds__(kMaxThreads, 2) tree_scan_kernel(const ScanArgs args) {
  using Tr = ModeTraits<MODE>;
  using CS = ChunkScan<T, A, V, MODE>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t t = blockIdx.x / args.groups;
  CS cs(args, smem_raw, blockIdx.x % args.groups);
  int* prow = reinterpret_cast<int*>(cs.totals + (args.lanes / kGroup) * cs.G * cs.per);
  for (int i = threadIdx.x; i <= kMaxPhases; i += blockDim.x)
    prow[i] = args.path_ptr[args.phase_path[t * (kMaxPhases + 1) + i]];
  __syncthreads();
  A carry[Tr::NS][V] = {};
  const int chunk = cs.chunk();
  for (int n = 0; n < kMaxPhases; ++n) {
    const int p = Tr::UP ? kMaxPhases - 1 - n : n;
    const int s = prow[p], e = prow[p + 1];
    if (s >= e) continue;  // block-uniform
    const int m = e - s;
    for (int i0 = 0; i0 < m; i0 += chunk) cs.apply(s, e, i0, min(i0 + chunk, m), carry, i0 > 0);
    __syncthreads();  // the phase's writes are visible to the next phase
  }
}

// ---------------------------------------------------------------------------- "phases"
// One phase [s, e) of the whole forest in chunks, one block per (chunk, channel slice).
template <typename T, typename A, int V, int MODE>
__global__ void __launch_bounds__(kMaxThreads, 2) phase_aggregate_kernel(const ScanArgs args) {
  using Tr = ModeTraits<MODE>;
  using CS = ChunkScan<T, A, V, MODE>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  CS cs(args, smem_raw, blockIdx.y);
  const int m = args.e - args.s;
  const int i0 = blockIdx.x * cs.chunk();
  typename CS::Aff total;
  cs.aggregate(args.s, args.e, i0, min(i0 + cs.chunk(), m), total);
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

// The value entering every chunk of a phase from the chunks' composites: chunk j's composite
// takes the value entering j to the one entering j + 1, and chunk 0 counts as a segment
// start (nothing enters it; its carry is not written). A parallel scan over the chunks, one
// block per channel, every stream in each thread: a thread composes kCarryRun consecutive
// chunks in order; a warp scans the composites of its 32 threads by shuffles (a span of
// kCarrySpan chunks, spans counted from chunk 0); the value entering a span is the value
// entering the one before it carried through that span's composite, span after span (as
// ChunkScan carries its groups); each thread then runs its chunks from the value entering
// it and writes the value after each. The order of every operation is fixed by the chunk
// count: blocks of any number of warps give the same bits.
constexpr int kCarryRun = 8;                 // chunks a thread composes
constexpr int kCarrySpan = 32 * kCarryRun;   // chunks a warp scans
constexpr int kCarryMaxWarps = 8;

// Threads of a carry block: a warp per span of the phase, at most kCarryMaxWarps.
__host__ __device__ inline int phase_carry_threads(int chunks) {
  const int spans = (chunks - 1 + kCarrySpan - 1) / kCarrySpan;
  return 32 * (spans < 1 ? 1 : (spans > kCarryMaxWarps ? kCarryMaxWarps : spans));
}

// Values of a carry record in shared memory: an Affine's NS + 2 (a, the b's, the flag),
// padded to whole 16-byte units. ptxas merges the loads of neighbouring values into 16-byte
// loads, which it may issue before it knows that the next record exists: with records of
// whole units no such load reaches past the last one.
template <typename A, int NS>
__host__ __device__ constexpr int carry_record_values() {
  return static_cast<int>(((NS + 2) * sizeof(A) + 15) / 16 * 16 / sizeof(A));
}

// Shared memory of a carry block of `threads`: the composite of every warp's span.
template <typename A, int NS>
__host__ __device__ inline int64_t phase_carry_smem_bytes(int threads) {
  return (int64_t)(threads / 32) * carry_record_values<A, NS>() * sizeof(A);
}

template <typename A, int NS>
__global__ void __launch_bounds__(kCarryMaxWarps * 32) phase_carry_kernel(
    const void* agg, const unsigned char* aggf, void* carry, int chunks, int64_t C) {
  using Aff = Affine<A, 1, NS>;
  constexpr int per = carry_record_values<A, NS>();  // a record's values
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* totals = reinterpret_cast<A*>(smem_raw);
  const int64_t c = blockIdx.x;
  const A* ag = reinterpret_cast<const A*>(agg);
  A* out = reinterpret_cast<A*>(carry);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  const int steps = chunks - 1;  // the chunks whose composites carry into a next one
  A h[NS];                       // the value entering the block's next span
#pragma unroll
  for (int st = 0; st < NS; ++st) h[st] = A(0);  // never used: chunk 0 starts a segment
  for (int t0 = 0; t0 < steps; t0 += warps * kCarrySpan) {
    const int first = t0 + threadIdx.x * kCarryRun;
    // the thread's chunks: every load before any use
    Aff el[kCarryRun];
#pragma unroll
    for (int r = 0; r < kCarryRun; ++r) {
      const int j = first + r;
      if (j < steps) {
        const A* row = ag + (int64_t)j * 2 * NS * C + c;
        el[r].a[0] = __ldg(row);
#pragma unroll
        for (int st = 0; st < NS; ++st) el[r].b[st][0] = __ldg(row + (1 + st) * C);
        el[r].f = j == 0 || __ldg(aggf + j) != 0;
      } else {
        el[r].identity();
      }
    }
    Aff incl;
    incl.identity();
#pragma unroll
    for (int r = 0; r < kCarryRun; ++r)
      if (first + r < steps) incl.then(el[r]);
    // the warp's scan (Kogge-Stone): `excl` = composite of the lanes before this one
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      Aff prev = incl;
      prev.shfl_up(static_cast<unsigned>(d));
      if (lane >= d) {
        prev.then(incl);
        incl = prev;
      }
    }
    Aff excl = incl;
    excl.shfl_up(1u);
    if (lane == 0) excl.identity();
    __syncthreads();  // the previous tile's readers are done with the totals
    if (lane == 31) incl.put(totals + warp * per);
    __syncthreads();
    // the value entering this warp's span, then the one leaving the block's spans
    A hv[NS];
    for (int w = 0; w < warps; ++w) {
      if (w == warp) {
#pragma unroll
        for (int st = 0; st < NS; ++st) hv[st] = h[st];
      }
      Aff t;
      t.get(totals + w * per);
#pragma unroll
      for (int st = 0; st < NS; ++st) h[st] = t.enter(h[st], true, st, 0);
    }
#pragma unroll
    for (int st = 0; st < NS; ++st) hv[st] = excl.enter(hv[st], true, st, 0);
#pragma unroll
    for (int r = 0; r < kCarryRun; ++r) {
      const int j = first + r;
      if (j >= steps) continue;
#pragma unroll
      for (int st = 0; st < NS; ++st) {
        hv[st] = el[r].enter(hv[st], true, st, 0);
        out[((int64_t)(j + 1) * NS + st) * C + c] = hv[st];
      }
    }
  }
}

template <typename T, typename A, int V, int MODE>
__global__ void __launch_bounds__(kMaxThreads, 2) phase_apply_kernel(const ScanArgs args) {
  using Tr = ModeTraits<MODE>;
  using CS = ChunkScan<T, A, V, MODE>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  CS cs(args, smem_raw, blockIdx.y);
  const int m = args.e - args.s;
  const int j = blockIdx.x;
  const int i0 = j * cs.chunk();
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
  cs.apply(args.s, args.e, i0, min(i0 + cs.chunk(), m), carry, j > 0);
}

}  // namespace treessm_cuda
