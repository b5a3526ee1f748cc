// Host side of the grid-tree construction: argument checks, launch configuration and the
// torch.library registration of torch.ops.treessm.cuda_grid_tree (CUDA dispatch key).
//
// cuda_grid_tree(cost, B, H, W, connectivity, threads, solo) builds, for B images of H x W pixels, the
// minimum spanning tree of each image's 4- or 8-neighbour grid under the costs (ties to the
// lower candidate index), rooted at the first pixel (0, 0), with its breadth-first
// layout and level plan: the tensors of Tree.from_parent(parent) and
// treessm.ops.plan.level_plan. threads: per image block (a multiple of 32 up to 1024, or 0
// for about one per two pixels); solo: levels up to this wide run on one warp without a
// block barrier. Nothing here waits for the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "check.cuh"
#include "grid_tree_kernels.cuh"
#include "host_utils.cuh"

namespace treessm_cuda {
namespace {


// Threads per image: about one per two pixels (the Borůvka phases sweep every pixel), at
// least two warps and at most 1024.
int block_threads(int n) {
  const int t = ((n / 2 + 31) / 32) * 32;
  return t < 64 ? 64 : (t > 1024 ? 1024 : t);
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor>;

}  // namespace

Outputs grid_tree(const at::Tensor& cost, int64_t B, int64_t H, int64_t W, int64_t connectivity,
                  int64_t threads, int64_t solo) {
  TREESSM_CHECK(cost.is_cuda(), "cost must be a CUDA tensor");
  TREESSM_CHECK(cost.dim() == 1 && cost.is_contiguous(), "cost must be a contiguous 1-D tensor, got ",
              cost.dim(), " dims");
  const auto dtype = cost.scalar_type();
  TREESSM_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "cost must be float32, float64, float16 or bfloat16, got ", dtype);
  TREESSM_CHECK(B >= 0, "B must be >= 0, got ", B);
  TREESSM_CHECK(H >= 1 && W >= 1, "H and W must be >= 1, got ", H, " x ", W);
  TREESSM_CHECK(connectivity == 4 || connectivity == 8, "connectivity must be 4 or 8, got ",
              connectivity);
  TREESSM_CHECK(H * W <= INT_MAX / 32, "an image of ", H, " x ", W, " pixels is too large");
  TREESSM_CHECK(threads == 0 || (threads >= 32 && threads <= 1024 && threads % 32 == 0),
              "threads must be 0 or a multiple of 32 up to 1024, got ", threads);
  TREESSM_CHECK(solo >= 0 && solo <= 1024, "solo must lie in [0, 1024], got ", solo);
  const grid::Grid g(static_cast<int>(H), static_cast<int>(W), static_cast<int>(connectivity));
  const int64_t n = g.n;
  TREESSM_CHECK(cost.numel() == B * g.E, "cost must hold B * E = ", B, " * ", g.E, " = ", B * g.E,
              " costs (E candidate edges per ", H, " x ", W, " image), got ", cost.numel());
  const int64_t N = B * n;

  const auto opts = cost.options().dtype(at::kLong);
  at::Tensor parent = at::empty({N}, opts);
  at::Tensor order = at::empty({N}, opts);
  at::Tensor child_ptr = at::empty({N + 1}, opts);
  at::Tensor tree_ptr = at::empty({B + 1}, opts);
  at::Tensor depth = at::empty({N}, opts);
  at::Tensor level_pos = at::empty({N + 1}, opts);
  at::Tensor tree_level_ptr = at::empty({B + 1}, opts);
  at::Tensor parent_pos = at::empty({N}, opts);
  if (N == 0) {
    level_pos.zero_();
    child_ptr.zero_();
    tree_ptr.zero_();
    tree_level_ptr.zero_();
    return {parent, order, child_ptr, tree_ptr, depth, level_pos, tree_level_ptr, parent_pos};
  }

  const c10::cuda::CUDAGuard guard(cost.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const size_t smem = grid::smem_bytes(g.n, g.E);
  const int optin = max_dynamic_smem(cost.get_device());
  TREESSM_CHECK(smem <= static_cast<size_t>(optin), "an image of ", H, " x ", W, " pixels (",
              connectivity, "-connectivity) needs ", smem,
              " bytes of shared memory per block; this device allows ", optin);
  TREESSM_CHECK(B <= INT_MAX, "too many images for one launch: ", B);

  at::Tensor level_start = at::empty({N}, cost.options().dtype(at::kInt));
  at::Tensor level_count = at::empty({B}, cost.options().dtype(at::kInt));
  grid::TreeOut o{parent.data_ptr<int64_t>(),     order.data_ptr<int64_t>(),
                  child_ptr.data_ptr<int64_t>(),  tree_ptr.data_ptr<int64_t>(),
                  depth.data_ptr<int64_t>(),      parent_pos.data_ptr<int64_t>(),
                  level_start.data_ptr<int>(),    level_count.data_ptr<int>()};
  const int block = threads > 0 ? static_cast<int>(threads) : block_threads(g.n);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "treessm_cuda_grid_tree", [&] {
    using T = typename CudaType<scalar_t>::type;
    constexpr auto kernel = grid::grid_tree_kernel<T>;
    allow_dynamic_smem<kernel>(static_cast<int64_t>(smem), cost.get_device());
    kernel<<<static_cast<unsigned>(B), block, smem, stream>>>(
        reinterpret_cast<const T*>(cost.data_ptr()), g.H, g.W, static_cast<int>(connectivity),
        static_cast<int>(solo), B, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int scan_threads = B >= 1024 ? 1024 : static_cast<int>((B + 31) / 32 * 32);
  grid::level_scan_kernel<<<1, scan_threads, 32 * sizeof(long long), stream>>>(
      level_count.data_ptr<int>(), B, tree_level_ptr.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grid::level_scatter_kernel<<<static_cast<unsigned>(B), 128, 0, stream>>>(
      level_start.data_ptr<int>(), level_count.data_ptr<int>(), tree_level_ptr.data_ptr<int64_t>(),
      g.n, B, level_pos.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {parent, order, child_ptr, tree_ptr, depth, level_pos, tree_level_ptr, parent_pos};
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def(
      "cuda_grid_tree(Tensor cost, int B, int H, int W, int connectivity, int threads, "
      "int solo) -> (Tensor parent, "
      "Tensor order, Tensor child_ptr, Tensor tree_ptr, Tensor depth, Tensor level_pos, "
      "Tensor tree_level_ptr, Tensor parent_pos)");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) { m.impl("cuda_grid_tree", &grid_tree); }

}  // namespace treessm_cuda
