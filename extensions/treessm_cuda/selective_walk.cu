// Host side of the fused selective tree scan along a depth-first walk (walk_kernels.cuh):
// argument checks, launches and the torch.library registration of
// torch.ops.treessm.cuda_selective_walk and cuda_selective_walk_backward (CUDA dispatch key;
// autograd and the choice of backend live in treessm.ops.selective_scan).
//
// cuda_selective_walk(u, dx, de, A, B, C, h0, srow, snext, rec, tree_ptr, num_slots, rule,
//   direction, lanes, keep) -> (y [N, D], states [K, D, S], kept), direction 0 ("down") or
//   1 ("up", no h0), `lanes` per channel (a power of two up to d_state padded to a power of
//   two; chosen by treessm.ops.selective_scan_cuda.lanes_per_channel); with `keep`, kept
//   holds the backward's num_slots checkpoint slots [num_slots, D, S], written by the same
//   walk (else it is empty);
// cuda_selective_walk_backward(gy, gstates, same inputs, kept, chains)
//   -> [gu, gdx, gde, gA, gB, gC, gh0] (empty where not applicable), recomputing the states
//   from the checkpoints: the forward's (kept), or those of a forward walk of its own, then
//   the backward walk, or with `chains` (a forest of chains, "down") chain_backward_kernel,
//   parallel in time.
// u, dx, de, A, B, C, h0 are float32 or float64 (all alike); d_state at most 16.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "check.cuh"
#include "host_utils.cuh"
#include "walk_kernels.cuh"

namespace treessm_cuda {
namespace {

constexpr int64_t kMaxTreeRows = 2048;  // block rows over the trees (each strides over them)

struct Problem {
  int64_t n, d, s, trees;
  int rule;
  int log2_lanes;  // lanes per channel: 2^log2_lanes
  int64_t states;  // s padded to a power of two: lanes * (states a lane holds)
};

int64_t padded_states(int64_t s) {
  int64_t p = 1;
  while (p < s) p *= 2;
  return p;
}

Problem check_inputs(const at::Tensor& u, const at::Tensor& dx, const c10::optional<at::Tensor>& de,
                     const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                     const c10::optional<at::Tensor>& h0, const at::Tensor& srow,
                     const at::Tensor& snext, const at::Tensor& rec, const at::Tensor& tree_ptr,
                     int64_t num_slots, int64_t rule, int64_t direction, int64_t lanes) {
  TREESSM_CHECK(u.is_cuda() && u.dim() == 2, "u must be a 2-D CUDA tensor");
  const auto dtype = u.scalar_type();
  TREESSM_CHECK(dtype == at::kFloat || dtype == at::kDouble, "u must be float32 or float64, got ",
              dtype);
  Problem p{u.size(0), u.size(1), A.size(1), tree_ptr.numel() - 1, static_cast<int>(rule), 0,
            padded_states(A.size(1))};
  TREESSM_CHECK(p.s >= 1 && p.s <= walk::kMaxStates, "d_state must lie in [1, ",
              walk::kMaxStates, "], got ", p.s);
  TREESSM_CHECK(lanes >= 1 && lanes <= p.states && (lanes & (lanes - 1)) == 0,
              "lanes must be a power of two up to ", p.states, " (d_state padded), got ", lanes);
  while ((int64_t(1) << p.log2_lanes) < lanes) ++p.log2_lanes;
  TREESSM_CHECK(rule >= walk::kChild && rule <= walk::kGiven, "rule must be 0, 1 or 2, got ", rule);
  TREESSM_CHECK(direction == 0 || direction == 1, "direction must be 0 (down) or 1 (up), got ",
              direction);
  TREESSM_CHECK(direction == 0 || !h0.has_value(), "h0 enters the roots of a down scan only");
  TREESSM_CHECK(p.n < (int64_t(1) << 31) && num_slots >= 0, "too many vertices");
  check_rows(u, "u", p.n, p.d, dtype);
  check_rows(dx, "dx", p.n, p.d, dtype);
  if (rule == walk::kGiven) {
    TREESSM_CHECK(de.has_value(), "de is required by rule 2 (given edge steps)");
    check_rows(*de, "de", p.n, p.d, dtype);
  }
  check_rows(A, "A", p.d, p.s, dtype);
  check_rows(B, "B", p.n, p.s, dtype);
  check_rows(C, "C", p.n, p.s, dtype);
  if (h0.has_value()) {
    TREESSM_CHECK(h0->is_cuda() && h0->is_contiguous() && h0->scalar_type() == dtype &&
                    h0->numel() == p.trees * p.d * p.s,
                "h0 must be a contiguous [T, D, S] tensor of u's dtype");
  }
  TREESSM_CHECK(srow.is_cuda() && srow.scalar_type() == at::kLong && srow.numel() == p.n,
              "srow must be a CUDA int64 tensor of N entries");
  TREESSM_CHECK(snext.is_cuda() && snext.scalar_type() == at::kLong, "snext must be CUDA int64");
  TREESSM_CHECK(rec.is_cuda() && rec.scalar_type() == at::kInt && rec.is_contiguous() &&
                  rec.dim() == 2 && rec.size(0) == p.n && rec.size(1) == 4,
              "rec must be a contiguous CUDA int32 tensor of shape [N, 4]");
  TREESSM_CHECK(tree_ptr.is_cuda() && tree_ptr.scalar_type() == at::kInt && tree_ptr.dim() == 1 &&
                  tree_ptr.numel() >= 1,
              "tree_ptr must be a CUDA int32 tensor of T + 1 entries");
  return p;
}

template <typename T>
walk::Args<T> make_args(const Problem& p, const at::Tensor& u, const at::Tensor& dx,
                        const c10::optional<at::Tensor>& de, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C,
                        const c10::optional<at::Tensor>& h0, const at::Tensor& srow,
                        const at::Tensor& snext, const at::Tensor& rec,
                        const at::Tensor& tree_ptr) {
  walk::Args<T> a{};
  a.u = u.data_ptr<T>();
  a.dx = dx.data_ptr<T>();
  a.de = p.rule == walk::kGiven ? de->data_ptr<T>() : nullptr;
  a.A = A.data_ptr<T>();
  a.B = B.data_ptr<T>();
  a.C = C.data_ptr<T>();
  a.h0 = optional_ptr<T>(h0);
  a.rec = reinterpret_cast<const int4*>(rec.data_ptr<int>());
  a.tree_ptr = tree_ptr.data_ptr<int>();
  a.srow = srow.data_ptr<int64_t>();
  a.snext = snext.data_ptr<int64_t>();
  a.n = static_cast<int>(p.n);
  a.d = static_cast<int>(p.d);
  a.s = static_cast<int>(p.s);
  a.num_trees = static_cast<int>(p.trees);
  a.rule = p.rule;
  a.log2_lanes = p.log2_lanes;
  a.deferred = walk::deferred_sums(p.rule, p.log2_lanes);
  return a;
}

// Blocks of kThreads / lanes channels along x, block rows over the trees along y.
dim3 grid_of(const Problem& p) {
  const int64_t channels = walk::kThreads >> p.log2_lanes;
  return dim3(static_cast<unsigned>((p.d + channels - 1) / channels),
              static_cast<unsigned>(std::min<int64_t>(p.trees, kMaxTreeRows)));
}

template <typename T>
size_t stage_bytes(const Problem& p, bool backward) {
  return walk::Stage<T>::bytes(static_cast<int>(p.states), walk::kThreads >> p.log2_lanes,
                               backward,
                               backward && walk::deferred_sums(p.rule, p.log2_lanes));
}

template <typename T, int L>
void launch_forward(const walk::Args<T>& a, const Problem& p, dim3 grid, bool up) {
  const size_t smem = stage_bytes<T>(p, false);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (up) {
    walk::up_forward_kernel<T, L><<<grid, walk::kThreads, smem, stream>>>(a);
  } else {
    walk::down_forward_kernel<T, L><<<grid, walk::kThreads, smem, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// chain_backward_kernel's blocks: kChainWarps channels (a warp each) along x, block rows
// over the chains along y.
dim3 chain_grid(const Problem& p) {
  return dim3(static_cast<unsigned>((p.d + walk::kChainWarps - 1) / walk::kChainWarps),
              static_cast<unsigned>(std::min<int64_t>(p.trees, kMaxTreeRows)));
}

template <typename T, int L>
void launch_backward(const walk::Args<T>& a, const Problem& p, dim3 grid, bool up) {
  const size_t smem = stage_bytes<T>(p, true);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (up) {
    walk::up_backward_kernel<T, L><<<grid, walk::kThreads, smem, stream>>>(a);
  } else {
    walk::down_backward_kernel<T, L><<<grid, walk::kThreads, smem, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs the statement with the constexpr int L, the states a lane holds: the padded state
// count over the lanes of a channel (a power of two up to 16).
#define TREESSM_WITH_LANE_STATES(p, ...)                 \
  do {                                                   \
    const int64_t lane_states = (p).states >> (p).log2_lanes; \
    if (lane_states == 1) {                              \
      constexpr int L = 1;                               \
      __VA_ARGS__;                                       \
    } else if (lane_states == 2) {                       \
      constexpr int L = 2;                               \
      __VA_ARGS__;                                       \
    } else if (lane_states == 4) {                       \
      constexpr int L = 4;                               \
      __VA_ARGS__;                                       \
    } else if (lane_states == 8) {                       \
      constexpr int L = 8;                               \
      __VA_ARGS__;                                       \
    } else {                                             \
      constexpr int L = 16;                              \
      __VA_ARGS__;                                       \
    }                                                    \
  } while (0)

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_walk(
    const at::Tensor& u, const at::Tensor& dx, const c10::optional<at::Tensor>& de,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& h0, const at::Tensor& srow, const at::Tensor& snext,
    const at::Tensor& rec, const at::Tensor& tree_ptr, int64_t num_slots, int64_t rule,
    int64_t direction, int64_t lanes, bool keep) {
  const Problem p = check_inputs(u, dx, de, A, B, C, h0, srow, snext, rec, tree_ptr, num_slots,
                                 rule, direction, lanes);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor y = at::empty({p.n, p.d}, u.options());
  at::Tensor states = at::zeros({snext.numel(), p.d, p.s}, u.options());
  const bool walks = p.n > 0 && p.d > 0 && p.trees > 0;
  // the backward's checkpoints, written by this walk (kept: the backward walks once less)
  at::Tensor ckpt = at::empty({keep && walks ? num_slots : 0, p.d, p.s}, u.options());
  if (!walks) return {y.zero_(), states, ckpt};
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cuda_selective_walk", [&] {
    auto a = make_args<scalar_t>(p, u, dx, de, A, B, C, h0, srow, snext, rec, tree_ptr);
    a.y = y.data_ptr<scalar_t>();
    a.states = snext.numel() ? states.data_ptr<scalar_t>() : nullptr;
    a.ckpt = ckpt.numel() ? ckpt.data_ptr<scalar_t>() : nullptr;
    TREESSM_WITH_LANE_STATES(p, launch_forward<scalar_t, L>(a, p, grid_of(p), direction == 1));
  });
  return {y, states, ckpt};
}

std::vector<at::Tensor> selective_walk_backward(
    const at::Tensor& gy, const c10::optional<at::Tensor>& gstates, const at::Tensor& u,
    const at::Tensor& dx, const c10::optional<at::Tensor>& de, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& h0,
    const at::Tensor& srow, const at::Tensor& snext, const at::Tensor& rec,
    const at::Tensor& tree_ptr, int64_t num_slots, int64_t rule, int64_t direction,
    int64_t lanes, const c10::optional<at::Tensor>& kept, bool chains) {
  const Problem p = check_inputs(u, dx, de, A, B, C, h0, srow, snext, rec, tree_ptr, num_slots,
                                 rule, direction, lanes);
  check_rows(gy, "gy", p.n, p.d, u.scalar_type());
  TREESSM_CHECK(!chains || direction == 0, "the chain kernel runs the direction down (0)");
  const bool has_kept = kept.has_value() && kept->numel() > 0;
  if (has_kept)
    TREESSM_CHECK(kept->is_cuda() && kept->is_contiguous() &&
                    kept->scalar_type() == u.scalar_type() &&
                    kept->numel() == num_slots * p.d * p.s,
                "kept must be the forward's contiguous [num_slots, D, S] checkpoints");
  const bool grad_states = gstates.has_value() && gstates->numel() > 0;
  if (grad_states)
    TREESSM_CHECK(gstates->is_contiguous() && gstates->numel() == snext.numel() * p.d * p.s &&
                    gstates->scalar_type() == u.scalar_type(),
                "gstates must be a contiguous [K, D, S] tensor of u's dtype");
  const c10::cuda::CUDAGuard guard(u.device());
  const dim3 grid = grid_of(p);
  const dim3 backward_grid = chains ? chain_grid(p) : grid;
  const int64_t blocks = backward_grid.x;  // rows of the partial sums of the gradients of B, C
  at::Tensor gu = at::zeros_like(u), gdx = at::zeros_like(u);
  at::Tensor gde = rule == walk::kGiven ? at::zeros_like(u) : at::empty({0}, u.options());
  at::Tensor gh0 = h0.has_value() ? at::zeros_like(*h0) : at::empty({0}, u.options());
  if (p.n == 0 || p.d == 0 || p.trees == 0) {
    return {gu, gdx, gde, at::zeros_like(A), at::zeros_like(B), at::zeros_like(C), gh0};
  }
  at::Tensor ckpt = has_kept ? *kept : at::empty({num_slots, p.d, p.s}, u.options());
  at::Tensor gA = at::empty({static_cast<int64_t>(grid.y), p.d, p.s}, u.options());
  at::Tensor gB = at::empty({blocks, p.n, p.s}, u.options());
  at::Tensor gC = at::empty({blocks, p.n, p.s}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cuda_selective_walk_backward", [&] {
    auto a = make_args<scalar_t>(p, u, dx, de, A, B, C, h0, srow, snext, rec, tree_ptr);
    a.ckpt = ckpt.data_ptr<scalar_t>();
    if (!has_kept)  // the checkpoints, from a walk of their own
      TREESSM_WITH_LANE_STATES(p, launch_forward<scalar_t, L>(a, p, grid, direction == 1));
    a.gy = gy.data_ptr<scalar_t>();
    a.gstates = grad_states ? gstates->data_ptr<scalar_t>() : nullptr;
    a.gu = gu.data_ptr<scalar_t>();
    a.gdx = gdx.data_ptr<scalar_t>();
    a.gde = rule == walk::kGiven ? gde.data_ptr<scalar_t>() : nullptr;
    a.gA = gA.data_ptr<scalar_t>();
    a.gB = gB.data_ptr<scalar_t>();
    a.gC = gC.data_ptr<scalar_t>();
    a.gh0 = h0.has_value() ? gh0.data_ptr<scalar_t>() : nullptr;
    if (chains) {
      const size_t smem = walk::chain_backward_smem_bytes<scalar_t>(static_cast<int>(p.s));
      if (smem > 48 * 1024)  // float64 with 16 states: past the default limit
        C10_CUDA_CHECK(cudaFuncSetAttribute(walk::chain_backward_kernel<scalar_t>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
      walk::chain_backward_kernel<scalar_t><<<backward_grid, walk::kChainWarps * 32, smem,
                                              at::cuda::getCurrentCUDAStream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      TREESSM_WITH_LANE_STATES(p, launch_backward<scalar_t, L>(a, p, grid, direction == 1));
    }
  });
  // partial sums over block rows and blocks, added in a fixed order
  return {gu, gdx, gde, gA.sum(0), gB.sum(0), gC.sum(0), gh0};
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def(
      "cuda_selective_walk(Tensor u, Tensor dx, Tensor? de, Tensor A, Tensor B, Tensor C, "
      "Tensor? h0, Tensor srow, Tensor snext, Tensor rec, Tensor tree_ptr, int num_slots, "
      "int rule, int direction, int lanes, bool keep) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cuda_selective_walk_backward(Tensor gy, Tensor? gstates, Tensor u, Tensor dx, Tensor? de, "
      "Tensor A, Tensor B, Tensor C, Tensor? h0, Tensor srow, Tensor snext, Tensor rec, "
      "Tensor tree_ptr, int num_slots, int rule, int direction, int lanes, Tensor? kept, "
      "bool chains) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) {
  m.impl("cuda_selective_walk", &selective_walk);
  m.impl("cuda_selective_walk_backward", &selective_walk_backward);
}

}  // namespace treessm_cuda
