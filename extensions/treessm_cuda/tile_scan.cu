// Host side of the tiled tree scan (tile_kernels.cuh): argument checks, the three launches
// and the torch.library registration (CUDA dispatch key)
//   torch.ops.treessm.cuda_tile_scan(x, weight, plan, direction) -> h
//   torch.ops.treessm.cuda_tile_scan_backward(grad, weight, out, plan, direction, x)
//       -> (grad_x, grad_weight)
//   torch.ops.treessm.cuda_tile_scan_both_parts(x, weight, plan) -> (up, inner, out)
//   torch.ops.treessm.cuda_tile_scan_both_backward(grad, weight, up, inner, out, plan)
//       -> (grad_up, grad_out, grad_weight)
//       "both" as its parts, in the accumulation type: h = up + out, grad_x = grad_up +
//       grad_out (the both scan of grad in parts); the backward from the forward's parts
//       instead of x, so that it scans the gradient only. The caller forms the sums, in x's
//       dtype, or reads the parts where it reads h once (treessm.ops.expansion_cuda)
// `plan` is treessm.ops.tiles.TilePlan.op_tensors(): the tensors from `vertex` to
// `path_ptr`, in that order (20 int32 tensors on x's device), then the plan's tile size (a
// CPU int64 tensor of one entry, read on the host: the kernels stage a tile's plan in
// shared memory sized by it, so it must be the one the layout was cut for). Directions "down",
// "up" and "both" (up, the brackets, then down of the brackets' inputs, all in the
// accumulation type; its backward needs the forward's input x). No autograd here (the
// backward op is the building block). Nothing here waits for the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "check.cuh"
#include "host_utils.cuh"
#include "tile_kernels.cuh"

namespace treessm_cuda {
namespace {

constexpr int kPlanTensors = 21;  // TilePlan's 20 tensors and its tile size

enum class Direction { kDown, kUp, kBoth };

Direction parse_direction(c10::string_view d) {
  TREESSM_CHECK(d == "down" || d == "up" || d == "both",
              "direction must be 'down', 'up' or 'both', got '", std::string(d), "'");
  return d == "down" ? Direction::kDown : d == "up" ? Direction::kUp : Direction::kBoth;
}

// The plan's tensors checked against N, and TileArgs pointing at them (no scratch yet).
// Every entry point calls it before it touches the plan.
TileArgs plan_args(at::TensorList plan, const at::Tensor& x) {
  TREESSM_CHECK(plan.size() == static_cast<size_t>(kPlanTensors), "plan must hold the ",
              kPlanTensors, " tensors of TilePlan.op_tensors() (vertex to path_ptr, then the "
              "tile size), got ", plan.size());
  static const char* names[kPlanTensors] = {
      "vertex", "parent", "size", "light_depth", "flags", "top", "tree_ptr", "tile_ptr",
      "scan", "level_ptr", "tile_levels", "boundary", "boundary_pos", "feeder",
      "boundary_level_ptr", "tile_boundary", "entries", "entry_ptr", "path", "path_ptr",
      "tile"};
  const at::Tensor& tile_host = plan[kPlanTensors - 1];
  TREESSM_CHECK(tile_host.defined() && tile_host.device().is_cpu() &&
                    tile_host.scalar_type() == at::kLong && tile_host.numel() == 1,
                "plan's last tensor (the tile size) must be a CPU int64 tensor of one entry");
  const int64_t tile = tile_host.item<int64_t>();
  for (int i = 0; i < kPlanTensors - 1; ++i) {
    const at::Tensor& t = plan[i];
    TREESSM_CHECK(t.defined() && t.is_cuda() && t.device() == x.device(), "plan.", names[i],
                " must be on ", x.device());
    TREESSM_CHECK(t.scalar_type() == at::kInt && t.is_contiguous(), "plan.", names[i],
                " must be contiguous int32");
  }
  const int64_t N = x.size(0);
  TREESSM_CHECK(N < 2147483647LL, "the tiled scan indexes positions with 32 bits");
  TREESSM_CHECK(tile >= 1 && tile < (1LL << 30), "tile must be positive, got ", tile);
  const at::Tensor &tile_ptr = plan[7], &level_ptr = plan[9], &tile_boundary = plan[15];
  TREESSM_CHECK(tile_ptr.dim() == 1 && tile_ptr.size(0) >= 1, "plan.tile_ptr must be [M + 1]");
  const int64_t M = tile_ptr.size(0) - 1;
  TREESSM_CHECK(M < 2147483647LL, "too many tiles: ", M);
  TREESSM_CHECK(level_ptr.dim() == 2 && level_ptr.size(0) == M && level_ptr.size(1) >= 1,
              "plan.level_ptr must be [M, L + 1]");
  TREESSM_CHECK(tile_boundary.dim() == 2 && tile_boundary.size(0) == M && tile_boundary.size(1) == 2,
              "plan.tile_boundary must be [M, 2]");
  for (int i : {0, 1, 2, 3, 4, 5, 8, 11, 12, 13, 16, 18})
    TREESSM_CHECK(plan[i].dim() == 1 && plan[i].size(0) == N, "plan.", names[i], " must have ",
                N, " entries, got ", plan[i].sizes());
  TREESSM_CHECK(plan[10].dim() == 1 && plan[10].size(0) == M, "plan.tile_levels must be [M]");
  for (int i : {14, 19})
    TREESSM_CHECK(plan[i].dim() == 1 && plan[i].size(0) == M + 1, "plan.", names[i],
                " must be [M + 1]");
  TREESSM_CHECK(plan[17].dim() == 1 && plan[17].size(0) == N + 1, "plan.entry_ptr must be [N + 1]");
  TileArgs a{};
  a.C = x.size(1);
  a.N = static_cast<int>(N);
  a.M = static_cast<int>(M);
  a.L = static_cast<int>(level_ptr.size(1) - 1);
  a.tile = static_cast<int>(tile);
  const int* p[kPlanTensors - 1];
  for (int i = 0; i < kPlanTensors - 1; ++i) p[i] = plan[i].data_ptr<int>();
  a.vertex = p[0];
  a.parent = p[1];
  a.size = p[2];
  a.flags = p[4];
  a.top = p[5];
  a.tile_ptr = p[7];
  a.scan = p[8];
  a.level_ptr = p[9];
  a.tile_levels = p[10];
  a.boundary = p[11];
  a.boundary_pos = p[12];
  a.feeder = p[13];
  a.tile_boundary = p[15];
  a.entries = p[16];
  a.entry_ptr = p[17];
  a.path = p[18];
  a.path_ptr = p[19];
  a.boundary_level_ptr = p[14];
  return a;
}

// Warps of every tile, path and tile-tree block (the values do not depend on it).
constexpr int kTileWarps = kTileThreads / kTileLanes;
// Tile blocks aimed at per multiprocessor when splitting a tile's channel groups over
// blocks (each block stages the tile's plan once for the groups it takes).
constexpr int kTileBlocksPerSM = 4;
// Blocks per multiprocessor of up's gathers, which stride over the boundary vertices.
constexpr int kGatherBlocksPerSM = 8;

// The three launches of a down scan (kScaled: its input is w x, tile_kernels.cuh).
template <typename T, typename A, bool kScaled>
void run_down(const TileArgs& a, dim3 grid, unsigned wgrid, int64_t tile_smem,
              int64_t path_smem, int device, cudaStream_t stream) {
  constexpr auto levels = tile_down_levels_kernel<T, A, kScaled>;
  allow_dynamic_smem<levels>(tile_smem, device);
  tile_down_paths_kernel<T, A, kScaled>
      <<<grid, kTileThreads, static_cast<size_t>(path_smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tile_down_feed_kernel<A><<<wgrid, kTileThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  levels<<<grid, kTileThreads, static_cast<size_t>(tile_smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The launches of one scan (tile_kernels.cuh: three phases, up's second in two launches);
// `scaled`: a down scan of w x (both's brackets).
template <typename T, typename A>
void run_tiles(TileArgs a, bool up, bool scaled, int device, cudaStream_t stream) {
  const int64_t groups = (a.C + kTileLanes - 1) / kTileLanes;
  TREESSM_CHECK(groups <= 65535, "too many channels for one launch: ", a.C);
  const int64_t target = static_cast<int64_t>(kTileBlocksPerSM) *
                         device_attribute<cudaDevAttrMultiProcessorCount>(device);
  int64_t slices = (target + a.M - 1) / a.M;
  slices = slices < 1 ? 1 : (slices > groups ? groups : slices);
  const int64_t per_block = (groups + slices - 1) / slices;
  slices = (groups + per_block - 1) / per_block;
  a.groups = static_cast<int>(groups);
  a.groups_per_block = static_cast<int>(per_block);
  const int64_t limit = max_dynamic_smem(device);
  const int64_t tile_smem = tile_smem_bytes<A>(a.tile, kTileWarps);
  TREESSM_CHECK(tile_smem <= limit, "tile ", a.tile, " needs ", tile_smem, " bytes of shared "
              "memory per block; this device allows ", limit);
  const int64_t path_smem = path_smem_bytes<A>(kTileWarps);
  const int64_t items = static_cast<int64_t>(a.M) * groups;  // (tile, group) warps
  const int64_t warp_blocks = (items + kTileWarps - 1) / kTileWarps;
  TREESSM_CHECK(warp_blocks <= 2147483647LL, "too many tiles and channels for one launch");
  const dim3 grid(static_cast<unsigned>(a.M), static_cast<unsigned>(slices));
  const unsigned wgrid = static_cast<unsigned>(warp_blocks);
  if (!up) {
    // the scaled input (both's brackets) runs in the accumulation type only
    if constexpr (std::is_same<T, A>::value)
      if (scaled)
        return run_down<T, A, true>(a, grid, wgrid, tile_smem, path_smem, device, stream);
    TREESSM_CHECK(!scaled, "a scaled down scan takes rows in the accumulation type");
    return run_down<T, A, false>(a, grid, wgrid, tile_smem, path_smem, device, stream);
  }
  constexpr auto levels = tile_up_levels_kernel<T, A>;
  constexpr auto tree = tile_up_tree_kernel<A>;
  allow_dynamic_smem<levels>(tile_smem, device);
  const int64_t tree_smem = tile_tree_smem_bytes<A>(a.M);
  const bool in_smem = tree_smem <= limit;
  if (in_smem) allow_dynamic_smem<tree>(tree_smem, device);
  // (boundary vertex, group) warps: at most N * groups, the count known on the device only
  const int64_t gather_warps = static_cast<int64_t>(a.N) * groups;
  const int64_t gather_cap = kGatherBlocksPerSM * device_attribute<cudaDevAttrMultiProcessorCount>(device);
  const int64_t gather_blocks = std::min((gather_warps + kTileWarps - 1) / kTileWarps, gather_cap);
  levels<<<grid, kTileThreads, static_cast<size_t>(tile_smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tile_up_gather_kernel<T, A><<<static_cast<unsigned>(gather_blocks), kTileThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tile_up_tiles_kernel<T, A><<<wgrid, kTileThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tree<<<static_cast<unsigned>(groups), kTileThreads,
         in_smem ? static_cast<size_t>(tree_smem) : 0, stream>>>(a, in_smem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tile_up_paths_kernel<T, A><<<grid, kTileThreads, static_cast<size_t>(path_smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// h = the scan of x along the plan (`a`: plan_args of it); `out` receives it (same shape
// and dtype as x). `scaled`: a down scan of w x (both's brackets).
void tile_scan_into(const at::Tensor& x, const at::Tensor& weight, TileArgs a, bool up,
                    at::Tensor& out, bool scaled = false) {
  if (x.numel() == 0 || a.M == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), M = a.M;
  const auto acc_dtype = acc_type(x.scalar_type());
  const auto acc = x.options().dtype(acc_dtype);
  // scratch rows by boundary number (fewer than N) and by tile
  at::Tensor sa = at::empty({N, C}, acc), sb = at::empty({N, C}, acc), tv = at::empty({M, C}, acc);
  at::Tensor tmu = up ? at::empty({M, C}, acc) : at::Tensor();
  at::Tensor tparent = up ? at::empty({M}, x.options().dtype(at::kInt)) : at::Tensor();
  at::Tensor etile = up ? at::empty({N}, x.options().dtype(at::kInt)) : at::Tensor();
  at::Tensor store = x.scalar_type() == acc_dtype ? at::Tensor() : at::empty({N, C}, acc);
  a.x = x.data_ptr();
  a.w = weight.data_ptr();
  a.h = out.data_ptr();
  a.store = store.defined() ? store.data_ptr() : out.data_ptr();
  a.sa = sa.data_ptr();
  a.sb = sb.data_ptr();
  a.tv = tv.data_ptr();
  a.tmu = tmu.defined() ? tmu.data_ptr() : nullptr;
  a.tparent = tparent.defined() ? tparent.data_ptr<int>() : nullptr;
  a.etile = etile.defined() ? etile.data_ptr<int>() : nullptr;
  const int device = x.get_device();
  auto stream = c10::cuda::getCurrentCUDAStream();
  TREESSM_DISPATCH_TYPES(x.scalar_type(), "treessm_tile_scan", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    using A_ = typename AccType<T_>::type;
    run_tiles<T_, A_>(a, up, scaled, device, stream);
  });
}

int64_t blocks_of(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  TREESSM_CHECK(blocks <= 2147483647LL, "too many rows for one launch");
  return blocks;
}

// The parts of both(x) (x, w in the accumulation type): up = up(x); inner[v] = x[p] +
// the siblings' shares w up; out = down(w inner, w), the products formed as the down scan
// reads inner; both = up + out.
struct BothParts {
  at::Tensor up, inner, out;
};

// prev: the sibling links of the plan (tile_sibling_links_kernel), int32 [N].
BothParts both_parts(const at::Tensor& x, const at::Tensor& w, const TileArgs& a,
                     const at::Tensor& prev) {
  BothParts r{at::empty_like(x), at::empty_like(x), at::empty_like(x)};
  const int64_t N = x.size(0), C = x.size(1);
  if (N * C == 0) return r;
  tile_scan_into(x, w, a, true, r.up);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "treessm_tile_brackets", [&] {
    tile_bracket_kernel<scalar_t><<<static_cast<unsigned>(blocks_of(N * C, threads)), threads,
                                    0, stream>>>(
        x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), r.up.data_ptr<scalar_t>(),
        r.inner.data_ptr<scalar_t>(), a.vertex, a.parent, a.size, prev.data_ptr<int>(), N, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  tile_scan_into(r.inner, w, a, false, r.out, /*scaled=*/true);
  return r;
}

at::Tensor sibling_links(const TileArgs& a, const at::Tensor& like) {
  const int64_t N = like.size(0);
  at::Tensor prev = at::empty({N}, like.options().dtype(at::kInt));
  if (N == 0) return prev;
  const c10::cuda::CUDAGuard guard(like.device());
  const int threads = 256;
  tile_sibling_links_kernel<<<static_cast<unsigned>(blocks_of(N, threads)), threads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
      a.parent, a.size, prev.data_ptr<int>(), static_cast<int>(N));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return prev;
}

// both(x) in x's dtype, and its parts in the accumulation type.
std::pair<at::Tensor, BothParts> both_scan(const at::Tensor& x, const at::Tensor& weight,
                                           const TileArgs& a, const at::Tensor& prev) {
  const auto acc = acc_type(x.scalar_type());
  BothParts parts = both_parts(x.to(acc), weight.to(acc), a, prev);
  return {at::add(parts.up, parts.out).to(x.scalar_type()), parts};
}

// grad_weight of both at grad (its parts parts_g) from the forward's parts parts_x:
// gw[v] = up(x)[v] br_g[v] + up(g)[v] br_x[v] at non-roots.
at::Tensor both_grad_weight(const at::Tensor& grad, const BothParts& parts_g,
                            const BothParts& parts_x, const TileArgs& a) {
  at::Tensor gw = at::empty_like(grad);
  const int64_t N = grad.size(0), C = grad.size(1);
  if (N * C == 0) return gw;
  const int threads = 256;
  const c10::cuda::CUDAGuard guard(grad.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  TREESSM_DISPATCH_TYPES(grad.scalar_type(), "treessm_tile_scan_backward_both", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    using A_ = typename AccType<T_>::type;
    auto ptr = [](const at::Tensor& t) { return reinterpret_cast<const A_*>(t.data_ptr()); };
    tile_both_grad_weight_kernel<T_, A_><<<static_cast<unsigned>(blocks_of(N * C, threads)),
                                           threads, 0, stream>>>(
        ptr(parts_x.up), ptr(parts_x.inner), ptr(parts_x.out), ptr(parts_g.up),
        ptr(parts_g.inner), ptr(parts_g.out), reinterpret_cast<T_*>(gw.data_ptr()),
        a.vertex, a.parent, N, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gw;
}

}  // namespace

at::Tensor tile_scan_cuda(const at::Tensor& x, const at::Tensor& weight, at::TensorList plan,
                          c10::string_view direction) {
  TREESSM_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous 2-D CUDA tensor");
  check_rows(weight, "weight", x);
  const Direction d = parse_direction(direction);
  const TileArgs a = plan_args(plan, x);
  if (d == Direction::kBoth) return both_scan(x, weight, a, sibling_links(a, x)).first;
  at::Tensor out = at::empty_like(x);
  tile_scan_into(x, weight, a, d == Direction::kUp, out);
  return out;
}

// The backward of h = scan(x, weight) in `direction`. down, up: grad_x is the other
// direction's scan of grad with the same weights (the transpose), grad_weight pairs it with
// `out` (h). both (self-adjoint): grad_x = both(grad); grad_weight[v] = up(x)[v] br_g[v] +
// up(grad)[v] br_x[v] at non-roots, which needs the forward's input `x` (`out` is only
// checked).
std::tuple<at::Tensor, at::Tensor> tile_scan_backward_cuda(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& out,
    at::TensorList plan, c10::string_view direction, const c10::optional<at::Tensor>& x) {
  TREESSM_CHECK(grad.is_cuda() && grad.dim() == 2 && grad.is_contiguous(),
              "grad must be a contiguous 2-D CUDA tensor");
  check_rows(weight, "weight", grad);
  check_rows(out, "out", grad);
  const Direction d = parse_direction(direction);
  const TileArgs a = plan_args(plan, grad);
  const int64_t N = grad.size(0), C = grad.size(1);
  const int threads = 256;
  if (d == Direction::kBoth) {
    TREESSM_CHECK(x.has_value() && x->defined(),
                "the backward of direction 'both' needs the forward's input x");
    check_rows(*x, "x", grad);
    const at::Tensor prev = sibling_links(a, grad);
    const auto acc = acc_type(grad.scalar_type());
    // x's parts recomputed (cuda_tile_scan_both_backward takes the forward's)
    std::pair<at::Tensor, BothParts> both_g = both_scan(grad, weight, a, prev);
    const BothParts parts_x = both_parts(x->to(acc), weight.to(acc), a, prev);
    return {both_g.first, both_grad_weight(grad, both_g.second, parts_x, a)};
  }
  const bool up = d == Direction::kUp;
  at::Tensor gx = at::empty_like(grad), gw = at::empty_like(grad);
  tile_scan_into(grad, weight, a, !up, gx);
  if (N * C == 0) return {gx, gw};
  const c10::cuda::CUDAGuard guard(grad.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = blocks_of(N * C, threads);
  TREESSM_DISPATCH_TYPES(grad.scalar_type(), "treessm_tile_scan_backward", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    using A_ = typename AccType<T_>::type;
    tile_grad_weight_kernel<T_, A_><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        reinterpret_cast<const T_*>(gx.data_ptr()), reinterpret_cast<const T_*>(out.data_ptr()),
        reinterpret_cast<T_*>(gw.data_ptr()), a.vertex, a.parent, N, C, up);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gw};
}

// The parts of both(x), in the accumulation type, for cuda_tile_scan_both_backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_scan_both_parts_cuda(
    const at::Tensor& x, const at::Tensor& weight, at::TensorList plan) {
  TREESSM_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous 2-D CUDA tensor");
  check_rows(weight, "weight", x);
  const TileArgs a = plan_args(plan, x);
  const auto acc = acc_type(x.scalar_type());
  BothParts r = both_parts(x.to(acc), weight.to(acc), a, sibling_links(a, x));
  return {r.up, r.inner, r.out};
}

// The backward of both at grad from the forward's parts (cuda_tile_scan_both_parts):
// grad_x's two parts and grad_weight.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_scan_both_backward_cuda(
    const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& up,
    const at::Tensor& inner, const at::Tensor& out, at::TensorList plan) {
  TREESSM_CHECK(grad.is_cuda() && grad.dim() == 2 && grad.is_contiguous(),
              "grad must be a contiguous 2-D CUDA tensor");
  check_rows(weight, "weight", grad);
  const auto acc = acc_type(grad.scalar_type());
  check_rows(up, "up", grad, acc);
  check_rows(inner, "inner", grad, acc);
  check_rows(out, "out", grad, acc);
  const TileArgs a = plan_args(plan, grad);
  BothParts parts_g = both_parts(grad.to(acc), weight.to(acc), a, sibling_links(a, grad));
  at::Tensor gw = both_grad_weight(grad, parts_g, BothParts{up, inner, out}, a);
  return {parts_g.up, parts_g.out, gw};
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def("cuda_tile_scan(Tensor x, Tensor weight, Tensor[] plan, str direction) -> Tensor");
  m.def(
      "cuda_tile_scan_backward(Tensor grad, Tensor weight, Tensor out, Tensor[] plan, "
      "str direction, Tensor? x=None) -> (Tensor, Tensor)");
  m.def(
      "cuda_tile_scan_both_parts(Tensor x, Tensor weight, Tensor[] plan) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "cuda_tile_scan_both_backward(Tensor grad, Tensor weight, Tensor up, Tensor inner, "
      "Tensor out, Tensor[] plan) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) {
  m.impl("cuda_tile_scan", &tile_scan_cuda);
  m.impl("cuda_tile_scan_backward", &tile_scan_backward_cuda);
  m.impl("cuda_tile_scan_both_parts", &tile_scan_both_parts_cuda);
  m.impl("cuda_tile_scan_both_backward", &tile_scan_both_backward_cuda);
}

}  // namespace treessm_cuda
