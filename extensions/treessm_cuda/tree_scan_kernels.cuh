// Tree-scan kernels, level schedule: level-synchronous dynamic programming over a rooted
// forest (the recurrences of docs/concepts.md; the plan: treessm/ops/plan.py).
//
// One thread block owns one tree and one group of channels, and walks the tree's
// breadth-first levels (leaves first for the up pass, roots first for the down pass),
// with one __syncthreads between levels. Inside a level, vertices are independent, so
// the block's threads split them; each thread moves V consecutive channels of one
// vertex with a single vector access (channels-last rows).
//
// Values handed from one level to the next live in shared memory, or in a position-space
// scratch for wide levels (row i = the vertex at breadth-first position i): the children
// of position i are the contiguous positions child_ptr[i] .. child_ptr[i+1], so the up
// pass reads them as one run of rows, and the down pass reads its parent's row at
// parent_pos[i]. Every output element is written by exactly one thread in a fixed order:
// the results are bitwise deterministic. Accumulation is float32 (float64 for double).
//
// Host builds of this header (the emulation harness under tests/extensions) declare
// treessm_emu::issue / commit / wait, the stand-ins for cp.async, before including it.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "numeric.cuh"

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

// The level plan of a forest (treessm.ops.plan.LevelPlan, with the tree's layout).
struct Plan {
  const int64_t* __restrict__ order;           // [N] vertex at each position
  const int64_t* __restrict__ child_ptr;       // [N+1] children of position i: [child_ptr[i], child_ptr[i+1]) clipped to the tree
  const int64_t* __restrict__ level_pos;       // [L+1] first position of each level, levels tree by tree
  const int64_t* __restrict__ tree_level_ptr;  // [T+1] levels of tree t: [tree_level_ptr[t], tree_level_ptr[t+1])
  const int64_t* __restrict__ parent_pos;      // [N] position of the parent of position i, -1 at roots
  const int64_t* __restrict__ parent_at_pos;   // [N] parent vertex of position i (parent[order[i]]), -1 at roots
};

// ======================================================================================
// Staged level scan: every global read taken off the chain of levels.
//
// A tree is a contiguous run of breadth-first positions and its levels are contiguous
// sub-runs, so the block walks a "stream" of positions (ascending for root-first passes,
// descending for leaf-first ones) and knows long in advance which rows it will need.
// Three rings in shared memory are filled with asynchronous copies (cp.async) ahead of the
// level being combined:
//   - the level bounds, 32 levels at a time;
//   - the index record of each position (vertex id, child range or parent position, parent
//     vertex), up to 2R positions ahead;
//   - the input rows of each position (x or U/G, w, h), up to R positions ahead, issued
//     once the position's index record has landed.
// Each level commits one copy group; before combining a level the block waits for the
// newest group that staged part of it (at most D-1 newer groups stay in flight), so copies
// run up to R positions ahead while levels are combined from shared memory only.
// Positions that the rings could not stage in time (levels wider than the rings) are read
// from global memory directly.
// ======================================================================================

template <int BYTES> struct alignas(BYTES) RawBytes { unsigned char b[BYTES]; };

// Asynchronous global -> shared copy of BYTES bytes (both aligned to BYTES).
template <int BYTES>
__device__ __forceinline__ void copy_async(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  if constexpr (BYTES == 16) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
    return;
  } else if constexpr (BYTES == 4 || BYTES == 8) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(BYTES)
                 : "memory");
    return;
  }
#endif
  *reinterpret_cast<RawBytes<BYTES>*>(dst) = *reinterpret_cast<const RawBytes<BYTES>*>(src);
#elif !defined(__CUDACC__)
  treessm_emu::issue(dst, src, BYTES);
#else
  (void)dst;
  (void)src;
#endif
}

__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif !defined(__CUDA_ARCH__) && !defined(__CUDACC__)
  treessm_emu::commit();
#endif
}

// Wait until at most N committed groups of this thread are pending.
template <int N>
__device__ __forceinline__ void copy_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif !defined(__CUDA_ARCH__) && !defined(__CUDACC__)
  treessm_emu::wait(N);
#endif
}

// copy_wait<m> for a run-time m in [0, M] (m above M waits for M).
template <int M>
__device__ __forceinline__ void copy_wait_upto(int m) {
  if constexpr (M > 0) {
    if (m >= M) {
      copy_wait<M>();
      return;
    }
    copy_wait_upto<M - 1>(m);
  } else {
    (void)m;
    copy_wait<0>();
  }
}

enum StagedMode {
  S_UP = 0,        // up = x + sum_c w_c up_c  -> up0 (A) and/or out (T)
  S_UP2 = 1,       // two streams at once (x and g): U, G for the backward of "both"
  S_UP_GW = 2,     // backward of "down": gx = up(g), gw = gx[v] h[parent]
  S_DOWN = 3,      // down = x + w down_parent
  S_BOTH = 4,      // h = w h_parent + (1 - w^2) U
  S_UP_BWD = 5,    // backward of "up": gx = g + w gx_parent, gw = h[v] gx_parent
  S_BOTH_BWD = 6,  // backward of "both": gx = both(g), gw = U P + G h[p] - 2 w U G
};

template <bool B, typename X, typename Y> struct Pick { using type = X; };
template <typename X, typename Y> struct Pick<false, X, Y> { using type = Y; };

// The tensors of one pass (shared by both schedules); pointers a mode does not use are null.
struct ScanIO {
  const void* in0;  // x, g or U (mode-dependent type)
  const void* in1;  // g (S_UP2) or G (S_BOTH_BWD)
  const void* w;
  const void* h;    // forward output (backward modes)
  void* up0;        // A-typed outputs of leaf-first passes (U, G)
  void* up1;
  void* out;        // T-typed output (h or gx)
  void* gw;
  void* val0;       // [N, C] accumulator rows handed between levels or paths
  void* val1;       // second stream (S_UP2)
};

// Arguments of the staged level kernel.
struct StagedArgs {
  ScanIO io;
  Plan plan;
  int64_t C;
  int lpv;          // threads per row
  int cap;          // rows per level handed on in shared memory
  int ring;         // R: positions of staged rows (power of two); index records: 2R
};

template <int MODE> struct StagedTraits {
  static constexpr bool UP = MODE <= S_UP_GW;
  static constexpr int NS = MODE == S_UP2 ? 2 : 1;
  static constexpr bool IN1 = MODE == S_UP2 || MODE == S_BOTH_BWD;
  static constexpr bool H = MODE == S_UP_GW || MODE == S_UP_BWD || MODE == S_BOTH_BWD;
  static constexpr bool H_PARENT = MODE == S_UP_GW || MODE == S_BOTH_BWD;
  static constexpr bool IN0_ACC = MODE == S_BOTH || MODE == S_BOTH_BWD;
  static constexpr bool IN1_ACC = MODE == S_BOTH_BWD;
};

// One root-first step of a mode, given the vertex's inputs (a0: x, g or U; a1: G; wv: its
// weight; hx: h at the vertex or its parent) and the value pv of its parent: the vertex's
// value r and, for the backward modes, its weight gradient g (both written for the root too).
template <int MODE, typename A, int V>
__device__ __forceinline__ void root_first_step(bool root, const A (&a0)[V], const A (&a1)[V],
                                                const A (&wv)[V], const A (&hx)[V],
                                                const A (&pv)[V], A (&r)[V], A (&g)[V]) {
  if (root) {
#pragma unroll
    for (int q = 0; q < V; ++q) {
      r[q] = MODE == S_BOTH_BWD ? a1[q] : a0[q];
      g[q] = A(0);
    }
    return;
  }
#pragma unroll
  for (int q = 0; q < V; ++q) {
    if (MODE == S_DOWN || MODE == S_UP_BWD) r[q] = a0[q] + wv[q] * pv[q];
    else if (MODE == S_BOTH) r[q] = wv[q] * pv[q] + (A(1) - wv[q] * wv[q]) * a0[q];
    else r[q] = wv[q] * pv[q] + (A(1) - wv[q] * wv[q]) * a1[q];  // S_BOTH_BWD: a0 = U, a1 = G
    if (MODE == S_UP_BWD) g[q] = hx[q] * pv[q];
    else if (MODE == S_BOTH_BWD) g[q] = a0[q] * pv[q] + a1[q] * hx[q] - A(2) * wv[q] * a0[q] * a1[q];
    else g[q] = A(0);
  }
}

constexpr int kLevelRing = 128;  // level bounds in shared memory
constexpr int kIndexWords = 4;   // int64 words of one position's index record

// Shared memory of the staged kernel for R staged positions, cw channels per row.
template <int MODE>
__host__ __device__ inline int64_t staged_smem_bytes(int ring, int cw, int cap, int t_size,
                                                     int a_size) {
  using Tr = StagedTraits<MODE>;
  const int64_t e0 = Tr::IN0_ACC ? a_size : t_size;
  const int64_t e1 = Tr::IN1 ? (Tr::IN1_ACC ? a_size : t_size) : 0;
  const int64_t rows = (int64_t)ring * cw * (e0 + e1 + t_size + (Tr::H ? t_size : 0));
  const int64_t idx = 2LL * ring * kIndexWords * 8 + kLevelRing * 8;
  const int64_t vals = (int64_t)Tr::NS * 2 * cap * cw * a_size;
  return idx + rows + vals;
}

// Shared-memory half of a Ring for 32-bit indices (the staged kernel's positions are
// below 2^31; the launcher checks): `cur` and `prev` point at this lane's columns of the two
// buffers.
template <typename A, int V>
struct Hand {
  A* glob;
  int cap, cw;
  int64_t C, c;
  __device__ __forceinline__ void put(A* cur, int rel, int i, const A (&r)[V]) const {
    if (rel < cap) store<V>(cur + rel * cw, r);
    else store<V>(glob + (int64_t)i * C + c, r);
  }
  __device__ __forceinline__ void get(const A* prev, int rel, int i, A (&r)[V]) const {
    if (rel < cap) load<V>(prev + rel * cw, r);
    else load<V>(glob + (int64_t)i * C + c, r);
  }
};

// Low 32 bits of a staged int64 (little-endian): plan entries are below 2^31 here.
__device__ __forceinline__ int lo32(const int64_t* p) { return *reinterpret_cast<const int*>(p); }

template <typename T, typename A, int V, int MODE>
__global__ void staged_scan_kernel(const StagedArgs args) {
  using Tr = StagedTraits<MODE>;
  constexpr bool UP = Tr::UP;
  using E0 = typename Pick<Tr::IN0_ACC, A, T>::type;
  using E1 = typename Pick<Tr::IN1_ACC, A, T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Plan& plan = args.plan;
  const int64_t C = args.C;
  const int lpv = args.lpv;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int lane = tid % lpv;
  const int slot = tid / lpv;
  const int slots = nthreads / lpv;
  const int cw = lpv * V;
  const int64_t c = ((int64_t)blockIdx.y * lpv + lane) * V;
  const bool active = c < C;
  const int64_t t = blockIdx.x;
  const int l0 = (int)plan.tree_level_ptr[t];
  const int l1 = (int)plan.tree_level_ptr[t + 1];
  const int nl = l1 - l0;
  if (nl <= 0) return;
  const int ts = (int)plan.level_pos[l0];
  const int te = (int)plan.level_pos[l1];
  const int n = te - ts;
  const int R = args.ring;
  const int IR = 2 * R;

  // shared memory: index records, level bounds, staged rows, values between levels
  int64_t* idx = reinterpret_cast<int64_t*>(smem_raw);
  int64_t* lvl = idx + (int64_t)IR * kIndexWords;
  unsigned char* p = reinterpret_cast<unsigned char*>(lvl + kLevelRing);
  E0* st0 = reinterpret_cast<E0*>(p);
  p += (int64_t)R * cw * sizeof(E0);
  E1* st1 = reinterpret_cast<E1*>(p);
  if (Tr::IN1) p += (int64_t)R * cw * sizeof(E1);
  T* stw = reinterpret_cast<T*>(p);
  p += (int64_t)R * cw * sizeof(T);
  T* sth = reinterpret_cast<T*>(p);
  if (Tr::H) p += (int64_t)R * cw * sizeof(T);
  A* vals0 = reinterpret_cast<A*>(p) + lane * V;          // [2][cap][cw], this lane's columns
  A* vals1 = vals0 + 2 * args.cap * cw;                    // second stream (S_UP2)
  const int vbuf = args.cap * cw;                          // elements of one buffer
  const Hand<A, V> r0{reinterpret_cast<A*>(args.io.val0), args.cap, cw, C, c};
  const Hand<A, V> r1{reinterpret_cast<A*>(args.io.val1), args.cap, cw, C, c};

  const E0* in0 = reinterpret_cast<const E0*>(args.io.in0);
  const E1* in1 = reinterpret_cast<const E1*>(args.io.in1);
  const T* w = reinterpret_cast<const T*>(args.io.w);
  const T* h = reinterpret_cast<const T*>(args.io.h);
  A* up0 = reinterpret_cast<A*>(args.io.up0);
  A* up1 = reinterpret_cast<A*>(args.io.up1);
  T* out = reinterpret_cast<T*>(args.io.out);
  T* gw = reinterpret_cast<T*>(args.io.gw);

  // stream index s <-> breadth-first position
  auto pos = [&](int s) { return UP ? te - 1 - s : ts + s; };
  // level entry e <-> level_pos index (entries 0..nl); iteration k spans entries k, k+1
  auto issue_levels = [&](int e0, int e1) {
    for (int e = e0 + tid; e < e1; e += nthreads)
      copy_async<8>(lvl + (e & (kLevelRing - 1)), plan.level_pos + (UP ? l1 - e : l0 + e));
  };
  auto issue_index = [&](int s0, int s1) {
    for (int s = s0 + tid; s < s1; s += nthreads) {
      const int i = pos(s);
      int64_t* d = idx + (s & (IR - 1)) * kIndexWords;
      copy_async<8>(d, plan.order + i);
      if (UP) {
        copy_async<8>(d + 1, plan.child_ptr + i);
        copy_async<8>(d + 2, plan.child_ptr + i + 1);
      } else {
        copy_async<8>(d + 1, plan.parent_pos + i);
      }
      if (Tr::H_PARENT) copy_async<8>(d + 3, plan.parent_at_pos + i);
    }
  };
  auto issue_rows = [&](int s0, int s1) {
    if (!active) return;
    for (int s = s0 + slot; s < s1; s += slots) {
      const int64_t* d = idx + (s & (IR - 1)) * kIndexWords;
      const int64_t row = (int64_t)lo32(d) * C + c;
      const int r = (s & (R - 1)) * cw + lane * V;
      copy_async<V * sizeof(E0)>(st0 + r, in0 + row);
      if (Tr::IN1) copy_async<V * sizeof(E1)>(st1 + r, in1 + row);
      copy_async<V * sizeof(T)>(stw + r, w + row);
      if (Tr::H) {
        const int hv = Tr::H_PARENT ? lo32(d + 3) : lo32(d);
        if (hv >= 0) copy_async<V * sizeof(T)>(sth + r, h + (int64_t)hv * C + c);
      }
    }
  };

  // Copies go out in groups, one per "refill"; at most two groups are in flight. A refill
  // waits for the older one, so what it staged becomes readable (the *ready frontiers*:
  // stream positions below Fr have their rows staged, below IFr their index records, level
  // entries below Lr their bounds), then stages up to R rows, 2R index records and
  // kLevelRing level entries ahead of the level being combined. Slots are only ever
  // overwritten for positions (entries) behind that level. A refill runs when the level
  // being combined comes within R/4 positions of Fr, or within kLevelRing/4 levels of Lr,
  // so in the steady state the level loop does no bookkeeping beyond one comparison.
  // prologue: the first rings, waited for
  int Lr = min(kLevelRing, nl + 1);
  int IFr = min(IR, n);
  issue_levels(0, Lr);
  issue_index(0, IFr);
  copy_commit();
  copy_wait<0>();
  __syncthreads();
  int Fr = min(R, n);
  issue_rows(0, Fr);
  copy_commit();
  copy_wait<0>();
  __syncthreads();
  // frontiers of the older and the newer group in flight (empty groups at the start)
  int Fo = Fr, Fn = Fr, IFo = IFr, IFn = IFr, Lo = Lr, Ln = Lr;
  const int margin = R / 4;
  constexpr int lmargin = kLevelRing / 4;

  auto level_start = [&](int e) {  // stream index of level entry e
    const int v = e < Lr ? lo32(lvl + (e & (kLevelRing - 1)))
                         : (int)plan.level_pos[UP ? l1 - e : l0 + e];
    return UP ? te - v : v - ts;
  };

  // One vertex of a level: what can be read before the level's turn (index record, input
  // rows) is fetched into registers a level ahead; `finish` then only waits for the values
  // handed on by the previous level.
  struct Item {
    int i, v, x1, x2, x3;
    A a0[V], a1[V], wv[V], hx[V];
  };
  auto fetch = [&](Item& it, int s) {
    const int i = pos(s);
    it.i = i;
    if (s < IFr) {
      const int64_t* d = idx + (s & (IR - 1)) * kIndexWords;
      it.v = lo32(d);
      it.x1 = lo32(d + 1);
      it.x2 = UP ? lo32(d + 2) : 0;
      it.x3 = Tr::H_PARENT ? lo32(d + 3) : -1;
    } else {
      it.v = (int)plan.order[i];
      it.x1 = (int)(UP ? plan.child_ptr[i] : plan.parent_pos[i]);
      it.x2 = UP ? (int)plan.child_ptr[i + 1] : 0;
      it.x3 = Tr::H_PARENT ? (int)plan.parent_at_pos[i] : -1;
    }
    const int hv = Tr::H_PARENT ? it.x3 : it.v;
    if (s < Fr) {
      const int r = (s & (R - 1)) * cw + lane * V;
      load<V>(st0 + r, it.a0);
      if (Tr::IN1) load<V>(st1 + r, it.a1);
      load<V>(stw + r, it.wv);
      if (Tr::H && hv >= 0) load<V>(sth + r, it.hx);
    } else {
      const int64_t row = (int64_t)it.v * C + c;
      load<V>(in0 + row, it.a0);
      if (Tr::IN1) load<V>(in1 + row, it.a1);
      load<V>(w + row, it.wv);
      if (Tr::H && hv >= 0) load<V>(h + (int64_t)hv * C + c, it.hx);
    }
  };
  // combine one vertex of level k (positions from `first`; the previous level's from `pf`)
  auto finish = [&](Item& it, int k, int first, int pf, A* cur0, A* cur1, const A* prev0,
                    const A* prev1) {
    const int64_t row = (int64_t)it.v * C + c;
    const int i = it.i;
    A tmp[V];
    if (UP) {
      // children: positions [x1, min(x2, te)) of the previous (deeper) level
      const int j1 = min(it.x2, te);
      for (int j = it.x1; j < j1; ++j) {
        r0.get(prev0, j - pf, j, tmp);
#pragma unroll
        for (int q = 0; q < V; ++q) it.a0[q] += tmp[q];
        if (Tr::NS == 2) {
          r1.get(prev1, j - pf, j, tmp);
#pragma unroll
          for (int q = 0; q < V; ++q) it.a1[q] += tmp[q];
        }
      }
      const bool root_level = (k == nl - 1);
      if (!root_level) {  // hand w * up to the parent
#pragma unroll
        for (int q = 0; q < V; ++q) tmp[q] = it.wv[q] * it.a0[q];
        r0.put(cur0, i - first, i, tmp);
        if (Tr::NS == 2) {
#pragma unroll
          for (int q = 0; q < V; ++q) tmp[q] = it.wv[q] * it.a1[q];
          r1.put(cur1, i - first, i, tmp);
        }
      }
      if (up0 != nullptr) store<V>(up0 + row, it.a0);
      if (Tr::NS == 2 && up1 != nullptr) store<V>(up1 + row, it.a1);
      if (out != nullptr) store<V>(out + row, it.a0);
      if (MODE == S_UP_GW) {
#pragma unroll
        for (int q = 0; q < V; ++q) tmp[q] = root_level ? A(0) : it.hx[q] * it.a0[q];
        store<V>(gw + row, tmp);
      }
    } else {
      A r[V], g[V], pv[V];
      const int pp = it.x1;
      if (pp >= 0) r0.get(prev0, pp - pf, pp, pv);
      root_first_step<MODE, A, V>(pp < 0, it.a0, it.a1, it.wv, it.hx, pv, r, g);
      r0.put(cur0, i - first, i, r);
      store<V>(out + row, r);
      if (MODE == S_UP_BWD || MODE == S_BOTH_BWD) store<V>(gw + row, g);
    }
  };

  int buf = 0;
  int prev_first = 0;  // first position of the previous level
  int La = 0;
  int Lb = level_start(1);
  Item nx;
  bool has_nx = active && slot < Lb;
  if (has_nx) fetch(nx, slot);
  for (int k = 0; k < nl; ++k) {
    const bool more = k + 1 < nl;
    const int Lc = more ? level_start(k + 2) : Lb;  // end of the next level
    if ((Fr < n && Lc + margin > Fr) || (Lr <= nl && k + 2 + lmargin >= Lr)) {
      // refill (block-uniform condition)
      copy_wait<1>();
      __syncthreads();
      Fr = Fo;
      IFr = IFo;
      Lr = Lo;
      const int Lt = min(k + kLevelRing, nl + 1);
      if (Lt > Ln) issue_levels(Ln, Lt);
      const int IFs = max(IFn, La);
      const int IFt = min(La + IR, n);
      if (IFt > IFs) issue_index(IFs, IFt);
      const int Fs = max(Fn, La);
      const int Ft = min(min(La + R, IFr), n);
      if (Ft > Fs) issue_rows(Fs, Ft);
      copy_commit();
      Fo = Fn;
      IFo = IFn;
      Lo = Ln;
      Fn = max(Fn, Ft);
      IFn = max(IFn, IFt);
      Ln = max(Ln, Lt);
    }
    Item cu = nx;
    const bool has_cu = has_nx;
    // the next level's first vertex of this thread, while this level is combined
    has_nx = active && more && Lb + slot < Lc;
    if (has_nx) fetch(nx, Lb + slot);

    // combine level k: stream [La, Lb), positions [first, first + Lb - La)
    const int first = UP ? te - Lb : ts + La;
    A* cur0 = vals0 + buf * vbuf;
    A* cur1 = vals1 + buf * vbuf;
    const A* prev0 = vals0 + (buf ^ 1) * vbuf;
    const A* prev1 = vals1 + (buf ^ 1) * vbuf;
    if (has_cu) finish(cu, k, first, prev_first, cur0, cur1, prev0, prev1);
    if (active) {
      for (int s = La + slot + slots; s < Lb; s += slots) {
        Item it;
        fetch(it, s);
        finish(it, k, first, prev_first, cur0, cur1, prev0, prev1);
      }
    }
    __syncthreads();  // the level's values visible to the next level
    prev_first = first;
    La = Lb;
    Lb = Lc;
    buf ^= 1;
  }
  copy_wait<0>();
}

}  // namespace treessm_cuda
