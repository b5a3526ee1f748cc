// Host side of the CUDA tree scan: argument checks, launch configuration and the
// torch.library registration of the ops torch.ops.treessm.cuda_scan_forward /
// torch.ops.treessm.cuda_scan_backward (CUDA dispatch key).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <initializer_list>
#include <tuple>

#include "launch_limits.cuh"
#include "path_scan_kernels.cuh"

namespace treessm_cuda {
namespace {

constexpr int kMaxShared = 48 * 1024;  // no opt-in needed below this

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

struct Launch {
  int vec;      // channels per thread access
  int lpv;      // threads per vertex row in a block
  int threads;  // threads per block
  dim3 grid;
  int cap(int streams, int acc_size) const {
    // rows of one level kept in shared memory (two alternating buffers per stream)
    const int row = lpv * vec * acc_size;
    int c = kMaxShared / (streams * 2 * row);
    return c < 256 ? c : 256;
  }
  size_t smem(int streams, int acc_size) const {
    return static_cast<size_t>(streams) * 2 * cap(streams, acc_size) * lpv * vec * acc_size;
  }
};

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v) ? std::atoi(v) : fallback;
}

// At most four channels per thread access, dividing C (aligned_vec then checks the rows'
// alignment).
int vec_width(int64_t C, int elem_size) {
  int vec = 16 / elem_size < 4 ? 16 / elem_size : 4;
  while (vec > 1 && C % vec != 0) vec /= 2;
  return vec;
}

// Grid of (trees, channel groups). Threads per row default to `row_bytes` of channels per
// block (at most 32 threads, fewer when the channels are fewer), threads per block to
// `threads_default`; TREESSM_CUDA_LPV / TREESSM_CUDA_THREADS override them (for tuning).
Launch launch_shape(int64_t C, int64_t num_trees, int elem_size, int vec, int row_bytes,
                    int threads_default) {
  const int64_t lanes = C / vec;
  int lpv_default = row_bytes / (vec * elem_size);
  if (lpv_default > 32) lpv_default = 32;
  if (lpv_default < 1) lpv_default = 1;
  int lpv = env_int("TREESSM_CUDA_LPV", lpv_default);
  if (lpv < 1 || lpv > 32 || (lpv & (lpv - 1))) lpv = lpv_default;
  while (lpv > 1 && lpv / 2 >= lanes) lpv /= 2;
  int threads = env_int("TREESSM_CUDA_THREADS", threads_default);
  if (threads < 32 || threads > 1024 || threads % 32) threads = threads_default;
  if (threads < lpv) threads = lpv;
  const int64_t groups = (lanes + lpv - 1) / lpv;
  TORCH_CHECK(groups <= 65535, "too many channels for one launch: ", C);
  TORCH_CHECK(num_trees <= 2147483647LL, "too many trees for one launch: ", num_trees);
  Launch L;
  L.vec = vec;
  L.lpv = lpv;
  L.threads = threads;
  L.grid = dim3(static_cast<unsigned>(num_trees), static_cast<unsigned>(groups), 1);
  return L;
}

// The direct kernels: 32-byte rows (two threads of 16 bytes for float32) and small blocks:
// a level of a tree holds tens of vertices, and independent blocks are what hides latency.
Launch configure(int64_t C, int64_t num_trees, int elem_size, int vec) {
  return launch_shape(C, num_trees, elem_size, vec, 32, 64);
}

Plan make_plan(const at::Tensor& order, const at::Tensor& child_ptr, const at::Tensor& level_pos,
               const at::Tensor& tree_level_ptr, const at::Tensor& parent_pos,
               const at::Tensor& parent_at_pos) {
  Plan p;
  p.order = order.data_ptr<int64_t>();
  p.child_ptr = child_ptr.data_ptr<int64_t>();
  p.level_pos = level_pos.data_ptr<int64_t>();
  p.tree_level_ptr = tree_level_ptr.data_ptr<int64_t>();
  p.parent_pos = parent_pos.data_ptr<int64_t>();
  p.parent_at_pos = parent_at_pos.data_ptr<int64_t>();
  return p;
}

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// Instantiates only the widths a type can take (at most 16 bytes per access).
#define TREESSM_DISPATCH_VEC(VEC, ELEM, ...)                                               \
  switch (VEC) {                                                                           \
    case 4: { constexpr int V = 4; if constexpr (V * sizeof(ELEM) <= 16) { __VA_ARGS__; } break; } \
    case 2: { constexpr int V = 2; __VA_ARGS__; break; }                                   \
    default: { constexpr int V = 1; __VA_ARGS__; break; }                                  \
  }

#define TREESSM_DISPATCH_TYPES(TYPE, NAME, ...)                                              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                              \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)                     \
                     AT_DISPATCH_CASE(at::ScalarType::Double, __VA_ARGS__)                    \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)                      \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

int direction_code(const std::string& d) {
  if (d == "both") return 0;
  if (d == "up") return 1;
  if (d == "down") return 2;
  TORCH_CHECK(false, "direction must be 'both', 'up' or 'down', got '", d, "'");
  return -1;
}

// The widest vector width that divides C and keeps every row of every tensor aligned.
int aligned_vec(int vec, int elem_size, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    if (t == nullptr || !t->defined()) continue;
    const auto addr = reinterpret_cast<uintptr_t>(t->data_ptr());
    while (vec > 1 && addr % (static_cast<uintptr_t>(vec) * elem_size) != 0) vec /= 2;
  }
  return vec;
}

// Which kernels run: the staged kernels (default) or the direct ones (TREESSM_CUDA_SCAN=direct).
// The staged kernels index positions, vertices and levels with 32 bits.
bool use_staged(int64_t N, int64_t num_levels) {
  const char* v = std::getenv("TREESSM_CUDA_SCAN");
  if (v != nullptr && std::string(v) == "direct") return false;
  return N < 2147483647LL && num_levels < 2147483647LL;
}

// The staged kernels: 32 channels per block (eight threads of 16 bytes for float32, eight
// of 8 bytes for 16-bit types; 128 bytes for float64), 128 threads, so a level step covers
// 16 vertices (TREESSM_CUDA_LPV / TREESSM_CUDA_THREADS override).
Launch configure_staged(int64_t C, int64_t num_trees, int elem_size, int vec) {
  return launch_shape(C, num_trees, elem_size, vec, elem_size <= 4 ? 32 * elem_size : 128, 128);
}

// Launches one staged kernel. The rings take what a shared-memory budget allows: R = 256
// staged positions at most (TREESSM_CUDA_RING), 64 rows per level handed on in shared
// memory (TREESSM_CUDA_CAP). The budget is 100 KiB, less where the grid would otherwise
// need more than one wave of blocks (smaller rings refill more often, but a second wave
// doubles the time); TREESSM_CUDA_SMEM sets it outright.
template <typename T, typename A, int V, int MODE>
void launch_staged(const Launch& L, StagedArgs a, cudaStream_t stream, int device) {
  const int cw = L.lpv * V;
  const int optin = max_dynamic_smem(device);
  const int64_t blocks = static_cast<int64_t>(L.grid.x) * L.grid.y;
  int budget = env_int("TREESSM_CUDA_SMEM",
                       static_cast<int>(one_wave_smem(blocks, device, 100 * 1024)));
  if (budget > optin) budget = optin;
  int cap = env_int("TREESSM_CUDA_CAP", 64);
  if (cap < 0) cap = 64;
  int ring = env_int("TREESSM_CUDA_RING", 256);
  int r = 16;
  while (r * 2 <= ring && r < (1 << 20)) r *= 2;
  ring = r;
  while (ring > 16 && staged_smem_bytes<MODE>(ring, cw, cap, sizeof(T), sizeof(A)) > budget) ring /= 2;
  while (cap > 0 && staged_smem_bytes<MODE>(ring, cw, cap, sizeof(T), sizeof(A)) > budget) cap /= 2;
  const int64_t smem = staged_smem_bytes<MODE>(ring, cw, cap, sizeof(T), sizeof(A));
  TORCH_CHECK(smem <= optin, "the staged scan needs ", smem, " bytes of shared memory, the device offers ", optin);
  a.lpv = L.lpv;
  a.cap = cap;
  a.ring = ring;
  constexpr auto kernel = staged_scan_kernel<T, A, V, MODE>;
  allow_dynamic_smem<kernel>(smem, device);
  kernel<<<L.grid, L.threads, static_cast<size_t>(smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

StagedArgs staged_args(const Plan& plan, int64_t C, const void* in0, const void* in1, const void* w,
                       const void* h, void* up0, void* up1, void* out, void* gw, void* val0,
                       void* val1) {
  StagedArgs a;
  a.in0 = in0;
  a.in1 = in1;
  a.w = w;
  a.h = h;
  a.up0 = up0;
  a.up1 = up1;
  a.out = out;
  a.gw = gw;
  a.val0 = val0;
  a.val1 = val1;
  a.plan = plan;
  a.C = C;
  a.lpv = 1;
  a.cap = 0;
  a.ring = 16;
  return a;
}

// The path kernels: rows as in the staged kernels. Each thread's ring takes
// kPathDepth * fields * 16 bytes; the tree's plan records follow (sized for the average
// tree, N / T; larger trees read them from global memory). Within a shared-memory budget of
// TREESSM_CUDA_SMEM bytes (default 113 KiB, two blocks per SM) a block takes 128 threads
// where the records fit, else 64 (TREESSM_CUDA_THREADS overrides).
template <typename T, typename A, int V, int MODE>
void launch_path(Launch L, PathArgs a, int64_t N, int64_t num_trees, cudaStream_t stream, int device) {
  const int optin = max_dynamic_smem(device);
  int budget = env_int("TREESSM_CUDA_SMEM", 113 * 1024);
  if (budget > optin) budget = optin;
  const int64_t avg = (N + num_trees - 1) / num_trees + 1;
  const int64_t want = avg < (1 << 20) ? avg : 0;
  if (std::getenv("TREESSM_CUDA_THREADS") == nullptr && L.threads > 64 &&
      path_smem_bytes<MODE>(L.threads, (int)want) > budget)
    L.threads = 64;  // at least lpv (at most 32)
  const int64_t ring = path_smem_bytes<MODE>(L.threads, 0);
  TORCH_CHECK(ring <= optin, "the path scan needs ", ring, " bytes of shared memory, the device offers ", optin);
  int64_t rec_cap = (budget - ring) / (int64_t)(sizeof(PathRec) + sizeof(int));
  if (rec_cap > want) rec_cap = want;
  if (rec_cap < 0) rec_cap = 0;
  a.lpv = L.lpv;
  a.rec_cap = static_cast<int>(rec_cap);
  const int64_t smem = path_smem_bytes<MODE>(L.threads, a.rec_cap);
  constexpr auto kernel = path_scan_kernel<T, A, V, MODE>;
  allow_dynamic_smem<kernel>(smem, device);
  kernel<<<L.grid, L.threads, static_cast<size_t>(smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PathArgs path_args(const PathPlan& plan, int64_t C, const void* in0, const void* in1, const void* w,
                   const void* h, void* up0, void* up1, void* out, void* gw, void* val0, void* val1) {
  PathArgs a;
  a.in0 = in0;
  a.in1 = in1;
  a.w = w;
  a.h = h;
  a.up0 = up0;
  a.up1 = up1;
  a.out = out;
  a.gw = gw;
  a.val0 = val0;
  a.val1 = val1;
  a.plan = plan;
  a.C = C;
  a.lpv = 1;
  a.rec_cap = 0;
  return a;
}

void check_path_plan(const at::Tensor& rec, const at::Tensor& light, const at::Tensor& path_ptr,
                     const at::Tensor& phase_path, int64_t N, const at::Tensor& like) {
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

PathPlan make_path_plan(const at::Tensor& rec, const at::Tensor& light, const at::Tensor& path_ptr,
                        const at::Tensor& phase_path) {
  PathPlan p;
  p.rec = reinterpret_cast<const PathRec*>(rec.data_ptr<int>());
  p.light = light.data_ptr<int>();
  p.path_ptr = path_ptr.data_ptr<int>();
  p.phase_path = phase_path.data_ptr<int>();
  return p;
}

}  // namespace

at::Tensor scan_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& order,
                        const at::Tensor& child_ptr, const at::Tensor& level_pos,
                        const at::Tensor& tree_level_ptr, const at::Tensor& parent_pos,
                        const at::Tensor& parent_at_pos, const std::string& direction) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  check_rows(weight, "weight", x);
  const int64_t N = x.size(0), C = x.size(1);
  check_index(parent_at_pos, "parent_at_pos", N, x);
  check_index(order, "order", N, x);
  check_index(child_ptr, "child_ptr", N + 1, x);
  check_index(parent_pos, "parent_pos", N, x);
  check_index(level_pos, "level_pos", -1, x);
  check_index(tree_level_ptr, "tree_level_ptr", -1, x);
  const int dir = direction_code(direction);
  at::Tensor out = at::empty_like(x);
  const int64_t T = tree_level_ptr.size(0) - 1;
  if (N == 0 || C == 0 || T <= 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Plan plan = make_plan(order, child_ptr, level_pos, tree_level_ptr, parent_pos, parent_at_pos);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scratch = at::empty({N, C}, x.options().dtype(acc_dtype));
  const int vec = aligned_vec(vec_width(C, x.element_size()), x.element_size(), {&x, &weight, &out});
  if (use_staged(x.size(0), level_pos.numel())) {
    const Launch L = configure_staged(C, T, x.element_size(), vec);
    const int device = x.get_device();
    TREESSM_DISPATCH_TYPES(x.scalar_type(), "treessm_scan_forward", [&] {
      using T_ = typename CudaType<scalar_t>::type;
      using A = typename AccType<T_>::type;
      TREESSM_DISPATCH_VEC(L.vec, T_, {
        if (dir == 1) {
          launch_staged<T_, A, V, S_UP>(L, staged_args(plan, C, ptr<T_>(x), nullptr, ptr<T_>(weight), nullptr, nullptr, nullptr, ptr<T_>(out), nullptr, ptr<A>(scratch), nullptr), stream, device);
        } else if (dir == 2) {
          launch_staged<T_, A, V, S_DOWN>(L, staged_args(plan, C, ptr<T_>(x), nullptr, ptr<T_>(weight), nullptr, nullptr, nullptr, ptr<T_>(out), nullptr, ptr<A>(scratch), nullptr), stream, device);
        } else {
          at::Tensor up = at::empty({N, C}, x.options().dtype(acc_dtype));
          launch_staged<T_, A, V, S_UP>(L, staged_args(plan, C, ptr<T_>(x), nullptr, ptr<T_>(weight), nullptr, ptr<A>(up), nullptr, nullptr, nullptr, ptr<A>(scratch), nullptr), stream, device);
          launch_staged<T_, A, V, S_BOTH>(L, staged_args(plan, C, ptr<A>(up), nullptr, ptr<T_>(weight), nullptr, nullptr, nullptr, ptr<T_>(out), nullptr, ptr<A>(scratch), nullptr), stream, device);
        }
      });
    });
    return out;
  }
  const Launch L = configure(C, T, x.element_size(), vec);
  TREESSM_DISPATCH_TYPES(x.scalar_type(), "treessm_scan_forward", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    using A = typename AccType<T_>::type;
    TREESSM_DISPATCH_VEC(L.vec, T_, {
      if (dir == 1) {
        up_pass_kernel<T_, A, V, 1><<<L.grid, L.threads, L.smem(1, sizeof(A)), stream>>>(
            ptr<T_>(x), nullptr, ptr<T_>(weight), nullptr, nullptr, ptr<T_>(out), nullptr, nullptr,
            ptr<A>(scratch), nullptr, plan, C, L.lpv, L.cap(1, sizeof(A)));
      } else if (dir == 2) {
        down_pass_kernel<T_, A, V, DOWN_FWD><<<L.grid, L.threads, L.smem(1, sizeof(A)), stream>>>(
            ptr<T_>(x), nullptr, nullptr, ptr<T_>(weight), nullptr, ptr<T_>(out), nullptr,
            ptr<A>(scratch), plan, C, L.lpv, L.cap(1, sizeof(A)));
      } else {
        at::Tensor up = at::empty({N, C}, x.options().dtype(acc_dtype));
        up_pass_kernel<T_, A, V, 1><<<L.grid, L.threads, L.smem(1, sizeof(A)), stream>>>(
            ptr<T_>(x), nullptr, ptr<T_>(weight), ptr<A>(up), nullptr, nullptr, nullptr, nullptr,
            ptr<A>(scratch), nullptr, plan, C, L.lpv, L.cap(1, sizeof(A)));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        down_pass_kernel<T_, A, V, BOTH_FWD><<<L.grid, L.threads, L.smem(1, sizeof(A)), stream>>>(
            nullptr, ptr<A>(up), nullptr, ptr<T_>(weight), nullptr, ptr<T_>(out), nullptr,
            ptr<A>(scratch), plan, C, L.lpv, L.cap(1, sizeof(A)));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scan_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& order, const at::Tensor& child_ptr, const at::Tensor& level_pos,
    const at::Tensor& tree_level_ptr, const at::Tensor& parent_pos,
    const at::Tensor& parent_at_pos, const std::string& direction) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  check_rows(weight, "weight", x);
  check_rows(grad, "grad", x);
  check_rows(out, "out", x);
  const int64_t N = x.size(0), C = x.size(1);
  check_index(parent_at_pos, "parent_at_pos", N, x);
  check_index(order, "order", N, x);
  check_index(child_ptr, "child_ptr", N + 1, x);
  check_index(parent_pos, "parent_pos", N, x);
  check_index(level_pos, "level_pos", -1, x);
  check_index(tree_level_ptr, "tree_level_ptr", -1, x);
  const int dir = direction_code(direction);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(x);
  const int64_t T = tree_level_ptr.size(0) - 1;
  if (N == 0 || C == 0 || T <= 0) return {gx, gw};
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Plan plan = make_plan(order, child_ptr, level_pos, tree_level_ptr, parent_pos, parent_at_pos);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scratch = at::empty({N, C}, x.options().dtype(acc_dtype));
  const int vec = aligned_vec(vec_width(C, x.element_size()), x.element_size(), {&grad, &x, &weight, &out, &gx, &gw});
  if (use_staged(x.size(0), level_pos.numel())) {
    const Launch L = configure_staged(C, T, x.element_size(), vec);
    const int device = x.get_device();
    TREESSM_DISPATCH_TYPES(x.scalar_type(), "treessm_scan_backward", [&] {
      using T_ = typename CudaType<scalar_t>::type;
      using A = typename AccType<T_>::type;
      TREESSM_DISPATCH_VEC(L.vec, T_, {
        if (dir == 1) {  // up: gx = down(g), gw = h[v] gx[p]
          launch_staged<T_, A, V, S_UP_BWD>(L, staged_args(plan, C, ptr<T_>(grad), nullptr, ptr<T_>(weight), ptr<T_>(out), nullptr, nullptr, ptr<T_>(gx), ptr<T_>(gw), ptr<A>(scratch), nullptr), stream, device);
        } else if (dir == 2) {  // down: gx = up(g), gw = gx[v] h[p]
          launch_staged<T_, A, V, S_UP_GW>(L, staged_args(plan, C, ptr<T_>(grad), nullptr, ptr<T_>(weight), ptr<T_>(out), nullptr, nullptr, ptr<T_>(gx), ptr<T_>(gw), ptr<A>(scratch), nullptr), stream, device);
        } else {  // both: U = up(x), G = up(g) in one pass, then gx and gw together
          at::Tensor U = at::empty({N, C}, x.options().dtype(acc_dtype));
          at::Tensor G = at::empty({N, C}, x.options().dtype(acc_dtype));
          at::Tensor scratch2 = at::empty({N, C}, x.options().dtype(acc_dtype));
          launch_staged<T_, A, V, S_UP2>(L, staged_args(plan, C, ptr<T_>(x), ptr<T_>(grad), ptr<T_>(weight), nullptr, ptr<A>(U), ptr<A>(G), nullptr, nullptr, ptr<A>(scratch), ptr<A>(scratch2)), stream, device);
          launch_staged<T_, A, V, S_BOTH_BWD>(L, staged_args(plan, C, ptr<A>(U), ptr<A>(G), ptr<T_>(weight), ptr<T_>(out), nullptr, nullptr, ptr<T_>(gx), ptr<T_>(gw), ptr<A>(scratch), nullptr), stream, device);
        }
      });
    });
    return {gx, gw};
  }
  const Launch L = configure(C, T, x.element_size(), vec);
  TREESSM_DISPATCH_TYPES(x.scalar_type(), "treessm_scan_backward", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    using A = typename AccType<T_>::type;
    TREESSM_DISPATCH_VEC(L.vec, T_, {
      if (dir == 1) {  // up: gx = down(g), gw = h[v] gx[p]
        down_pass_kernel<T_, A, V, UP_BWD><<<L.grid, L.threads, L.smem(1, sizeof(A)), stream>>>(
            ptr<T_>(grad), nullptr, nullptr, ptr<T_>(weight), ptr<T_>(out), ptr<T_>(gx),
            ptr<T_>(gw), ptr<A>(scratch), plan, C, L.lpv, L.cap(1, sizeof(A)));
      } else if (dir == 2) {  // down: gx = up(g), gw = gx[v] h[p]
        up_pass_kernel<T_, A, V, 1><<<L.grid, L.threads, L.smem(1, sizeof(A)), stream>>>(
            ptr<T_>(grad), nullptr, ptr<T_>(weight), nullptr, nullptr, ptr<T_>(gx), ptr<T_>(out),
            ptr<T_>(gw), ptr<A>(scratch), nullptr, plan, C, L.lpv, L.cap(1, sizeof(A)));
      } else {  // both: U = up(x), G = up(g) in one pass, then gx = both(g) and gw together
        at::Tensor U = at::empty({N, C}, x.options().dtype(acc_dtype));
        at::Tensor G = at::empty({N, C}, x.options().dtype(acc_dtype));
        at::Tensor scratch2 = at::empty({N, C}, x.options().dtype(acc_dtype));
        up_pass_kernel<T_, A, V, 2><<<L.grid, L.threads, L.smem(2, sizeof(A)), stream>>>(
            ptr<T_>(x), ptr<T_>(grad), ptr<T_>(weight), ptr<A>(U), ptr<A>(G), nullptr, nullptr,
            nullptr, ptr<A>(scratch), ptr<A>(scratch2), plan, C, L.lpv, L.cap(2, sizeof(A)));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        down_pass_kernel<T_, A, V, BOTH_BWD><<<L.grid, L.threads, L.smem(1, sizeof(A)), stream>>>(
            nullptr, ptr<A>(U), ptr<A>(G), ptr<T_>(weight), ptr<T_>(out), ptr<T_>(gx), ptr<T_>(gw),
            ptr<A>(scratch), plan, C, L.lpv, L.cap(1, sizeof(A)));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {gx, gw};
}

at::Tensor path_scan_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rec,
                             const at::Tensor& light, const at::Tensor& path_ptr,
                             const at::Tensor& phase_path, const std::string& direction) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  check_rows(weight, "weight", x);
  const int64_t N = x.size(0), C = x.size(1);
  check_path_plan(rec, light, path_ptr, phase_path, N, x);
  const int dir = direction_code(direction);
  at::Tensor out = at::empty_like(x);
  const int64_t T = phase_path.size(0);
  if (N == 0 || C == 0 || T <= 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const PathPlan plan = make_path_plan(rec, light, path_ptr, phase_path);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scratch = at::empty({N, C}, x.options().dtype(acc_dtype));
  const int vec = aligned_vec(vec_width(C, x.element_size()), x.element_size(), {&x, &weight, &out});
  const Launch L = configure_staged(C, T, x.element_size(), vec);
  const int device = x.get_device();
  TREESSM_DISPATCH_TYPES(x.scalar_type(), "treessm_path_scan_forward", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    using A = typename AccType<T_>::type;
    TREESSM_DISPATCH_VEC(L.vec, T_, {
      if (dir == 1) {
        launch_path<T_, A, V, S_UP>(L, path_args(plan, C, ptr<T_>(x), nullptr, ptr<T_>(weight), nullptr, nullptr, nullptr, ptr<T_>(out), nullptr, ptr<A>(scratch), nullptr), N, T, stream, device);
      } else if (dir == 2) {
        launch_path<T_, A, V, S_DOWN>(L, path_args(plan, C, ptr<T_>(x), nullptr, ptr<T_>(weight), nullptr, nullptr, nullptr, ptr<T_>(out), nullptr, ptr<A>(scratch), nullptr), N, T, stream, device);
      } else {
        at::Tensor up = at::empty({N, C}, x.options().dtype(acc_dtype));
        launch_path<T_, A, V, S_UP>(L, path_args(plan, C, ptr<T_>(x), nullptr, ptr<T_>(weight), nullptr, ptr<A>(up), nullptr, nullptr, nullptr, ptr<A>(scratch), nullptr), N, T, stream, device);
        launch_path<T_, A, V, S_BOTH>(L, path_args(plan, C, ptr<A>(up), nullptr, ptr<T_>(weight), nullptr, nullptr, nullptr, ptr<T_>(out), nullptr, ptr<A>(scratch), nullptr), N, T, stream, device);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> path_scan_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& rec, const at::Tensor& light, const at::Tensor& path_ptr,
    const at::Tensor& phase_path, const std::string& direction) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  check_rows(weight, "weight", x);
  check_rows(grad, "grad", x);
  check_rows(out, "out", x);
  const int64_t N = x.size(0), C = x.size(1);
  check_path_plan(rec, light, path_ptr, phase_path, N, x);
  const int dir = direction_code(direction);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(x);
  const int64_t T = phase_path.size(0);
  if (N == 0 || C == 0 || T <= 0) return {gx, gw};
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const PathPlan plan = make_path_plan(rec, light, path_ptr, phase_path);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scratch = at::empty({N, C}, x.options().dtype(acc_dtype));
  const int vec = aligned_vec(vec_width(C, x.element_size()), x.element_size(), {&grad, &x, &weight, &out, &gx, &gw});
  const Launch L = configure_staged(C, T, x.element_size(), vec);
  const int device = x.get_device();
  TREESSM_DISPATCH_TYPES(x.scalar_type(), "treessm_path_scan_backward", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    using A = typename AccType<T_>::type;
    TREESSM_DISPATCH_VEC(L.vec, T_, {
      if (dir == 1) {  // up: gx = down(g), gw = h[v] gx[p]
        launch_path<T_, A, V, S_UP_BWD>(L, path_args(plan, C, ptr<T_>(grad), nullptr, ptr<T_>(weight), ptr<T_>(out), nullptr, nullptr, ptr<T_>(gx), ptr<T_>(gw), ptr<A>(scratch), nullptr), N, T, stream, device);
      } else if (dir == 2) {  // down: gx = up(g), gw = gx[v] h[p]
        launch_path<T_, A, V, S_UP_GW>(L, path_args(plan, C, ptr<T_>(grad), nullptr, ptr<T_>(weight), ptr<T_>(out), nullptr, nullptr, ptr<T_>(gx), ptr<T_>(gw), ptr<A>(scratch), nullptr), N, T, stream, device);
      } else {  // both: U = up(x), G = up(g) in one pass, then gx and gw together
        at::Tensor U = at::empty({N, C}, x.options().dtype(acc_dtype));
        at::Tensor G = at::empty({N, C}, x.options().dtype(acc_dtype));
        at::Tensor scratch2 = at::empty({N, C}, x.options().dtype(acc_dtype));
        launch_path<T_, A, V, S_UP2>(L, path_args(plan, C, ptr<T_>(x), ptr<T_>(grad), ptr<T_>(weight), nullptr, ptr<A>(U), ptr<A>(G), nullptr, nullptr, ptr<A>(scratch), ptr<A>(scratch2)), N, T, stream, device);
        launch_path<T_, A, V, S_BOTH_BWD>(L, path_args(plan, C, ptr<A>(U), ptr<A>(G), ptr<T_>(weight), ptr<T_>(out), nullptr, nullptr, ptr<T_>(gx), ptr<T_>(gw), ptr<A>(scratch), nullptr), N, T, stream, device);
      }
    });
  });
  return {gx, gw};
}

TORCH_LIBRARY_FRAGMENT(treessm, m) {
  m.def(
      "cuda_scan_forward(Tensor x, Tensor weight, Tensor order, Tensor child_ptr, "
      "Tensor level_pos, Tensor tree_level_ptr, Tensor parent_pos, Tensor parent_at_pos, "
      "str direction) -> Tensor");
  m.def(
      "cuda_scan_backward(Tensor grad, Tensor x, Tensor weight, Tensor out, Tensor order, "
      "Tensor child_ptr, Tensor level_pos, Tensor tree_level_ptr, Tensor parent_pos, "
      "Tensor parent_at_pos, str direction) -> (Tensor, Tensor)");
  m.def(
      "cuda_path_scan_forward(Tensor x, Tensor weight, Tensor rec, Tensor light, "
      "Tensor path_ptr, Tensor phase_path, str direction) -> Tensor");
  m.def(
      "cuda_path_scan_backward(Tensor grad, Tensor x, Tensor weight, Tensor out, Tensor rec, "
      "Tensor light, Tensor path_ptr, Tensor phase_path, str direction) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) {
  m.impl("cuda_scan_forward", &scan_forward);
  m.impl("cuda_scan_backward", &scan_backward);
  m.impl("cuda_path_scan_forward", &path_scan_forward);
  m.impl("cuda_path_scan_backward", &path_scan_backward);
}

}  // namespace treessm_cuda
