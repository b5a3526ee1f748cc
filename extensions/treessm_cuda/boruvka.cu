// Host side of Borůvka's algorithm (boruvka_kernels.cuh): argument checks, the launches and
// the torch.library registration of torch.ops.treessm.cuda_boruvka (CUDA dispatch key).
//
// cuda_boruvka(edge_index, key, num_nodes, rounds, sentinel) -> (chosen, comp): the edges
// chosen in `rounds` rounds of Borůvka's algorithm (bool [E]) and every vertex's component
// label (int64 [N], a vertex id of its component: the root of its hook trees). edge_index:
// int64 [2, E]; key: int64 [E], distinct, with the edge index in the low 32 bits, all below
// `sentinel`. Ids in [0, N) and distinct keys are the caller's responsibility (checking them
// would wait for the device); nothing here does. Three launches per round, none of which
// waits for the device; the rounds after the components stop growing return at once.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "check.cuh"
#include "boruvka_kernels.cuh"

namespace treessm_cuda {
namespace {

void check_long(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TREESSM_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TREESSM_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), name,
              " must be a contiguous int64 tensor, got ", t.scalar_type());
}

// Grid-stride loops: enough blocks to fill the device, and cheap launches for the rounds
// that return at once.
constexpr int64_t kMaxBlocks = 4096;

}  // namespace

std::tuple<at::Tensor, at::Tensor> boruvka_forest(const at::Tensor& edge_index,
                                                  const at::Tensor& key, int64_t num_nodes,
                                                  int64_t rounds, int64_t sentinel) {
  check_long(edge_index, "edge_index", edge_index);
  check_long(key, "key", edge_index);
  TREESSM_CHECK(edge_index.dim() == 2 && edge_index.size(0) == 2,
              "edge_index must have shape [2, E], got ", edge_index.sizes());
  const int64_t E = edge_index.size(1);
  TREESSM_CHECK(key.dim() == 1 && key.size(0) == E, "key must have shape [", E, "], got ",
              key.sizes());
  TREESSM_CHECK(E < (int64_t{1} << 32), "at most 2^32 - 1 edges, got ", E);
  TREESSM_CHECK(num_nodes >= 0 && rounds >= 0, "num_nodes and rounds must be >= 0, got ",
              num_nodes, " and ", rounds);
  const c10::cuda::CUDAGuard guard(edge_index.device());
  const auto opts = edge_index.options();
  at::Tensor chosen = at::zeros({E}, opts.dtype(at::kBool));
  at::Tensor comp = at::arange(num_nodes, opts);
  if (E == 0 || num_nodes <= 1 || rounds == 0) return {chosen, comp};
  at::Tensor best = at::full({num_nodes}, sentinel, opts);
  at::Tensor hook = at::empty({num_nodes}, opts);
  at::Tensor active = at::zeros({rounds + 1}, opts.dtype(at::kInt));
  active.narrow(0, 0, 1).fill_(1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto blocks = [](int64_t items) {
    const int64_t need = (items + boruvka::kThreads - 1) / boruvka::kThreads;
    return static_cast<unsigned>(std::min<int64_t>(need, kMaxBlocks));
  };
  const int64_t* ei = edge_index.data_ptr<int64_t>();
  const int64_t* keys = key.data_ptr<int64_t>();
  int64_t* labels = comp.data_ptr<int64_t>();
  bool* in_forest = chosen.data_ptr<bool>();
  auto* best_p = reinterpret_cast<long long*>(best.data_ptr<int64_t>());
  auto* hook_p = reinterpret_cast<long long*>(hook.data_ptr<int64_t>());
  int* flags = active.data_ptr<int>();  // flags[k]: round k runs
  for (int64_t k = 0; k < rounds; ++k) {
    boruvka::lightest_edges_kernel<<<blocks(E), boruvka::kThreads, 0, stream>>>(
        ei, keys, labels, best_p, E, flags + k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    boruvka::hook_kernel<<<blocks(num_nodes), boruvka::kThreads, 0, stream>>>(
        ei, labels, best_p, hook_p, in_forest, num_nodes, E, sentinel, flags + k, flags + k + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    boruvka::relabel_kernel<<<blocks(num_nodes), boruvka::kThreads, 0, stream>>>(
        hook_p, labels, best_p, num_nodes, sentinel, flags + k + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {chosen, comp};
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def("cuda_boruvka(Tensor edge_index, Tensor key, int num_nodes, int rounds, int sentinel) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) {
  m.impl("cuda_boruvka", &boruvka_forest);
}

}  // namespace treessm_cuda
