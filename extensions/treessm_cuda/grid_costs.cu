// Host side of the grid edge costs: argument checks, launch configuration and the
// torch.library registration of torch.ops.treessm.cuda_grid_costs (CUDA dispatch key).
//
// cuda_grid_costs(feat, B, H, W, connectivity, kind, eps, group) computes, for B images of H x W
// pixels with features feat [B*H*W, C] (or [B, H, W, C]), the cost of every candidate edge of
// the 4- or 8-neighbour grids in the order of treessm.topology.grid.grid_edges, with one
// kernel that reads each feature row from memory about once (see grid_costs_kernels.cuh).
// kind 0: cosine, exp(-cos) with norms floored at eps; kind 1: Euclidean distance.
// group: lanes per pixel (1, 2, 4, 8, 16 or 32), or 0 for costs::choose_group's choice by
// row length. Returns float64 costs for float64 features, else float32. Nothing here waits
// for the device.
//
// cuda_edge_costs(feat, edge_index, kind, eps, group) computes the same costs for the edges
// edge_index [2, E] (int64, entries in [0, N), not checked) between the rows of feat [N, C]
// (edge_costs_kernel: a group of lanes per edge, no [E, C] gather).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "check.cuh"
#include "grid_costs_kernels.cuh"
#include "host_utils.cuh"

namespace treessm_cuda {
namespace {

// Multiprocessor count of a device, queried once per device.
inline int sm_count(int device) {
  return device_attribute<cudaDevAttrMultiProcessorCount>(device);
}

template <typename T, int V, int KIND>
void launch_kind(const T* feat, const costs::Shape& s, bool eight, int group,
                 typename AccType<T>::type eps, typename AccType<T>::type* out,
                 unsigned blocks, cudaStream_t stream) {
  if (eight) {
    costs::grid_costs_kernel<T, V, KIND, true>
        <<<blocks, costs::kThreads, 0, stream>>>(feat, s, group, eps, out);
  } else {
    costs::grid_costs_kernel<T, V, KIND, false>
        <<<blocks, costs::kThreads, 0, stream>>>(feat, s, group, eps, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int V>
void launch_pack(const T* feat, const costs::Shape& s, bool eight, int kind, int group,
                 typename AccType<T>::type eps, typename AccType<T>::type* out,
                 unsigned blocks, cudaStream_t stream) {
  if (kind == costs::kCosine) {
    launch_kind<T, V, costs::kCosine>(feat, s, eight, group, eps, out, blocks, stream);
  } else {
    launch_kind<T, V, costs::kL2>(feat, s, eight, group, eps, out, blocks, stream);
  }
}

template <typename T, int V>
void launch_edges(const T* feat, const int64_t* src, const int64_t* dst, int64_t E, int64_t C,
                  int kind, int group, typename AccType<T>::type eps,
                  typename AccType<T>::type* out, unsigned blocks, cudaStream_t stream) {
  if (kind == costs::kCosine) {
    costs::edge_costs_kernel<T, V, costs::kCosine>
        <<<blocks, costs::kThreads, 0, stream>>>(feat, src, dst, E, C, group, eps, out);
  } else {
    costs::edge_costs_kernel<T, V, costs::kL2>
        <<<blocks, costs::kThreads, 0, stream>>>(feat, src, dst, E, C, group, eps, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pack width, lanes per item (pixel or edge) and blocks of a cost launch over `items` rows
// of C elements: 16-byte packs where the rows allow, `group` lanes or costs::choose_group's
// choice, and enough blocks to fill the device several times over (the kernels stride over
// the rest).
struct CostLaunch {
  int pack;
  int lanes;
  unsigned blocks;
};

template <typename T>
CostLaunch cost_launch(const T* data, int64_t C, int64_t group, int64_t items, int device) {
  CostLaunch l;
  l.pack = costs::pack_elements<T>(data, C);
  l.lanes = group > 0 ? static_cast<int>(group) : costs::choose_group(C / l.pack);
  const int64_t per_block = costs::kThreads / l.lanes;
  const int64_t cap = std::max<int64_t>(1, static_cast<int64_t>(sm_count(device)) * 64);
  l.blocks = static_cast<unsigned>(std::min<int64_t>((items + per_block - 1) / per_block, cap));
  return l;
}

}  // namespace

at::Tensor grid_costs(const at::Tensor& feat, int64_t B, int64_t H, int64_t W,
                      int64_t connectivity, int64_t kind, double eps, int64_t group) {
  TREESSM_CHECK(feat.is_cuda(), "feat must be a CUDA tensor");
  const auto dtype = feat.scalar_type();
  TREESSM_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "feat must be float32, float64, float16 or bfloat16, got ", dtype);
  TREESSM_CHECK(B >= 0, "B must be >= 0, got ", B);
  TREESSM_CHECK(H >= 1 && W >= 1, "H and W must be >= 1, got ", H, " x ", W);
  TREESSM_CHECK(H * W <= INT_MAX, "an image of ", H, " x ", W, " pixels is too large");
  TREESSM_CHECK(feat.size(-1) <= INT_MAX, "too many channels: ", feat.size(-1));
  TREESSM_CHECK(connectivity == 4 || connectivity == 8, "connectivity must be 4 or 8, got ",
              connectivity);
  TREESSM_CHECK(kind == costs::kCosine || kind == costs::kL2,
              "kind must be 0 (cosine) or 1 (l2), got ", kind);
  TREESSM_CHECK(group == 0 || (group <= 32 && (group & (group - 1)) == 0 && group > 0),
              "group must be 0 or a power of two up to 32, got ", group);
  const int64_t pixels = B * H * W;
  const bool rows = feat.dim() == 2 && feat.size(0) == pixels;
  const bool image = feat.dim() == 4 && feat.size(0) == B && feat.size(1) == H &&
                     feat.size(2) == W;
  TREESSM_CHECK(rows || image, "feat must have shape [B*H*W, C] = [", pixels,
              ", C] or [B, H, W, C] = [", B, ", ", H, ", ", W, ", C], got ", feat.sizes());
  const int64_t C = feat.size(-1);
  const bool eight = connectivity == 8;
  const costs::Shape s =
      costs::make_shape(B, static_cast<int>(H), static_cast<int>(W), C, eight);

  const auto out_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({B * s.per_image}, feat.options().dtype(out_type));
  if (out.numel() == 0) return out;  // no images, or 1 x 1 images (no edges)

  const c10::cuda::CUDAGuard guard(feat.device());
  const at::Tensor x = feat.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "treessm_cuda_grid_costs", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = typename AccType<T>::type;
    const T* data = reinterpret_cast<const T*>(x.data_ptr());
    const CostLaunch l = cost_launch<T>(data, C, group, pixels, feat.get_device());
    A* o = out.data_ptr<A>();
    const A e = static_cast<A>(eps);
    if (l.pack > 1) {
      launch_pack<T, costs::kPackBytes / sizeof(T)>(data, s, eight, static_cast<int>(kind),
                                                    l.lanes, e, o, l.blocks, stream);
    } else {
      launch_pack<T, 1>(data, s, eight, static_cast<int>(kind), l.lanes, e, o, l.blocks, stream);
    }
  });
  return out;
}

at::Tensor edge_costs(const at::Tensor& feat, const at::Tensor& edge_index, int64_t kind,
                      double eps, int64_t group) {
  TREESSM_CHECK(feat.is_cuda() && feat.dim() == 2, "feat must be a 2-D [N, C] CUDA tensor");
  const auto dtype = feat.scalar_type();
  TREESSM_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "feat must be float32, float64, float16 or bfloat16, got ", dtype);
  TREESSM_CHECK(edge_index.is_cuda() && edge_index.device() == feat.device(),
              "edge_index must be on ", feat.device());
  TREESSM_CHECK(edge_index.scalar_type() == at::kLong && edge_index.dim() == 2 &&
                  edge_index.size(0) == 2,
              "edge_index must be an int64 tensor of shape [2, E], got ", edge_index.sizes());
  TREESSM_CHECK(feat.size(1) <= INT_MAX, "too many channels: ", feat.size(1));
  TREESSM_CHECK(kind == costs::kCosine || kind == costs::kL2,
              "kind must be 0 (cosine) or 1 (l2), got ", kind);
  TREESSM_CHECK(group == 0 || (group <= 32 && (group & (group - 1)) == 0 && group > 0),
              "group must be 0 or a power of two up to 32, got ", group);
  const int64_t E = edge_index.size(1);
  const int64_t C = feat.size(1);
  const auto out_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({E}, feat.options().dtype(out_type));
  if (E == 0) return out;
  TREESSM_CHECK(feat.size(0) > 0, "feat has no rows for ", E, " edges");

  const c10::cuda::CUDAGuard guard(feat.device());
  const at::Tensor x = feat.contiguous();
  const at::Tensor ends = edge_index.contiguous();
  const int64_t* src = ends.data_ptr<int64_t>();
  const int64_t* dst = src + E;
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "treessm_cuda_edge_costs", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = typename AccType<T>::type;
    const T* data = reinterpret_cast<const T*>(x.data_ptr());
    const CostLaunch l = cost_launch<T>(data, C, group, E, feat.get_device());
    A* o = out.data_ptr<A>();
    const A e = static_cast<A>(eps);
    if (l.pack > 1) {
      launch_edges<T, costs::kPackBytes / sizeof(T)>(data, src, dst, E, C, static_cast<int>(kind),
                                                     l.lanes, e, o, l.blocks, stream);
    } else {
      launch_edges<T, 1>(data, src, dst, E, C, static_cast<int>(kind), l.lanes, e, o, l.blocks,
                         stream);
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def(
      "cuda_grid_costs(Tensor feat, int B, int H, int W, int connectivity, int kind, "
      "float eps, int group) -> Tensor");
  m.def("cuda_edge_costs(Tensor feat, Tensor edge_index, int kind, float eps, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) {
  m.impl("cuda_grid_costs", &grid_costs);
  m.impl("cuda_edge_costs", &edge_costs);
}

}  // namespace treessm_cuda
