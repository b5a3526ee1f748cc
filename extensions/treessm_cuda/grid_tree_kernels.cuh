// Grid-tree kernels: the rooted breadth-first minimum spanning tree of a batch of images.
//
// One thread block owns one H x W image and keeps all of its state in shared memory:
//
// 1. Minimum spanning tree by Borůvka's algorithm. Every candidate edge e of the image gets
//    the key (cost, e); keys are distinct, so the tree is the unique one Kruskal's
//    algorithm picks when it scans edges by (cost, index) -- ties go to the lower index.
//    Each round, every component finds its lightest outgoing edge (atomicMin of a packed
//    key), hooks onto the component at the other end (of two components that picked the
//    same edge the lower id stays the root) and pointer jumping flattens the labels.
// 2. Breadth-first search from the first pixel (0, 0), one level at a time. The
//    children of a vertex are its tree neighbours in ascending id; a block-wide exclusive
//    scan of the children counts, in position order, places them. Narrow levels (most of
//    them: minimum spanning trees of images are long and thin) are run by warp 0 alone,
//    with warp-level synchronisation only.
// 3. Two small kernels turn the per-image level counts into the tree's level plan.
//
// The results equal Tree.from_parent(parent) and Tree.scan_plan() bit for bit (see
// treessm/tree.py for the layout). Costs may be float32, float16 or bfloat16 (keyed as
// the order-preserving 32-bit image of their float value, packed with the edge index in
// one 64-bit word) or float64 (a 64-bit key, then the lowest index among the edges that
// carry it: two atomic phases per round). NaN costs give an unspecified spanning tree.
//
// The source also compiles for the host against extensions/treessm_cuda/host_emulation,
// which runs one std::thread per CUDA thread: shared state lives only in the dynamic
// shared-memory block, and every block-level decision is block-uniform.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace treessm_cuda {
namespace grid {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr unsigned kNoEdge = 0xffffffffu;

// Candidate edges of one image, in the order of treessm.topology.grid (each part row-major):
// horizontal (i,j)-(i,j+1) from 0, vertical (i,j)-(i+1,j) from e_vert, and for
// 8-connectivity diagonal (i,j)-(i+1,j+1) from e_diag, anti-diagonal (i,j+1)-(i+1,j) from
// e_anti.
struct Grid {
  int H, W, n, E, e_vert, e_diag, e_anti;
  bool eight;
  __host__ __device__ Grid(int h, int w, int connectivity)
      : H(h), W(w), n(h * w), eight(connectivity == 8) {
    e_vert = h * (w - 1);
    e_diag = e_vert + (h - 1) * w;
    e_anti = e_diag + (eight ? (h - 1) * (w - 1) : 0);
    E = e_anti + (eight ? (h - 1) * (w - 1) : 0);
  }
};

// Dynamic shared memory of grid_tree_kernel (mirrored by treessm/topology/cuda_grid.py):
//   [0, 8n)            uint64 key per vertex (Borůvka), then int32 queue (BFS)
//   [8n, 12n)          uint32 chosen edge / hook (Borůvka), then int32 parent (BFS)
//   [12n, 16n)         int32 component label
//   [16n, 16n + 256)   block-wide scalars: warp sums and the BFS state
//   [16n + 256, ...)   uint8 per edge: in the tree
__host__ __device__ inline size_t smem_bytes(int n, int E) {
  return 16 * static_cast<size_t>(n) + 256 + ((static_cast<size_t>(E) + 15) / 16) * 16;
}

// ---------------------------------------------------------------------------- edge keys
template <typename T> struct WideKey : std::false_type {};
template <> struct WideKey<double> : std::true_type {};

__device__ __forceinline__ float as_float(float x) { return x; }
__device__ __forceinline__ float as_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// IEEE bits order like the value for non-negative numbers and in reverse for negative ones:
// flipping a negative number's bits and setting a positive one's sign bit gives an unsigned
// integer in the order of the value; -0.0 is folded onto +0.0 first (they compare equal).
__device__ __forceinline__ uint32_t ordered32(float f) {
  uint32_t b = __float_as_uint(f);
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ unsigned long long ordered64(double f) {
  unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(f));
  constexpr unsigned long long sign = 0x8000000000000000ull;
  if (b == sign) b = 0ull;
  return (b & sign) ? ~b : (b | sign);
}

// Narrow costs: (cost, index) in one word. Wide costs: the cost alone.
template <typename T>
__device__ __forceinline__ unsigned long long edge_key(const T* __restrict__ cost, int e) {
  if constexpr (WideKey<T>::value) {
    return ordered64(cost[e]);
  } else {
    return (static_cast<unsigned long long>(ordered32(as_float(cost[e]))) << 32) |
           static_cast<unsigned>(e);
  }
}

// ---------------------------------------------------------------------------- grid helpers
// Calls f(e, u, w) for the edges whose cell is pixel v: right, down and, for
// 8-connectivity, the diagonal and anti-diagonal of the square below-right of v.
template <typename F>
__device__ __forceinline__ void for_cell_edges(const Grid& g, int v, F&& f) {
  const int i = v / g.W, j = v - i * g.W;
  const int cell = i * (g.W - 1) + j;
  const bool right = j + 1 < g.W, down = i + 1 < g.H;
  if (right) f(cell, v, v + 1);
  if (down) f(g.e_vert + v, v, v + g.W);
  if (g.eight && right && down) {
    f(g.e_diag + cell, v, v + g.W + 1);
    f(g.e_anti + cell, v + 1, v + g.W);
  }
}

__device__ __forceinline__ void edge_ends(const Grid& g, int e, int& u, int& w) {
  if (e < g.e_vert) {
    const int i = e / (g.W - 1), j = e - i * (g.W - 1);
    u = i * g.W + j;
    w = u + 1;
  } else if (e < g.e_diag) {
    u = e - g.e_vert;
    w = u + g.W;
  } else {
    const bool anti = e >= g.e_anti;
    const int k = e - (anti ? g.e_anti : g.e_diag);
    const int i = k / (g.W - 1), j = k - i * (g.W - 1);
    u = i * g.W + j + (anti ? 1 : 0);
    w = anti ? u + g.W - 1 : u + g.W + 1;
  }
}

// The 8 neighbour directions k = 0..7 in ascending vertex id: up-left, up, up-right, left,
// right, down-left, down, down-right (4-connectivity uses up, left, right and down).
__device__ __forceinline__ int neighbour(int v, int k, int W) {
  const int dr = k < 3 ? -1 : (k < 5 ? 0 : 1);
  const int dc = ((0x94 >> k) & 1) - ((0x29 >> k) & 1);  // +1 for k in {2,4,7}, -1 for {0,3,5}
  return v + dr * W + dc;
}

// Bit k set: the neighbour in direction k is a child of v (a tree neighbour other than pv).
__device__ __forceinline__ unsigned tree_children(const Grid& g, const unsigned char* in_tree,
                                                  int v, int pv) {
  const int i = v / g.W, j = v - i * g.W;
  const int W1 = g.W - 1;
  const bool up = i > 0, down = i + 1 < g.H, left = j > 0, right = j + 1 < g.W;
  unsigned m = 0;
  auto take = [&](bool exists, int e, int u, unsigned bit) {
    if (exists && u != pv && in_tree[e]) m |= bit;
  };
  if (g.eight) take(up && left, g.e_diag + (i - 1) * W1 + j - 1, v - g.W - 1, 1u);
  take(up, g.e_vert + v - g.W, v - g.W, 2u);
  if (g.eight) take(up && right, g.e_anti + (i - 1) * W1 + j, v - g.W + 1, 4u);
  take(left, i * W1 + j - 1, v - 1, 8u);
  take(right, i * W1 + j, v + 1, 16u);
  if (g.eight) take(down && left, g.e_anti + i * W1 + j - 1, v + g.W - 1, 32u);
  take(down, g.e_vert + v, v + g.W, 64u);
  if (g.eight) take(down && right, g.e_diag + i * W1 + j, v + g.W + 1, 128u);
  return m;
}

__device__ __forceinline__ int warp_inclusive_sum(int x, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(kFullMask, x, d);
    if (lane >= d) x += y;
  }
  return x;
}

__device__ __forceinline__ long long warp_inclusive_sum(long long x, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const long long y = __shfl_up_sync(kFullMask, x, d);
    if (lane >= d) x += y;
  }
  return x;
}

// Outputs of one image; positions and vertices are global (image base + local).
struct TreeOut {
  int64_t* __restrict__ parent;      // [N] by vertex
  int64_t* __restrict__ order;       // [N] by position
  int64_t* __restrict__ child_ptr;   // [N + 1] by position
  int64_t* __restrict__ tree_ptr;    // [B + 1]
  int64_t* __restrict__ depth;       // [N] by vertex
  int64_t* __restrict__ parent_pos;  // [N] by position
  int* __restrict__ level_start;     // [B * n]: local first position of each level
  int* __restrict__ level_count;     // [B]: number of levels
};

// Places the children (bits of m) of vertex v at local position i, first child at local
// position p, at depth lvl + 1.
__device__ __forceinline__ void emit_children(const Grid& g, const TreeOut& o, int* q, int* par,
                                              int64_t base, int i, int v, unsigned m, int p,
                                              int lvl) {
  o.child_ptr[base + i] = base + p;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (m & (1u << k)) {
      const int u = neighbour(v, k, g.W);
      q[p] = u;
      par[u] = v;
      o.order[base + p] = base + u;
      o.parent[base + u] = base + v;
      o.depth[base + u] = lvl + 1;
      o.parent_pos[base + p] = base + i;
      ++p;
    }
  }
}

// ---------------------------------------------------------------------------- kernels
// One block per image (blockIdx.x); blockDim.x a multiple of 32, at most 1024. cost holds
// each image's E candidate costs in a contiguous block. Levels at most solo_width wide are
// run by warp 0 alone.
template <typename T>
__global__ void __launch_bounds__(1024)
grid_tree_kernel(const T* __restrict__ cost, const int H, const int W, const int connectivity,
                 const int solo_width, const int64_t num_images, const TreeOut o) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Grid g(H, W, connectivity);
  const int n = g.n;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, num_warps = nt >> 5;
  const int64_t img = blockIdx.x;
  const int64_t base = img * n;
  const T* __restrict__ c_img = cost + img * g.E;

  unsigned long long* key = reinterpret_cast<unsigned long long*>(smem_raw);
  unsigned* sel = reinterpret_cast<unsigned*>(smem_raw + 8 * static_cast<size_t>(n));
  int* comp = reinterpret_cast<int*>(smem_raw + 12 * static_cast<size_t>(n));
  int* misc = reinterpret_cast<int*>(smem_raw + 16 * static_cast<size_t>(n));
  unsigned char* in_tree = smem_raw + 16 * static_cast<size_t>(n) + 256;
  constexpr bool wide = WideKey<T>::value;

  for (int v = tid; v < n; v += nt) comp[v] = v;
  for (int e = tid; e < g.E; e += nt) in_tree[e] = 0;
  __syncthreads();

  // ------------------------------------------------------------------ Borůvka
  // The chosen edge of a component root: the key's low half (narrow) or sel (wide).
  auto chosen = [&](int c) -> unsigned {
    if constexpr (wide) return sel[c];
    else return static_cast<unsigned>(key[c] & 0xffffffffull);
  };
  for (;;) {
    for (int v = tid; v < n; v += nt) {
      key[v] = ~0ull;
      if (wide) sel[v] = kNoEdge;
    }
    __syncthreads();
    int found = 0;
    for (int v = tid; v < n; v += nt) {
      for_cell_edges(g, v, [&](int e, int u, int w) {
        const int cu = comp[u], cw = comp[w];
        if (cu != cw) {
          found = 1;
          const unsigned long long k = edge_key(c_img, e);
          atomicMin(&key[cu], k);
          atomicMin(&key[cw], k);
        }
      });
    }
    if (!__syncthreads_or(found)) break;  // one component left
    if (wide) {  // the lowest index among the edges that carry the component's least cost
      for (int v = tid; v < n; v += nt) {
        for_cell_edges(g, v, [&](int e, int u, int w) {
          const int cu = comp[u], cw = comp[w];
          if (cu != cw) {
            const unsigned long long k = edge_key(c_img, e);
            if (k == key[cu]) atomicMin(&sel[cu], static_cast<unsigned>(e));
            if (k == key[cw]) atomicMin(&sel[cw], static_cast<unsigned>(e));
          }
        });
      }
      __syncthreads();
    }
    // Hook every root onto the component across its edge. Keys are distinct, so the only
    // cycles are pairs that chose the same edge: the lower id of a pair stays a root.
    // The hook is stored where this phase reads nothing: sel (narrow) or key (wide).
    for (int c = tid; c < n; c += nt) {
      if (comp[c] != c) continue;
      const unsigned e = chosen(c);
      int h = c;
      if (e != kNoEdge) {
        int u, w;
        edge_ends(g, static_cast<int>(e), u, w);
        const int d = comp[u] ^ comp[w] ^ c;
        if (!(chosen(d) == e && c < d)) h = d;
        in_tree[e] = 1;
      }
      if (wide) key[c] = static_cast<unsigned long long>(h);
      else sel[c] = static_cast<unsigned>(h);
    }
    __syncthreads();
    for (int c = tid; c < n; c += nt) {
      if (comp[c] == c) comp[c] = wide ? static_cast<int>(key[c]) : static_cast<int>(sel[c]);
    }
    __syncthreads();
    // Pointer jumping in place: a label only ever moves to an ancestor in the hook forest,
    // so reading a neighbour's label mid-update is harmless.
    for (;;) {
      int changed = 0;
      for (int v = tid; v < n; v += nt) {
        const int c = comp[v];
        const int cc = comp[c];
        if (cc != c) {
          comp[v] = cc;
          changed = 1;
        }
      }
      if (!__syncthreads_or(changed)) break;
    }
  }

  // ------------------------------------------------------------------ breadth-first search
  int* q = reinterpret_cast<int*>(smem_raw);  // local vertex at each local position
  int* par = reinterpret_cast<int*>(sel);     // local parent of each local vertex
  int* wsum = misc;                           // [32] warp totals
  int* state = misc + 32;                     // [3] solo phase hand-over
  int* level_start = o.level_start + base;
  const int root = 0;  // the first pixel
  if (tid == 0) {
    q[0] = root;
    par[root] = -1;
    o.order[base] = base + root;
    o.parent[base + root] = -1;
    o.depth[base + root] = 0;
    o.parent_pos[base] = -1;
    o.tree_ptr[img] = base;
    if (img == 0) {
      o.tree_ptr[num_images] = num_images * n;
      o.child_ptr[num_images * n] = num_images * n;
    }
  }
  __syncthreads();

  int a = 0, b = 1, lvl = 0;  // current level: local positions [a, b)
  while (a < b) {
    if (b - a <= solo_width) {
      if (warp == 0) {
        do {
          if (lane == 0) level_start[lvl] = a;
          int tail = b;
          for (int s = a; s < b; s += 32) {
            const int i = s + lane;
            int v = 0, cnt = 0;
            unsigned m = 0;
            if (i < b) {
              v = q[i];
              m = tree_children(g, in_tree, v, par[v]);
              cnt = __popc(m);
            }
            const int incl = warp_inclusive_sum(cnt, lane);
            const int total = __shfl_sync(kFullMask, incl, 31);
            if (i < b) emit_children(g, o, q, par, base, i, v, m, tail + incl - cnt, lvl);
            tail += total;
          }
          __syncwarp();
          a = b;
          b = tail;
          ++lvl;
        } while (a < b && b - a <= solo_width);
        if (lane == 0) {
          state[0] = a;
          state[1] = b;
          state[2] = lvl;
        }
      }
      __syncthreads();
      a = state[0];
      b = state[1];
      lvl = state[2];
      // state is next written in a later solo phase, after a wide level's barriers
    } else {
      if (tid == 0) level_start[lvl] = a;
      int tail = b;
      for (int s = a; s < b; s += nt) {
        const int i = s + tid;
        int v = 0, cnt = 0;
        unsigned m = 0;
        if (i < b) {
          v = q[i];
          m = tree_children(g, in_tree, v, par[v]);
          cnt = __popc(m);
        }
        const int incl = warp_inclusive_sum(cnt, lane);
        if (lane == 31) wsum[warp] = incl;
        __syncthreads();
        int before = 0, total = 0;
        for (int k = 0; k < num_warps; ++k) {
          const int x = wsum[k];
          before += k < warp ? x : 0;
          total += x;
        }
        if (i < b) emit_children(g, o, q, par, base, i, v, m, tail + before + incl - cnt, lvl);
        tail += total;
        __syncthreads();  // wsum is rewritten next; q and par are read next
      }
      a = b;
      b = tail;
      ++lvl;
    }
  }
  if (tid == 0) o.level_count[img] = lvl;
}

// tree_level_ptr[b] = sum of level_count[0 .. b), for b = 0 .. B. One block; its dynamic
// shared memory holds 32 int64.
__global__ void __launch_bounds__(1024)
level_scan_kernel(const int* __restrict__ level_count, const int64_t num_images,
                  int64_t* __restrict__ tree_level_ptr) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  long long* wsum = reinterpret_cast<long long*>(smem_raw);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, num_warps = nt >> 5;
  long long carry = 0;
  for (int64_t s = 0; s < num_images; s += nt) {
    const int64_t k = s + tid;
    const long long x = k < num_images ? level_count[k] : 0;
    const long long incl = warp_inclusive_sum(x, lane);
    if (lane == 31) wsum[warp] = incl;
    __syncthreads();
    long long before = 0, total = 0;
    for (int w = 0; w < num_warps; ++w) {
      const long long y = wsum[w];
      before += w < warp ? y : 0;
      total += y;
    }
    if (k < num_images) tree_level_ptr[k] = carry + before + incl - x;
    carry += total;
    __syncthreads();
  }
  if (tid == 0) tree_level_ptr[num_images] = carry;
}

// level_pos[tree_level_ptr[b] + l] = global first position of level l of image b (one block
// per image); the entries past the last level, [tree_level_ptr[B], N], are set to N, split
// evenly over the blocks.
__global__ void level_scatter_kernel(const int* __restrict__ level_start,
                                     const int* __restrict__ level_count,
                                     const int64_t* __restrict__ tree_level_ptr, const int n,
                                     const int64_t num_images, int64_t* __restrict__ level_pos) {
  const int64_t img = blockIdx.x;
  const int64_t first = tree_level_ptr[img];
  const int count = level_count[img];
  const int64_t base = img * n;
  for (int l = threadIdx.x; l < count; l += blockDim.x)
    level_pos[first + l] = base + level_start[base + l];
  const int64_t N = num_images * n;
  const int64_t total = tree_level_ptr[num_images];
  const int64_t chunk = (N + 1 - total + num_images - 1) / num_images;
  const int64_t from = total + img * chunk;
  const int64_t to = from + chunk < N + 1 ? from + chunk : N + 1;
  for (int64_t k = from + threadIdx.x; k < to; k += blockDim.x) level_pos[k] = N;
}

}  // namespace grid
}  // namespace treessm_cuda
