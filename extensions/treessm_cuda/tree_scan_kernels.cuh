// Tree-scan kernels: level-synchronous dynamic programming over a rooted forest.
//
// One thread block owns one tree and one group of channels, and walks the tree's
// breadth-first levels (leaves first for the up pass, roots first for the down pass),
// with one __syncthreads between levels. Inside a level, vertices are independent, so
// the block's threads split them; each thread moves V consecutive channels of one
// vertex with a single vector access (channels-last rows).
//
// Values handed from one level to the next live in a position-space scratch
// (row i = the vertex at breadth-first position i): the children of position i are
// the contiguous positions child_ptr[i] .. child_ptr[i+1], so the up pass reads them as
// one run of rows, and the down pass reads its parent's row at parent_pos[i].
// Every output element is written by exactly one thread in a fixed order: the results
// are bitwise deterministic. Accumulation is float32 (float64 for double inputs).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "numeric.cuh"

#if !defined(__CUDACC__)
#include "async_copy.h"  // host emulation of cp.async
#endif

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

// The breadth-first plan of a forest (see treessm/tree.py and treessm/ops/cuda.py).
struct Plan {
  const int64_t* __restrict__ order;           // [N] vertex at each position
  const int64_t* __restrict__ child_ptr;       // [N+1] children of position i: [child_ptr[i], child_ptr[i+1]) clipped to the tree
  const int64_t* __restrict__ level_pos;       // [L+1] first position of each level, levels tree by tree
  const int64_t* __restrict__ tree_level_ptr;  // [T+1] levels of tree t: [tree_level_ptr[t], tree_level_ptr[t+1])
  const int64_t* __restrict__ parent_pos;      // [N] position of the parent of position i, -1 at roots
  const int64_t* __restrict__ parent_at_pos;   // [N] parent vertex of position i (parent[order[i]]), -1 at roots
};

// Values handed from one level to the next. Level l's values sit in shared memory at
// row (i - first position of l) when that is below `cap`, else in the global scratch row i;
// two shared buffers alternate between consecutive levels.
template <typename A, int V>
struct Ring {
  A* sh;             // [2][cap][cw]
  A* glob;           // [N, C] positions of levels wider than cap
  int cap, cw, loff;
  int64_t C, c;
  __device__ __forceinline__ void put(int buf, int64_t rel, int64_t i, const A (&r)[V]) const {
    if (rel < cap) store<V>(sh + ((int64_t)buf * cap + rel) * cw + loff, r);
    else store<V>(glob + i * C + c, r);
  }
  __device__ __forceinline__ void get(int buf, int64_t rel, int64_t i, A (&r)[V]) const {
    if (rel < cap) load<V>(sh + ((int64_t)buf * cap + rel) * cw + loff, r);
    else load<V>(glob + i * C + c, r);
  }
};

// Leaf-first pass. For NS input streams s (x, or x and g), computes
//   up_s[v] = s[v] + sum_{children c} w[c] * up_s[c]
// and writes it to up0/up1 (accumulator type, may be null) and/or `out` (type T).
// When gw is set (backward of direction "down"): gw[v] = up0[v] * h[parent[v]], 0 at roots.
// The loads that do not depend on the previous level (indices, x, w, h) of a thread's
// first vertex in the next level are issued before the current level is combined.
template <typename T, typename A, int V, int NS>
__global__ void up_pass_kernel(
    const T* __restrict__ x0, const T* __restrict__ x1, const T* __restrict__ w,
    A* __restrict__ up0, A* __restrict__ up1, T* __restrict__ out,
    const T* __restrict__ h, T* __restrict__ gw,
    A* __restrict__ cb0, A* __restrict__ cb1, const Plan plan, const int64_t C, const int lpv,
    const int cap) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int lane = threadIdx.x % lpv;
  const int slot = threadIdx.x / lpv;
  const int slots = blockDim.x / lpv;
  const int cw = lpv * V;
  const int64_t c = ((int64_t)blockIdx.y * lpv + lane) * V;
  const bool active = c < C;
  const int64_t t = blockIdx.x;
  const int64_t l0 = plan.tree_level_ptr[t];
  const int64_t l1 = plan.tree_level_ptr[t + 1];
  // child_ptr ranges are clipped to the tree: the next tree's root follows its last leaf
  const int64_t tree_end = plan.level_pos[l1];
  const Ring<A, V> r0{smem, cb0, cap, cw, lane * V, C, c};
  const Ring<A, V> r1{smem + 2 * (int64_t)cap * cw, cb1, cap, cw, lane * V, C, c};

  struct Item {
    int64_t i, v, j0, j1, p;
    A s0[V], s1[V], wv[V], hp[V];
  };
  auto fetch = [&](Item& it, int64_t i) {
    it.i = i;
    it.v = plan.order[i];
    it.j0 = plan.child_ptr[i];
    it.j1 = min(plan.child_ptr[i + 1], tree_end);
    load<V>(x0 + it.v * C + c, it.s0);
    if (NS == 2) load<V>(x1 + it.v * C + c, it.s1);
    load<V>(w + it.v * C + c, it.wv);
    if (gw != nullptr) {
      it.p = plan.parent_at_pos[i];
      if (it.p >= 0) load<V>(h + it.p * C + c, it.hp);
    }
  };
  // a: first position of this level; ca: first position of the level below (children)
  auto finish = [&](Item& it, int64_t a, int64_t ca, int buf, bool root_level) {
    A tmp[V];
    for (int64_t j = it.j0; j < it.j1; ++j) {
      r0.get(buf ^ 1, j - ca, j, tmp);
#pragma unroll
      for (int q = 0; q < V; ++q) it.s0[q] += tmp[q];
      if (NS == 2) {
        r1.get(buf ^ 1, j - ca, j, tmp);
#pragma unroll
        for (int q = 0; q < V; ++q) it.s1[q] += tmp[q];
      }
    }
    if (up0 != nullptr) store<V>(up0 + it.v * C + c, it.s0);
    if (NS == 2 && up1 != nullptr) store<V>(up1 + it.v * C + c, it.s1);
    if (out != nullptr) store<V>(out + it.v * C + c, it.s0);
    if (!root_level) {  // hand w * up to the parent
#pragma unroll
      for (int q = 0; q < V; ++q) tmp[q] = it.wv[q] * it.s0[q];
      r0.put(buf, it.i - a, it.i, tmp);
      if (NS == 2) {
#pragma unroll
        for (int q = 0; q < V; ++q) tmp[q] = it.wv[q] * it.s1[q];
        r1.put(buf, it.i - a, it.i, tmp);
      }
      if (gw != nullptr) {
#pragma unroll
        for (int q = 0; q < V; ++q) tmp[q] = it.hp[q] * it.s0[q];
        store<V>(gw + it.v * C + c, tmp);
      }
    } else if (gw != nullptr) {
#pragma unroll
      for (int q = 0; q < V; ++q) tmp[q] = A(0);
      store<V>(gw + it.v * C + c, tmp);
    }
  };

  // Two levels of look-ahead: while level l is combined, the independent loads of the
  // thread's first vertex in levels l-1 and l-2 are in flight.
  int buf = 0;
  int64_t ca = tree_end;  // the deepest level has no children
  int64_t b = tree_end;
  int64_t a = plan.level_pos[l1 - 1];
  int64_t na = (l1 - 2 >= l0) ? plan.level_pos[l1 - 2] : a;
  Item n1, n2;
  bool h1 = active && a + slot < b;
  if (h1) fetch(n1, a + slot);
  bool h2 = active && l1 - 2 >= l0 && na + slot < a;
  if (h2) fetch(n2, na + slot);
  for (int64_t l = l1 - 1; l >= l0; --l) {
    Item cur = n1;
    const bool hc = h1;
    n1 = n2;
    h1 = h2;
    const int64_t nna = (l - 2 >= l0) ? plan.level_pos[l - 2] : na;
    h2 = active && l - 2 >= l0 && nna + slot < na;
    if (h2) fetch(n2, nna + slot);
    if (hc) finish(cur, a, ca, buf, l == l0);
    if (active) {
      for (int64_t i = a + slot + slots; i < b; i += slots) {
        Item it;
        fetch(it, i);
        finish(it, a, ca, buf, l == l0);
      }
    }
    __syncthreads();
    ca = a;
    b = a;
    a = na;
    na = nna;
    buf ^= 1;
  }
}

// Root-first passes. P = the running value at the parent (handed down through the ring).
//   DOWN_FWD : r = src + w P                      (src = x)          root: r = src
//   BOTH_FWD : r = w P + (1 - w^2) U              (U = up(x))        root: r = U
//   UP_BWD   : r = src + w P, gw = h[v] P         (src = g)          root: r = src, gw = 0
//   BOTH_BWD : r = w P + (1 - w^2) G,             (U = up(x), G = up(g))
//              gw = U P + G h[p] - 2 w U G                          root: r = G, gw = 0
enum Mode { DOWN_FWD = 0, BOTH_FWD = 1, UP_BWD = 2, BOTH_BWD = 3 };

template <typename T, typename A, int V, int MODE>
__global__ void down_pass_kernel(
    const T* __restrict__ src, const A* __restrict__ U, const A* __restrict__ G,
    const T* __restrict__ w, const T* __restrict__ h, T* __restrict__ out, T* __restrict__ gw,
    A* __restrict__ val, const Plan plan, const int64_t C, const int lpv, const int cap) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int lane = threadIdx.x % lpv;
  const int slot = threadIdx.x / lpv;
  const int slots = blockDim.x / lpv;
  const int cw = lpv * V;
  const int64_t c = ((int64_t)blockIdx.y * lpv + lane) * V;
  const bool active = c < C;
  const int64_t t = blockIdx.x;
  const int64_t l0 = plan.tree_level_ptr[t];
  const int64_t l1 = plan.tree_level_ptr[t + 1];
  constexpr bool BWD = (MODE == UP_BWD || MODE == BOTH_BWD);
  const Ring<A, V> ring{smem, val, cap, cw, lane * V, C, c};

  struct Item {
    int64_t i, v, pp;
    A base[V], u[V], wv[V], hx[V];
  };
  auto fetch = [&](Item& it, int64_t i) {
    it.i = i;
    it.v = plan.order[i];
    it.pp = plan.parent_pos[i];
    const int64_t row = it.v * C + c;
    if (MODE == DOWN_FWD || MODE == UP_BWD) load<V>(src + row, it.base);
    if (MODE == BOTH_FWD || MODE == BOTH_BWD) load<V>(U + row, it.u);
    if (MODE == BOTH_BWD) load<V>(G + row, it.base);
    if (MODE == BOTH_FWD) {
#pragma unroll
      for (int q = 0; q < V; ++q) it.base[q] = it.u[q];
    }
    if (it.pp >= 0) {
      load<V>(w + row, it.wv);
      if (MODE == UP_BWD) load<V>(h + row, it.hx);
      if (MODE == BOTH_BWD) load<V>(h + plan.parent_at_pos[i] * C + c, it.hx);
    }
  };
  // pa: first position of the parents' level
  auto finish = [&](Item& it, int64_t a, int64_t pa, int buf) {
    A r[V], g[V];
    if (it.pp < 0) {
#pragma unroll
      for (int q = 0; q < V; ++q) { r[q] = it.base[q]; g[q] = A(0); }
    } else {
      A pv[V];
      ring.get(buf ^ 1, it.pp - pa, it.pp, pv);
      if (MODE == DOWN_FWD || MODE == UP_BWD) {
#pragma unroll
        for (int q = 0; q < V; ++q) r[q] = it.base[q] + it.wv[q] * pv[q];
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q)
          r[q] = it.wv[q] * pv[q] + (A(1) - it.wv[q] * it.wv[q]) * it.base[q];
      }
      if (MODE == UP_BWD) {
#pragma unroll
        for (int q = 0; q < V; ++q) g[q] = it.hx[q] * pv[q];
      }
      if (MODE == BOTH_BWD) {
#pragma unroll
        for (int q = 0; q < V; ++q)
          g[q] = it.u[q] * pv[q] + it.base[q] * it.hx[q] - A(2) * it.wv[q] * it.u[q] * it.base[q];
      }
    }
    ring.put(buf, it.i - a, it.i, r);
    store<V>(out + it.v * C + c, r);
    if (BWD) store<V>(gw + it.v * C + c, g);
  };

  // Two levels of look-ahead, as in the up pass.
  int buf = 0;
  int64_t pa = 0;
  int64_t a = plan.level_pos[l0];
  int64_t b = plan.level_pos[l0 + 1];
  int64_t nb = (l0 + 1 < l1) ? plan.level_pos[l0 + 2] : b;
  Item n1, n2;
  bool h1 = active && a + slot < b;
  if (h1) fetch(n1, a + slot);
  bool h2 = active && l0 + 1 < l1 && b + slot < nb;
  if (h2) fetch(n2, b + slot);
  for (int64_t l = l0; l < l1; ++l) {
    Item cur = n1;
    const bool hc = h1;
    n1 = n2;
    h1 = h2;
    const int64_t nnb = (l + 2 < l1) ? plan.level_pos[l + 3] : nb;
    h2 = active && l + 2 < l1 && nb + slot < nnb;
    if (h2) fetch(n2, nb + slot);
    if (hc) finish(cur, a, pa, buf);
    if (active) {
      for (int64_t i = a + slot + slots; i < b; i += slots) {
        Item it;
        fetch(it, i);
        finish(it, a, pa, buf);
      }
    }
    __syncthreads();
    pa = a;
    a = b;
    b = nb;
    nb = nnb;
    buf ^= 1;
  }
}


// ======================================================================================
// Staged scan (the default): the same level-synchronous recurrences, with every global
// read taken off the chain of levels.
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
// from global memory directly. The arithmetic, the order of every sum and hence the
// results are those of the kernels above.
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
  S_BOTH_BWD = 6,  // backward of "both" (see down_pass_kernel)
};

template <bool B, typename X, typename Y> struct Pick { using type = X; };
template <typename X, typename Y> struct Pick<false, X, Y> { using type = Y; };

// Arguments of the staged kernel; pointers a mode does not use are null.
struct StagedArgs {
  const void* in0;  // x, g or U (mode-dependent type)
  const void* in1;  // g (S_UP2) or G (S_BOTH_BWD)
  const void* w;
  const void* h;    // forward output (backward modes)
  void* up0;        // A-typed outputs of leaf-first passes (U, G)
  void* up1;
  void* out;        // T-typed output (h or gx)
  void* gw;
  void* val0;       // [N, C] global rows of levels wider than `cap`
  void* val1;
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
  const Hand<A, V> r0{reinterpret_cast<A*>(args.val0), args.cap, cw, C, c};
  const Hand<A, V> r1{reinterpret_cast<A*>(args.val1), args.cap, cw, C, c};

  const E0* in0 = reinterpret_cast<const E0*>(args.in0);
  const E1* in1 = reinterpret_cast<const E1*>(args.in1);
  const T* w = reinterpret_cast<const T*>(args.w);
  const T* h = reinterpret_cast<const T*>(args.h);
  A* up0 = reinterpret_cast<A*>(args.up0);
  A* up1 = reinterpret_cast<A*>(args.up1);
  T* out = reinterpret_cast<T*>(args.out);
  T* gw = reinterpret_cast<T*>(args.gw);

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
      A r[V], g[V];
      const int pp = it.x1;
      if (pp < 0) {
#pragma unroll
        for (int q = 0; q < V; ++q) {
          r[q] = MODE == S_BOTH_BWD ? it.a1[q] : it.a0[q];
          g[q] = A(0);
        }
      } else {
        A pv[V];
        r0.get(prev0, pp - pf, pp, pv);
        if (MODE == S_DOWN || MODE == S_UP_BWD) {
#pragma unroll
          for (int q = 0; q < V; ++q) r[q] = it.a0[q] + it.wv[q] * pv[q];
        } else if (MODE == S_BOTH) {
#pragma unroll
          for (int q = 0; q < V; ++q)
            r[q] = it.wv[q] * pv[q] + (A(1) - it.wv[q] * it.wv[q]) * it.a0[q];
        } else {  // S_BOTH_BWD: a0 = U, a1 = G
#pragma unroll
          for (int q = 0; q < V; ++q)
            r[q] = it.wv[q] * pv[q] + (A(1) - it.wv[q] * it.wv[q]) * it.a1[q];
        }
        if (MODE == S_UP_BWD) {
#pragma unroll
          for (int q = 0; q < V; ++q) g[q] = it.hx[q] * pv[q];
        }
        if (MODE == S_BOTH_BWD) {
#pragma unroll
          for (int q = 0; q < V; ++q)
            g[q] = it.a0[q] * pv[q] + it.a1[q] * it.hx[q] - A(2) * it.wv[q] * it.a0[q] * it.a1[q];
        }
      }
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
