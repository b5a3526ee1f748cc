// Path-schedule tree scan: the recurrences of the staged level kernels, walked along heavy
// paths instead of breadth-first levels (plan: treessm.ops.plan.PathPlan).
//
// The heavy edges cut a tree into paths; a path's phase is the number of light edges above
// its head, at most log2(n) + 1 phases per tree. `parts` thread blocks share one tree and a
// group of channels (one block per tree unless the tree is large); a group of lpv threads
// (one row of channels) walks whole paths one after another, carrying the running value
// from a vertex to the next vertex of its path in registers. The paths of a phase are
// independent, so the groups of the tree's blocks split them, and the phases run in
// order: root-first passes take phases 0, 1, ..., leaf-first passes the reverse. With one
// block per tree, a __syncthreads separates phases inside one launch; with several, each
// launch runs one phase (the launch boundary orders them). A value crosses paths only at a
// head: leaf-first, the head leaves w * value in a [N, C] scratch row for its parent;
// root-first, a vertex with light children leaves its value there for their heads.
//
// Each thread stages its own next kPathDepth steps (input rows, weight, forward output,
// the scratch row a step reads) with cp.async into a private shared-memory ring, so a
// step reads only shared memory and the chain from step to step is a few arithmetic
// instructions. The tree's plan records are copied to shared memory first when they fit.
// Sums run in a fixed order (input, light children ascending, heavy child): the results
// are bitwise deterministic.
#pragma once

#include "tree_scan_kernels.cuh"

namespace treessm_cuda {

constexpr int kMaxPhases = 32;  // treessm.ops.plan.MAX_PHASES
constexpr int kPathDepth = 8;   // steps each thread stages ahead

// One path index: vertex, parent's path index (-1 at a root), first light child's path
// index (-1 if none), start of its light children in PathPlan::light.
struct alignas(16) PathRec {
  int v, parent, light0, light_start;
};

struct PathPlan {
  const PathRec* rec;     // [N + 1]
  const int* light;       // [N]
  const int* path_ptr;    // [N + 1]
  const int* phase_path;  // [T][kMaxPhases + 1]
};

struct PathArgs {
  ScanIO io;    // val0/val1: rows handed across paths (row = path index)
  PathPlan plan;
  int64_t C;
  int lpv;      // threads per row
  int rec_cap;  // plan records (and path bounds) staged in shared memory per tree
  int parts;    // blocks per tree: block b works on tree b / parts
  int phase_lo, phase_hi;  // the phases this launch runs, [phase_lo, phase_hi)
};

// Shared-memory fields of one staged step, 16 bytes each.
template <int MODE> struct PathFields {
  using Tr = StagedTraits<MODE>;
  static constexpr int IN0 = 0;
  static constexpr int IN1 = 1;  // when Tr::IN1
  static constexpr int W = Tr::IN1 ? 2 : 1;
  static constexpr int H = W + 1;  // when Tr::H
  static constexpr int X0 = W + 1 + (Tr::H ? 1 : 0);
  static constexpr int X1 = X0 + 1;  // when Tr::NS == 2
  static constexpr int COUNT = X0 + 1 + (Tr::NS == 2 ? 1 : 0);
};

template <int MODE>
__host__ __device__ inline int64_t path_smem_bytes(int threads, int rec_cap) {
  return (int64_t)kPathDepth * PathFields<MODE>::COUNT * threads * 16 +
         (int64_t)rec_cap * (sizeof(PathRec) + sizeof(int));
}

template <typename T, typename A, int V, int MODE>
__global__ void path_scan_kernel(const PathArgs args) {
  using Tr = StagedTraits<MODE>;
  using Fd = PathFields<MODE>;
  constexpr bool UP = Tr::UP;
  constexpr int D = kPathDepth;
  using E0 = typename Pick<Tr::IN0_ACC, A, T>::type;
  using E1 = typename Pick<Tr::IN1_ACC, A, T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const PathPlan& plan = args.plan;
  const int64_t C = args.C;
  const int lpv = args.lpv;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int lane = tid % lpv;
  const int part = (int)(blockIdx.x % (unsigned)args.parts);
  const int slot = part * (nthreads / lpv) + tid / lpv;  // this group among the tree's groups
  const int slots = args.parts * (nthreads / lpv);
  const int64_t c = ((int64_t)blockIdx.y * lpv + lane) * V;
  const bool active = c < C;
  const int* phases = plan.phase_path + (int64_t)(blockIdx.x / (unsigned)args.parts) * (kMaxPhases + 1);
  const int pj0 = phases[0];
  const int pj1 = phases[kMaxPhases];
  if (pj0 >= pj1) return;  // block-uniform
  const int ts = plan.path_ptr[pj0];
  const int te = plan.path_ptr[pj1];

  unsigned char* ring = smem_raw;
  PathRec* srec = reinterpret_cast<PathRec*>(smem_raw + (int64_t)D * Fd::COUNT * nthreads * 16);
  int* sptr = reinterpret_cast<int*>(srec + args.rec_cap);
  const bool staged = te - ts + 1 <= args.rec_cap && pj1 - pj0 + 1 <= args.rec_cap;
  if (staged) {
    for (int k = tid; k <= te - ts; k += nthreads) copy_async<16>(srec + k, plan.rec + ts + k);
    for (int j = tid; j <= pj1 - pj0; j += nthreads) copy_async<4>(sptr + j, plan.path_ptr + pj0 + j);
    copy_commit();
    copy_wait<0>();
  }
  __syncthreads();
  auto rec = [&](int k) -> PathRec { return staged ? srec[k - ts] : plan.rec[k]; };
  auto pptr = [&](int j) -> int { return staged ? sptr[j - pj0] : plan.path_ptr[j]; };

  const E0* in0 = reinterpret_cast<const E0*>(args.io.in0);
  const E1* in1 = reinterpret_cast<const E1*>(args.io.in1);
  const T* w = reinterpret_cast<const T*>(args.io.w);
  const T* h = reinterpret_cast<const T*>(args.io.h);
  A* up0 = reinterpret_cast<A*>(args.io.up0);
  A* up1 = reinterpret_cast<A*>(args.io.up1);
  T* out = reinterpret_cast<T*>(args.io.out);
  T* gw = reinterpret_cast<T*>(args.io.gw);
  A* val0 = reinterpret_cast<A*>(args.io.val0);
  A* val1 = reinterpret_cast<A*>(args.io.val1);

  // this thread's 16 bytes of field f of ring slot s
  auto field = [&](int s, int f) { return ring + ((int64_t)(s * Fd::COUNT + f) * nthreads + tid) * 16; };

  // A group's walk through one phase: paths j0 + slot, j0 + slot + slots, ...; each path
  // tail to head (leaf-first) or head to tail (root-first).
  struct Cursor {
    int j = 0, k = 0, k0 = 0, k1 = 0;
  };
  auto start = [&](Cursor& u, int j, int j1) {
    u.j = j;
    if (j < j1) {
      u.k0 = pptr(j);
      u.k1 = pptr(j + 1);
      u.k = UP ? u.k1 - 1 : u.k0;
    }
  };
  auto advance = [&](Cursor& u, int j1) {
    if (UP ? u.k > u.k0 : u.k < u.k1 - 1) u.k += UP ? -1 : 1;
    else start(u, u.j + slots, j1);
  };

  // stage step u into ring slot s
  auto issue = [&](const Cursor& u, int s) {
    const PathRec r = rec(u.k);
    const int64_t row = (int64_t)r.v * C + c;
    copy_async<V * sizeof(E0)>(field(s, Fd::IN0), in0 + row);
    if (Tr::IN1) copy_async<V * sizeof(E1)>(field(s, Fd::IN1), in1 + row);
    copy_async<V * sizeof(T)>(field(s, Fd::W), w + row);
    if (Tr::H) {
      const int hv = Tr::H_PARENT ? (r.parent >= 0 ? rec(r.parent).v : -1) : r.v;
      if (hv >= 0) copy_async<V * sizeof(T)>(field(s, Fd::H), h + (int64_t)hv * C + c);
    }
    if (UP) {
      if (r.light0 >= 0) {
        copy_async<V * sizeof(A)>(field(s, Fd::X0), val0 + (int64_t)r.light0 * C + c);
        if (Tr::NS == 2) copy_async<V * sizeof(A)>(field(s, Fd::X1), val1 + (int64_t)r.light0 * C + c);
      }
    } else if (u.k == u.k0 && r.parent >= 0) {
      copy_async<V * sizeof(A)>(field(s, Fd::X0), val0 + (int64_t)r.parent * C + c);
    }
  };

  A hand0[V], hand1[V];  // leaf-first: w * value of the path's previous vertex (heavy child)
  A pv[V];               // root-first: value of the path's previous vertex (the parent)
#pragma unroll
  for (int q = 0; q < V; ++q) hand0[q] = hand1[q] = pv[q] = A(0);
  // combine step u from ring slot s
  auto consume = [&](const Cursor& u, int s) {
    const PathRec r = rec(u.k);
    const int64_t row = (int64_t)r.v * C + c;
    A a0[V], a1[V], wv[V], hx[V], tmp[V];
    load<V>(reinterpret_cast<const E0*>(field(s, Fd::IN0)), a0);
    if (Tr::IN1) load<V>(reinterpret_cast<const E1*>(field(s, Fd::IN1)), a1);
    load<V>(reinterpret_cast<const T*>(field(s, Fd::W)), wv);
    if (Tr::H) load<V>(reinterpret_cast<const T*>(field(s, Fd::H)), hx);
    if (UP) {
      if (r.light0 >= 0) {
        load<V>(reinterpret_cast<const A*>(field(s, Fd::X0)), tmp);
#pragma unroll
        for (int q = 0; q < V; ++q) a0[q] += tmp[q];
        if (Tr::NS == 2) {
          load<V>(reinterpret_cast<const A*>(field(s, Fd::X1)), tmp);
#pragma unroll
          for (int q = 0; q < V; ++q) a1[q] += tmp[q];
        }
        const int lend = rec(u.k + 1).light_start;
        for (int m = r.light_start + 1; m < lend; ++m) {  // more light children: direct reads
          const int64_t lrow = (int64_t)plan.light[m] * C + c;
          load<V>(val0 + lrow, tmp);
#pragma unroll
          for (int q = 0; q < V; ++q) a0[q] += tmp[q];
          if (Tr::NS == 2) {
            load<V>(val1 + lrow, tmp);
#pragma unroll
            for (int q = 0; q < V; ++q) a1[q] += tmp[q];
          }
        }
      }
      if (u.k != u.k1 - 1) {  // the heavy child, the path's previous vertex
#pragma unroll
        for (int q = 0; q < V; ++q) {
          a0[q] += hand0[q];
          if (Tr::NS == 2) a1[q] += hand1[q];
        }
      }
      if (up0 != nullptr) store<V>(up0 + row, a0);
      if (Tr::NS == 2 && up1 != nullptr) store<V>(up1 + row, a1);
      if (out != nullptr) store<V>(out + row, a0);
      if (MODE == S_UP_GW) {
#pragma unroll
        for (int q = 0; q < V; ++q) tmp[q] = r.parent < 0 ? A(0) : hx[q] * a0[q];
        store<V>(gw + row, tmp);
      }
      if (r.parent >= 0) {  // hand w * up to the parent
#pragma unroll
        for (int q = 0; q < V; ++q) {
          hand0[q] = wv[q] * a0[q];
          if (Tr::NS == 2) hand1[q] = wv[q] * a1[q];
        }
        if (u.k == u.k0) {  // a head: the parent lies on another path
          store<V>(val0 + (int64_t)u.k * C + c, hand0);
          if (Tr::NS == 2) store<V>(val1 + (int64_t)u.k * C + c, hand1);
        }
      }
    } else {
      A res[V], g[V];
      if (u.k == u.k0 && r.parent >= 0) load<V>(reinterpret_cast<const A*>(field(s, Fd::X0)), pv);
      root_first_step<MODE, A, V>(r.parent < 0, a0, a1, wv, hx, pv, res, g);
      store<V>(out + row, res);
      if (MODE == S_UP_BWD || MODE == S_BOTH_BWD) store<V>(gw + row, g);
      if (r.light0 >= 0) store<V>(val0 + (int64_t)u.k * C + c, res);  // for the light children
#pragma unroll
      for (int q = 0; q < V; ++q) pv[q] = res[q];
    }
  };

  for (int q = args.phase_lo; q < args.phase_hi; ++q) {
    const int p = UP ? args.phase_lo + args.phase_hi - 1 - q : q;
    const int j0 = phases[p];
    const int j1 = phases[p + 1];
    if (j0 >= j1) continue;  // block-uniform
    if (active) {
      Cursor ic, cc;
      start(ic, j0 + slot, j1);
      cc = ic;
      for (int d = 0; d < D - 1; ++d) {  // steps 0 .. D-2 into slots 0 .. D-2
        if (ic.j < j1) {
          issue(ic, d);
          advance(ic, j1);
        }
        copy_commit();
      }
      for (int s = 0; cc.j < j1; ++s) {
        if (ic.j < j1) {  // step s + D - 1 into the slot step s - 1 has left
          issue(ic, (s + D - 1) % D);
          advance(ic, j1);
        }
        copy_commit();
        copy_wait<D - 1>();  // step s has landed
        consume(cc, s % D);
        advance(cc, j1);
      }
    }
    __syncthreads();  // the phase's hand-off rows visible to the next phase
  }
  copy_wait<0>();
}

}  // namespace treessm_cuda
