// Borůvka's algorithm on a general graph (treessm/topology/boruvka.py), one round as three
// kernels that boruvka.cu launches for every round of cuda_boruvka:
//
// 1. lightest_edges_kernel -- the lightest edge leaving each component:
//      best[c] = min of key[e] over the edges e = (u, v) with comp[u] != comp[v] and
//                c in {comp[u], comp[v]}     (best holds a sentinel above every key before)
// 2. hook_kernel -- every component c with such an edge marks it chosen and hooks onto the
//    component t at its other end; of two components that chose the same edge, the lower id
//    stays a root (hook[c] = c). Keys are distinct, so these pairs are the only cycles.
// 3. relabel_kernel -- every vertex's label becomes the root of its label's hook tree, and
//    best goes back to the sentinel for the next round.
//
// Keys are distinct int64 (cost, then edge index in the low 32 bits; negative for negative
// costs), compared as signed 64-bit words, so atomicMin gives one answer whatever the order of
// the threads. Once components have merged into a few large ones, most edges of a round point
// at the same few slots, and atomics to one address run one after another. A thread
// therefore reads the slot first and only issues its atomicMin when its key is below what it
// read: a slot only decreases, so a stale read costs at most an atomic that changes nothing,
// and a slot sees few atomics however many edges point at it. Edges inside a component touch
// nothing.
//
// The number of rounds is fixed by the caller (the host never waits for the device); a round
// after the one in which no component had an edge left changes nothing, so its kernels return
// at once: round k runs when active[k] != 0, and its hook step sets active[k + 1].
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
    const int64_t* __restrict__ comp, long long* best, int64_t num_edges,
    const int* __restrict__ active) {
  if (*active == 0) return;
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

// One thread per vertex; only component labels (comp[c] == c) act. hook[c] is written for
// every label (c itself when no edge leaves c), so the next step's walks, which start at
// labels, read only this round's hooks.
__global__ void __launch_bounds__(kThreads) hook_kernel(
    const int64_t* __restrict__ edge_index, const int64_t* __restrict__ comp,
    const long long* __restrict__ best, long long* __restrict__ hook, bool* __restrict__ chosen,
    int64_t n, int64_t num_edges, long long sentinel, const int* __restrict__ active,
    int* next_active) {
  if (*active == 0) return;  // the same for every thread: the flag is from an earlier launch
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int hooked = 0;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < n;
       c += stride) {
    if (comp[c] != c) continue;
    const long long k = best[c];
    long long target = c;
    if (k != sentinel) {
      const int64_t e = k & 0xFFFFFFFFll;
      chosen[e] = true;
      // one end of e lies in c, so XOR-ing c out of both ends' labels leaves the other
      const long long t = comp[edge_index[e]] ^ comp[edge_index[num_edges + e]] ^ c;
      target = (best[t] == k && c < t) ? c : t;
      hooked = 1;
    }
    hook[c] = target;
  }
  // one store per block, not per component: stores to one address run one after another
  if (__syncthreads_or(hooked) && threadIdx.x == 0) *next_active = 1;
}

// One thread per vertex: walks from v's label to the root of its hook tree, pointing every
// label it passes at that label's grandparent (path splitting, as in union-find), so walks
// that cross the same path share the shortening instead of each paying the path's whole
// length; then resets best[v] for the next round. A pointer only ever moves to a proper
// ancestor and a root never moves, so every walk ends at its root whatever the order of the
// threads, and the labels are the same on every run. 64-bit loads and stores of aligned
// words are single transactions: a walk reads either the old or the new pointer of a label,
// both ancestors. Runs when the round hooked anything (active: the flag hook_kernel set).
__global__ void __launch_bounds__(kThreads) relabel_kernel(long long* hook, int64_t* comp,
                                                           long long* best, int64_t n,
                                                           long long sentinel,
                                                           const int* __restrict__ active) {
  if (*active == 0) return;
  volatile long long* p = hook;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n;
       v += stride) {
    long long cur = comp[v], next = p[cur];
    while (cur != next) {
      const long long after = p[next];
      if (after != next) p[cur] = after;  // cur skips its parent
      cur = next;
      next = after;
    }
    comp[v] = cur;
    best[v] = sentinel;
  }
}

}  // namespace boruvka
}  // namespace treessm_cuda
