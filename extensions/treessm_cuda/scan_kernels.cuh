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
//     downwards; b[k] = input + sum over light children c of w[c] up[c] (fixed order),
//     a[k] = w of the heavy child k + 1;
//   - root-first passes take phases from 0 and positions upwards; a head reads its
//     parent's value, left by an earlier phase.
// "both" is up, then the part of the tree outside each subtree: out[k] = w[k] br[k] with
// the bracket br[k] = out[p] + x[p] + sum over the siblings s of k of w[s] up[s]. Along a
// path the bracket is out[k-1] + loc[k-1] (loc: the input plus light children's shares, left
// by the up pass); a parent forms its light children's brackets from prefix and suffix
// sums over them, so no share is ever subtracted back out.
//
// A thread block scans a chunk of kLanes * RMAX positions of one phase for one slice of
// channels: kLanes position lanes (G threads each, V channels a thread) take RMAX
// consecutive positions each; pass 1 loads them into registers and composes the lane's
// run; a scan of the lane composites in shared memory (Kogge-Stone over the kLanes lanes)
// gives every lane its incoming value; pass 2 runs the recurrence through the registers and
// writes. Chunks start every kLanes * RMAX positions from the phase's start and carry the
// value after them into the next one. Two schedules drive the chunks:
//   - "trees": one block per (tree, channel slice) walks its tree's phases and chunks in
//     order (__syncthreads between phases);
//   - "phases": per phase of the whole forest, chunks in parallel over the device; a
//     first launch composes each chunk, a second carries values across chunks in order,
//     a third rescans every chunk from its carried-in value.
// Every value is written by one thread and every sum is taken in a fixed order that
// depends on the positions alone (not on the channels a block takes, nor on the schedule):
// results are bitwise deterministic and the same for every launch shape and both
// schedules. Accumulation is float32 (float64 for double).
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

template <int V, typename T, typename A>
__device__ __forceinline__ void load(const T* __restrict__ p, A (&o)[V]) {
  const Pack<T, V> k = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int q = 0; q < V; ++q) o[q] = static_cast<A>(to_acc(k.v[q]));
}

template <int V, typename T, typename A>
__device__ __forceinline__ void store(T* __restrict__ p, const A (&o)[V]) {
  Pack<T, V> k;
#pragma unroll
  for (int q = 0; q < V; ++q) k.v[q] = Store<T>::cvt(o[q]);
  *reinterpret_cast<Pack<T, V>*>(p) = k;
}

enum ScanMode {
  M_UP = 0,       // up(x) -> out (when set), up[0]; loc[0] (when set)
  M_UP2 = 1,      // up(x), up(g) -> up[0], up[1]; loc[0], loc[1]: first pass of both's backward
  M_UP_GW = 2,    // backward of down: gx = up(g) -> out, gw = gx[v] h[parent]
  M_DOWN = 3,     // down(x) -> out
  M_DOWN_GW = 4,  // backward of up: gx = down(g) -> out, gw = h[v] gx[parent]
  M_BOTH = 5,     // both(x) = up + outside -> out, after M_UP
  M_BOTH2 = 6,    // backward of both: gx = both(g) -> out, gw = up(x) br_g + up(g) br_x, after M_UP2
};

constexpr int kLanes = 128;  // position lanes of a block: a chunk is kLanes * RMAX positions

template <int MODE> struct ModeTraits {
  static constexpr bool UP = MODE <= M_UP_GW;  // leaf-first: phases and positions downwards
  static constexpr bool BOTH = MODE >= M_BOTH;
  static constexpr int NS = (MODE == M_UP2 || MODE == M_BOTH2) ? 2 : 1;  // streams
  static constexpr int RMAX = NS == 2 ? 4 : 8;  // positions per lane and chunk
  static constexpr bool GW = MODE == M_UP_GW || MODE == M_DOWN_GW || MODE == M_BOTH2;
};

// The tensors of one pass; pointers a mode does not use are null. Vertex-space tensors are
// [N, C] by vertex id, position-space ones [N, C] by layout position.
struct ScanIO {
  const void* in[2];  // T: x (and g for two streams), or g
  const void* w;      // T
  const void* h;      // T: the forward output (M_UP_GW, M_DOWN_GW)
  void* out;          // T: the scan, or dL/dx
  void* gw;           // T: dL/dw
  void* up[2];        // A by position: up values (leaf-first modes write, both modes read)
  void* loc[2];       // A by position: input plus light children's shares
  void* br[2];        // A by position: brackets of light heads (both modes)
  void* val;          // A by position: root-first values of vertices with light children
};

struct ScanArgs {
  ScanIO io;
  const PathRec* rec;    // [N + 1]
  const int* light;      // light children's positions, grouped by parent
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

// Shared memory of a block: two buffers of lane composites for the lane scan, then the
// tree's phase bounds ("trees").
template <int MODE>
__host__ __device__ inline int64_t scan_smem_bytes(int lpv, int V, int a_size) {
  constexpr int NS = ModeTraits<MODE>::NS;
  const int64_t per = (int64_t)V * (1 + NS) + 1;
  return 2LL * kLanes * lpv * per * a_size + (kMaxPhases + 2) * 4;
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
  static constexpr int RMAX = Tr::RMAX;
  using Aff = Affine<A, V, NS>;

  static constexpr int CHUNK = kLanes * RMAX;

  const ScanArgs& args;
  A* lanes;  // shared: two buffers of [kLanes][G] lane composites
  int G, g, q, per;
  int64_t c;
  bool active;

  __device__ ChunkScan(const ScanArgs& a, unsigned char* smem, int cgroup) : args(a) {
    G = a.lpv;
    g = threadIdx.x % G;
    q = threadIdx.x / G;
    per = V * (1 + NS) + 1;
    c = ((int64_t)cgroup * G + g) * V;
    active = c < a.C;
    lanes = reinterpret_cast<A*>(smem);
  }

  __device__ __forceinline__ const T* rowp(const void* base, int v) const {
    return reinterpret_cast<const T*>(base) + (int64_t)v * args.C + c;
  }
  __device__ __forceinline__ T* rowp_out(void* base, int v) const {
    return reinterpret_cast<T*>(base) + (int64_t)v * args.C + c;
  }
  __device__ __forceinline__ A* accp(void* base, int k) const {
    return reinterpret_cast<A*>(base) + (int64_t)k * args.C + c;
  }

  // Registers of the lane's run: per element the step (a; b or, in both modes, the bracket
  // term r with b = a r) and whether a segment starts there.
  A ra[RMAX][V];
  A rb[NS][RMAX][V];
  unsigned rf;

  // Pass 1: load the run's steps into registers; returns the lane's composite.
  __device__ __forceinline__ void load_run(int s, int e, int i0, int i1, Aff& acc) {
    acc.identity();
    rf = 0;
    const int first = i0 + q * RMAX;
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      const int i = first + r;
      if (i >= i1 || !active) continue;
      const int k = Tr::UP ? e - 1 - i : s + i;
      const PathRec rk = args.rec[k];
      Aff el;
      if constexpr (Tr::UP) {
        const PathRec rn = args.rec[k + 1];
        const bool heavy = rn.parent == k;
        el.f = !heavy;
        if (heavy) load<V>(rowp(args.io.w, rn.v), el.a);
        else {
#pragma unroll
          for (int u = 0; u < V; ++u) el.a[u] = A(0);
        }
#pragma unroll
        for (int st = 0; st < NS; ++st) load<V>(rowp(args.io.in[st], rk.v), el.b[st]);
        for (int j = rk.light_start; j < rn.light_start; ++j) {
          const int cj = args.light[j];
          if (cj < 0) break;  // padding after a tree's last light child
          A wj[V];
          load<V>(rowp(args.io.w, args.rec[cj].v), wj);
#pragma unroll
          for (int st = 0; st < NS; ++st) {
            const A* uj = accp(args.io.up[st], cj);
#pragma unroll
            for (int u = 0; u < V; ++u) el.b[st][u] += wj[u] * uj[u];
          }
        }
#pragma unroll
        for (int u = 0; u < V; ++u) {
          ra[r][u] = el.a[u];
#pragma unroll
          for (int st = 0; st < NS; ++st) rb[st][r][u] = el.b[st][u];
        }
      } else {
        const bool head = rk.parent < 0 || rk.parent != k - 1;
        el.f = head;
        if (rk.parent >= 0) load<V>(rowp(args.io.w, rk.v), el.a);
        else {
#pragma unroll
          for (int u = 0; u < V; ++u) el.a[u] = A(0);
        }
        if constexpr (Tr::BOTH) {
#pragma unroll
          for (int st = 0; st < NS; ++st) {
            if (!head) {
              const A* lp = accp(args.io.loc[st], k - 1);
#pragma unroll
              for (int u = 0; u < V; ++u) rb[st][r][u] = lp[u];
            } else if (rk.parent >= 0) {
              const A* bp = accp(args.io.br[st], k);
#pragma unroll
              for (int u = 0; u < V; ++u) rb[st][r][u] = bp[u];
            } else {
#pragma unroll
              for (int u = 0; u < V; ++u) rb[st][r][u] = A(0);
            }
#pragma unroll
            for (int u = 0; u < V; ++u) el.b[st][u] = el.a[u] * rb[st][r][u];
          }
        } else {
          load<V>(rowp(args.io.in[0], rk.v), el.b[0]);
          if (head && rk.parent >= 0) {
            const A* pv = accp(args.io.val, rk.parent);
#pragma unroll
            for (int u = 0; u < V; ++u) el.b[0][u] += el.a[u] * pv[u];
          }
#pragma unroll
          for (int u = 0; u < V; ++u) rb[0][r][u] = el.b[0][u];
        }
#pragma unroll
        for (int u = 0; u < V; ++u) ra[r][u] = el.a[u];
      }
      if (el.f) rf |= 1u << r;
      acc.then(el);
    }
  }

  // Scan of the lane composites (Kogge-Stone over the kLanes lanes, in shared memory):
  // `excl` = composite of the lanes before this one (identity for the first), `total` =
  // composite of the whole chunk. Starts and ends with a barrier.
  __device__ __forceinline__ void lane_scan(Aff& incl, Aff& excl, Aff& total) {
    A* src = lanes;
    A* dst = lanes + (int64_t)kLanes * G * per;
    __syncthreads();  // the previous chunk's readers are done with both buffers
    incl.put(src + ((int64_t)q * G + g) * per);
    __syncthreads();
    for (int d = 1; d < kLanes; d <<= 1) {
      Aff cur;
      cur.get(src + ((int64_t)q * G + g) * per);
      if (q >= d) {
        Aff prev;
        prev.get(src + ((int64_t)(q - d) * G + g) * per);
        prev.then(cur);
        cur = prev;
      }
      cur.put(dst + ((int64_t)q * G + g) * per);
      __syncthreads();
      A* t = src;
      src = dst;
      dst = t;
    }
    if (q > 0) excl.get(src + ((int64_t)(q - 1) * G + g) * per);
    else excl.identity();
    total.get(src + ((int64_t)(kLanes - 1) * G + g) * per);
  }

  // Composite of stream indices [i0, i1) (the "phases" schedule's first launch).
  __device__ void aggregate(int s, int e, int i0, int i1, Aff& total) {
    Aff incl, excl;
    load_run(s, e, i0, i1, incl);
    lane_scan(incl, excl, total);
  }

  // Scan of stream indices [i0, i1) entering with `carry` (when `has_carry`); on return
  // `carry` holds the value after the chunk, and the block has passed a barrier after its
  // writes.
  __device__ void apply(int s, int e, int i0, int i1, A (&carry)[NS][V], bool has_carry) {
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
    const int first = i0 + q * RMAX;
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      const int i = first + r;
      if (i >= i1 || !active) continue;
      step(Tr::UP ? e - 1 - i : s + i, r, hp);
    }
    __syncthreads();  // the writes are visible to the next phase
  }

  // The value after a composite entered with h (the phase carry kernel takes the same
  // expression).
  __device__ __forceinline__ static A enter(const Aff& t, A h, bool has, int st, int u) {
    return (t.f || !has) ? t.b[st][u] : mul0(t.a[u], h) + t.b[st][u];
  }

  // Pass 2 at position k (the lane's r-th): the value from the previous one in hp, on
  // return this one's; the outputs of the mode.
  __device__ __forceinline__ void step(int k, int r, A (&hp)[NS][V]) {
    const PathRec rk = args.rec[k];
    const bool f = (rf >> r) & 1u;
    A v[NS][V];
    if constexpr (Tr::BOTH) {
      A brk[NS][V];
#pragma unroll
      for (int st = 0; st < NS; ++st)
#pragma unroll
        for (int u = 0; u < V; ++u) {
          brk[st][u] = f ? rb[st][r][u] : hp[st][u] + rb[st][r][u];
          v[st][u] = ra[r][u] * brk[st][u];
        }
      const A* u0 = accp(args.io.up[0], k);
      if constexpr (MODE == M_BOTH) {
        A o[V];
#pragma unroll
        for (int u = 0; u < V; ++u) o[u] = u0[u] + v[0][u];
        store<V>(rowp_out(args.io.out, rk.v), o);
      } else {
        const A* u1 = accp(args.io.up[1], k);
        A o[V], gwv[V];
#pragma unroll
        for (int u = 0; u < V; ++u) {
          o[u] = u1[u] + v[1][u];
          gwv[u] = rk.parent >= 0 ? u0[u] * brk[1][u] + u1[u] * brk[0][u] : A(0);
        }
        store<V>(rowp_out(args.io.out, rk.v), o);
        store<V>(rowp_out(args.io.gw, rk.v), gwv);
      }
      if (rk.light0 >= 0) brackets(k, rk, args.rec[k + 1], v);
    } else {
#pragma unroll
      for (int st = 0; st < NS; ++st)
#pragma unroll
        for (int u = 0; u < V; ++u) v[st][u] = f ? rb[st][r][u] : ra[r][u] * hp[st][u] + rb[st][r][u];
      if constexpr (Tr::UP) {
#pragma unroll
        for (int st = 0; st < NS; ++st) {
          A* up = accp(args.io.up[st], k);
#pragma unroll
          for (int u = 0; u < V; ++u) up[u] = v[st][u];
          if (args.io.loc[st] != nullptr) {
            A* lp = accp(args.io.loc[st], k);
#pragma unroll
            for (int u = 0; u < V; ++u) lp[u] = rb[st][r][u];
          }
        }
        if (args.io.out != nullptr) store<V>(rowp_out(args.io.out, rk.v), v[0]);
        if constexpr (MODE == M_UP_GW) {
          A gwv[V];
          if (rk.parent >= 0) {
            A hpar[V];
            load<V>(rowp(args.io.h, args.rec[rk.parent].v), hpar);
#pragma unroll
            for (int u = 0; u < V; ++u) gwv[u] = v[0][u] * hpar[u];
          } else {
#pragma unroll
            for (int u = 0; u < V; ++u) gwv[u] = A(0);
          }
          store<V>(rowp_out(args.io.gw, rk.v), gwv);
        }
      } else {
        store<V>(rowp_out(args.io.out, rk.v), v[0]);
        if constexpr (MODE == M_DOWN_GW) {
          A gwv[V];
          if (rk.parent >= 0) {
            A hv[V];
            load<V>(rowp(args.io.h, rk.v), hv);
            const A* pv = f ? accp(args.io.val, rk.parent) : nullptr;
#pragma unroll
            for (int u = 0; u < V; ++u) gwv[u] = hv[u] * (f ? pv[u] : hp[0][u]);
          } else {
#pragma unroll
            for (int u = 0; u < V; ++u) gwv[u] = A(0);
          }
          store<V>(rowp_out(args.io.gw, rk.v), gwv);
        }
        if (rk.light0 >= 0) {  // light heads read this value
          A* vp = accp(args.io.val, k);
#pragma unroll
          for (int u = 0; u < V; ++u) vp[u] = v[0][u];
        }
      }
    }
#pragma unroll
    for (int st = 0; st < NS; ++st)
#pragma unroll
      for (int u = 0; u < V; ++u) hp[st][u] = v[st][u];
  }

  // The brackets of k's light children: out[k] + in[k] + w[k+1] up[k+1] + the shares of
  // the other light children, by an exclusive prefix sum forwards and the suffix added
  // backwards.
  __device__ __forceinline__ void brackets(int k, const PathRec& rk, const PathRec& rn,
                                           const A (&o)[NS][V]) {
    A wh[V];
    load<V>(rowp(args.io.w, rn.v), wh);
#pragma unroll
    for (int st = 0; st < NS; ++st) {
      A run[V], xin[V];
      load<V>(rowp(args.io.in[st], rk.v), xin);
      const A* uh = accp(args.io.up[st], k + 1);
#pragma unroll
      for (int u = 0; u < V; ++u) run[u] = (o[st][u] + xin[u]) + wh[u] * uh[u];
      for (int j = rk.light_start; j < rn.light_start; ++j) {
        const int cj = args.light[j];
        if (cj < 0) break;
        A* bj = accp(args.io.br[st], cj);
        A wj[V];
        load<V>(rowp(args.io.w, args.rec[cj].v), wj);
        const A* uj = accp(args.io.up[st], cj);
#pragma unroll
        for (int u = 0; u < V; ++u) {
          bj[u] = run[u];
          run[u] += wj[u] * uj[u];
        }
      }
#pragma unroll
      for (int u = 0; u < V; ++u) run[u] = A(0);
      for (int j = rn.light_start - 1; j >= rk.light_start; --j) {
        const int cj = args.light[j];
        if (cj < 0) continue;
        A* bj = accp(args.io.br[st], cj);
        A wj[V];
        load<V>(rowp(args.io.w, args.rec[cj].v), wj);
        const A* uj = accp(args.io.up[st], cj);
#pragma unroll
        for (int u = 0; u < V; ++u) {
          bj[u] = bj[u] + run[u];
          run[u] += wj[u] * uj[u];
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------- "trees"
// One block per (tree, channel slice): every phase of the tree in order, each in chunks of
// P * RMAX positions chained by their carries.
template <typename T, typename A, int V, int MODE>
__global__ void tree_scan_kernel(const ScanArgs args) {
  using Tr = ModeTraits<MODE>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ChunkScan<T, A, V, MODE> cs(args, smem_raw, blockIdx.y);
  int* prow = reinterpret_cast<int*>(reinterpret_cast<A*>(smem_raw) + 2LL * kLanes * cs.G * cs.per);
  const int t = blockIdx.x;
  for (int i = threadIdx.x; i <= kMaxPhases; i += blockDim.x)
    prow[i] = args.path_ptr[args.phase_path[(int64_t)t * (kMaxPhases + 1) + i]];
  __syncthreads();
  constexpr int chunk = ChunkScan<T, A, V, MODE>::CHUNK;
  A carry[Tr::NS][V] = {};
  for (int n = 0; n < kMaxPhases; ++n) {
    const int p = Tr::UP ? kMaxPhases - 1 - n : n;
    const int s = prow[p], e = prow[p + 1];
    if (s >= e) continue;  // block-uniform
    const int m = e - s;
    for (int i0 = 0; i0 < m; i0 += chunk) cs.apply(s, e, i0, min(i0 + chunk, m), carry, i0 > 0);
  }
}

// ---------------------------------------------------------------------------- "phases"
// One phase [s, e) of the whole forest in chunks, one block per (chunk, channel slice).
template <typename T, typename A, int V, int MODE>
__global__ void phase_aggregate_kernel(const ScanArgs args) {
  using Tr = ModeTraits<MODE>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ChunkScan<T, A, V, MODE> cs(args, smem_raw, blockIdx.y);
  constexpr int chunk = ChunkScan<T, A, V, MODE>::CHUNK;
  const int m = args.e - args.s;
  const int i0 = blockIdx.x * chunk;
  typename ChunkScan<T, A, V, MODE>::Aff total;
  cs.aggregate(args.s, args.e, i0, min(i0 + chunk, m), total);
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
__global__ void phase_apply_kernel(const ScanArgs args) {
  using Tr = ModeTraits<MODE>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ChunkScan<T, A, V, MODE> cs(args, smem_raw, blockIdx.y);
  constexpr int chunk = ChunkScan<T, A, V, MODE>::CHUNK;
  const int m = args.e - args.s;
  const int j = blockIdx.x;
  const int i0 = j * chunk;
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
  cs.apply(args.s, args.e, i0, min(i0 + chunk, m), carry, j > 0);
}

}  // namespace treessm_cuda
