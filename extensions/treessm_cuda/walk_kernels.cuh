// The fused selective tree scan of directions "down" and "up" along a depth-first walk of
// each tree (treessm.ops.walk.WalkPlan), without its state expansion in memory.
//
// P = 2^log2_lanes adjacent lanes of a warp own one inner channel d of one tree (P a power of
// two, 1 to 16, chosen by the host): lane `part` of them keeps the L = S / P states
// [part * L, part * L + L) of the current vertex in registers (S, the state count padded to
// a power of two, extra states zero), h[v] = w[v] h[parent] + x[v] with x = (dx u) B and
// w = exp(de A). The walk visits each vertex before its children and its heavy child (the
// largest subtree) last, so a vertex's parent is the previous vertex (its first child) or
// the top of a stack of states, pushed at each vertex with two or more children and popped
// at its last child; every vertex above which the stack holds an entry sits in a light
// subtree, so the stack never holds more than log2(tree size) entries. Splitting a
// channel's states launches P times the warps for the same problem: a walk is a chain of
// dependent steps, and only other warps hide its latency.
//
// The walk is cut into segments of K positions. The backward runs the forward walk again
// and saves, at each segment start, the state of the previous vertex and the stack
// (checkpoint slots); it then takes the segments from the last to the first: it restores a
// segment's context, walks it forward once more keeping each vertex's parent state, and
// walks it backward, accumulating dL/dx = G with G[v] = C[v] gy[v] + sum over children c of
// w[c] G[c] (the up scan of the gradients) through a stack of the same shape.
//
// Sums over the states of a channel (y = sum_s C h; in the backward sum_s G B and
// sum_s G h w A) are pairwise sums over the states in their order: each lane adds its L
// products pairwise, then the P lanes add their partial sums with xor shuffles at offsets
// 1, 2, ..., P / 2. The products are rounded before they are added (no fused multiply-add),
// so the result is the same pairwise sum of the same numbers for every P: bitwise equal
// across lane counts. Sums over the channels of a warp (the gradients of B and C, 32 / P
// channels) are warp-wide pairwise sums in a fixed order, the block's two warps added in
// shared memory at each segment's end, summed over blocks by the host;
// everything else a lane sums runs in walk order: results are bitwise reproducible for a
// given P, and every result but the gradients of B and C is the same for every P.
//
// A block is kThreads / P channels of one tree at a time (blockIdx.y strides over the
// trees); a segment's walk records, B and C rows and per-channel inputs are staged in shared
// memory before it is walked.
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
constexpr int kThreads = 64;  // lanes of a block: two warps
constexpr int kMaxStates = 16;  // S, the padded state count, at most (L * P <= 16 < 32)

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
  int log2_lanes;    // P = 2^log2_lanes lanes per channel
  // backward: the gradients of u, dx (and given edge steps) summed over a channel's lanes
  // after each segment (input_grads) rather than at each step: rules kChild and kGiven
  // with more than one lane a channel (deferred_sums)
  bool deferred;
};

// Whether the backward sums the inputs' gradients over a channel's lanes after each
// segment: rule kMean hands each vertex's sum to its parent during the walk.
__host__ __device__ inline bool deferred_sums(int rule, int log2_lanes) {
  return rule != kMean && log2_lanes > 0;
}

// w = exp(de A) as walk_exp(exp_step(de) A): in float exp2 of the step pre-scaled by
// log2(e) (cheaper than expf; accuracy measured in host emulation against the float64
// reference), in double exp. The forward and the backward form w alike.
__device__ __forceinline__ float walk_exp(float v) { return exp2f(v); }
__device__ __forceinline__ double walk_exp(double v) { return exp(v); }
__device__ __forceinline__ float exp_step(float e) { return e * 1.4426950408889634f; }
__device__ __forceinline__ double exp_step(double e) { return e; }
// A product that is never fused with the addition that consumes it: the terms of a sum
// over states are the same numbers however the lanes split the sum.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
// a b + c d with one rounding order fixed: c d rounded, then fused with a b. Left to the
// compiler, which product is fused may differ between the kernels of two lane counts.
template <typename T>
__device__ __forceinline__ T two_products(T a, T b, T c, T d) { return fma(a, b, mul_rn(c, d)); }

template <int N> struct Log2 { static constexpr int value = N <= 1 ? 0 : 1 + Log2<N / 2>::value; };
template <> struct Log2<1> { static constexpr int value = 0; };

// A lane's place: its channel d (of the block's `channels`), its part of the channel's
// `states` (the padded S) and the first state s0 it holds.
template <int L> struct Place {
  int log2p, part, channels, c, d, s0, states, log2s;
  bool live;
  template <typename T>
  __device__ explicit Place(const Args<T>& a) {
    log2p = a.log2_lanes;
    log2s = Log2<L>::value + log2p;
    part = threadIdx.x & ((1 << log2p) - 1);
    channels = kThreads >> log2p;
    c = threadIdx.x >> log2p;
    d = blockIdx.x * channels + c;
    s0 = part * L;
    states = L << log2p;
    live = d < a.d;
  }
};

// Shared memory of a block: the staged segment.
template <typename T> struct Stage {
  static constexpr int K = Segment<T>::K;
  int4* rec;
  T* B;   // [K][states]
  T* C;   // [K][states]
  T* u;   // [K][channels]
  T* dx;  // [K][channels]
  T* de;  // [K][channels] the edge step
  T* gy;  // [K][channels] (backward)
  T* wB;  // [2][K][states] (backward) each warp's sums over its channels, for the
  T* wC;  //   gradients of B and C, added at the segment's end (BlockSums)
  T* yp;  // [K][kThreads] (forward) each lane's part of the read-out (read_out)
  T* xp;  // [K][kThreads] (deferred backward) each lane's parts of the sums over the states
  T* ep;  //   of G B and of dL/dw w A (input_grads)
  static constexpr size_t bytes(int states, int channels, bool backward, bool deferred) {
    return 16 * K + sizeof(T) * (2 * K * states + (backward ? 4 : 3) * K * channels +
                                 (backward ? 4 * K * states : K * kThreads) +
                                 (deferred ? 2 * K * kThreads : 0));
  }
  __device__ Stage(unsigned char* raw, int states, int channels) {
    rec = reinterpret_cast<int4*>(raw);
    B = reinterpret_cast<T*>(raw + 16 * K);
    C = B + K * states;
    u = C + K * states;
    dx = u + K * channels;
    de = dx + K * channels;
    gy = de + K * channels;
    wB = gy + K * channels;
    wC = wB + 2 * K * states;
    yp = de + K * channels;  // the forward stages no gy, wB, wC
    xp = wC + 2 * K * states;
    ep = xp + K * kThreads;
  }
};

// Stages positions [c0, c0 + nc) of the walk: records, B and C rows (states past `s` as
// zeros), and the block's channels' u, dx, edge step (and gy).
template <typename T, int L>
__device__ __forceinline__ void stage(const Args<T>& a, Stage<T>& st, const Place<L>& pl, int c0,
                                      int nc, bool backward) {
  const int tid = threadIdx.x;
  __syncthreads();  // the previous segment is done with the stage
  if (tid < nc) st.rec[tid] = a.rec[c0 + tid];
  __syncthreads();
  for (int q = tid; q < nc << pl.log2s; q += kThreads) {
    const int k = q >> pl.log2s, s = q & (pl.states - 1);
    const int64_t v = st.rec[k].x;
    st.B[q] = s < a.s ? a.B[v * a.s + s] : T(0);
    st.C[q] = s < a.s ? a.C[v * a.s + s] : T(0);
  }
  const int log2c = Log2<kThreads>::value - pl.log2p;
  for (int q = tid; q < nc * pl.channels; q += kThreads) {
    const int4 r = st.rec[q >> log2c];
    const int d = blockIdx.x * pl.channels + (q & (pl.channels - 1));
    T uv = 0, dv = 0, ev = 0, gv = 0;
    if (d < a.d) {
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
    st.u[q] = uv;
    st.dx[q] = dv;
    st.de[q] = ev;
    if (backward) st.gy[q] = gv;
  }
  __syncthreads();
}

// A lane's L entries of row `row` of a [rows, D, S] tensor: the address of its first.
template <typename T, int L>
__device__ __forceinline__ int64_t state_at(const Args<T>& a, int64_t row, const Place<L>& pl) {
  return (row * a.d + pl.d) * a.s + pl.s0;
}

// The lane's slice of A (zero past `s` and for idle channels).
template <typename T, int L>
__device__ __forceinline__ void load_rates(const Args<T>& a, const Place<L>& pl, T (&r)[L]) {
#pragma unroll
  for (int j = 0; j < L; ++j)
    r[j] = (pl.live && pl.s0 + j < a.s) ? a.A[static_cast<int64_t>(pl.d) * a.s + pl.s0 + j]
                                        : T(0);
}

// The state entering position k: h0 or zero at a root, the previous vertex's state at a
// first child, else the stack's top (popped at a last child).
template <typename T, int L>
__device__ __forceinline__ void parent_state(const Args<T>& a, int flags, int t,
                                             const Place<L>& pl, const T (&h)[L],
                                             T (&stack)[kStack][L], int& top, T (&hp)[L]) {
  if (flags & kRoot) {
#pragma unroll
    for (int j = 0; j < L; ++j)
      hp[j] = (a.h0 != nullptr && pl.live && pl.s0 + j < a.s) ? a.h0[state_at(a, t, pl) + j]
                                                              : T(0);
  } else if (flags & kFirst) {
#pragma unroll
    for (int j = 0; j < L; ++j) hp[j] = h[j];
  } else {
#pragma unroll
    for (int j = 0; j < L; ++j) hp[j] = stack[top - 1][j];
    if (flags & kLast) --top;
  }
}

// A walker's context at a segment boundary, in checkpoint slots from `slot`: one state
// (`head`: the previous vertex's state, or the hand-over of "up") and `top` stack entries.
template <typename T, int L>
__device__ __forceinline__ void save_context(const Args<T>& a, int64_t slot, const Place<L>& pl,
                                             const T (&head)[L], const T (&stack)[kStack][L],
                                             int top) {
#pragma unroll
  for (int j = 0; j < L; ++j)
    if (pl.s0 + j < a.s) a.ckpt[state_at(a, slot, pl) + j] = head[j];
  for (int q = 0; q < top; ++q)
#pragma unroll
    for (int j = 0; j < L; ++j)
      if (pl.s0 + j < a.s) a.ckpt[state_at(a, slot + 1 + q, pl) + j] = stack[q][j];
}

template <typename T, int L>
__device__ __forceinline__ void load_context(const Args<T>& a, int64_t slot, const Place<L>& pl,
                                             T (&head)[L], T (&stack)[kStack][L], int top) {
#pragma unroll
  for (int j = 0; j < L; ++j)
    head[j] = (pl.live && pl.s0 + j < a.s) ? a.ckpt[state_at(a, slot, pl) + j] : T(0);
  for (int q = 0; q < top; ++q)
#pragma unroll
    for (int j = 0; j < L; ++j)
      stack[q][j] = (pl.live && pl.s0 + j < a.s) ? a.ckpt[state_at(a, slot + 1 + q, pl) + j] : T(0);
}

// "down" at one vertex: h = w hp + x, pushed when the vertex has two or more children.
template <typename T, int L>
__device__ __forceinline__ void down_step(int flags, T e, T xu, const T (&Ar)[L], const T* B,
                                          const T (&hp)[L], T (&h)[L], T (&stack)[kStack][L],
                                          int& top) {
  const T es = exp_step(e);
#pragma unroll
  for (int j = 0; j < L; ++j) h[j] = two_products(walk_exp(es * Ar[j]), hp[j], xu, B[j]);
  if (flags & kPush) {
#pragma unroll
    for (int j = 0; j < L; ++j) stack[top][j] = h[j];
    ++top;
  }
}

// "up" at one vertex, walked back: up = x + the first child's hand-over + the accumulator
// of the other children (closed here); then w up goes to the parent: handed over by a
// first child, opening an accumulator from a last child, added to it from a middle one.
// Products are rounded on their own (mul_rn): left to the compiler, which ones it fuses
// with the additions may differ between lane counts.
template <typename T, int L>
__device__ __forceinline__ void up_step(int flags, T e, T xu, const T (&Ar)[L], const T* B,
                                        T (&carry)[L], T (&stack)[kStack][L], int& top,
                                        T (&up)[L]) {
#pragma unroll
  for (int j = 0; j < L; ++j) up[j] = mul_rn(xu, B[j]) + carry[j];
  if (flags & kPush) {
    --top;
#pragma unroll
    for (int j = 0; j < L; ++j) up[j] += stack[top][j];
  }
#pragma unroll
  for (int j = 0; j < L; ++j) carry[j] = T(0);
  if (flags & kRoot) return;
  T share[L];
  const T es = exp_step(e);
#pragma unroll
  for (int j = 0; j < L; ++j) share[j] = mul_rn(walk_exp(es * Ar[j]), up[j]);
  if (flags & kFirst) {
#pragma unroll
    for (int j = 0; j < L; ++j) carry[j] = share[j];
  } else if (flags & kLast) {
#pragma unroll
    for (int j = 0; j < L; ++j) stack[top][j] = share[j];
    ++top;
  } else {
#pragma unroll
    for (int j = 0; j < L; ++j) stack[top - 1][j] += share[j];
  }
}

// The pairwise sum of n <= N terms (n a power of two, the first n of `terms`): neighbours
// added, then neighbouring sums, and so on.
template <int N, typename T>
__device__ __forceinline__ T pairwise_sum(const T (&terms)[N], int n = N) {
  T b[N];
#pragma unroll
  for (int j = 0; j < N; ++j) b[j] = terms[j];
#pragma unroll
  for (int w = N / 2; w >= 1; w /= 2)
    if (w < n)
#pragma unroll
      for (int i = 0; i < w; ++i) b[i] = b[2 * i] + b[2 * i + 1];
  return b[0];
}

// The sum of the P = 2^log2p values at `parts` (a channel's lanes' parts, in lane order),
// pairwise: the tree of channel_sum's xor shuffles.
template <typename T>
__device__ __forceinline__ T lanes_sum(const T* parts, int log2p) {
  T b[kMaxStates];
#pragma unroll
  for (int i = 0; i < kMaxStates; ++i) b[i] = i < (1 << log2p) ? parts[i] : T(0);
  return pairwise_sum<kMaxStates>(b, 1 << log2p);
}

// The sum of a channel's terms over all its states, in every lane of the channel: each lane
// adds its L terms pairwise, then the P lanes add theirs at xor offsets 1, 2, ..., P / 2 (a
// lane adds its partner's sum to its own, the partner the same two numbers: one result).
// The whole is the pairwise sum of the S terms in state order, whatever P is.
template <int L, typename T>
__device__ __forceinline__ T channel_sum(const T (&terms)[L], int log2p) {
  T v = pairwise_sum<L>(terms);
  for (int off = 1; off < (1 << log2p); off <<= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// A lane's states of row `row` of a [rows, D, S] tensor, from its first state on (a live
// lane; states past `s` are padding and not written).
template <typename T, int L>
__device__ __forceinline__ void write_lane_states(const Args<T>& a, T* dst, int64_t row,
                                                  const Place<L>& pl, const T (&v)[L]) {
  if (!pl.live) return;
#pragma unroll
  for (int j = 0; j < L; ++j)
    if (pl.s0 + j < a.s) dst[state_at(a, row, pl) + j] = v[j];
}

// The states h[v] of a position (vertex v): this lane's part of the read-out
// y[v] = sum_s C[v, s] h[v, s], the pairwise sum of its L products, left in the stage at yp
// (the lane's entry of the position in Stage::yp) for read_out; and h[v] at the rows of
// `states` that request vertex v.
template <typename T, int L>
__device__ __forceinline__ void emit(const Args<T>& a, const Place<L>& pl, T* yp, int64_t v,
                                     const T* Ck, const T (&h)[L]) {
  if (a.y != nullptr) {
    T terms[L];
#pragma unroll
    for (int j = 0; j < L; ++j) terms[j] = mul_rn(Ck[j], h[j]);
    *yp = pairwise_sum<L>(terms);
  }
  if (a.states != nullptr && pl.live)
    for (int64_t row = a.srow[v]; row >= 0; row = a.snext[row])
      write_lane_states<T, L>(a, a.states, row, pl, h);
}

// f(k, c, d) for each position k < nc of the segment and channel c of the block (inner
// channel d < D), one thread a pair, consecutive threads on consecutive channels, after a
// barrier: every lane's parts of the segment are in the stage.
template <typename T, int L, typename F>
__device__ __forceinline__ void per_position_channel(const Args<T>& a, const Place<L>& pl,
                                                     int nc, F f) {
  __syncthreads();
  const int log2c = Log2<kThreads>::value - pl.log2p;
  for (int q = threadIdx.x; q < nc << log2c; q += kThreads) {
    const int k = q >> log2c, c = q & (pl.channels - 1);
    const int d = blockIdx.x * pl.channels + c;
    if (d < a.d) f(k, c, d);
  }
}

// y at the segment's nc positions: each channel's P lane parts (emit) summed pairwise in
// lane order, so that y is the pairwise sum of the S products in state order, the same for
// every P.
template <typename T, int L>
__device__ __forceinline__ void read_out(const Args<T>& a, const Stage<T>& st,
                                         const Place<L>& pl, int nc) {
  if (a.y == nullptr) return;
  per_position_channel<T, L>(a, pl, nc, [&](int k, int c, int d) {
    a.y[static_cast<int64_t>(st.rec[k].x) * a.d + d] =
        lanes_sum(st.yp + k * kThreads + (c << pl.log2p), pl.log2p);
  });
}

// The gradients of u and dx (and of the given edge steps) at the segment's nc positions
// from the lanes' parts of dL/d(dx u) = sum_s G B and of the edge step's dL/dw w A
// (Stage::xp, ep; each lane's pairwise sum of its L terms), added over the channel's lanes
// as read_out adds y's: the same numbers as channel_sum's, for a.deferred. `accumulate`:
// dx's gradient is added to (direction "up", whose kMean children add to their parent's).
template <typename T, int L>
__device__ __forceinline__ void input_grads(const Args<T>& a, const Stage<T>& st,
                                            const Place<L>& pl, int nc, bool accumulate) {
  if (!a.deferred) return;
  per_position_channel<T, L>(a, pl, nc, [&](int k, int c, int d) {
    const int part = k * kThreads + (c << pl.log2p), at = k * pl.channels + c;
    const T gxu = lanes_sum(st.xp + part, pl.log2p), gw_de = lanes_sum(st.ep + part, pl.log2p);
    const int64_t row = static_cast<int64_t>(st.rec[k].x) * a.d + d;
    a.gu[row] = gxu * st.dx[at];
    const T own = a.rule == kChild ? mul_rn(gxu, st.u[at]) + gw_de : gxu * st.u[at];
    a.gdx[row] = accumulate ? a.gdx[row] + own : own;
    if (a.rule == kGiven) a.gde[row] = gw_de;
  });
}

// G += the gradients of the states requested at vertex v; zero on an idle lane.
template <typename T, int L>
__device__ __forceinline__ void add_state_grads(const Args<T>& a, const Place<L>& pl,
                                                int64_t v, T (&G)[L]) {
  if (!pl.live) {
#pragma unroll
    for (int j = 0; j < L; ++j) G[j] = T(0);
    return;
  }
  if (a.gstates != nullptr)
    for (int64_t row = a.srow[v]; row >= 0; row = a.snext[row])
#pragma unroll
      for (int j = 0; j < L; ++j)
        if (pl.s0 + j < a.s) G[j] += a.gstates[state_at(a, row, pl) + j];
}

// Sums a[j] over the channels of a warp (the lanes with the same part) for each of the L
// states a lane holds: halving exchanges at offsets 16, 8, ..., 32 / L (all above P: L P is
// at most 16) leave lane l with the sum of its state j = l >> (5 - log2 L), then plain
// exchanges at offsets down to P finish the sum; every lane takes part, and the order of
// the additions is fixed.
template <int L, typename T>
__device__ __forceinline__ T warp_channel_sum(T (&a)[L], int lane, int log2p) {
  int off = 16;
#pragma unroll
  for (int m = L / 2; m >= 1; m >>= 1, off >>= 1) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int j = 0; j < m; ++j) {
      const T send = upper ? a[j] : a[j + m];
      const T keep = upper ? a[j + m] : a[j];
      a[j] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
  T v = a[0];
  for (; off >= (1 << log2p); off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The gradients of B and C: sums over the channels of a block. At each position a warp
// sums its channels (warp_channel_sum) and one lane per state leaves the sum in the stage;
// at the segment's end (flush) the block adds its two warps' sums, warp 0's first, and
// writes them to its row of the [blocks, N, S] partial sums, which the host adds over the
// blocks. Every lane takes part in both steps.
template <int L> struct BlockSums {
  static_assert(kThreads == 64, "flush adds the sums of two warps");
  int lane, state, warp;
  bool writes;
  template <typename T>
  __device__ BlockSums(const Args<T>& a, const Place<L>& pl) {
    constexpr int kSpread = 5 - Log2<L>::value;  // lanes holding one state's sum: 2^kSpread
    lane = threadIdx.x & 31;
    warp = threadIdx.x >> 5;
    state = pl.s0 + (lane >> kSpread);
    writes = ((lane & ((1 << kSpread) - 1)) >> pl.log2p) == 0 && state < a.s;
  }
  // This warp's sums of cpart and bpart over its channels at position k of the segment.
  template <typename T>
  __device__ void add(const Stage<T>& st, int log2p, int states, int k, T (&cpart)[L],
                      T (&bpart)[L]) const {
    constexpr int K = Segment<T>::K;
    const T csum = warp_channel_sum<L>(cpart, lane, log2p);
    const T bsum = warp_channel_sum<L>(bpart, lane, log2p);
    if (writes) {
      st.wC[(warp * K + k) * states + state] = csum;
      st.wB[(warp * K + k) * states + state] = bsum;
    }
  }
  // The block's sums of the segment's nc positions, to its rows of a.gB and a.gC.
  template <typename T>
  __device__ void flush(const Args<T>& a, const Stage<T>& st, int states, int nc) const {
    constexpr int K = Segment<T>::K;
    __syncthreads();  // every warp's sums of the segment are in the stage
    for (int q = threadIdx.x; q < nc * states; q += kThreads) {
      const int k = q / states, s = q - k * states;
      if (s >= a.s) continue;
      const int64_t at = (static_cast<int64_t>(blockIdx.x) * a.n + st.rec[k].x) * a.s + s;
      a.gC[at] = st.wC[k * states + s] + st.wC[(K + k) * states + s];
      a.gB[at] = st.wB[k * states + s] + st.wB[(K + k) * states + s];
    }
  }
};

// The forward walk: y (when a.y), states at requested vertices (when a.states) and the
// contexts at segment starts (when a.ckpt).
template <typename T, int L>
__global__ void __launch_bounds__(kThreads) down_forward_kernel(Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Place<L> pl(a);
  Stage<T> st(smem_raw, pl.states, pl.channels);
  constexpr int K = Segment<T>::K;
  T Ar[L];
  load_rates(a, pl, Ar);
  T stack[kStack][L];
  for (int t = blockIdx.y; t < a.num_trees; t += gridDim.y) {
    const int start = a.tree_ptr[t], end = a.tree_ptr[t + 1];
    T h[L];
#pragma unroll
    for (int j = 0; j < L; ++j) h[j] = T(0);
    int top = 0;
    for (int c0 = start; c0 < end; c0 += K) {
      const int nc = min(K, end - c0);
      stage<T, L>(a, st, pl, c0, nc, false);
      if (a.ckpt != nullptr && pl.live) save_context<T, L>(a, st.rec[0].w, pl, h, stack, top);
      // the lane's entries of position k, advanced by one position a step
      const T *su = st.u + pl.c, *sdx = st.dx + pl.c, *sde = st.de + pl.c;
      const T *Bk = st.B + pl.s0, *Ck = st.C + pl.s0;
      T* yp = st.yp + threadIdx.x;
      for (int k = 0; k < nc; ++k) {
        const int4 r = st.rec[k];
        const int flags = r.z & 15;
        T hp[L];
        parent_state<T, L>(a, flags, t, pl, h, stack, top, hp);
        down_step<T, L>(flags, *sde, *sdx * *su, Ar, Bk, hp, h, stack, top);
        emit<T, L>(a, pl, yp, r.x, Ck, h);
        su += pl.channels;
        sdx += pl.channels;
        sde += pl.channels;
        Bk += pl.states;
        Ck += pl.states;
        yp += kThreads;
      }
      read_out<T, L>(a, st, pl, nc);
    }
  }
}

// The backward walk, after down_forward_kernel has filled a.ckpt.
template <typename T, int L>
__global__ void __launch_bounds__(kThreads) down_backward_kernel(Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Place<L> pl(a);
  Stage<T> st(smem_raw, pl.states, pl.channels);
  constexpr int K = Segment<T>::K;
  const BlockSums<L> sums(a, pl);
  T Ar[L], gA[L];
  load_rates(a, pl, Ar);
#pragma unroll
  for (int j = 0; j < L; ++j) gA[j] = T(0);
  T stack[kStack][L];       // states, for the walk forward inside a segment
  T gstack[kStack][L + 1];  // gradient shares handed to a parent, and the halves of the edge
                            // steps' gradients (rule kMean; alike in the channel's lanes)
  T hps[K][L];              // the parent state of each position of the segment
  for (int t = blockIdx.y; t < a.num_trees; t += gridDim.y) {
    const int start = a.tree_ptr[t], end = a.tree_ptr[t + 1];
    if (start >= end) continue;
    const int nseg = (end - start + K - 1) / K;
    int gtop = 0;
    T gc[L + 1];  // what the first child hands to its parent, the next position walked back
#pragma unroll
    for (int j = 0; j <= L; ++j) gc[j] = T(0);
    for (int sj = nseg - 1; sj >= 0; --sj) {
      const int c0 = start + sj * K, nc = min(K, end - c0);
      stage<T, L>(a, st, pl, c0, nc, true);
      // the context at the segment's start
      int top = st.rec[0].z >> 4;
      T h[L];
      load_context<T, L>(a, st.rec[0].w, pl, h, stack, top);
      // forward through the segment, keeping the parent states
      for (int k = 0; k < nc; ++k) {
        const int flags = st.rec[k].z & 15;
        T hp[L];
        parent_state<T, L>(a, flags, t, pl, h, stack, top, hp);
        const int at = k * pl.channels + pl.c;
        const T xu = st.dx[at] * st.u[at];
#pragma unroll
        for (int j = 0; j < L; ++j) hps[k][j] = hp[j];
        down_step<T, L>(flags, st.de[at], xu, Ar, st.B + k * pl.states + pl.s0, hp, h, stack,
                        top);
      }
      // backward through the segment
      for (int k = nc - 1; k >= 0; --k) {
        const int4 r = st.rec[k];
        const int flags = r.z & 15;
        const int64_t v = r.x;
        const int at = k * pl.channels + pl.c;
        const T uv = st.u[at], dv = st.dx[at], e = st.de[at], gyv = st.gy[at];
        const T* Bk = st.B + k * pl.states + pl.s0;
        const T* Ck = st.C + k * pl.states + pl.s0;
        const T xu = dv * uv;
        T G[L];
        T half = gc[L];
#pragma unroll
        for (int j = 0; j < L; ++j) G[j] = mul_rn(Ck[j], gyv) + gc[j];
        if (flags & kPush) {
          --gtop;
#pragma unroll
          for (int j = 0; j < L; ++j) G[j] += gstack[gtop][j];
          half += gstack[gtop][L];
        }
        add_state_grads<T, L>(a, pl, v, G);
        T cpart[L], bpart[L], w[L], xterms[L], eterms[L];
        const T es = exp_step(e);
#pragma unroll
        for (int j = 0; j < L; ++j) {
          w[j] = walk_exp(es * Ar[j]);
          const T hv = two_products(w[j], hps[k][j], xu, Bk[j]);
          cpart[j] = gyv * hv;
          bpart[j] = G[j] * xu;
          xterms[j] = mul_rn(G[j], Bk[j]);
          const T gww = G[j] * hps[k][j] * w[j];  // dL/dw * w
          eterms[j] = mul_rn(gww, Ar[j]);
          gA[j] += mul_rn(gww, e);
        }
        sums.add(st, pl.log2p, pl.states, k, cpart, bpart);
        const bool root = (flags & kRoot) != 0;
        T up_half = T(0);  // the half of dL/dde[v] that belongs to the parent's dx
        if (a.deferred) {  // summed over the lanes after the segment (input_grads)
          st.xp[k * kThreads + threadIdx.x] = pairwise_sum<L>(xterms);
          st.ep[k * kThreads + threadIdx.x] = pairwise_sum<L>(eterms);
        } else {
          const T gxu = channel_sum<L>(xterms, pl.log2p);    // dL/d(dx u)
          const T gw_de = channel_sum<L>(eterms, pl.log2p);  // dL/d(edge step)
          T own = mul_rn(gxu, uv);  // dL/d(dx[v]) through x
          if (a.rule == kChild || (a.rule == kMean && root)) {
            own += gw_de;
          } else if (a.rule == kMean) {
            own += T(0.5) * gw_de;
            up_half = T(0.5) * gw_de;
          }
          if (a.rule == kMean) own += half;
          if (pl.live && pl.part == 0) {
            a.gu[v * a.d + pl.d] = gxu * dv;
            a.gdx[v * a.d + pl.d] = own;
            if (a.rule == kGiven) a.gde[v * a.d + pl.d] = gw_de;
          }
        }
        if (pl.live && root && a.gh0 != nullptr)
#pragma unroll
          for (int j = 0; j < L; ++j)
            if (pl.s0 + j < a.s) a.gh0[state_at(a, t, pl) + j] = G[j] * w[j];
        // hand w G (and the half) to the parent
#pragma unroll
        for (int j = 0; j <= L; ++j) gc[j] = T(0);
        if (root) continue;
        if (flags & kFirst) {
#pragma unroll
          for (int j = 0; j < L; ++j) gc[j] = w[j] * G[j];
          gc[L] = up_half;
        } else if (flags & kLast) {
#pragma unroll
          for (int j = 0; j < L; ++j) gstack[gtop][j] = w[j] * G[j];
          gstack[gtop][L] = up_half;
          ++gtop;
        } else {
#pragma unroll
          for (int j = 0; j < L; ++j) gstack[gtop - 1][j] += mul_rn(w[j], G[j]);
          gstack[gtop - 1][L] += up_half;
        }
      }
      sums.flush(a, st, pl.states, nc);
      input_grads<T, L>(a, st, pl, nc, false);
    }
  }
  write_lane_states<T, L>(a, a.gA, blockIdx.y, pl, gA);
}


// ---------------------------------------------------------------------------- direction "up"
// up[v] = x[v] + sum over children c of w[c] up[c]: the walk taken backwards, each vertex
// after its subtree. A first child hands w up to its parent, the next position walked back
// (`carry`); the parent's last child opens an accumulator on the stack, its middle children
// add to it, and the parent closes it. Contexts (carry and open accumulators) are saved at
// the first position of every segment but a tree's first, in that segment's slots: the
// context in which the segment before it is walked.
template <typename T, int L>
__global__ void __launch_bounds__(kThreads) up_forward_kernel(Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Place<L> pl(a);
  Stage<T> st(smem_raw, pl.states, pl.channels);
  constexpr int K = Segment<T>::K;
  T Ar[L];
  load_rates(a, pl, Ar);
  T stack[kStack][L];
  for (int t = blockIdx.y; t < a.num_trees; t += gridDim.y) {
    const int start = a.tree_ptr[t], end = a.tree_ptr[t + 1];
    if (start >= end) continue;
    const int nseg = (end - start + K - 1) / K;
    T carry[L];
#pragma unroll
    for (int j = 0; j < L; ++j) carry[j] = T(0);
    int top = 0;
    for (int sj = nseg - 1; sj >= 0; --sj) {
      const int c0 = start + sj * K, nc = min(K, end - c0);
      stage<T, L>(a, st, pl, c0, nc, false);
      for (int k = nc - 1; k >= 0; --k) {
        const int4 r = st.rec[k];
        const int flags = r.z & 15;
        const int at = k * pl.channels + pl.c;
        const T xu = st.dx[at] * st.u[at];
        const T* Ck = st.C + k * pl.states + pl.s0;
        T up[L];
        up_step<T, L>(flags, st.de[at], xu, Ar, st.B + k * pl.states + pl.s0, carry, stack,
                      top, up);
        emit<T, L>(a, pl, st.yp + k * kThreads + threadIdx.x, r.x, Ck, up);
      }
      read_out<T, L>(a, st, pl, nc);
      if (a.ckpt != nullptr && sj > 0 && pl.live)
        save_context<T, L>(a, st.rec[0].w, pl, carry, stack, top);
    }
  }
}

// The backward of "up", after up_forward_kernel has filled a.ckpt: G = dL/dx is the down
// scan of C gy, G[v] = C[v] gy[v] + w[v] G[parent], walked forward with a stack of the
// parents' G; each segment's up values are first recomputed from the context saved at the
// next segment's start.
template <typename T, int L>
__global__ void __launch_bounds__(kThreads) up_backward_kernel(Args<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Place<L> pl(a);
  Stage<T> st(smem_raw, pl.states, pl.channels);
  constexpr int K = Segment<T>::K;
  const BlockSums<L> sums(a, pl);
  T Ar[L], gA[L];
  load_rates(a, pl, Ar);
#pragma unroll
  for (int j = 0; j < L; ++j) gA[j] = T(0);
  T stack[kStack][L];   // open accumulators, for the walk back inside a segment
  T gstack[kStack][L];  // G of the vertices with two or more children
  T ups[K][L];          // the up values of the segment's positions
  for (int t = blockIdx.y; t < a.num_trees; t += gridDim.y) {
    const int start = a.tree_ptr[t], end = a.tree_ptr[t + 1];
    if (start >= end) continue;
    const int nseg = (end - start + K - 1) / K;
    int gtop = 0;
    T Gprev[L];
#pragma unroll
    for (int j = 0; j < L; ++j) Gprev[j] = T(0);
    for (int sj = 0; sj < nseg; ++sj) {
      const int c0 = start + sj * K, nc = min(K, end - c0);
      stage<T, L>(a, st, pl, c0, nc, true);
      // the context after the next segment was walked back
      T carry[L];
      int top = 0;
#pragma unroll
      for (int j = 0; j < L; ++j) carry[j] = T(0);
      if (sj + 1 < nseg) {
        const int4 next = a.rec[c0 + nc];
        top = next.z >> 4;
        load_context<T, L>(a, next.w, pl, carry, stack, top);
      }
      // back through the segment: the up values
      for (int k = nc - 1; k >= 0; --k) {
        const int flags = st.rec[k].z & 15;
        const int at = k * pl.channels + pl.c;
        const T xu = st.dx[at] * st.u[at];
        T up[L];
        up_step<T, L>(flags, st.de[at], xu, Ar, st.B + k * pl.states + pl.s0, carry, stack,
                      top, up);
#pragma unroll
        for (int j = 0; j < L; ++j) ups[k][j] = up[j];
      }
      // forward through the segment: G and the gradients
      for (int k = 0; k < nc; ++k) {
        const int4 r = st.rec[k];
        const int flags = r.z & 15;
        const int64_t v = r.x;
        const int at = k * pl.channels + pl.c;
        const T uv = st.u[at], dv = st.dx[at], e = st.de[at], gyv = st.gy[at];
        const T* Bk = st.B + k * pl.states + pl.s0;
        const T* Ck = st.C + k * pl.states + pl.s0;
        const T xu = dv * uv;
        const bool root = (flags & kRoot) != 0;
        T Gp[L];
        if (root) {
#pragma unroll
          for (int j = 0; j < L; ++j) Gp[j] = T(0);
        } else if (flags & kFirst) {
#pragma unroll
          for (int j = 0; j < L; ++j) Gp[j] = Gprev[j];
        } else {
#pragma unroll
          for (int j = 0; j < L; ++j) Gp[j] = gstack[gtop - 1][j];
          if (flags & kLast) --gtop;
        }
        T G[L], w[L], cpart[L], bpart[L], xterms[L], eterms[L];
        const T es = exp_step(e);
#pragma unroll
        for (int j = 0; j < L; ++j) {
          w[j] = walk_exp(es * Ar[j]);
          G[j] = two_products(w[j], Gp[j], Ck[j], gyv);
        }
        add_state_grads<T, L>(a, pl, v, G);
#pragma unroll
        for (int j = 0; j < L; ++j) {
          cpart[j] = gyv * ups[k][j];
          bpart[j] = G[j] * xu;
          xterms[j] = mul_rn(G[j], Bk[j]);
          const T gww = Gp[j] * ups[k][j] * w[j];  // dL/dw * w
          eterms[j] = mul_rn(gww, Ar[j]);
          gA[j] += mul_rn(gww, e);
        }
        sums.add(st, pl.log2p, pl.states, k, cpart, bpart);
        if (a.deferred) {  // summed over the lanes after the segment (input_grads)
          st.xp[k * kThreads + threadIdx.x] = pairwise_sum<L>(xterms);
          st.ep[k * kThreads + threadIdx.x] = pairwise_sum<L>(eterms);
        } else {
          const T gxu = channel_sum<L>(xterms, pl.log2p);
          const T gw_de = channel_sum<L>(eterms, pl.log2p);
          if (pl.live && pl.part == 0) {
            a.gu[v * a.d + pl.d] = gxu * dv;
            T own = mul_rn(gxu, uv);
            if (a.rule == kChild) {
              own += gw_de;
            } else if (a.rule == kMean && !root) {
              own += T(0.5) * gw_de;
            }
            // the parent precedes its children in the walk: under rule kMean each child
            // adds the parent's half of its edge step's gradient after the parent's own terms
            a.gdx[v * a.d + pl.d] += own;
            if (a.rule == kMean && !root)
              a.gdx[static_cast<int64_t>(r.y) * a.d + pl.d] += T(0.5) * gw_de;
            if (a.rule == kGiven) a.gde[v * a.d + pl.d] = gw_de;
          }
        }
#pragma unroll
        for (int j = 0; j < L; ++j) Gprev[j] = G[j];
        if (flags & kPush) {
#pragma unroll
          for (int j = 0; j < L; ++j) gstack[gtop][j] = G[j];
          ++gtop;
        }
      }
      sums.flush(a, st, pl.states, nc);
      input_grads<T, L>(a, st, pl, nc, true);
    }
  }
  write_lane_states<T, L>(a, a.gA, blockIdx.y, pl, gA);
}

// ---------------------------------------------------------------------------- chains
// The backward of "down" over a forest of chains (each vertex's parent the previous position
// of its tree's walk: WalkPlan.chains), parallel in time, from the checkpoints of the
// forward walk. A warp takes one channel of one chain in pieces of 32 R positions
// (R = chain_items: whole segments) from the last, its lane l the R consecutive positions
// from l R of a piece. For each state s, with a = w = exp(de A) and b = (dx u) B the step
// h = a h' + b of a position, the lanes compose their positions' steps, scan the
// compositions across the warp (lanes_before: never a division, so weights of 0 and above 1
// stay exact) and recompute the piece's states from the checkpoint at its start (h0, or
// zero, at the chain's first). Then the share Gw[v] = w[v] G[v] that each position hands to
// its parent, right to left: Gw[v] = w[v] (c[v] + Gw[child]) with c = C dL/dy (and the
// gradients of requested states), composed per lane, scanned across the warp with shuffles
// from the right, and carried from the piece after (zero at a chain's last position);
// G = c + Gw[child] = dL/dx. The sums over states (dL/d(dx u) = sum_s G B, the edge step's
// sum_s dL/dw w A) run in state order per position; those over channels (the gradients of B
// and C) add the block's warps in order in shared memory, one row of partial sums a block
// as the walk's, written out once per piece; dL/dA sums over the positions of a lane, then
// the warp's lanes, then the pieces, then the block row's chains. Under rule kMean a
// position adds half of its child's edge-step gradient (the next position's) to its dx's.
// A block is kChainWarps consecutive channels of one chain; it stages a piece's rows of B
// and C, and of u, dx and dL/dy at its channels, in shared memory (chain_stage), read by
// its warps state by state or position by position, and writes the gradients of B and C,
// u, dx and the edge steps back through shared memory too, a position's row at a time.
// Three blocks a multiprocessor (80 registers a thread). Results are bitwise reproducible.
constexpr int kChainWarps = 8;

// Positions a lane takes in a piece (16 / sizeof(T): pieces of 128 in float, 64 in double):
// whole segments, and the staged rows with the gradients' terms within 48 KB of shared
// memory.
template <typename T>
__host__ __device__ constexpr int chain_items() {
  return 16 / static_cast<int>(sizeof(T));
}

// A state's row of staged B or C: the piece's 32 R positions with a word of padding after
// every R (lane l's item i at l (R + 1) + i: no two lanes of a warp in one bank), and one word
// more (the staging threads' states fall in different banks).
template <typename T>
__host__ __device__ constexpr int chain_row() {
  return 32 * chain_items<T>() + 33;
}

// The slot of the piece's position q in staged row r (a state of B or C, a channel of u,
// dx or dL/dy): a word of padding after every R positions.
template <typename T>
__device__ __forceinline__ int chain_slot(int r, int q) {
  constexpr int R = chain_items<T>();
  return r * chain_row<T>() + q + q / R;
}

// Stages, by the block's threads together after the readers of the piece before, the
// piece's rows [base, base + 32 R) (zero past the chain's `end`): B and C for every state,
// position q of state s at chain_slot(s, q); and u, dx and dL/dy for the block's channels
// (from d0), position q of channel c at chain_slot(c, q) (zero past the last channel), so
// that each is read from global memory a position's row at a time.
template <typename T>
__device__ __forceinline__ void chain_stage(const Args<T>& a, int base, int end, int d0, T* sB,
                                            T* sC, T* tu, T* tx, T* tg) {
  constexpr int R = chain_items<T>();
  __syncthreads();
  for (int k = threadIdx.x; k < 32 * R * a.s; k += kChainWarps * 32) {
    const int q = k / a.s, s = k - q * a.s;
    T b = T(0), c = T(0);
    if (base + q < end) {
      const int64_t at = static_cast<int64_t>(a.rec[base + q].x) * a.s + s;
      b = a.B[at];
      c = a.C[at];
    }
    sB[chain_slot<T>(s, q)] = b;
    sC[chain_slot<T>(s, q)] = c;
  }
  for (int k = threadIdx.x; k < 32 * R * kChainWarps; k += kChainWarps * 32) {
    const int q = k / kChainWarps, c = k % kChainWarps;
    T u = T(0), dx = T(0), gy = T(0);
    if (base + q < end && d0 + c < a.d) {
      const int64_t row = static_cast<int64_t>(a.rec[base + q].x) * a.d + d0 + c;
      u = a.u[row];
      dx = a.dx[row];
      gy = a.gy[row];
    }
    tu[chain_slot<T>(c, q)] = u;
    tx[chain_slot<T>(c, q)] = dx;
    tg[chain_slot<T>(c, q)] = gy;
  }
  __syncthreads();
}

// (ea, eb): the composition of the steps h -> a h + b of the warp's lanes before this one,
// in lane order (the identity for lane 0), from each lane's own composition (ca, cb): an
// inclusive scan with shuffles at offsets 1, 2, ..., 16, then the left neighbour's.
template <typename T>
__device__ __forceinline__ void lanes_before(T ca, T cb, int lane, T& ea, T& eb) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T pa = __shfl_up_sync(0xffffffffu, ca, off);
    const T pb = __shfl_up_sync(0xffffffffu, cb, off);
    if (lane >= off) {
      cb = fma(ca, pb, cb);
      ca = ca * pa;
    }
  }
  ea = __shfl_up_sync(0xffffffffu, ca, 1);
  eb = __shfl_up_sync(0xffffffffu, cb, 1);
  if (lane == 0) {
    ea = T(1);
    eb = T(0);
  }
}

// Shared memory of chain_backward_kernel for d_state states: the staged rows of B and C,
// each warp's terms of the gradients of B and C at a piece's positions, and the staged rows
// of u, dx and dL/dy (on their way out, of the gradients of u, dx and the edge steps).
template <typename T>
__host__ __device__ constexpr size_t chain_backward_smem_bytes(int d_state) {
  return sizeof(T) * ((2 * static_cast<size_t>(d_state) + 3 * kChainWarps) * chain_row<T>() +
                      2 * kChainWarps * 32 * chain_items<T>());
}

template <typename T>
__global__ void __launch_bounds__(kChainWarps * 32, 3) chain_backward_kernel(Args<T> a) {
  constexpr int R = chain_items<T>(), kPiece = 32 * R, kRow = chain_row<T>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sB = reinterpret_cast<T*>(smem_raw);
  T* sC = sB + a.s * kRow;
  T(*wB)[kPiece] = reinterpret_cast<T(*)[kPiece]>(sC + a.s * kRow);
  T(*wC)[kPiece] = wB + kChainWarps;
  T* tu = &wC[kChainWarps - 1][kPiece];
  T* tx = tu + kChainWarps * kRow;
  T* tg = tx + kChainWarps * kRow;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int d0 = blockIdx.x * kChainWarps, d = d0 + warp;
  // this lane's positions in the staged rows of its channel
  T* lu = tu + warp * kRow + lane * (R + 1);
  T* lx = tx + warp * kRow + lane * (R + 1);
  T* lg = tg + warp * kRow + lane * (R + 1);
  const bool live = d < a.d;  // an idle warp still takes part in the block's sums
  T gA_acc = T(0);            // lane s: dL/dA[d, s] over the block row's chains
  for (int t = blockIdx.y; t < a.num_trees; t += gridDim.y) {
    const int start = a.tree_ptr[t], end = a.tree_ptr[t + 1];
    const int pieces = (end - start + kPiece - 1) / kPiece;
    T gw_carry = T(0);   // lane s: Gw of the first position of the piece after, state s
    T half_next = T(0);  // kMean: half the edge-step gradient of that position
    for (int pc = pieces - 1; pc >= 0; --pc) {
      const int base = start + pc * kPiece;
      chain_stage<T>(a, base, end, d0, sB, sC, tu, tx, tg);
      int v[R];
      T xu[R], e[R], gyv[R], gxu[R], gwde[R];
      unsigned valid = 0, wanted = 0;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int p = base + lane * R + i;
        v[i] = 0;
        xu[i] = e[i] = gyv[i] = gxu[i] = gwde[i] = T(0);
        if (p >= end || !live) continue;
        valid |= 1u << i;
        const int4 r = a.rec[p];
        v[i] = r.x;
        const int64_t row = static_cast<int64_t>(r.x) * a.d + d;
        const T dv = lx[i];
        xu[i] = dv * lu[i];
        gyv[i] = lg[i];
        e[i] = dv;
        if (a.rule == kGiven) {
          e[i] = a.de[row];
        } else if (a.rule == kMean && r.y >= 0) {  // the parent: the position before
          const int q = lane * R + i - 1;
          const T dp = q >= 0 ? tx[chain_slot<T>(warp, q)]
                              : a.dx[static_cast<int64_t>(r.y) * a.d + d];
          e[i] = T(0.5) * (dv + dp);
        }
        if (a.gstates != nullptr && a.srow[r.x] >= 0) wanted |= 1u << i;
      }
      const int slot = a.rec[base].w;  // the piece starts a segment
      for (int s = 0; s < a.s; ++s) {
        const T As = live ? a.A[static_cast<int64_t>(d) * a.s + s] : T(0);
        const T* rB = sB + s * kRow + lane * (R + 1);  // this lane's positions, state s
        const T* rC = sC + s * kRow + lane * (R + 1);
        T wa[R], xb[R], Cs[R], Bs[R];
        T ca = T(1), cb = T(0);
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const bool ok = (valid >> i) & 1u;
          wa[i] = ok ? walk_exp(exp_step(e[i]) * As) : T(1);
          Bs[i] = ok ? rB[i] : T(0);
          Cs[i] = ok ? rC[i] : T(0);
          xb[i] = mul_rn(xu[i], Bs[i]);
          cb = fma(wa[i], cb, xb[i]);
          ca = wa[i] * ca;
        }
        // the states, from the piece's entering state
        T ea, eb;
        lanes_before(ca, cb, lane, ea, eb);
        T enter = T(0);
        if (live) {
          if (pc > 0) enter = a.ckpt[(static_cast<int64_t>(slot) * a.d + d) * a.s + s];
          else if (a.h0 != nullptr) enter = a.h0[(static_cast<int64_t>(t) * a.d + d) * a.s + s];
        }
        T hp[R], hv[R];
        T h = fma(ea, enter, eb);
#pragma unroll
        for (int i = 0; i < R; ++i) {
          hp[i] = h;
          h = fma(wa[i], h, xb[i]);
          hv[i] = h;
        }
        // the shares handed to the parents, right to left
        T c[R];
        T ga = T(1), gb = T(0);  // this lane's map from the share entering from its right
#pragma unroll
        for (int i = R - 1; i >= 0; --i) {
          c[i] = mul_rn(Cs[i], gyv[i]);
          if ((wanted >> i) & 1u)
            for (int64_t row = a.srow[v[i]]; row >= 0; row = a.snext[row])
              c[i] += a.gstates[(row * a.d + d) * a.s + s];
          gb = wa[i] * (c[i] + gb);
          ga = wa[i] * ga;
        }
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const T na = __shfl_down_sync(0xffffffffu, ga, off);
          const T nb = __shfl_down_sync(0xffffffffu, gb, off);
          if (lane + off < 32) {
            gb = fma(ga, nb, gb);
            ga = ga * na;
          }
        }
        T fa = __shfl_down_sync(0xffffffffu, ga, 1), fb = __shfl_down_sync(0xffffffffu, gb, 1);
        if (lane == 31) {
          fa = T(1);
          fb = T(0);
        }
        T gw = fma(fa, __shfl_sync(0xffffffffu, gw_carry, s), fb);  // from this lane's right
        T gA_piece = T(0);
#pragma unroll
        for (int i = R - 1; i >= 0; --i) {
          const int q = lane * R + i;
          wB[warp][q] = T(0);
          wC[warp][q] = T(0);
          if (!((valid >> i) & 1u)) continue;
          const T G = c[i] + gw;
          gxu[i] += mul_rn(G, Bs[i]);
          const T gww = G * hp[i] * wa[i];  // dL/dw w
          gwde[i] += mul_rn(gww, As);
          gA_piece += mul_rn(gww, e[i]);
          wB[warp][q] = G * xu[i];
          wC[warp][q] = gyv[i] * hv[i];
          if (base + q == start && a.gh0 != nullptr)
            a.gh0[(static_cast<int64_t>(t) * a.d + d) * a.s + s] = G * wa[i];
          gw = wa[i] * G;
        }
        const T first = __shfl_sync(0xffffffffu, gw, 0);  // the piece's first position's share
        if (lane == s) gw_carry = first;
        for (int off = 16; off >= 1; off >>= 1)
          gA_piece += __shfl_xor_sync(0xffffffffu, gA_piece, off);
        if (lane == s) gA_acc += gA_piece;
        // the gradients of B and C at the piece's positions: the block's warps in order, in
        // place of the staged row of state s, which no warp reads after this state's terms
        __syncthreads();
        for (int q = threadIdx.x; q < kPiece; q += kChainWarps * 32) {
          T sb = T(0), sc = T(0);
          for (int w = 0; w < kChainWarps; ++w) {
            sb += wB[w][q];
            sc += wC[w][q];
          }
          sB[chain_slot<T>(s, q)] = sb;
          sC[chain_slot<T>(s, q)] = sc;
        }
        __syncthreads();
      }
      // ... written out once for all states, a position's states side by side (the next
      // piece's staging waits for these reads)
      for (int k = threadIdx.x; k < kPiece * a.s; k += kChainWarps * 32) {
        const int q = k / a.s, s = k - q * a.s;
        if (base + q >= end) continue;
        const int64_t at = (static_cast<int64_t>(blockIdx.x) * a.n + a.rec[base + q].x) * a.s + s;
        a.gB[at] = sB[chain_slot<T>(s, q)];
        a.gC[at] = sC[chain_slot<T>(s, q)];
      }
      // the inputs' gradients; under kMean the child's half (the next position's)
      T half_in = __shfl_down_sync(0xffffffffu, T(0.5) * gwde[0], 1);
      if (lane == 31) half_in = half_next;
      half_next = __shfl_sync(0xffffffffu, T(0.5) * gwde[0], 0);
#pragma unroll
      for (int i = R - 1; i >= 0; --i) {
        const T child_half = i == R - 1 ? half_in : T(0.5) * gwde[i + 1 < R ? i + 1 : i];
        if (!((valid >> i) & 1u)) continue;
        const int p = base + lane * R + i;
        T own = mul_rn(gxu[i], lu[i]);
        if (a.rule == kChild || (a.rule == kMean && p == start)) own += gwde[i];
        else if (a.rule == kMean) own += T(0.5) * gwde[i];
        if (a.rule == kMean && p + 1 < end) own += child_half;
        // in place of this position's u, dx and dL/dy in the staged rows
        lu[i] = gxu[i] * lx[i];
        lx[i] = own;
        lg[i] = gwde[i];
      }
      // ... written out a position's row at a time
      __syncthreads();
      for (int k = threadIdx.x; k < kPiece * kChainWarps; k += kChainWarps * 32) {
        const int q = k / kChainWarps, c = k % kChainWarps;
        if (base + q >= end || d0 + c >= a.d) continue;
        const int64_t row = static_cast<int64_t>(a.rec[base + q].x) * a.d + d0 + c;
        const int at = chain_slot<T>(c, q);
        a.gu[row] = tu[at];
        a.gdx[row] = tx[at];
        if (a.rule == kGiven) a.gde[row] = tg[at];
      }
    }
  }
  if (live && lane < a.s) a.gA[(static_cast<int64_t>(blockIdx.y) * a.d + d) * a.s + lane] = gA_acc;
}

}  // namespace walk
}  // namespace treessm_cuda
