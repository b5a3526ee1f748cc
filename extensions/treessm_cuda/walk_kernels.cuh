// The fused selective tree scan of directions "down" and "up" along a depth-first walk of
// each tree (treessm.ops.walk.WalkPlan), without its state expansion in memory.
//
// One thread owns one inner channel d of one tree and keeps the S states of the current
// vertex in registers: h[v] = w[v] h[parent] + x[v] with x = (dx u) B and w = exp(de A),
// y[v] = sum_s C[v, s] h[v, s]. The walk visits each vertex before its children and its
// heavy child (the largest subtree) last, so a vertex's parent is the previous vertex (its
// first child) or the top of a stack of states, pushed at each vertex with two or more
// children and popped at its last child; every vertex above which the stack holds an entry
// sits in a light subtree, so the stack never holds more than log2(tree size) entries.
//
// The walk is cut into segments of K positions. The backward runs the forward walk again
// and saves, at each segment start, the state of the previous vertex and the stack
// (checkpoint slots); it then takes the segments from the last to the first: it restores a
// segment's context, walks it forward once more keeping each vertex's parent state, and
// walks it backward, accumulating dL/dx = G with G[v] = C[v] gy[v] + sum over children c of
// w[c] G[c] (the up scan of the gradients) through a stack of the same shape. Sums over the
// channels of a warp (the gradients of B and C) are warp-wide pairwise sums in a fixed
// order; everything else a thread sums runs in walk order: results are bitwise
// reproducible and do not depend on the launch.
//
// A block is kThreads channels of one tree at a time (blockIdx.y strides over the trees);
// a segment's walk records, B and C rows and per-channel inputs are staged in shared memory
// before it is walked.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace treessm_cuda {
namespace walk {

// Bits of a walk record's flags (the low 4 bits of rec.z; the stack depth before the
// position is rec.z >> 4).
enum Flag { kRoot = 1, kFirst = 2, kLast = 4, kPush = 8 };
// How the step of the edge (v, parent(v)) is formed: dx[v], (dx[v] + dx[p]) / 2, de[v].
enum EdgeRule { kChild = 0, kMean = 1, kGiven = 2 };

constexpr int kStack = 32;    // entries of the walk's stack (a tree below 2^31 vertices needs 30)
constexpr int kThreads = 64;  // channels of a block: two warps

// Positions of a segment: the unit of checkpoints and of shared-memory staging.
template <typename T> struct Segment { static constexpr int K = sizeof(T) == 4 ? 32 : 16; };

template <typename T> struct Args {
  const T* u;        // [N, D]
  const T* dx;       // [N, D] the vertices' steps
  const T* de;       // [N, D] the edges' steps (rule kGiven), else null
  const T* A;        // [D, S]
  const T* B;        // [N, S]
  const T* C;        // [N, S]
  const T* h0;       // [T, D, S] or null: a state entering each root through its own edge
  const int4* rec;   // [N] per walk position: vertex, parent vertex, flags | depth << 4, slot
  const int* tree_ptr;       // [T + 1] walk positions of each tree
  const int64_t* srow;       // [N] first row of `states` of each vertex (-1: none)
  const int64_t* snext;      // [K] next row of the same vertex (-1: none)
  T* y;              // [N, D] or null
  T* states;         // [K, D, S] or null
  T* ckpt;           // [slots, D, S] or null: contexts at segment starts
  // backward
  const T* gy;       // [N, D]
  const T* gstates;  // [K, D, S] or null
  T* gu;             // [N, D]
  T* gdx;            // [N, D]
  T* gde;            // [N, D] (rule kGiven)
  T* gA;             // [gridDim.y, D, S] per block row, summed over its trees
  T* gB;             // [warps, N, S] per warp of channels
  T* gC;             // [warps, N, S]
  T* gh0;            // [T, D, S] or null
  int n, d, s, num_trees, rule;
};

__device__ __forceinline__ float walk_exp(float v) { return expf(v); }
__device__ __forceinline__ double walk_exp(double v) { return exp(v); }

// Shared memory of a block: the staged segment.
template <typename T, int S> struct Stage {
  static constexpr int K = Segment<T>::K;
  int4* rec;
  T* B;   // [K][S]
  T* C;   // [K][S]
  T* u;   // [K][kThreads]
  T* dx;  // [K][kThreads]
  T* de;  // [K][kThreads] the edge step
  T* gy;  // [K][kThreads] (backward)
  static constexpr size_t bytes(bool backward) {
    return 16 * K + sizeof(T) * (2 * K * S + (backward ? 4 : 3) * K * kThreads);
  }
  __device__ explicit Stage(unsigned char* raw) {
    rec = reinterpret_cast<int4*>(raw);
    B = reinterpret_cast<T*>(raw + 16 * K);
    C = B + K * S;
    u = C + K * S;
    dx = u + K * kThreads;
    de = dx + K * kThreads;
    gy = de + K * kThreads;
  }
};

// Stages positions [c0, c0 + nc) of the walk: records, B and C rows (states past `s` as
// zeros), and the channel's u, dx, edge step (and gy).
template <typename T, int S>
__device__ __forceinline__ void stage(const Args<T>& a, Stage<T, S>& st, int c0, int nc, int d,
                                      bool live, bool backward) {
  const int tid = threadIdx.x;
  __syncthreads();  // the previous segment is done with the stage
  if (tid < nc) st.rec[tid] = a.rec[c0 + tid];
  __syncthreads();
  for (int q = tid; q < nc * S; q += kThreads) {
    const int k = q / S, s = q - k * S;
    const int64_t v = st.rec[k].x;
    st.B[q] = s < a.s ? a.B[v * a.s + s] : T(0);
    st.C[q] = s < a.s ? a.C[v * a.s + s] : T(0);
  }
  for (int k = 0; k < nc; ++k) {
    const int4 r = st.rec[k];
    T uv = 0, dv = 0, ev = 0, gv = 0;
    if (live) {
      const int64_t row = static_cast<int64_t>(r.x) * a.d + d;
      uv = a.u[row];
      dv = a.dx[row];
      if (a.rule == kGiven) {
        ev = a.de[row];
      } else if (a.rule == kMean && r.y >= 0) {
        ev = T(0.5) * (dv + a.dx[static_cast<int64_t>(r.y) * a.d + d]);
      } else {
        ev = dv;
      }
      if (backward) gv = a.gy[row];
    }
    st.u[k * kThreads + tid] = uv;
    st.dx[k * kThreads + tid] = dv;
    st.de[k * kThreads + tid] = ev;
    if (backward) st.gy[k * kThreads + tid] = gv;
  }
  __syncthreads();
}

// The state entering position k: h0 or zero at a root, the previous vertex's state at a
// first child, else the stack's top (popped at a last child).
template <typename T, int S>
__device__ __forceinline__ void parent_state(const Args<T>& a, int flags, int t, int d, bool live,
                                             const T (&h)[S], T (&stack)[kStack][S], int& top,
                                             T (&hp)[S]) {
  if (flags & kRoot) {
#pragma unroll
    for (int s = 0; s < S; ++s)
      hp[s] = (a.h0 != nullptr && live && s < a.s)
                  ? a.h0[(static_cast<int64_t>(t) * a.d + d) * a.s + s] : T(0);
  } else if (flags & kFirst) {
#pragma unroll
    for (int s = 0; s < S; ++s) hp[s] = h[s];
  } else {
#pragma unroll
    for (int s = 0; s < S; ++s) hp[s] = stack[top - 1][s];
    if (flags & kLast) --top;
  }
}

// A walker's context at a segment boundary, in checkpoint slots from `slot`: one state
// (`head`: the previous vertex's state, or the hand-over of "up") and `top` stack entries.
template <typename T, int S>
__device__ __forceinline__ void save_context(const Args<T>& a, int64_t slot, int d,
                                             const T (&head)[S], const T (&stack)[kStack][S],
                                             int top) {
#pragma unroll
  for (int s = 0; s < S; ++s)
    if (s < a.s) a.ckpt[(slot * a.d + d) * a.s + s] = head[s];
  for (int q = 0; q < top; ++q)
#pragma unroll
    for (int s = 0; s < S; ++s)
      if (s < a.s) a.ckpt[((slot + 1 + q) * a.d + d) * a.s + s] = stack[q][s];
}

template <typename T, int S>
__device__ __forceinline__ void load_context(const Args<T>& a, int64_t slot, int d, bool live,
                                             T (&head)[S], T (&stack)[kStack][S], int top) {
#pragma unroll
  for (int s = 0; s < S; ++s)
    head[s] = (live && s < a.s) ? a.ckpt[(slot * a.d + d) * a.s + s] : T(0);
  for (int q = 0; q < top; ++q)
#pragma unroll
    for (int s = 0; s < S; ++s)
      stack[q][s] = (live && s < a.s) ? a.ckpt[((slot + 1 + q) * a.d + d) * a.s + s] : T(0);
}

// "down" at one vertex: h = w hp + x, pushed when the vertex has two or more children.
template <typename T, int S>
__device__ __forceinline__ void down_step(int flags, T e, T xu, const T (&Ar)[S], const T* B,
                                          const T (&hp)[S], T (&h)[S], T (&stack)[kStack][S],
                                          int& top) {
#pragma unroll
  for (int s = 0; s < S; ++s) h[s] = walk_exp(e * Ar[s]) * hp[s] + xu * B[s];
  if (flags & kPush) {
#pragma unroll
    for (int s = 0; s < S; ++s) stack[top][s] = h[s];
    ++top;
  }
}

// "up" at one vertex, walked back: up = x + the first child's hand-over + the accumulator
// of the other children (closed here); then w up goes to the parent: handed over by a
// first child, opening an accumulator from a last child, added to it from a middle one.
template <typename T, int S>
__device__ __forceinline__ void up_step(int flags, T e, T xu, const T (&Ar)[S], const T* B,
                                        T (&carry)[S], T (&stack)[kStack][S], int& top,
                                        T (&up)[S]) {
#pragma unroll
  for (int s = 0; s < S; ++s) up[s] = xu * B[s] + carry[s];
  if (flags & kPush) {
    --top;
#pragma unroll
    for (int s = 0; s < S; ++s) up[s] += stack[top][s];
  }
#pragma unroll
  for (int s = 0; s < S; ++s) carry[s] = T(0);
  if (flags & kRoot) return;
  T share[S];
#pragma unroll
  for (int s = 0; s < S; ++s) share[s] = walk_exp(e * Ar[s]) * up[s];
  if (flags & kFirst) {
#pragma unroll
    for (int s = 0; s < S; ++s) carry[s] = share[s];
  } else if (flags & kLast) {
#pragma unroll
    for (int s = 0; s < S; ++s) stack[top][s] = share[s];
    ++top;
  } else {
#pragma unroll
    for (int s = 0; s < S; ++s) stack[top - 1][s] += share[s];
  }
}

// The forward walk: y (when a.y), states at requested vertices (when a.states) and the
// contexts at segment starts (when a.ckpt).
template <typename T, int S>
__global__ void __launch_bounds__(kThreads) down_forward_kernel(Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Stage<T, S> st(smem_raw);
  constexpr int K = Segment<T>::K;
  const int d = blockIdx.x * kThreads + threadIdx.x;
  const bool live = d < a.d;
  T Ar[S];
#pragma unroll
  for (int s = 0; s < S; ++s) Ar[s] = (live && s < a.s) ? a.A[static_cast<int64_t>(d) * a.s + s] : T(0);
  T stack[kStack][S];
  for (int t = blockIdx.y; t < a.num_trees; t += gridDim.y) {
    const int start = a.tree_ptr[t], end = a.tree_ptr[t + 1];
    T h[S];
#pragma unroll
    for (int s = 0; s < S; ++s) h[s] = T(0);
    int top = 0;
    for (int c0 = start; c0 < end; c0 += K) {
      const int nc = min(K, end - c0);
      stage<T, S>(a, st, c0, nc, d, live, false);
      if (a.ckpt != nullptr && live) save_context<T, S>(a, st.rec[0].w, d, h, stack, top);
      for (int k = 0; k < nc; ++k) {
        const int4 r = st.rec[k];
        const int flags = r.z & 15;
        T hp[S];
        parent_state<T, S>(a, flags, t, d, live, h, stack, top, hp);
        const T xu = st.dx[k * kThreads + threadIdx.x] * st.u[k * kThreads + threadIdx.x];
        const T e = st.de[k * kThreads + threadIdx.x];
        down_step<T, S>(flags, e, xu, Ar, st.B + k * S, hp, h, stack, top);
        T yv = T(0);
#pragma unroll
        for (int s = 0; s < S; ++s) yv += st.C[k * S + s] * h[s];
        if (!live) continue;
        const int64_t v = r.x;
        if (a.y != nullptr) a.y[v * a.d + d] = yv;
        if (a.states != nullptr)
          for (int64_t row = a.srow[v]; row >= 0; row = a.snext[row])
#pragma unroll
            for (int s = 0; s < S; ++s)
              if (s < a.s) a.states[(row * a.d + d) * a.s + s] = h[s];
      }
    }
  }
}

// Sums a[s] over the 32 lanes of a warp for every s (S a power of two up to 32): halving
// exchanges leave lane l with the sum of state l >> (5 - log2 S); every lane takes part,
// and the order of the additions is fixed.
template <int S, typename T>
__device__ __forceinline__ T warp_state_sum(T (&a)[S], int lane) {
  int off = 16;
#pragma unroll
  for (int m = S / 2; m >= 1; m >>= 1, off >>= 1) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int j = 0; j < m; ++j) {
      const T send = upper ? a[j] : a[j + m];
      const T keep = upper ? a[j + m] : a[j];
      a[j] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
  T v = a[0];
  for (; off >= 1; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <int S> struct Log2 { static constexpr int value = S <= 1 ? 0 : 1 + Log2<S / 2>::value; };
template <> struct Log2<1> { static constexpr int value = 0; };

// The backward walk, after down_forward_kernel has filled a.ckpt.
template <typename T, int S>
__global__ void __launch_bounds__(kThreads) down_backward_kernel(Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Stage<T, S> st(smem_raw);
  constexpr int K = Segment<T>::K;
  constexpr int kSpread = 5 - Log2<S>::value;  // lanes holding one state's warp sum: 2^kSpread
  const int tid = threadIdx.x, lane = tid & 31;
  const int d = blockIdx.x * kThreads + tid;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + tid) >> 5;
  const bool live = d < a.d;
  const int my_state = lane >> kSpread;
  const bool writes_sum = (lane & ((1 << kSpread) - 1)) == 0 && my_state < a.s;
  T Ar[S], gA[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    Ar[s] = (live && s < a.s) ? a.A[static_cast<int64_t>(d) * a.s + s] : T(0);
    gA[s] = T(0);
  }
  T stack[kStack][S];       // states, for the walk forward inside a segment
  T gstack[kStack][S + 1];  // gradient shares handed to a parent, and the halves of the edge
                            // steps' gradients (rule kMean)
  T hps[K][S];              // the parent state of each position of the segment
  for (int t = blockIdx.y; t < a.num_trees; t += gridDim.y) {
    const int start = a.tree_ptr[t], end = a.tree_ptr[t + 1];
    if (start >= end) continue;
    const int nseg = (end - start + K - 1) / K;
    int gtop = 0;
    T gc[S + 1];  // what the first child hands to its parent, the next position walked back
#pragma unroll
    for (int s = 0; s <= S; ++s) gc[s] = T(0);
    for (int j = nseg - 1; j >= 0; --j) {
      const int c0 = start + j * K, nc = min(K, end - c0);
      stage<T, S>(a, st, c0, nc, d, live, true);
      // the context at the segment's start
      int top = st.rec[0].z >> 4;
      T h[S];
      load_context<T, S>(a, st.rec[0].w, d, live, h, stack, top);
      // forward through the segment, keeping the parent states
      for (int k = 0; k < nc; ++k) {
        const int flags = st.rec[k].z & 15;
        T hp[S];
        parent_state<T, S>(a, flags, t, d, live, h, stack, top, hp);
        const T xu = st.dx[k * kThreads + tid] * st.u[k * kThreads + tid];
        const T e = st.de[k * kThreads + tid];
#pragma unroll
        for (int s = 0; s < S; ++s) hps[k][s] = hp[s];
        down_step<T, S>(flags, e, xu, Ar, st.B + k * S, hp, h, stack, top);
      }
      // backward through the segment
      for (int k = nc - 1; k >= 0; --k) {
        const int4 r = st.rec[k];
        const int flags = r.z & 15;
        const int64_t v = r.x;
        const T uv = st.u[k * kThreads + tid], dv = st.dx[k * kThreads + tid];
        const T e = st.de[k * kThreads + tid], gyv = st.gy[k * kThreads + tid];
        const T xu = dv * uv;
        T G[S];
        T half = gc[S];
#pragma unroll
        for (int s = 0; s < S; ++s) G[s] = st.C[k * S + s] * gyv + gc[s];
        if (flags & kPush) {
          --gtop;
#pragma unroll
          for (int s = 0; s < S; ++s) G[s] += gstack[gtop][s];
          half += gstack[gtop][S];
        }
        if (a.gstates != nullptr && live)
          for (int64_t row = a.srow[v]; row >= 0; row = a.snext[row])
#pragma unroll
            for (int s = 0; s < S; ++s)
              if (s < a.s) G[s] += a.gstates[(row * a.d + d) * a.s + s];
        if (!live)
#pragma unroll
          for (int s = 0; s < S; ++s) G[s] = T(0);
        T cpart[S], bpart[S], w[S];
        T gxu = T(0), gw_de = T(0);
#pragma unroll
        for (int s = 0; s < S; ++s) {
          w[s] = walk_exp(e * Ar[s]);
          const T hv = w[s] * hps[k][s] + xu * st.B[k * S + s];
          cpart[s] = gyv * hv;
          bpart[s] = G[s] * xu;
          gxu += G[s] * st.B[k * S + s];
          const T gww = G[s] * hps[k][s] * w[s];  // dL/dw * w
          gw_de += gww * Ar[s];
          gA[s] += gww * e;
        }
        const T csum = warp_state_sum<S>(cpart, lane);
        const T bsum = warp_state_sum<S>(bpart, lane);
        if (writes_sum) {
          a.gC[(warp * a.n + v) * a.s + my_state] = csum;
          a.gB[(warp * a.n + v) * a.s + my_state] = bsum;
        }
        const bool root = (flags & kRoot) != 0;
        T own = gxu * uv;  // dL/d(dx[v]) through x
        T up_half = T(0);  // the half of dL/dde[v] that belongs to the parent's dx
        if (a.rule == kChild || (a.rule == kMean && root)) {
          own += gw_de;
        } else if (a.rule == kMean) {
          own += T(0.5) * gw_de;
          up_half = T(0.5) * gw_de;
        }
        if (a.rule == kMean) own += half;
        if (live) {
          a.gu[v * a.d + d] = gxu * dv;
          a.gdx[v * a.d + d] = own;
          if (a.rule == kGiven) a.gde[v * a.d + d] = gw_de;
          if (root && a.gh0 != nullptr)
#pragma unroll
            for (int s = 0; s < S; ++s)
              if (s < a.s) a.gh0[(static_cast<int64_t>(t) * a.d + d) * a.s + s] = G[s] * w[s];
        }
        // hand w G (and the half) to the parent
#pragma unroll
        for (int s = 0; s <= S; ++s) gc[s] = T(0);
        if (root) continue;
        if (flags & kFirst) {
#pragma unroll
          for (int s = 0; s < S; ++s) gc[s] = w[s] * G[s];
          gc[S] = up_half;
        } else if (flags & kLast) {
#pragma unroll
          for (int s = 0; s < S; ++s) gstack[gtop][s] = w[s] * G[s];
          gstack[gtop][S] = up_half;
          ++gtop;
        } else {
#pragma unroll
          for (int s = 0; s < S; ++s) gstack[gtop - 1][s] += w[s] * G[s];
          gstack[gtop - 1][S] += up_half;
        }
      }
    }
  }
  if (live)
#pragma unroll
    for (int s = 0; s < S; ++s)
      if (s < a.s) a.gA[(static_cast<int64_t>(blockIdx.y) * a.d + d) * a.s + s] = gA[s];
}


// ---------------------------------------------------------------------------- direction "up"
// up[v] = x[v] + sum over children c of w[c] up[c]: the walk taken backwards, each vertex
// after its subtree. A first child hands w up to its parent, the next position walked back
// (`carry`); the parent's last child opens an accumulator on the stack, its middle children
// add to it, and the parent closes it. Contexts (carry and open accumulators) are saved at
// the first position of every segment but a tree's first, in that segment's slots: the
// context in which the segment before it is walked.
template <typename T, int S>
__global__ void __launch_bounds__(kThreads) up_forward_kernel(Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Stage<T, S> st(smem_raw);
  constexpr int K = Segment<T>::K;
  const int tid = threadIdx.x;
  const int d = blockIdx.x * kThreads + tid;
  const bool live = d < a.d;
  T Ar[S];
#pragma unroll
  for (int s = 0; s < S; ++s) Ar[s] = (live && s < a.s) ? a.A[static_cast<int64_t>(d) * a.s + s] : T(0);
  T stack[kStack][S];
  for (int t = blockIdx.y; t < a.num_trees; t += gridDim.y) {
    const int start = a.tree_ptr[t], end = a.tree_ptr[t + 1];
    if (start >= end) continue;
    const int nseg = (end - start + K - 1) / K;
    T carry[S];
#pragma unroll
    for (int s = 0; s < S; ++s) carry[s] = T(0);
    int top = 0;
    for (int j = nseg - 1; j >= 0; --j) {
      const int c0 = start + j * K, nc = min(K, end - c0);
      stage<T, S>(a, st, c0, nc, d, live, false);
      for (int k = nc - 1; k >= 0; --k) {
        const int4 r = st.rec[k];
        const int flags = r.z & 15;
        const T xu = st.dx[k * kThreads + tid] * st.u[k * kThreads + tid];
        const T e = st.de[k * kThreads + tid];
        T up[S];
        up_step<T, S>(flags, e, xu, Ar, st.B + k * S, carry, stack, top, up);
        T yv = T(0);
#pragma unroll
        for (int s = 0; s < S; ++s) yv += st.C[k * S + s] * up[s];
        if (!live) continue;
        const int64_t v = r.x;
        if (a.y != nullptr) a.y[v * a.d + d] = yv;
        if (a.states != nullptr)
          for (int64_t row = a.srow[v]; row >= 0; row = a.snext[row])
#pragma unroll
            for (int s = 0; s < S; ++s)
              if (s < a.s) a.states[(row * a.d + d) * a.s + s] = up[s];
      }
      if (a.ckpt != nullptr && j > 0 && live)
        save_context<T, S>(a, st.rec[0].w, d, carry, stack, top);
    }
  }
}

// The backward of "up", after up_forward_kernel has filled a.ckpt: G = dL/dx is the down
// scan of C gy, G[v] = C[v] gy[v] + w[v] G[parent], walked forward with a stack of the
// parents' G; each segment's up values are first recomputed from the context saved at the
// next segment's start.
template <typename T, int S>
__global__ void __launch_bounds__(kThreads) up_backward_kernel(Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Stage<T, S> st(smem_raw);
  constexpr int K = Segment<T>::K;
  constexpr int kSpread = 5 - Log2<S>::value;
  const int tid = threadIdx.x, lane = tid & 31;
  const int d = blockIdx.x * kThreads + tid;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + tid) >> 5;
  const bool live = d < a.d;
  const int my_state = lane >> kSpread;
  const bool writes_sum = (lane & ((1 << kSpread) - 1)) == 0 && my_state < a.s;
  T Ar[S], gA[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    Ar[s] = (live && s < a.s) ? a.A[static_cast<int64_t>(d) * a.s + s] : T(0);
    gA[s] = T(0);
  }
  T stack[kStack][S];   // open accumulators, for the walk back inside a segment
  T gstack[kStack][S];  // G of the vertices with two or more children
  T ups[K][S];          // the up values of the segment's positions
  for (int t = blockIdx.y; t < a.num_trees; t += gridDim.y) {
    const int start = a.tree_ptr[t], end = a.tree_ptr[t + 1];
    if (start >= end) continue;
    const int nseg = (end - start + K - 1) / K;
    int gtop = 0;
    T Gprev[S];
#pragma unroll
    for (int s = 0; s < S; ++s) Gprev[s] = T(0);
    for (int j = 0; j < nseg; ++j) {
      const int c0 = start + j * K, nc = min(K, end - c0);
      stage<T, S>(a, st, c0, nc, d, live, true);
      // the context after the next segment was walked back
      T carry[S];
      int top = 0;
#pragma unroll
      for (int s = 0; s < S; ++s) carry[s] = T(0);
      if (j + 1 < nseg) {
        const int4 next = a.rec[c0 + nc];
        top = next.z >> 4;
        load_context<T, S>(a, next.w, d, live, carry, stack, top);
      }
      // back through the segment: the up values
      for (int k = nc - 1; k >= 0; --k) {
        const int flags = st.rec[k].z & 15;
        const T xu = st.dx[k * kThreads + tid] * st.u[k * kThreads + tid];
        const T e = st.de[k * kThreads + tid];
        T up[S];
        up_step<T, S>(flags, e, xu, Ar, st.B + k * S, carry, stack, top, up);
#pragma unroll
        for (int s = 0; s < S; ++s) ups[k][s] = up[s];
      }
      // forward through the segment: G and the gradients
      for (int k = 0; k < nc; ++k) {
        const int4 r = st.rec[k];
        const int flags = r.z & 15;
        const int64_t v = r.x;
        const T uv = st.u[k * kThreads + tid], dv = st.dx[k * kThreads + tid];
        const T e = st.de[k * kThreads + tid], gyv = st.gy[k * kThreads + tid];
        const T xu = dv * uv;
        const bool root = (flags & kRoot) != 0;
        T Gp[S];
        if (root) {
#pragma unroll
          for (int s = 0; s < S; ++s) Gp[s] = T(0);
        } else if (flags & kFirst) {
#pragma unroll
          for (int s = 0; s < S; ++s) Gp[s] = Gprev[s];
        } else {
#pragma unroll
          for (int s = 0; s < S; ++s) Gp[s] = gstack[gtop - 1][s];
          if (flags & kLast) --gtop;
        }
        T G[S], w[S], cpart[S], bpart[S];
        T gxu = T(0), gw_de = T(0);
#pragma unroll
        for (int s = 0; s < S; ++s) {
          w[s] = walk_exp(e * Ar[s]);
          G[s] = st.C[k * S + s] * gyv + w[s] * Gp[s];
        }
        if (a.gstates != nullptr && live)
          for (int64_t row = a.srow[v]; row >= 0; row = a.snext[row])
#pragma unroll
            for (int s = 0; s < S; ++s)
              if (s < a.s) G[s] += a.gstates[(row * a.d + d) * a.s + s];
        if (!live)
#pragma unroll
          for (int s = 0; s < S; ++s) G[s] = T(0);
#pragma unroll
        for (int s = 0; s < S; ++s) {
          cpart[s] = gyv * ups[k][s];
          bpart[s] = G[s] * xu;
          gxu += G[s] * st.B[k * S + s];
          const T gww = Gp[s] * ups[k][s] * w[s];  // dL/dw * w
          gw_de += gww * Ar[s];
          gA[s] += gww * e;
        }
        const T csum = warp_state_sum<S>(cpart, lane);
        const T bsum = warp_state_sum<S>(bpart, lane);
        if (writes_sum) {
          a.gC[(warp * a.n + v) * a.s + my_state] = csum;
          a.gB[(warp * a.n + v) * a.s + my_state] = bsum;
        }
        if (live) {
          a.gu[v * a.d + d] = gxu * dv;
          T own = gxu * uv;
          if (a.rule == kChild) {
            own += gw_de;
          } else if (a.rule == kMean && !root) {
            own += T(0.5) * gw_de;
          }
          // the parent precedes its children in the walk: under rule kMean each child adds
          // the parent's half of its edge step's gradient after the parent's own terms
          a.gdx[v * a.d + d] += own;
          if (a.rule == kMean && !root)
            a.gdx[static_cast<int64_t>(r.y) * a.d + d] += T(0.5) * gw_de;
          if (a.rule == kGiven) a.gde[v * a.d + d] = gw_de;
        }
#pragma unroll
        for (int s = 0; s < S; ++s) Gprev[s] = G[s];
        if (flags & kPush) {
#pragma unroll
          for (int s = 0; s < S; ++s) gstack[gtop][s] = G[s];
          ++gtop;
        }
      }
    }
  }
  if (live)
#pragma unroll
    for (int s = 0; s < S; ++s)
      if (s < a.s) a.gA[(static_cast<int64_t>(blockIdx.y) * a.d + d) * a.s + s] = gA[s];
}

}  // namespace walk
}  // namespace treessm_cuda
