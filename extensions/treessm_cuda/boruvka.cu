// Host side of Borůvka's steps (boruvka_kernels.cuh): argument checks, the launches and the
// torch.library registration of torch.ops.treessm.cuda_lightest_edges and
// torch.ops.treessm.cuda_find_roots (CUDA dispatch key).
//
// cuda_lightest_edges(edge_index, key, comp, sentinel) -> best: int64 [N], for every vertex
// id c the least key of an edge between component c and another one, `sentinel` where no
// edge leaves c (or c labels no component). edge_index: int64 [2, E]; key: int64 [E],
// below `sentinel`; comp: int64 [N], labels in [0, N). Labels and ids are
// the caller's responsibility (checking them would wait for the device); nothing here does.
//
// cuda_find_roots(parent) -> roots: int64 [N], the root of every vertex of the forest whose
// parent pointers are `parent` (int64 [N], parent[r] == r at a root, every pointer in
// [0, N), no cycle but the roots' own: the caller's responsibility, as above).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "check.cuh"
#include "boruvka_kernels.cuh"

namespace treessm_cuda {
namespace {

void check_long(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TREESSM_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TREESSM_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), name,
              " must be a contiguous int64 tensor, got ", t.scalar_type());
}

}  // namespace

at::Tensor lightest_edges(const at::Tensor& edge_index, const at::Tensor& key,
                          const at::Tensor& comp, int64_t sentinel) {
  check_long(edge_index, "edge_index", edge_index);
  check_long(key, "key", edge_index);
  check_long(comp, "comp", edge_index);
  TREESSM_CHECK(edge_index.dim() == 2 && edge_index.size(0) == 2,
              "edge_index must have shape [2, E], got ", edge_index.sizes());
  const int64_t E = edge_index.size(1);
  TREESSM_CHECK(key.dim() == 1 && key.size(0) == E, "key must have shape [", E, "], got ",
              key.sizes());
  TREESSM_CHECK(comp.dim() == 1, "comp must be 1-D [N], got ", comp.sizes());
  const c10::cuda::CUDAGuard guard(edge_index.device());
  at::Tensor best = at::full({comp.size(0)}, sentinel, comp.options());
  if (E == 0 || comp.size(0) == 0) return best;
  const int64_t need = (E + boruvka::kThreads - 1) / boruvka::kThreads;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(need, 1 << 20));
  boruvka::lightest_edges_kernel<<<blocks, boruvka::kThreads, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(
      edge_index.data_ptr<int64_t>(), key.data_ptr<int64_t>(), comp.data_ptr<int64_t>(),
      reinterpret_cast<long long*>(best.data_ptr<int64_t>()), E);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return best;
}

at::Tensor find_roots(const at::Tensor& parent) {
  check_long(parent, "parent", parent);
  TREESSM_CHECK(parent.dim() == 1, "parent must be 1-D [N], got ", parent.sizes());
  const c10::cuda::CUDAGuard guard(parent.device());
  at::Tensor scratch = parent.clone();
  at::Tensor roots = at::empty_like(parent);
  const int64_t n = parent.size(0);
  if (n == 0) return roots;
  const int64_t need = (n + boruvka::kThreads - 1) / boruvka::kThreads;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(need, 1 << 20));
  boruvka::find_roots_kernel<<<blocks, boruvka::kThreads, 0,
                               c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<long long*>(scratch.data_ptr<int64_t>()),
      reinterpret_cast<long long*>(roots.data_ptr<int64_t>()), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return roots;
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def("cuda_lightest_edges(Tensor edge_index, Tensor key, Tensor comp, int sentinel) -> Tensor");
  m.def("cuda_find_roots(Tensor parent) -> Tensor");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) {
  m.impl("cuda_lightest_edges", &lightest_edges);
  m.impl("cuda_find_roots", &find_roots);
}

}  // namespace treessm_cuda
