// Host side of the heavy-path plan: torch.ops.treessm.cuda_path_plan(order, child_ptr,
// tree_ptr, depth, parent_pos) -> (rec, light, slot, path_ptr, phase_path), the tensors of
// treessm/path_plan.py built by one block per tree (path_plan_kernels.cuh). Nothing here
// waits for the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "check.cuh"
#include "path_plan_kernels.cuh"

namespace treessm_cuda {
namespace {

void check_layout(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& like) {
  TREESSM_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TREESSM_CHECK(t.scalar_type() == at::kLong, name, " must be int64");
  TREESSM_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
  TREESSM_CHECK(t.size(0) == n, name, " must have ", n, " entries, got ", t.size(0));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> path_plan(
    const at::Tensor& order, const at::Tensor& child_ptr, const at::Tensor& tree_ptr,
    const at::Tensor& depth, const at::Tensor& parent_pos) {
  TREESSM_CHECK(order.is_cuda() && order.dim() == 1, "order must be a 1-D CUDA tensor");
  const int64_t N = order.size(0);
  TREESSM_CHECK(tree_ptr.dim() == 1 && tree_ptr.size(0) >= 1, "tree_ptr must be a 1-D tensor");
  const int64_t T = tree_ptr.size(0) - 1;
  check_layout(order, "order", N, order);
  check_layout(child_ptr, "child_ptr", N + 1, order);
  check_layout(tree_ptr, "tree_ptr", T + 1, order);
  check_layout(depth, "depth", N, order);
  check_layout(parent_pos, "parent_pos", N, order);
  TREESSM_CHECK(N < (1LL << 30), "the path plan kernel takes fewer than 2^30 vertices, got ", N);
  const auto opts = order.options().dtype(at::kInt);
  at::Tensor rec = at::empty({N + 1, 4}, opts);
  at::Tensor light = at::empty({N}, opts);
  at::Tensor slot = at::empty({N}, opts);
  at::Tensor path_ptr = at::empty({N + 1}, opts);
  at::Tensor phase_path = at::empty({T, kMaxPhases + 1}, opts);
  if (T <= 0) {
    rec.fill_(-1);
    rec.select(1, 2).fill_(N);
    rec.select(1, 3).fill_(N);
    path_ptr.fill_(N);
    return {rec, light, slot, path_ptr, phase_path};
  }
  const c10::cuda::CUDAGuard guard(order.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor work = at::empty({4 * (N + T) + 9 * N}, opts);
  PathPlanArgs a;
  a.order = order.data_ptr<int64_t>();
  a.child_ptr = child_ptr.data_ptr<int64_t>();
  a.tree_ptr = tree_ptr.data_ptr<int64_t>();
  a.depth = depth.data_ptr<int64_t>();
  a.parent_pos = parent_pos.data_ptr<int64_t>();
  a.rec = reinterpret_cast<PathRec*>(rec.data_ptr<int>());
  a.light = light.data_ptr<int>();
  a.slot = slot.data_ptr<int>();
  a.path_ptr = path_ptr.data_ptr<int>();
  a.phase_path = phase_path.data_ptr<int>();
  a.work = reinterpret_cast<unsigned*>(work.data_ptr<int>());
  a.N = N;
  a.T = T;
  // about one thread per two vertices of the average tree, 64 to 1024
  const int64_t avg = (N + T - 1) / T;
  int threads = static_cast<int>(((avg / 2 + 31) / 32) * 32);
  threads = threads < 64 ? 64 : (threads > 1024 ? 1024 : threads);
  TREESSM_CHECK(T <= 2147483647LL, "too many trees for one launch: ", T);
  path_plan_kernel<<<static_cast<unsigned>(T), threads, kPathPlanSmem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rec, light, slot, path_ptr, phase_path};
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def(
      "cuda_path_plan(Tensor order, Tensor child_ptr, Tensor tree_ptr, Tensor depth, "
      "Tensor parent_pos) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) { m.impl("cuda_path_plan", &path_plan); }

}  // namespace treessm_cuda
