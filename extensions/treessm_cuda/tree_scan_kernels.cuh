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

namespace treessm_cuda {

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

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

}  // namespace treessm_cuda
