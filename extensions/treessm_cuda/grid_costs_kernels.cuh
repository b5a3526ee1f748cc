// Grid-cost kernel: the cost of every candidate edge of a batch of images in one pass; and
// the edge-cost kernel: the same costs for a list of edges.
//
// Features are [B*H*W, C], channels last. For image b, pixel (i, j) = b*H*W + i*W + j, the
// candidate edges are laid out as treessm.topology.grid.grid_edges lists them (each part
// row-major, images one after another):
//   horizontal (i,j)-(i,j+1)   from 0,       H*(W-1) edges
//   vertical   (i,j)-(i+1,j)   from e_vert,  (H-1)*W edges
//   diagonal   (i,j)-(i+1,j+1) from e_diag,  (H-1)*(W-1) edges (8-connectivity)
//   anti-diag. (i,j+1)-(i+1,j) from e_anti,  (H-1)*(W-1) edges (8-connectivity)
//
// A group of G lanes (G a power of two, at most a warp) owns one pixel p and writes the
// edges whose upper or left end is p: right, down and, with 8-connectivity, down-right and
// down-left (the anti-diagonal edge of cell (i, j-1)). The lanes split the channels into
// packs of V consecutive elements (16-byte loads when the rows allow, single elements
// otherwise), read p's pack and the same pack of each forward neighbour, and accumulate
//   cosine: |p|^2, <p, q> and |q|^2 per neighbour q;
//   l2:     |p - q|^2 per neighbour q;
// then sum over the group with butterfly shuffles (every lane ends with the same sums).
// So each pixel's row comes from DRAM about once; its other reads (as the right or lower
// neighbour of another pixel) hit L1/L2, read by the same or a nearby block shortly
// before or after. Costs:
//   cosine: exp(-<p, q> / (max(|p|, eps) max(|q|, eps)))   (the cosine of the normalised
//           features, as torch.nn.functional.normalize(x, eps=eps) gives them; a norm that
//           overflows to infinity normalises to zero, as there)
//   l2:     sqrt(|p - q|^2)
// Accumulation is float32 for float32, float16 and bfloat16 features and float64 for
// float64; the output has that type. Cosine sums of rows of any finite scale: when a squared
// norm of a nonzero row falls outside the range where its sums keep every bit (SafeSquares,
// as treessm.topology.distance.safe_squares), the warp redoes its sums on rows scaled by the
// power of two that brings each row's largest magnitude into [1/2, 1) (exact: the cosine of
// two rows is what it was, and rows that were safe give the same bits). The l2 costs of
// extreme features are the caller's to scale (one power of two per image keeps their order).
//
// edge_costs_kernel computes the same costs for a list of edges between the rows of any
// feature matrix (a graph's edge_index): a group of lanes per edge reads both rows, so the
// rows of the two ends are never gathered into [E, C] arrays; both kernels share the sums
// (group_costs).
//
// Offsets are 64-bit (B*H*W*C may exceed 2^31); one image's pixel index is 32-bit. Loops are
// grid-strided with block-uniform bounds, so every lane of a warp reaches every shuffle.
//
// The source also compiles for the host against extensions/treessm_cuda/host_emulation
// (one std::thread per CUDA thread, see host_emulation/grid_costs_harness.cpp).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "numeric.cuh"

namespace treessm_cuda {
namespace costs {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kCosine = 0;  // kind codes of treessm.topology.distance.kind_code
constexpr int kL2 = 1;
constexpr int kThreads = 256;    // threads per block of the launches in grid_costs.cu
constexpr int kMaxPacks = 10;    // packs per lane that the group-size choice aims at
constexpr int kPackBytes = 16;   // bytes of one vector load

// Accumulation type (numeric.cuh): float64 for float64 features, float32 otherwise.
using treessm_cuda::AccType;
using treessm_cuda::to_acc;

__device__ __forceinline__ float root(float x) { return sqrtf(x); }
__device__ __forceinline__ double root(double x) { return sqrt(x); }
__device__ __forceinline__ float expo(float x) { return expf(x); }
__device__ __forceinline__ double expo(double x) { return exp(x); }

// V consecutive elements, aligned so that one load instruction moves them.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* __restrict__ p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

// Squared norms whose sums keep (almost) every bit and cannot overflow, for up to 2^20
// channels: [2^-100, 2^100] in float32, [2^-900, 2^900] in float64.
template <typename A> struct SafeSquares;
template <> struct SafeSquares<float> {
  __device__ __forceinline__ static float lo() { return 0x1p-100f; }
  __device__ __forceinline__ static float hi() { return 0x1p100f; }
};
template <> struct SafeSquares<double> {
  __device__ __forceinline__ static double lo() { return 0x1p-900; }
  __device__ __forceinline__ static double hi() { return 0x1p900; }
};

__device__ __forceinline__ float magnitude(float x) { return fabsf(x); }
__device__ __forceinline__ double magnitude(double x) { return fabs(x); }
__device__ __forceinline__ float larger(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double larger(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float times_pow2(float x, int e) { return ldexpf(x, e); }
__device__ __forceinline__ double times_pow2(double x, int e) { return ldexp(x, e); }
__device__ __forceinline__ int exponent_of(float x) { int e; frexpf(x, &e); return e; }
__device__ __forceinline__ int exponent_of(double x) { int e; frexp(x, &e); return e; }

// The factor 2^-e (e: the exponent of a row's largest magnitude m = f 2^e, f in [1/2, 1))
// as two powers of two, each representable (2^-e alone overflows for subnormal m).
template <typename A> struct RowScale {
  int lo = 0, hi = 0;
  __device__ __forceinline__ RowScale() {}
  __device__ __forceinline__ explicit RowScale(A m) {
    const int e = m == A(0) ? 0 : exponent_of(m);
    lo = -(e >> 1);
    hi = (e >> 1) - e;
  }
  __device__ __forceinline__ A operator()(A x) const { return times_pow2(times_pow2(x, lo), hi); }
};

// 1 / max(sqrt(sq), eps): the factor of torch.nn.functional.normalize.
template <typename A>
__device__ __forceinline__ A inv_norm(A sq, A eps) {
  const A n = root(sq);
  return A(1) / (n > eps ? n : eps);
}

struct Shape {
  int64_t pixels;  // B * H * W
  int64_t C;       // channels (elements per row)
  int H, W;
  int64_t per_image;  // candidate edges per image
  int64_t e_vert, e_diag, e_anti;  // first vertical / diagonal / anti-diagonal edge
};

__host__ __device__ inline Shape make_shape(int64_t B, int H, int W, int64_t C, bool eight) {
  Shape s;
  s.pixels = B * H * W;
  s.C = C;
  s.H = H;
  s.W = W;
  const int64_t cells = static_cast<int64_t>(H - 1) * (W - 1);
  s.e_vert = static_cast<int64_t>(H) * (W - 1);
  s.e_diag = s.e_vert + static_cast<int64_t>(H - 1) * W;
  s.e_anti = s.e_diag + (eight ? cells : 0);
  s.per_image = s.e_anti + (eight ? cells : 0);
  return s;
}

// Elements per pack: 16 bytes' worth when every row starts on a 16-byte boundary (the base
// address and the row length in bytes are multiples of 16), else 1.
template <typename T>
__host__ __device__ inline int pack_elements(const void* base, int64_t C) {
  constexpr int v = kPackBytes / static_cast<int>(sizeof(T));
  const bool aligned = (reinterpret_cast<uintptr_t>(base) % kPackBytes) == 0 &&
                       (C * static_cast<int64_t>(sizeof(T))) % kPackBytes == 0;
  return (v > 1 && aligned) ? v : 1;
}

// Lanes per pixel for `packs` packs per row: among the powers of two up to 32 whose lanes
// read at most kMaxPacks packs each, the one that leaves the fewest lanes idle in the last
// round; ties go to the smallest group (more pixels per warp, fewer shuffle rounds). Rows
// longer than 32 * kMaxPacks packs take a full warp.
__host__ __device__ inline int choose_group(int64_t packs) {
  int best = 32;
  double best_use = -1.0;
  for (int g = 1; g <= 32; g *= 2) {
    const int64_t rounds = (packs + g - 1) / g;
    if (rounds > kMaxPacks) continue;
    const double use = rounds == 0 ? 1.0 : static_cast<double>(packs) / (g * rounds);
    if (use > best_use) {
      best_use = use;
      best = g;
    }
  }
  return best;
}

// The costs between row p of feat and rows q[t] (t < K, used where has[t]) by the group of
// `group` lanes that this lane (`sub` within the group) belongs to; every lane of the warp
// calls it (it shuffles across the warp), `active` lanes read rows, and every lane of an
// active group ends with the same costs. V elements per pack, `packs` packs per row of C.
template <typename T, int V, int KIND, int K>
__device__ __forceinline__ void group_costs(const T* __restrict__ feat, const int64_t C,
                                            const int packs, const int64_t p,
                                            const int64_t (&q)[K], const bool (&has)[K],
                                            const bool active, const int sub, const int group,
                                            const typename AccType<T>::type eps,
                                            typename AccType<T>::type (&cost)[K]) {
  using A = typename AccType<T>::type;
  constexpr int NA = KIND == kCosine ? 1 + 2 * K : K;
  A acc[NA];
  A mag[1 + K];  // cosine: the largest magnitude of p's row and of each neighbour's row
#pragma unroll
  for (int k = 0; k < 1 + K; ++k) mag[k] = A(0);
  // The sums of the lane's packs: plain, or (`scaled`) on rows scaled by RowScale.
  auto accumulate = [&](bool scaled) {
#pragma unroll
    for (int k = 0; k < NA; ++k) acc[k] = A(0);
    if (!active) return;
    RowScale<A> sp(mag[0]);
    RowScale<A> sq[K];
#pragma unroll
    for (int t = 0; t < K; ++t) sq[t] = RowScale<A>(mag[1 + t]);
    const T* __restrict__ row = feat + p * C;
    const T* __restrict__ nb[K];
#pragma unroll
    for (int t = 0; t < K; ++t) nb[t] = feat + q[t] * C;
#pragma unroll 2
    for (int k = sub; k < packs; k += group) {
      const int off = k * V;
      const Pack<T, V> a = load_pack<T, V>(row + off);
      Pack<T, V> n[K];
#pragma unroll
      for (int t = 0; t < K; ++t) n[t] = load_pack<T, V>(nb[t] + off);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        A x = to_acc(a.v[e]);
        if constexpr (KIND == kCosine) {
          if (scaled) x = sp(x);
          else mag[0] = larger(mag[0], magnitude(x));
          acc[0] += x * x;
        }
#pragma unroll
        for (int t = 0; t < K; ++t) {
          A y = to_acc(n[t].v[e]);
          if constexpr (KIND == kCosine) {
            if (scaled) y = sq[t](y);
            else mag[1 + t] = larger(mag[1 + t], magnitude(y));
            acc[1 + t] += x * y;
            acc[1 + K + t] += y * y;
          } else {
            const A d = x - y;
            acc[t] += d * d;
          }
        }
      }
    }
  };
  auto reduce = [&](bool magnitudes) {
    for (int o = group >> 1; o > 0; o >>= 1) {
#pragma unroll
      for (int k = 0; k < NA; ++k) acc[k] += __shfl_xor_sync(kFullMask, acc[k], o);
      if (magnitudes) {
#pragma unroll
        for (int k = 0; k < 1 + K; ++k) mag[k] = larger(mag[k], __shfl_xor_sync(kFullMask, mag[k], o));
      }
    }
  };
  accumulate(false);
  reduce(KIND == kCosine);
  if constexpr (KIND == kCosine) {
    // a nonzero row whose squared norm left the safe range: the whole warp (every lane
    // reaches the shuffles) redoes its sums on scaled rows
    auto safe = [](A sq, A m) {
      return (sq >= SafeSquares<A>::lo() && sq <= SafeSquares<A>::hi()) || m == A(0);
    };
    int bad = 0;
    if (active) {
      bad = !safe(acc[0], mag[0]);
#pragma unroll
      for (int t = 0; t < K; ++t) bad |= has[t] && !safe(acc[1 + K + t], mag[1 + t]);
    }
    for (int o = 16; o > 0; o >>= 1) bad |= __shfl_xor_sync(kFullMask, bad, o);
    if (bad) {
      accumulate(true);
      reduce(false);
    }
  }
  A inv_p = A(0);
  if constexpr (KIND == kCosine) inv_p = inv_norm(acc[0], eps);
#pragma unroll
  for (int t = 0; t < K; ++t) {
    if constexpr (KIND == kCosine) {
      const A inv_q = inv_norm(acc[1 + K + t], eps);
      // an infinite norm normalises its vector to zero: cosine 0
      const A cs = (inv_p == A(0) || inv_q == A(0)) ? A(0) : acc[1 + t] * inv_p * inv_q;
      cost[t] = expo(-cs);
    } else {
      cost[t] = root(acc[t]);
    }
  }
}

// out[b * per_image + e] = cost of candidate edge e of image b. blockDim.x is a multiple of
// 32 and of `group` (a power of two up to 32); V elements per pack (see pack_elements; with
// V > 1 every row of feat is 16-byte aligned).
template <typename T, int V, int KIND, bool EIGHT>
__global__ void __launch_bounds__(kThreads)
    grid_costs_kernel(const T* __restrict__ feat, const Shape s, const int group,
                      const typename AccType<T>::type eps, typename AccType<T>::type* __restrict__ out) {
  using A = typename AccType<T>::type;
  constexpr int K = EIGHT ? 4 : 2;  // forward neighbours: right, down, down-right, down-left
  const int sub = static_cast<int>(threadIdx.x) & (group - 1);  // lane within the group
  const int64_t groups = static_cast<int64_t>(blockDim.x / group);
  const int64_t slot = threadIdx.x / group;
  const int packs = static_cast<int>(s.C / V);  // per row; the host checks it fits an int
  const int hw = s.H * s.W;                     // per image; likewise
  const bool narrow = s.pixels <= 0x7fffffff;   // 32-bit division suffices
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups;

  // block-uniform bounds: the whole warp takes every shuffle below
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < s.pixels;
       first += stride) {
    const int64_t p = first + slot;
    const bool active = p < s.pixels;
    int64_t b = 0;
    int i = 0, j = 0;
    if (active) {
      int r;
      if (narrow) {
        const int p32 = static_cast<int>(p);
        const int b32 = p32 / hw;
        b = b32;
        r = p32 - b32 * hw;
      } else {
        b = p / hw;
        r = static_cast<int>(p - b * hw);
      }
      i = r / s.W;
      j = r - i * s.W;
    }
    const bool right = active && j + 1 < s.W;
    const bool down = active && i + 1 < s.H;
    bool has[K];
    int64_t q[K];  // neighbour pixels; a missing one reads p again (same lines, no fault)
    has[0] = right;
    has[1] = down;
    q[0] = right ? p + 1 : p;
    q[1] = down ? p + s.W : p;
    if constexpr (EIGHT) {
      has[2] = right && down;
      has[3] = down && j > 0;
      q[2] = has[2] ? p + s.W + 1 : p;
      q[3] = has[3] ? p + s.W - 1 : p;
    }
    A cost[K];
    group_costs<T, V, KIND, K>(feat, s.C, packs, p, q, has, active, sub, group, eps, cost);

    if (active) {
      const int64_t base = b * s.per_image;
      const int64_t cell = static_cast<int64_t>(i) * (s.W - 1) + j;
      int64_t idx[K];
      idx[0] = base + cell;
      idx[1] = base + s.e_vert + static_cast<int64_t>(i) * s.W + j;
      if constexpr (EIGHT) {
        idx[2] = base + s.e_diag + cell;
        idx[3] = base + s.e_anti + cell - 1;  // cell (i, j - 1): (i, j) - (i + 1, j - 1)
      }
#pragma unroll
      for (int t = 0; t < K; ++t) {
        if (has[t] && sub == t % group) out[idx[t]] = cost[t];  // one lane writes each edge
      }
    }
  }
}

// out[e] = cost of edge (src[e], dst[e]) of a list of E edges between the rows of feat
// [N, C], one group of lanes per edge (the sums and costs of group_costs); launch as
// grid_costs_kernel.
template <typename T, int V, int KIND>
__global__ void __launch_bounds__(kThreads)
    edge_costs_kernel(const T* __restrict__ feat, const int64_t* __restrict__ src,
                      const int64_t* __restrict__ dst, const int64_t E, const int64_t C,
                      const int group, const typename AccType<T>::type eps,
                      typename AccType<T>::type* __restrict__ out) {
  using A = typename AccType<T>::type;
  const int sub = static_cast<int>(threadIdx.x) & (group - 1);
  const int64_t groups = static_cast<int64_t>(blockDim.x / group);
  const int64_t slot = threadIdx.x / group;
  const int packs = static_cast<int>(C / V);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < E; first += stride) {
    const int64_t e = first + slot;
    const bool active = e < E;
    const int64_t q[1] = {active ? dst[e] : 0};
    const bool has[1] = {active};
    A cost[1];
    group_costs<T, V, KIND, 1>(feat, C, packs, active ? src[e] : 0, q, has, active, sub, group,
                               eps, cost);
    if (active && sub == 0) out[e] = cost[0];
  }
}

}  // namespace costs
}  // namespace treessm_cuda
