// Tree-scan kernels of the "columns" schedule: one thread per (tree, channel) runs the
// recurrences of docs/concepts.md vertex by vertex along the tree's breadth-first positions,
// its values in a column of shared memory (one entry per position of the tree, the 32
// threads of a block side by side, so no access conflicts), or of global memory where the
// largest tree's columns do not fit (entries [j][N][C]). No thread waits for another:
// a small tree's scan is a few hundred shared-memory steps, not a block-wide step per
// heavy-path phase. With the columns in shared memory the block first copies its tree's
// records (vertex and parent of each position) beside them, once for all its passes; the
// rows of the next kAhead positions are loaded while the steps of the current ones run.
//
// Positions (treessm.Tree): a tree's positions are the contiguous range [tree_ptr[t],
// tree_ptr[t + 1]), every parent before its children, and the children of a vertex are
// consecutive positions. Passes:
//   - up, leaves first: U[i] = x[i] + the shares w[c] U[c] its children pushed into U[i];
//   - down, roots first: H[i] = x[i] + w[i] H[p];
//   - both: up; then, leaves first, each child's suffix S[i] = sum of w U over its later
//     siblings; then, roots first, the prefix over its earlier siblings, the bracket
//     br[i] = (out[p] + x[p]) + (prefix + suffix), out[i] = w[i] br[i] and h = U + out, and
//     S[i] <- out[i] + x[i] for i's own children: no share is ever subtracted back out.
// The backward of down is up of the gradient g (dL/dw[i] = G[i] h[p]), of up it is down of
// g (dL/dw[i] = h[i] G[p]); both is self-adjoint, and dL/dw[i] = U_x[i] br_g[i] + U_g[i]
// br_x[i] from the passes over x and g run side by side. Every sum runs in position order:
// results are bitwise deterministic. Accumulation is float32 (float64 for double).
//
// A chain (every position's parent the one before it) too long for shared memory needs no
// column in up and down and their backward: the value a step reads is the one the step
// before formed, kept in a register, so such a pass reads its rows and writes its outputs
// and nothing else (the same operations in the same order, so the same bits). A block
// finds whether its tree is one from the parents (one vote).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "numeric.cuh"

namespace treessm_cuda {
namespace columns {

constexpr int kThreads = 32;  // channels of a block
constexpr int kAhead = 8;     // positions of a chunk: two chunks' loads in flight

// a register buffer's index, known at compile time
template <int B> struct Buffer {
  __device__ __forceinline__ constexpr operator int() const { return B; }
};

enum Mode { kUp = 0, kDown = 1, kBoth = 2, kUpGrad = 3, kDownGrad = 4, kBothGrad = 5 };

// Shared-memory entries a thread keeps per position of its tree.
__host__ __device__ constexpr int columns_of(int mode) {
  return mode == kBoth ? 2 : (mode == kBothGrad ? 4 : 1);
}

template <typename T> struct Args {
  const T* x;    // [N, C]: the input (forward) or the output's gradient (backward)
  const T* x2;   // both's backward: the forward input
  const T* w;    // [N, C]: weight of the edge to the parent
  const T* h;    // the forward output (the backward of up and down)
  T* out;        // h (forward) or dL/dx (backward)
  T* gw;         // dL/dw (backward)
  const int* order;     // vertex at each position
  const int* parent;    // parent position, -1 at roots
  const int* tree_ptr;  // [T + 1]
  int64_t C;
  int groups;  // channel groups of kThreads
  int stride;  // positions of a shared-memory column: the largest tree
  int64_t N;
  void* scratch;  // [columns_of(MODE), N, C] accumulators when the columns are in global memory
};

// Runs step(i, k, b) for the positions of [s, e) (roots first: s first; else e - 1 first)
// in chunks of kAhead; load(i, k, b) fills slot k of register buffer b with position i's
// record and rows. The loads of a chunk are issued before the steps of the one before it
// run (buffers 0 and 1 alternate; b is a constant at every call).
template <bool ROOTS_FIRST, typename Load, typename Step>
__device__ __forceinline__ void sweep(int s, int e, Load&& load, Step&& step) {
  const int n = e - s;
  auto position = [&](int j) { return ROOTS_FIRST ? s + j : e - 1 - j; };
  auto load_chunk = [&](int base, auto b) {
#pragma unroll
    for (int k = 0; k < kAhead; ++k)
      if (base + k < n) load(position(base + k), k, b);
  };
  auto step_chunk = [&](int base, auto b) {
#pragma unroll
    for (int k = 0; k < kAhead; ++k)
      if (base + k < n) step(position(base + k), k, b);
  };
  const Buffer<0> first;
  const Buffer<1> second;
  load_chunk(0, first);
  for (int base = 0; base < n; base += 2 * kAhead) {
    load_chunk(base + kAhead, second);
    step_chunk(base, first);
    load_chunk(base + 2 * kAhead, first);
    step_chunk(base + kAhead, second);
  }
}

template <typename T>
__device__ __forceinline__ typename AccType<T>::type load_acc(const T* p) {
  return static_cast<typename AccType<T>::type>(to_acc(__ldg(p)));
}

// Shared-memory bytes of a block's columns, where its tree's records start.
template <typename A>
__host__ __device__ constexpr int64_t columns_bytes(int mode, int64_t stride) {
  return static_cast<int64_t>(columns_of(mode)) * stride * kThreads * static_cast<int64_t>(sizeof(A));
}

// Shared-memory bytes of a block: its columns, then its tree's records (two ints a position).
template <typename A>
__host__ __device__ constexpr int64_t shared_bytes(int mode, int64_t stride) {
  return columns_bytes<A>(mode, stride) + stride * 2 * static_cast<int64_t>(sizeof(int));
}

template <typename T, int MODE, bool SHARED>
__global__ void __launch_bounds__(kThreads) column_scan_kernel(const Args<T> a) {
  using A = typename AccType<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* sm = SHARED ? reinterpret_cast<A*>(smem_raw) : static_cast<A*>(a.scratch);
  const int t = static_cast<int>(blockIdx.x) / a.groups;
  const int s = a.tree_ptr[t], e = a.tree_ptr[t + 1];
  // the records: vertex and parent position of position s + j at [j] and [stride + j]
  int* records = reinterpret_cast<int*>(smem_raw + columns_bytes<A>(MODE, a.stride));
  if (SHARED) {
    for (int i = s + static_cast<int>(threadIdx.x); i < e; i += kThreads) {
      records[i - s] = __ldg(a.order + i);
      records[a.stride + i - s] = __ldg(a.parent + i);
    }
    __syncthreads();
  }
  // with the columns in global memory (trees too large for shared memory), whether the
  // tree is a chain (every thread votes, before the idle ones leave); with shared columns a
  // step's read is cheap already, and the chain's branch would only add registers to the
  // small trees' kernels
  constexpr bool kMayChain = !SHARED && MODE != kBoth && MODE != kBothGrad;
  bool link = true;
  if (kMayChain)
    for (int i = s + 1 + static_cast<int>(threadIdx.x); i < e; i += kThreads)
      link = link && __ldg(a.parent + i) == i - 1;
  const bool chain = kMayChain && __syncthreads_and(link);
  const int64_t c = static_cast<int64_t>(blockIdx.x % a.groups) * kThreads + threadIdx.x;
  if (c >= a.C) return;
  const int64_t C = a.C;
  // entry j (0 .. columns_of(MODE) - 1) of position i
  auto at = [&](int j, int i) -> A& {
    return SHARED ? sm[(static_cast<int64_t>(j) * a.stride + (i - s)) * kThreads + threadIdx.x]
                  : sm[(static_cast<int64_t>(j) * a.N + i) * C + c];
  };
  auto vertex_at = [&](int i) { return SHARED ? records[i - s] : __ldg(a.order + i); };
  auto parent_at = [&](int i) { return SHARED ? records[a.stride + i - s] : __ldg(a.parent + i); };
  // two register buffers of kAhead positions: record (vertex, parent) and rows: x, w and a
  // third row (x2 in the backward of both; h at the vertex in up's, at the parent in down's)
  int vr[2][kAhead], pr[2][kAhead];
  A xr[2][kAhead], wr[2][kAhead], third[2][kAhead];
  auto rec = [&](int i, int k, int b) {
    vr[b][k] = vertex_at(i);
    pr[b][k] = parent_at(i);
  };
  // the rows a pass reads: x and w at the vertex (and x2, or h at the vertex or its parent)
  auto rows_xw = [&](int k, int b) {
    xr[b][k] = load_acc(a.x + vr[b][k] * C + c);
    wr[b][k] = load_acc(a.w + vr[b][k] * C + c);
  };
  const A zero = A(0);

  if (MODE == kDown || MODE == kUpGrad) {
    // roots first: H[i] = x[i] + w[i] H[p]; the backward of up also writes
    // dL/dw[i] = h[i] G[p]. In a chain H[p] is the step before's.
    A before = zero;
    sweep<true>(s, e, [&](int i, int k, int b) {
      rec(i, k, b);
      rows_xw(k, b);
      if (MODE == kUpGrad) third[b][k] = load_acc(a.h + vr[b][k] * C + c);
    }, [&](int i, int k, int b) {
      const int p = pr[b][k];
      const A hp = p >= 0 ? (chain ? before : at(0, p)) : zero;
      const A v = p >= 0 ? xr[b][k] + wr[b][k] * hp : xr[b][k];
      if (chain) before = v;
      else at(0, i) = v;
      a.out[vr[b][k] * C + c] = Store<T>::cvt(v);
      if (MODE == kUpGrad) a.gw[vr[b][k] * C + c] = Store<T>::cvt(p >= 0 ? third[b][k] * hp : zero);
    });
    return;
  }

  if (MODE == kUp || MODE == kDownGrad) {
    // leaves first: U[i] = x[i] + the children's shares; the backward of down also writes
    // dL/dw[i] = G[i] h[p]. In a chain the one share a position takes is the step before's,
    // added to zero as the column would add it.
    if (!chain)
      for (int i = s; i < e; ++i) at(0, i) = zero;
    A share = zero;
    sweep<false>(s, e, [&](int i, int k, int b) {
      rec(i, k, b);
      rows_xw(k, b);
      if (MODE == kDownGrad)
        third[b][k] = pr[b][k] >= 0 ? load_acc(a.h + vertex_at(pr[b][k]) * C + c) : zero;
    }, [&](int i, int k, int b) {
      const int p = pr[b][k];
      const A v = xr[b][k] + (chain ? share : at(0, i));
      a.out[vr[b][k] * C + c] = Store<T>::cvt(v);
      if (MODE == kDownGrad) a.gw[vr[b][k] * C + c] = Store<T>::cvt(p >= 0 ? v * third[b][k] : zero);
      if (p >= 0) {
        if (chain) share = zero + wr[b][k] * v;
        else at(0, p) += wr[b][k] * v;
      }
    });
    return;
  }

  // both (kBoth: x; kBothGrad: the gradient g in x and the forward input in x2, side by
  // side): entries 0 and 1 hold U_x and S_x (later out_x + x); 2 and 3 U_g and S_g
  constexpr bool GRAD = MODE == kBothGrad;
  constexpr int NS = GRAD ? 2 : 1;  // streams: x, or x and g
  auto load_both = [&](int i, int k, int b) {
    rec(i, k, b);
    rows_xw(k, b);
    if (GRAD) third[b][k] = load_acc(a.x2 + vr[b][k] * C + c);
  };
  // the stream's input at slot k: x (forward); x2 = x and x = g (backward)
  auto input = [&](int q, int k, int b) -> A { return GRAD && q == 0 ? third[b][k] : xr[b][k]; };
  for (int i = s; i < e; ++i) {
    at(0, i) = zero;
    if (GRAD) at(2, i) = zero;
  }
  sweep<false>(s, e, load_both, [&](int i, int k, int b) {  // up
    const int p = pr[b][k];
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      const A u = input(q, k, b) + at(2 * q, i);
      at(2 * q, i) = u;
      if (p >= 0) at(2 * q, p) += wr[b][k] * u;
    }
  });
  int family = -2;
  A run[NS];
  sweep<false>(s, e, [&](int i, int k, int b) {
    rec(i, k, b);
    wr[b][k] = load_acc(a.w + vr[b][k] * C + c);
  }, [&](int i, int k, int b) {  // suffix sums over the later siblings
    const int p = pr[b][k];
    if (p < 0) return;
    if (p != family) {
      family = p;
#pragma unroll
      for (int q = 0; q < NS; ++q) run[q] = zero;
    }
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      at(2 * q + 1, i) = run[q];
      run[q] += wr[b][k] * at(2 * q, i);
    }
  });
  family = -2;
  sweep<true>(s, e, load_both, [&](int i, int k, int b) {  // prefix sums, brackets, out
    const int p = pr[b][k];
    const int64_t r = vr[b][k] * C + c;
    if (p < 0) {
#pragma unroll
      for (int q = 0; q < NS; ++q) at(2 * q + 1, i) = input(q, k, b);  // out + x, out = 0
      a.out[r] = Store<T>::cvt(at(2 * (NS - 1), i));
      if (GRAD) a.gw[r] = Store<T>::cvt(zero);
      return;
    }
    if (p != family) {
      family = p;
#pragma unroll
      for (int q = 0; q < NS; ++q) run[q] = zero;
    }
    A br[NS];
#pragma unroll
    for (int q = 0; q < NS; ++q) {
      br[q] = at(2 * q + 1, p) + (run[q] + at(2 * q + 1, i));
      run[q] += wr[b][k] * at(2 * q, i);
    }
    const A last = at(2 * (NS - 1), i) + wr[b][k] * br[NS - 1];  // h, or dL/dx = both(g)
    a.out[r] = Store<T>::cvt(last);
    if (GRAD) a.gw[r] = Store<T>::cvt(at(0, i) * br[1] + at(2, i) * br[0]);
#pragma unroll
    for (int q = 0; q < NS; ++q) at(2 * q + 1, i) = wr[b][k] * br[q] + input(q, k, b);
  });
}

}  // namespace columns
}  // namespace treessm_cuda
