// Two steps of Borůvka's algorithm on a general graph (treessm/topology/boruvka.py): the
// lightest edge leaving each component (lightest_edges_kernel), and the root of every hook
// tree once components have hooked onto each other (find_roots_kernel).
//
// Selection:
//   best[c] = min of key[e] over the edges e = (u, v) with comp[u] != comp[v] and
//             c in {comp[u], comp[v]}          (best starts at a sentinel above every key)
//
// Keys are distinct int64 (cost, then edge index; negative for negative costs), compared as
// signed 64-bit words, so atomicMin gives one answer whatever the order of the threads.
// Once components have merged into a few large ones, most edges of a round point at the
// same few slots, and atomics to one address run one after another. A thread therefore reads
// the slot first and only issues its atomicMin when its key is below what it read: a slot
// only decreases, so a stale read costs at most an atomic that changes nothing, and a slot
// sees few atomics however many edges point at it. Edges inside a component touch nothing.
// The source also compiles for the host against tests/extensions/host_emulation.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace treessm_cuda {
namespace boruvka {

constexpr int kThreads = 256;

__device__ __forceinline__ void lower_slot(long long* slot, long long key) {
  if (key < *reinterpret_cast<volatile long long*>(slot)) atomicMin(slot, key);
}

// One thread per edge (a grid-stride loop): edge_index is [2, E] (row 0 sources, row 1
// targets), comp the component label of every vertex.
__global__ void __launch_bounds__(kThreads) lightest_edges_kernel(
    const int64_t* __restrict__ edge_index, const int64_t* __restrict__ key,
    const int64_t* __restrict__ comp, long long* best, int64_t num_edges) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < num_edges;
       e += stride) {
    const int64_t a = comp[edge_index[e]], b = comp[edge_index[num_edges + e]];
    if (a == b) continue;
    const long long k = static_cast<long long>(key[e]);
    lower_slot(best + a, k);
    lower_slot(best + b, k);
  }
}

// Roots of a forest of parent pointers (parent[r] == r at a root): out[v] = the root above v.
// Each thread walks from its vertex to the root and points every vertex it passes at that
// vertex's grandparent (path splitting, as in union-find), so walks that cross the same path
// share the shortening instead of each paying the path's whole length. `parent` is scratch.
// A pointer only ever moves to a proper ancestor and a root never moves, so every walk ends
// at its root whatever the order of the threads, and `out` is the same on every run. 64-bit
// loads and stores of aligned words are single transactions: a walk reads either the old or
// the new pointer of a vertex, both ancestors.
__global__ void __launch_bounds__(kThreads) find_roots_kernel(long long* parent, long long* out,
                                                              int64_t n) {
  volatile long long* p = parent;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n;
       v += stride) {
    long long cur = v, next = p[v];
    while (cur != next) {
      const long long after = p[next];
      if (after != next) p[cur] = after;  // cur skips its parent
      cur = next;
      next = after;
    }
    out[v] = cur;
  }
}

}  // namespace boruvka
}  // namespace treessm_cuda
