// Host side of the CUDA tree scan: argument checks, launches and the torch.library
// registration of the ops (CUDA dispatch key)
//   torch.ops.treessm.cuda_scan_forward / cuda_scan_backward            (level schedule)
//   torch.ops.treessm.cuda_path_scan_forward / cuda_path_scan_backward  (heavy-path schedule)
//   torch.ops.treessm.cuda_tree_scan / cuda_tree_scan_backward          (either schedule, with
//                                    its autograd in C++: the lean path of treessm.tree_scan)
//   torch.ops.treessm.cuda_device_limits
// Launch parameters are arguments, chosen by treessm/ops/plan.py; here they are only fitted
// to the shared memory the device offers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "host_utils.cuh"
#include "path_scan_kernels.cuh"

namespace treessm_cuda {
namespace {

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [N, C], got ", t.dim(), " dims");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device());
}

void check_index(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
  if (n >= 0) TORCH_CHECK(t.size(0) == n, name, " must have ", n, " entries, got ", t.size(0));
}

int direction_code(const std::string& d) {
  if (d == "both") return 0;
  if (d == "up") return 1;
  if (d == "down") return 2;
  TORCH_CHECK(false, "direction must be 'both', 'up' or 'down', got '", d, "'");
  return -1;
}

// At most four channels per thread access, dividing C, keeping every row of every tensor
// aligned to the access.
int vec_width(int64_t C, int elem_size, std::initializer_list<const at::Tensor*> ts) {
  int vec = 16 / elem_size < 4 ? 16 / elem_size : 4;
  while (vec > 1 && C % vec != 0) vec /= 2;
  for (const at::Tensor* t : ts) {
    const auto addr = reinterpret_cast<uintptr_t>(t->data_ptr());
    while (vec > 1 && addr % (static_cast<uintptr_t>(vec) * elem_size) != 0) vec /= 2;
  }
  return vec;
}

// Grid and block shape of both schedules: `row_bytes` of channels per block (at most 32
// threads per row, fewer when the channels are fewer), `threads` per block, `parts` blocks
// per tree.
struct Shape {
  int vec, lpv, threads;
  dim3 grid;
};

Shape launch_shape(int64_t C, int64_t num_trees, int elem_size, int vec, int64_t row_bytes,
                   int64_t threads, int64_t parts) {
  TORCH_CHECK(row_bytes >= elem_size && row_bytes <= 32 * 16, "row_bytes must lie in [",
              elem_size, ", 512], got ", row_bytes);
  TORCH_CHECK(threads >= 32 && threads <= 1024 && threads % 32 == 0,
              "threads must be a multiple of 32 up to 1024, got ", threads);
  TORCH_CHECK(parts >= 1, "blocks_per_tree must be >= 1, got ", parts);
  const int64_t lanes = C / vec;
  int lpv = static_cast<int>(row_bytes / (vec * elem_size));
  if (lpv > 32) lpv = 32;
  if (lpv < 1) lpv = 1;
  while (lpv & (lpv - 1)) lpv &= lpv - 1;  // a power of two
  while (lpv > 1 && lpv / 2 >= lanes) lpv /= 2;
  const int64_t groups = (lanes + lpv - 1) / lpv;
  TORCH_CHECK(groups <= 65535, "too many channels for one launch: ", C);
  TORCH_CHECK(num_trees * parts <= 2147483647LL, "too many trees for one launch: ", num_trees);
  Shape L;
  L.vec = vec;
  L.lpv = lpv;
  L.threads = static_cast<int>(threads < lpv ? lpv : threads);
  L.grid = dim3(static_cast<unsigned>(num_trees * parts), static_cast<unsigned>(groups), 1);
  return L;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// The tensors of one pass, by role (see ScanIO); undefined tensors give null pointers.
struct Io {
  at::Tensor in0, in1, w, h, up0, up1, out, gw, val0, val1;
  template <typename T, typename A, int MODE>
  ScanIO get() const {
    using Tr = StagedTraits<MODE>;
    ScanIO io;
    io.in0 = Tr::IN0_ACC ? static_cast<const void*>(ptr<A>(in0)) : ptr<T>(in0);
    io.in1 = Tr::IN1_ACC ? static_cast<const void*>(ptr<A>(in1)) : ptr<T>(in1);
    io.w = ptr<T>(w);
    io.h = ptr<T>(h);
    io.up0 = ptr<A>(up0);
    io.up1 = ptr<A>(up1);
    io.out = ptr<T>(out);
    io.gw = ptr<T>(gw);
    io.val0 = ptr<A>(val0);
    io.val1 = ptr<A>(val1);
    return io;
  }
};

template <int M> using Mode = std::integral_constant<int, M>;

// The passes of each direction. `pass(Mode<M>{}, io)` runs one pass; `acc(...)` makes an
// accumulator-typed [N, C] buffer.
template <typename Pass, typename Acc>
void forward_passes(int dir, const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                    Pass&& pass, Acc&& acc) {
  const at::Tensor scratch = acc();
  if (dir == 1) {
    pass(Mode<S_UP>{}, Io{x, {}, w, {}, {}, {}, out, {}, scratch, {}});
  } else if (dir == 2) {
    pass(Mode<S_DOWN>{}, Io{x, {}, w, {}, {}, {}, out, {}, scratch, {}});
  } else {
    const at::Tensor up = acc();
    pass(Mode<S_UP>{}, Io{x, {}, w, {}, up, {}, {}, {}, scratch, {}});
    pass(Mode<S_BOTH>{}, Io{up, {}, w, {}, {}, {}, out, {}, scratch, {}});
  }
}

template <typename Pass, typename Acc>
void backward_passes(int dir, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& h, const at::Tensor& gx, const at::Tensor& gw,
                     Pass&& pass, Acc&& acc) {
  const at::Tensor scratch = acc();
  if (dir == 1) {  // up: gx = down(g), gw = h[v] gx[p]
    pass(Mode<S_UP_BWD>{}, Io{g, {}, w, h, {}, {}, gx, gw, scratch, {}});
  } else if (dir == 2) {  // down: gx = up(g), gw = gx[v] h[p]
    pass(Mode<S_UP_GW>{}, Io{g, {}, w, h, {}, {}, gx, gw, scratch, {}});
  } else {  // both: U = up(x), G = up(g) in one pass, then gx = both(g) and gw together
    const at::Tensor U = acc(), G = acc(), scratch2 = acc();
    pass(Mode<S_UP2>{}, Io{x, g, w, {}, U, G, {}, {}, scratch, scratch2});
    pass(Mode<S_BOTH_BWD>{}, Io{U, G, w, h, {}, {}, gx, gw, scratch, {}});
  }
}

#define TREESSM_DISPATCH_TYPES(TYPE, NAME, ...)                                              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                              \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)                     \
                     AT_DISPATCH_CASE(at::ScalarType::Double, __VA_ARGS__)                    \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)                      \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// Instantiates only the widths a type can take (at most 16 bytes per access).
#define TREESSM_DISPATCH_VEC(VEC, ELEM, ...)                                               \
  switch (VEC) {                                                                           \
    case 4: { constexpr int V = 4; if constexpr (V * sizeof(ELEM) <= 16) { __VA_ARGS__; } break; } \
    case 2: { constexpr int V = 2; __VA_ARGS__; break; }                                   \
    default: { constexpr int V = 1; __VA_ARGS__; break; }                                  \
  }

// Runs `body<T, A, V>()` for the element type of `x` and the vector width `vec`.
#define TREESSM_DISPATCH_SCAN(x, vec, NAME, ...)                                   \
  TREESSM_DISPATCH_TYPES((x).scalar_type(), NAME, [&] {                            \
    using T_ = typename CudaType<scalar_t>::type;                                  \
    using A_ = typename AccType<T_>::type;                                         \
    TREESSM_DISPATCH_VEC(vec, T_, __VA_ARGS__);                                    \
  })

// ---------------------------------------------------------------------------- level schedule
// One staged level pass. The rings take what the shared-memory budget allows: `ring`
// staged positions at most (rounded down to a power of two, at least 16) and `cap` values
// per level handed on in shared memory, halved until they fit.
template <typename T, typename A, int V, int MODE>
void launch_levels(const Shape& L, const Plan& plan, int64_t C, const ScanIO& io, int64_t ring_max,
                   int64_t cap_max, int64_t budget, cudaStream_t stream, int device) {
  const int cw = L.lpv * V;
  const int optin = max_dynamic_smem(device);
  if (budget > optin) budget = optin;
  int cap = cap_max < 0 ? 0 : static_cast<int>(cap_max < 4096 ? cap_max : 4096);
  int ring = 16;
  while (ring * 2 <= ring_max && ring < (1 << 20)) ring *= 2;
  while (ring > 16 && staged_smem_bytes<MODE>(ring, cw, cap, sizeof(T), sizeof(A)) > budget) ring /= 2;
  while (cap > 0 && staged_smem_bytes<MODE>(ring, cw, cap, sizeof(T), sizeof(A)) > budget) cap /= 2;
  const int64_t smem = staged_smem_bytes<MODE>(ring, cw, cap, sizeof(T), sizeof(A));
  TORCH_CHECK(smem <= optin, "the level scan needs ", smem, " bytes of shared memory, the device offers ", optin);
  StagedArgs a{io, plan, C, L.lpv, cap, ring};
  constexpr auto kernel = staged_scan_kernel<T, A, V, MODE>;
  allow_dynamic_smem<kernel>(smem, device);
  kernel<<<L.grid, L.threads, static_cast<size_t>(smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct LevelTensors {
  at::Tensor order, child_ptr, level_pos, tree_level_ptr, parent_pos, parent_at_pos;
  void check(int64_t N, const at::Tensor& like) const {
    check_index(parent_at_pos, "parent_at_pos", N, like);
    check_index(order, "order", N, like);
    check_index(child_ptr, "child_ptr", N + 1, like);
    check_index(parent_pos, "parent_pos", N, like);
    check_index(level_pos, "level_pos", -1, like);
    check_index(tree_level_ptr, "tree_level_ptr", -1, like);
    TORCH_CHECK(N < 2147483647LL && level_pos.numel() < 2147483647LL,
                "the level scan indexes positions with 32 bits");
  }
  Plan plan() const {
    return Plan{order.data_ptr<int64_t>(),     child_ptr.data_ptr<int64_t>(),
                level_pos.data_ptr<int64_t>(), tree_level_ptr.data_ptr<int64_t>(),
                parent_pos.data_ptr<int64_t>(), parent_at_pos.data_ptr<int64_t>()};
  }
};

struct LevelLaunch {
  int64_t row_bytes, threads, ring, cap, smem;
};

// Runs the passes of `run` (forward_passes or backward_passes) with the level kernels.
template <typename Run>
void levels(const at::Tensor& x, const LevelTensors& lt, const LevelLaunch& la, int vec, Run&& run) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t T = lt.tree_level_ptr.size(0) - 1;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int device = x.get_device();
  const Plan plan = lt.plan();
  const Shape L = launch_shape(C, T, x.element_size(), vec, la.row_bytes, la.threads, 1);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto acc = [&] { return at::empty({N, C}, x.options().dtype(acc_dtype)); };
  TREESSM_DISPATCH_SCAN(x, L.vec, "treessm_level_scan", {
    run([&](auto mode, const Io& io) {
      constexpr int M = decltype(mode)::value;
      launch_levels<T_, A_, V, M>(L, plan, C, io.get<T_, A_, M>(), la.ring, la.cap, la.smem,
                                  stream, device);
    }, acc);
  });
}

// ---------------------------------------------------------------------------- path schedule
// One path pass. With one block per tree, all phases run in one launch and the tree's plan
// records go to shared memory when they fit the budget (a block takes 64 threads instead of
// 128 where that makes them fit); with several blocks per tree, one launch per phase, plan
// records read from global memory.
template <typename T, typename A, int V, int MODE>
void launch_paths(Shape L, const PathPlan& plan, int64_t C, const ScanIO& io, int64_t N,
                  int64_t num_trees, int64_t parts, int64_t num_phases, int64_t budget,
                  cudaStream_t stream, int device) {
  const int optin = max_dynamic_smem(device);
  if (budget > optin) budget = optin;
  int64_t want = 0;
  if (parts == 1) {
    const int64_t avg = (N + num_trees - 1) / num_trees + 1;
    want = avg < (1 << 20) ? avg : 0;
    if (L.threads > 64 && path_smem_bytes<MODE>(L.threads, static_cast<int>(want)) > budget)
      L.threads = 64 > L.lpv ? 64 : L.lpv;
  }
  const int64_t ring = path_smem_bytes<MODE>(L.threads, 0);
  TORCH_CHECK(ring <= optin, "the path scan needs ", ring, " bytes of shared memory, the device offers ", optin);
  int64_t rec_cap = (budget - ring) / static_cast<int64_t>(sizeof(PathRec) + sizeof(int));
  if (rec_cap > want) rec_cap = want;
  if (rec_cap < 0) rec_cap = 0;
  PathArgs a{io, plan, C, L.lpv, static_cast<int>(rec_cap), static_cast<int>(parts), 0, kMaxPhases};
  const int64_t smem = path_smem_bytes<MODE>(L.threads, a.rec_cap);
  constexpr auto kernel = path_scan_kernel<T, A, V, MODE>;
  allow_dynamic_smem<kernel>(smem, device);
  if (parts == 1) {
    kernel<<<L.grid, L.threads, static_cast<size_t>(smem), stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  constexpr bool up = StagedTraits<MODE>::UP;
  for (int64_t q = 0; q < num_phases; ++q) {
    const int p = static_cast<int>(up ? num_phases - 1 - q : q);
    a.phase_lo = p;
    a.phase_hi = p + 1;
    kernel<<<L.grid, L.threads, static_cast<size_t>(smem), stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

struct PathTensors {
  at::Tensor rec, light, path_ptr, phase_path;
  void check(int64_t N, const at::Tensor& like) const {
    for (const auto* t : {&rec, &light, &path_ptr, &phase_path}) {
      TORCH_CHECK(t->is_cuda() && t->device() == like.device(), "path plan tensors must be on ", like.device());
      TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "path plan tensors must be contiguous int32");
    }
    TORCH_CHECK(rec.dim() == 2 && rec.size(0) == N + 1 && rec.size(1) == 4, "rec must be [N + 1, 4]");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(rec.data_ptr()) % 16 == 0, "rec must be 16-byte aligned");
    TORCH_CHECK(light.dim() == 1 && light.size(0) == N, "light must have N entries");
    TORCH_CHECK(path_ptr.dim() == 1 && path_ptr.size(0) == N + 1, "path_ptr must have N + 1 entries");
    TORCH_CHECK(phase_path.dim() == 2 && phase_path.size(1) == kMaxPhases + 1,
                "phase_path must be [T, ", kMaxPhases + 1, "]");
    TORCH_CHECK(N < 2147483647LL, "the path plan indexes positions with 32 bits");
  }
  PathPlan plan() const {
    return PathPlan{reinterpret_cast<const PathRec*>(rec.data_ptr<int>()), light.data_ptr<int>(),
                    path_ptr.data_ptr<int>(), phase_path.data_ptr<int>()};
  }
};

struct PathLaunch {
  int64_t row_bytes, threads, smem, parts, num_phases;
};

template <typename Run>
void paths(const at::Tensor& x, const PathTensors& pt, const PathLaunch& la, int vec, Run&& run) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t T = pt.phase_path.size(0);
  TORCH_CHECK(la.num_phases >= 0 && la.num_phases <= kMaxPhases, "num_phases must lie in [0, ",
              kMaxPhases, "], got ", la.num_phases);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int device = x.get_device();
  const PathPlan plan = pt.plan();
  const Shape L = launch_shape(C, T, x.element_size(), vec, la.row_bytes, la.threads, la.parts);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto acc = [&] { return at::empty({N, C}, x.options().dtype(acc_dtype)); };
  TREESSM_DISPATCH_SCAN(x, L.vec, "treessm_path_scan", {
    run([&](auto mode, const Io& io) {
      constexpr int M = decltype(mode)::value;
      launch_paths<T_, A_, V, M>(L, plan, C, io.get<T_, A_, M>(), N, T, la.parts, la.num_phases,
                                 la.smem, stream, device);
    }, acc);
  });
}

// ---------------------------------------------------------------------------- entry points
// Runs the forward passes of `schedule` (levels(...) or paths(...)).
template <typename Schedule>
at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::string& direction,
                   int64_t T, Schedule&& schedule) {
  check_rows(weight, "weight", x);
  const int dir = direction_code(direction);
  at::Tensor out = at::empty_like(x);
  if (x.size(0) == 0 || x.size(1) == 0 || T <= 0) return out;
  const int vec = vec_width(x.size(1), x.element_size(), {&x, &weight, &out});
  schedule(vec, [&](auto&& pass, auto&& acc) { forward_passes(dir, x, weight, out, pass, acc); });
  return out;
}

template <typename Schedule>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,
                                            const at::Tensor& weight, const at::Tensor& out,
                                            const std::string& direction, int64_t T,
                                            Schedule&& schedule) {
  check_rows(weight, "weight", x);
  check_rows(grad, "grad", x);
  check_rows(out, "out", x);
  const int dir = direction_code(direction);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(x);
  if (x.size(0) == 0 || x.size(1) == 0 || T <= 0) return {gx, gw};
  const int vec = vec_width(x.size(1), x.element_size(), {&grad, &x, &weight, &out, &gx, &gw});
  schedule(vec, [&](auto&& pass, auto&& acc) {
    backward_passes(dir, grad, x, weight, out, gx, gw, pass, acc);
  });
  return {gx, gw};
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
}

}  // namespace

at::Tensor scan_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& order,
                        const at::Tensor& child_ptr, const at::Tensor& level_pos,
                        const at::Tensor& tree_level_ptr, const at::Tensor& parent_pos,
                        const at::Tensor& parent_at_pos, const std::string& direction,
                        int64_t row_bytes, int64_t threads, int64_t ring, int64_t cap,
                        int64_t smem) {
  check_x(x);
  const LevelTensors lt{order, child_ptr, level_pos, tree_level_ptr, parent_pos, parent_at_pos};
  lt.check(x.size(0), x);
  const LevelLaunch la{row_bytes, threads, ring, cap, smem};
  return forward(x, weight, direction, tree_level_ptr.size(0) - 1,
                 [&](int vec, auto&& run) { levels(x, lt, la, vec, run); });
}

std::tuple<at::Tensor, at::Tensor> scan_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& order, const at::Tensor& child_ptr, const at::Tensor& level_pos,
    const at::Tensor& tree_level_ptr, const at::Tensor& parent_pos,
    const at::Tensor& parent_at_pos, const std::string& direction, int64_t row_bytes,
    int64_t threads, int64_t ring, int64_t cap, int64_t smem) {
  check_x(x);
  const LevelTensors lt{order, child_ptr, level_pos, tree_level_ptr, parent_pos, parent_at_pos};
  lt.check(x.size(0), x);
  const LevelLaunch la{row_bytes, threads, ring, cap, smem};
  return backward(grad, x, weight, out, direction, tree_level_ptr.size(0) - 1,
                  [&](int vec, auto&& run) { levels(x, lt, la, vec, run); });
}

at::Tensor path_scan_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rec,
                             const at::Tensor& light, const at::Tensor& path_ptr,
                             const at::Tensor& phase_path, const std::string& direction,
                             int64_t row_bytes, int64_t threads, int64_t smem,
                             int64_t blocks_per_tree, int64_t num_phases) {
  check_x(x);
  const PathTensors pt{rec, light, path_ptr, phase_path};
  pt.check(x.size(0), x);
  const PathLaunch la{row_bytes, threads, smem, blocks_per_tree, num_phases};
  return forward(x, weight, direction, phase_path.size(0),
                 [&](int vec, auto&& run) { paths(x, pt, la, vec, run); });
}

std::tuple<at::Tensor, at::Tensor> path_scan_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& rec, const at::Tensor& light, const at::Tensor& path_ptr,
    const at::Tensor& phase_path, const std::string& direction, int64_t row_bytes,
    int64_t threads, int64_t smem, int64_t blocks_per_tree, int64_t num_phases) {
  check_x(x);
  const PathTensors pt{rec, light, path_ptr, phase_path};
  pt.check(x.size(0), x);
  const PathLaunch la{row_bytes, threads, smem, blocks_per_tree, num_phases};
  return backward(grad, x, weight, out, direction, phase_path.size(0),
                  [&](int vec, auto&& run) { paths(x, pt, la, vec, run); });
}

// ---------------------------------------------------------------------------- lean path
// One op for both schedules, its plan tensors p0..p3 (treessm.ops.plan.LevelPlan or
// PathPlan) and launch parameters in the order of treessm.ops.plan.Launch: row_bytes,
// threads, ring, cap, smem, blocks_per_tree, num_phases.
namespace {

void check_launch(c10::string_view schedule, at::IntArrayRef launch) {
  TORCH_CHECK(schedule == "levels" || schedule == "paths",
              "schedule must be 'levels' or 'paths', got '", std::string(schedule), "'");
  TORCH_CHECK(launch.size() == 7, "launch must hold the 7 fields of treessm.ops.plan.Launch, got ",
              launch.size());
}

}  // namespace

at::Tensor tree_scan_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& order,
                          const at::Tensor& child_ptr, const at::Tensor& p0, const at::Tensor& p1,
                          const at::Tensor& p2, const at::Tensor& p3, c10::string_view schedule,
                          at::IntArrayRef launch, c10::string_view direction) {
  check_launch(schedule, launch);
  const std::string dir(direction);
  if (schedule == "paths")
    return path_scan_forward(x, weight, p0, p1, p2, p3, dir, launch[0], launch[1], launch[4],
                             launch[5], launch[6]);
  return scan_forward(x, weight, order, child_ptr, p0, p1, p2, p3, dir, launch[0], launch[1],
                      launch[2], launch[3], launch[4]);
}

std::tuple<at::Tensor, at::Tensor> tree_scan_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& order, const at::Tensor& child_ptr, const at::Tensor& p0,
    const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& p3, c10::string_view schedule,
    at::IntArrayRef launch, c10::string_view direction) {
  check_launch(schedule, launch);
  const std::string dir(direction);
  if (schedule == "paths")
    return path_scan_backward(grad, x, weight, out, p0, p1, p2, p3, dir, launch[0], launch[1],
                              launch[4], launch[5], launch[6]);
  return scan_backward(grad, x, weight, out, order, child_ptr, p0, p1, p2, p3, dir, launch[0],
                       launch[1], launch[2], launch[3], launch[4]);
}

namespace {

// The ops are called through the dispatcher, so that traced and fake-tensor runs reach the
// fake kernels registered in Python.
using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, c10::string_view,
                              at::IntArrayRef, c10::string_view);
using BackwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    c10::string_view, at::IntArrayRef, c10::string_view);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("treessm::cuda_tree_scan", "")
                             .typed<ForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("treessm::cuda_tree_scan_backward", "")
                             .typed<BackwardSig>();
  return op;
}

class TreeScanFunction : public torch::autograd::Function<TreeScanFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& order,
                            const at::Tensor& child_ptr, const at::Tensor& p0,
                            const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& p3,
                            c10::string_view schedule, at::IntArrayRef launch,
                            c10::string_view direction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = forward_op().call(x, weight, order, child_ptr, p0, p1, p2, p3, schedule,
                                       launch, direction);
    ctx->save_for_backward({x, weight, out, order, child_ptr, p0, p1, p2, p3});
    ctx->saved_data["schedule"] = std::string(schedule);
    ctx->saved_data["launch"] = launch.vec();
    ctx->saved_data["direction"] = std::string(direction);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::vector<int64_t> launch = ctx->saved_data["launch"].toIntVector();
    auto [gx, gw] = backward_op().call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5],
                                       s[6], s[7], s[8],
                                       ctx->saved_data["schedule"].toStringRef(), launch,
                                       ctx->saved_data["direction"].toStringRef());
    return {gx, gw, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor tree_scan_autograd(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& order, const at::Tensor& child_ptr,
                              const at::Tensor& p0, const at::Tensor& p1, const at::Tensor& p2,
                              const at::Tensor& p3, c10::string_view schedule,
                              at::IntArrayRef launch, c10::string_view direction) {
  return TreeScanFunction::apply(x, weight, order, child_ptr, p0, p1, p2, p3, schedule, launch,
                                 direction);
}

}  // namespace

// (multiprocessors, shared memory per multiprocessor, opt-in shared memory per block)
std::vector<int64_t> device_limits(int64_t device) {
  const int d = static_cast<int>(device);
  return {device_attribute<cudaDevAttrMultiProcessorCount>(d),
          device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(d),
          max_dynamic_smem(d)};
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def(
      "cuda_scan_forward(Tensor x, Tensor weight, Tensor order, Tensor child_ptr, "
      "Tensor level_pos, Tensor tree_level_ptr, Tensor parent_pos, Tensor parent_at_pos, "
      "str direction, int row_bytes, int threads, int ring, int cap, int smem) -> Tensor");
  m.def(
      "cuda_scan_backward(Tensor grad, Tensor x, Tensor weight, Tensor out, Tensor order, "
      "Tensor child_ptr, Tensor level_pos, Tensor tree_level_ptr, Tensor parent_pos, "
      "Tensor parent_at_pos, str direction, int row_bytes, int threads, int ring, int cap, "
      "int smem) -> (Tensor, Tensor)");
  m.def(
      "cuda_path_scan_forward(Tensor x, Tensor weight, Tensor rec, Tensor light, "
      "Tensor path_ptr, Tensor phase_path, str direction, int row_bytes, int threads, "
      "int smem, int blocks_per_tree, int num_phases) -> Tensor");
  m.def(
      "cuda_path_scan_backward(Tensor grad, Tensor x, Tensor weight, Tensor out, Tensor rec, "
      "Tensor light, Tensor path_ptr, Tensor phase_path, str direction, int row_bytes, "
      "int threads, int smem, int blocks_per_tree, int num_phases) -> (Tensor, Tensor)");
  m.def(
      "cuda_tree_scan(Tensor x, Tensor weight, Tensor order, Tensor child_ptr, Tensor p0, "
      "Tensor p1, Tensor p2, Tensor p3, str schedule, int[] launch, str direction) -> Tensor");
  m.def(
      "cuda_tree_scan_backward(Tensor grad, Tensor x, Tensor weight, Tensor out, Tensor order, "
      "Tensor child_ptr, Tensor p0, Tensor p1, Tensor p2, Tensor p3, str schedule, int[] launch, "
      "str direction) -> (Tensor, Tensor)");
  m.def("cuda_device_limits(int device) -> int[]", &device_limits);
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) {
  m.impl("cuda_scan_forward", &scan_forward);
  m.impl("cuda_scan_backward", &scan_backward);
  m.impl("cuda_path_scan_forward", &path_scan_forward);
  m.impl("cuda_path_scan_backward", &path_scan_backward);
  m.impl("cuda_tree_scan", &tree_scan_cuda);
  m.impl("cuda_tree_scan_backward", &tree_scan_backward_cuda);
}

TORCH_LIBRARY_IMPL(treessm, Autograd, m) { m.impl("cuda_tree_scan", &tree_scan_autograd); }

}  // namespace treessm_cuda
