// The heavy-path layout of a forest that the scan kernels read (treessm.ops.plan.PathPlan),
// shared by the kernel that builds it (path_plan_kernels.cuh) and the scans (scan_kernels.cuh).
//
// Positions ("path indices") run tree by tree, phase by phase (a path's phase is the number
// of light edges above its head), and inside a phase path by path, each path head first and
// then down its heavy children: every heavy path is a contiguous run of positions, so the
// heavy child of position k, when k has children, is position k + 1.
#pragma once

namespace treessm_cuda {

constexpr int kMaxPhases = 32;  // treessm.ops.plan.MAX_PHASES: phases of a tree below 2^31 vertices

// One position: its vertex, its parent's position (-1 at a root) and the range of its light
// children in the light list; position N is a sentinel {-1, -1, N, N}.
struct alignas(16) PathRec {
  int v, parent, light_start, light_end;
};

}  // namespace treessm_cuda
