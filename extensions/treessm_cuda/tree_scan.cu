// Host side of the CUDA tree scan: argument checks, launches and the torch.library
// registration of the ops (CUDA dispatch key)
//   torch.ops.treessm.cuda_tree_scan / cuda_tree_scan_backward   (with autograd in C++: the
//                                    eager path of treessm.tree_scan)
//   torch.ops.treessm.cuda_device_limits
// The schedule and the launch parameters are arguments, chosen by treessm/ops/plan.py; the
// five plan tensors are, for "trees", the layout's records, light list, slots, path bounds
// and phase bounds per tree (treessm.ops.plan.PathPlan); for "phases", the phase-major
// records, light list, slots and the positions where each phase starts, on the device and
// on the host (treessm.ops.plan.PhasePlan); for "columns", the vertex and the parent
// position at each breadth-first position, the trees' bounds and, on the host, the
// largest tree's size (treessm.ops.plan.ColumnPlan; its fifth tensor is empty).
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

#include "check.cuh"
#include "column_kernels.cuh"
#include "host_utils.cuh"
#include "scan_kernels.cuh"

namespace treessm_cuda {
namespace {

int direction_code(c10::string_view d) {
  if (d == "both") return 0;
  if (d == "up") return 1;
  if (d == "down") return 2;
  TREESSM_CHECK(false, "direction must be 'both', 'up' or 'down', got '", std::string(d), "'");
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

// Block shape: `row_bytes` of channels per block (G threads of V channels per position, G
// one or two, one when the channels are few) and `lanes` position lanes: lanes * G threads.
constexpr int kMaxLpv = 2;

struct Shape {
  int vec, lpv, lanes, threads;
  int64_t groups;
};

Shape launch_shape(int64_t C, int elem_size, int vec, int64_t row_bytes, int64_t lanes) {
  TREESSM_CHECK(row_bytes >= elem_size && row_bytes <= 512, "row_bytes must lie in [",
              elem_size, ", 512], got ", row_bytes);
  TREESSM_CHECK(lanes >= kGroup && lanes <= kMaxLanes && lanes % kGroup == 0, "lanes must be a "
              "multiple of ", kGroup, " in [", kGroup, ", ", kMaxLanes, "], got ", lanes);
  const int64_t vecs = C / vec;  // channel vectors of a row
  int lpv = static_cast<int>(row_bytes / (vec * elem_size));
  if (lpv > kMaxLpv) lpv = kMaxLpv;
  if (lpv < 1) lpv = 1;
  while (lpv & (lpv - 1)) lpv &= lpv - 1;
  while (lpv > 1 && lpv / 2 >= vecs) lpv /= 2;
  Shape L;
  L.vec = vec;
  L.lpv = lpv;
  // a block holds whole warps: the group scans shuffle across 32 threads
  L.lanes = static_cast<int>(lanes * lpv < 32 ? 32 / lpv : lanes);
  L.threads = L.lanes * lpv;
  L.groups = (vecs + lpv - 1) / lpv;
  TREESSM_CHECK(L.groups <= 65535, "too many channels for one launch: ", C);
  return L;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// The tensors of one pass by role (ScanIO); undefined tensors give null pointers. `acc()`
// hands out an accumulator-typed [N, C] buffer (forward_buffers / backward_buffers of them
// a call).
struct Io {
  at::Tensor in0, in1, w, h, out, gw;
  at::Tensor up[2], loc[2], share[2], contrib[2], sib[2], val[2];
  ScanIO get() const {
    ScanIO io;
    io.in[0] = ptr<void>(in0);
    io.in[1] = ptr<void>(in1);
    io.w = ptr<void>(w);
    io.h = ptr<void>(h);
    io.out = ptr<void>(out);
    io.gw = ptr<void>(gw);
    for (int s = 0; s < 2; ++s) {
      io.up[s] = ptr<void>(up[s]);
      io.loc[s] = ptr<void>(loc[s]);
      io.share[s] = ptr<void>(share[s]);
      io.contrib[s] = ptr<void>(contrib[s]);
      io.sib[s] = ptr<void>(sib[s]);
      io.val[s] = ptr<void>(val[s]);
    }
    return io;
  }
  // the buffers of an up pass that a both pass reads, for `streams` streams
  template <typename Acc>
  void up_buffers(int streams, Acc&& acc) {
    for (int s = 0; s < streams; ++s) {
      up[s] = acc();
      loc[s] = acc();
      share[s] = acc();
      contrib[s] = acc();
      sib[s] = acc();
    }
  }
};

template <int M> using Mode = std::integral_constant<int, M>;

// The accumulator buffers the passes of a direction take (their `acc()` calls): a call
// allocates them as one tensor, so that a small scan costs the host one allocation.
int forward_buffers(int dir) { return dir == 0 ? 6 : 1; }
int backward_buffers(int dir) { return dir == 0 ? 12 : 1; }

// The passes of each direction. `pass(Mode<M>{}, io)` runs one pass.
template <typename Pass, typename Acc>
void forward_passes(int dir, const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                    Pass&& pass, Acc&& acc) {
  Io io;
  io.in0 = x;
  io.w = w;
  if (dir == 1) {
    io.out = out;
    io.contrib[0] = acc();
    pass(Mode<M_UP>{}, io);
  } else if (dir == 2) {
    io.out = out;
    io.val[0] = acc();
    pass(Mode<M_DOWN>{}, io);
  } else {
    io.up_buffers(1, acc);
    pass(Mode<M_UP>{}, io);
    io.out = out;
    io.val[0] = acc();
    pass(Mode<M_BOTH>{}, io);
  }
}

template <typename Pass, typename Acc>
void backward_passes(int dir, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& h, const at::Tensor& gx, const at::Tensor& gw,
                     Pass&& pass, Acc&& acc) {
  Io io;
  io.w = w;
  if (dir == 1) {  // up: gx = down(g), gw = h[v] gx[p]
    io.in0 = g;
    io.h = h;
    io.out = gx;
    io.gw = gw;
    io.val[0] = acc();
    pass(Mode<M_DOWN_GW>{}, io);
  } else if (dir == 2) {  // down: gx = up(g), gw = gx[v] h[p]
    io.in0 = g;
    io.h = h;
    io.out = gx;
    io.gw = gw;
    io.contrib[0] = acc();
    pass(Mode<M_UP_GW>{}, io);
  } else {  // both: up(x) and up(g) together, then gx = both(g) and gw from the brackets
    io.in0 = x;
    io.in1 = g;
    io.up_buffers(2, acc);
    pass(Mode<M_UP2>{}, io);
    io.out = gx;
    io.gw = gw;
    io.val[0] = acc();
    io.val[1] = acc();
    pass(Mode<M_BOTH2>{}, io);
  }
}

// Runs the statement for V = VEC (4, 2 or 1), instantiating only the widths whose rows fit
// one access of at most 16 bytes.
#define TREESSM_DISPATCH_VEC(VEC, ELEM, ...)                                               \
  switch (VEC) {                                                                           \
    case 4: { constexpr int V = 4; if constexpr (V * sizeof(ELEM) <= 16) { __VA_ARGS__; } break; } \
    case 2: { constexpr int V = 2; __VA_ARGS__; break; }                                   \
    default: { constexpr int V = 1; __VA_ARGS__; break; }                                  \
  }

// ---------------------------------------------------------------------------- plans
void check_int_plan(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TREESSM_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device());
  TREESSM_CHECK(t.scalar_type() == at::kInt && t.is_contiguous(), name, " must be contiguous int32");
}

struct Layout {
  at::Tensor rec, light, slot;
  void check(int64_t N, const at::Tensor& like) const {
    check_int_plan(rec, "rec", like);
    check_int_plan(light, "light", like);
    check_int_plan(slot, "slot", like);
    TREESSM_CHECK(slot.dim() == 1 && slot.size(0) == N, "slot must have N entries");
    TREESSM_CHECK(rec.dim() == 2 && rec.size(0) == N + 1 && rec.size(1) == 4, "rec must be [N + 1, 4]");
    TREESSM_CHECK(reinterpret_cast<uintptr_t>(rec.data_ptr()) % 16 == 0, "rec must be 16-byte aligned");
    TREESSM_CHECK(light.dim() == 1 && light.size(0) == N, "light must have N entries");
    TREESSM_CHECK(N < 2147483647LL, "the scan indexes positions with 32 bits");
  }
};

// "trees": one block per (tree, channel slice)
struct Trees {
  Layout lay;
  at::Tensor path_ptr, phase_path;
  void check(int64_t N, const at::Tensor& like) const {
    lay.check(N, like);
    check_int_plan(path_ptr, "path_ptr", like);
    check_int_plan(phase_path, "phase_path", like);
    TREESSM_CHECK(path_ptr.dim() == 1 && path_ptr.size(0) == N + 1, "path_ptr must have N + 1 entries");
    TREESSM_CHECK(phase_path.dim() == 2 && phase_path.size(1) == kMaxPhases + 1,
                "phase_path must be [T, ", kMaxPhases + 1, "]");
  }
  int64_t trees() const { return phase_path.size(0); }
};

// "phases": per phase of the forest, chunks over the device
struct Phases {
  Layout lay;
  at::Tensor phase_ptr, phase_ptr_host;
  std::vector<int64_t> bounds;
  void check(int64_t N, const at::Tensor& like) {
    lay.check(N, like);
    check_int_plan(phase_ptr, "phase_ptr", like);
    TREESSM_CHECK(phase_ptr_host.device().is_cpu() && phase_ptr_host.scalar_type() == at::kLong &&
                    phase_ptr_host.dim() == 1 && phase_ptr_host.size(0) == kMaxPhases + 1,
                "phase_ptr_host must be a CPU int64 tensor of ", kMaxPhases + 1, " entries");
    const at::Tensor hc = phase_ptr_host.contiguous();
    const int64_t* p = hc.data_ptr<int64_t>();
    bounds.assign(p, p + kMaxPhases + 1);
    TREESSM_CHECK(bounds[0] == 0 && bounds[kMaxPhases] == N, "phase_ptr_host must run from 0 to N");
    for (int i = 0; i < kMaxPhases; ++i)
      TREESSM_CHECK(bounds[i] <= bounds[i + 1], "phase_ptr_host must be non-decreasing");
  }
};

struct Launch {
  int64_t row_bytes, lanes;
};

ScanArgs base_args(const Layout& lay, int64_t C, const Shape& L) {
  ScanArgs a{};
  a.rec = reinterpret_cast<const PathRec*>(lay.rec.data_ptr<int>());
  a.slot = lay.slot.data_ptr<int>();
  a.C = C;
  a.lpv = L.lpv;
  a.lanes = L.lanes;
  a.groups = L.groups;
  return a;
}

template <typename T, typename A, int V, int MODE>
void launch_trees(const Shape& L, const Trees& pl, int64_t C, const ScanIO& io, cudaStream_t stream,
                  int device) {
  ScanArgs a = base_args(pl.lay, C, L);
  a.io = io;
  a.path_ptr = pl.path_ptr.data_ptr<int>();
  a.phase_path = pl.phase_path.data_ptr<int>();
  const int64_t smem = scan_smem_bytes<MODE>(L.lanes, L.lpv, V, sizeof(A));
  constexpr auto kernel = tree_scan_kernel<T, A, V, MODE>;
  allow_dynamic_smem<kernel>(smem, device);
  const int64_t blocks = pl.trees() * L.groups;
  TREESSM_CHECK(blocks <= 2147483647LL, "too many trees and channels for one launch");
  kernel<<<static_cast<unsigned>(blocks), L.threads, static_cast<size_t>(smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A, int V, int MODE>
void launch_phases(const Shape& L, const Phases& pl, int64_t C, const ScanIO& io,
                   const at::Tensor& like, cudaStream_t stream, int device) {
  using Tr = ModeTraits<MODE>;
  ScanArgs a = base_args(pl.lay, C, L);
  a.io = io;
  const int64_t chunk = static_cast<int64_t>(L.lanes) * kRun;
  int64_t most = 1;
  for (int p = 0; p < kMaxPhases; ++p) {
    const int64_t n = (pl.bounds[p + 1] - pl.bounds[p] + chunk - 1) / chunk;
    most = n > most ? n : most;
  }
  TREESSM_CHECK(most <= 2147483647LL, "too many chunks for one launch");
  const auto acc_dtype = acc_type(like.scalar_type());
  at::Tensor agg, aggf, carry;
  if (most > 1) {
    agg = at::empty({most, 2 * Tr::NS, C}, like.options().dtype(acc_dtype));
    aggf = at::empty({most}, like.options().dtype(at::kByte));
    carry = at::empty({most, Tr::NS, C}, like.options().dtype(acc_dtype));
    a.agg = agg.data_ptr();
    a.aggf = aggf.data_ptr<uint8_t>();
    a.carry = carry.data_ptr();
  }
  const int64_t smem = scan_smem_bytes<MODE>(L.lanes, L.lpv, V, sizeof(A));
  constexpr auto aggregate = phase_aggregate_kernel<T, A, V, MODE>;
  constexpr auto apply = phase_apply_kernel<T, A, V, MODE>;
  allow_dynamic_smem<aggregate>(smem, device);
  allow_dynamic_smem<apply>(smem, device);
  for (int n = 0; n < kMaxPhases; ++n) {
    const int p = Tr::UP ? kMaxPhases - 1 - n : n;
    const int64_t s = pl.bounds[p], e = pl.bounds[p + 1];
    if (s >= e) continue;
    a.s = static_cast<int>(s);
    a.e = static_cast<int>(e);
    const int64_t chunks = (e - s + chunk - 1) / chunk;
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(L.groups));
    if (chunks > 1) {
      aggregate<<<grid, L.threads, static_cast<size_t>(smem), stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int threads = phase_carry_threads(static_cast<int>(chunks));
      const auto carry_smem = static_cast<size_t>(phase_carry_smem_bytes<A, Tr::NS>(threads));
      phase_carry_kernel<A, Tr::NS><<<static_cast<unsigned>(C), threads, carry_smem, stream>>>(
          a.agg, a.aggf, const_cast<void*>(a.carry), static_cast<int>(chunks), C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    apply<<<grid, L.threads, static_cast<size_t>(smem), stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Runs the passes of `run` (forward_passes or backward_passes) along `plan`, with `buffers`
// accumulator buffers.
template <typename Plan, typename Run>
void scan(const at::Tensor& x, const Plan& plan, const Launch& la, int vec, int buffers,
          Run&& run) {
  const int64_t N = x.size(0), C = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int device = x.get_device();
  const Shape L = launch_shape(C, x.element_size(), vec, la.row_bytes, la.lanes);
  const auto acc_dtype = acc_type(x.scalar_type());
  const at::Tensor arena = at::empty({buffers, N, C}, x.options().dtype(acc_dtype));
  int taken = 0;
  auto acc = [&] {
    TREESSM_CHECK(taken < buffers, "a scan's passes took more than ", buffers, " buffers");
    return arena.select(0, taken++);
  };
  TREESSM_DISPATCH_TYPES(x.scalar_type(), "treessm_tree_scan", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    using A_ = typename AccType<T_>::type;
    TREESSM_DISPATCH_VEC(L.vec, T_, {
      run([&](auto mode, const Io& io) {
        constexpr int M = decltype(mode)::value;
        if constexpr (std::is_same_v<Plan, Trees>)
          launch_trees<T_, A_, V, M>(L, plan, C, io.get(), stream, device);
        else
          launch_phases<T_, A_, V, M>(L, plan, C, io.get(), x, stream, device);
      }, acc);
    });
  });
}

void check_x(const at::Tensor& x) {
  TREESSM_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
}

Launch check_launch(c10::string_view schedule, at::IntArrayRef launch) {
  TREESSM_CHECK(schedule == "trees" || schedule == "phases" || schedule == "columns",
              "schedule must be 'trees', 'phases' or 'columns', got '", std::string(schedule),
              "'");
  TREESSM_CHECK(launch.size() == 2, "launch must hold the fields of treessm.ops.plan.Launch, got ",
              launch.size());
  return Launch{launch[0], launch[1]};
}

// Runs `body(plan)` with the plan tensors of `schedule`, checked.
template <typename Body>
void with_plan(const at::Tensor& x, c10::string_view schedule, const at::Tensor& p0,
               const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& p3,
               const at::Tensor& p4, Body&& body) {
  const int64_t N = x.size(0);
  if (schedule == "trees") {
    const Trees pl{{p0, p1, p2}, p3, p4};
    pl.check(N, x);
    body(pl);
  } else {
    Phases pl{{p0, p1, p2}, p3, p4, {}};
    pl.check(N, x);
    body(pl);
  }
}

// ---------------------------------------------------------------------------- "columns"
// One thread per (tree, channel), the tree's values in a shared-memory column
// (column_kernels.cuh).
struct Columns {
  at::Tensor order, parent, tree_ptr;
  int64_t largest = 0;
  Columns(int64_t N, const at::Tensor& like, const at::Tensor& p0, const at::Tensor& p1,
          const at::Tensor& p2, const at::Tensor& p3)
      : order(p0), parent(p1), tree_ptr(p2) {
    check_int_plan(order, "order", like);
    check_int_plan(parent, "parent", like);
    check_int_plan(tree_ptr, "tree_ptr", like);
    TREESSM_CHECK(order.dim() == 1 && order.size(0) == N, "order must have N entries");
    TREESSM_CHECK(parent.dim() == 1 && parent.size(0) == N, "parent must have N entries");
    TREESSM_CHECK(tree_ptr.dim() == 1 && tree_ptr.size(0) >= 1, "tree_ptr must be 1-D");
    TREESSM_CHECK(p3.device().is_cpu() && p3.scalar_type() == at::kLong && p3.numel() == 1,
                  "largest_host must be a CPU int64 tensor of one entry");
    largest = p3.item<int64_t>();
    TREESSM_CHECK(largest >= 0 && largest <= N, "largest_host must be a tree size");
  }
};

// The columns (and the tree's records) in shared memory where the largest tree's fit, else
// the columns in a global buffer.
template <typename T, int MODE>
void launch_columns(const Columns& pl, columns::Args<T> a, const at::Tensor& like, int device,
                    cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const int64_t trees = pl.tree_ptr.size(0) - 1;
  a.order = pl.order.data_ptr<int>();
  a.parent = pl.parent.data_ptr<int>();
  a.tree_ptr = pl.tree_ptr.data_ptr<int>();
  a.groups = static_cast<int>((a.C + columns::kThreads - 1) / columns::kThreads);
  a.stride = static_cast<int>(pl.largest);
  a.N = like.size(0);
  const int64_t blocks = trees * a.groups;
  TREESSM_CHECK(blocks <= 2147483647LL, "too many trees and channels for one launch");
  if (blocks == 0) return;
  const int64_t smem = columns::shared_bytes<A>(MODE, pl.largest);
  const auto grid = static_cast<unsigned>(blocks);
  if (smem <= max_dynamic_smem(device)) {
    constexpr auto kernel = columns::column_scan_kernel<T, MODE, true>;
    allow_dynamic_smem<kernel>(smem, device);
    kernel<<<grid, columns::kThreads, static_cast<size_t>(smem), stream>>>(a);
  } else {
    const at::Tensor scratch = at::empty({columns::columns_of(MODE), a.N, a.C},
                                         like.options().dtype(acc_type(like.scalar_type())));
    a.scratch = scratch.data_ptr();
    columns::column_scan_kernel<T, MODE, false><<<grid, columns::kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dir: 0 both, 1 up, 2 down; grad: the backward (x the gradient, x2 the forward input, h
// the forward output)
void run_columns(const Columns& pl, int dir, bool grad, const at::Tensor& x,
                 const at::Tensor& x2, const at::Tensor& w, const at::Tensor& h,
                 const at::Tensor& out, const at::Tensor& gw) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int device = x.get_device();
  TREESSM_DISPATCH_TYPES(x.scalar_type(), "treessm_column_scan", [&] {
    using T_ = typename CudaType<scalar_t>::type;
    columns::Args<T_> a{};
    a.x = ptr<const T_>(x);
    a.x2 = ptr<const T_>(x2);
    a.w = ptr<const T_>(w);
    a.h = ptr<const T_>(h);
    a.out = ptr<T_>(out);
    a.gw = ptr<T_>(gw);
    a.C = x.size(1);
    if (!grad && dir == 0) launch_columns<T_, columns::kBoth>(pl, a, x, device, stream);
    if (!grad && dir == 1) launch_columns<T_, columns::kUp>(pl, a, x, device, stream);
    if (!grad && dir == 2) launch_columns<T_, columns::kDown>(pl, a, x, device, stream);
    if (grad && dir == 0) launch_columns<T_, columns::kBothGrad>(pl, a, x, device, stream);
    if (grad && dir == 1) launch_columns<T_, columns::kUpGrad>(pl, a, x, device, stream);
    if (grad && dir == 2) launch_columns<T_, columns::kDownGrad>(pl, a, x, device, stream);
  });
}

}  // namespace

at::Tensor tree_scan_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& p0,
                          const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& p3,
                          const at::Tensor& p4, c10::string_view schedule, at::IntArrayRef launch,
                          c10::string_view direction) {
  const Launch la = check_launch(schedule, launch);
  check_x(x);
  check_rows(weight, "weight", x);
  const int dir = direction_code(direction);
  at::Tensor out = at::empty_like(x);
  if (x.size(0) == 0 || x.size(1) == 0) return out;
  if (schedule == "columns") {
    run_columns(Columns(x.size(0), x, p0, p1, p2, p3), dir, false, x, {}, weight, {}, out, {});
    return out;
  }
  const int vec = vec_width(x.size(1), x.element_size(), {&x, &weight, &out});
  with_plan(x, schedule, p0, p1, p2, p3, p4, [&](const auto& pl) {
    scan(x, pl, la, vec, forward_buffers(dir), [&](auto&& pass, auto&& acc) {
      forward_passes(dir, x, weight, out, pass, acc);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> tree_scan_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& p0, const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& p3,
    const at::Tensor& p4, c10::string_view schedule, at::IntArrayRef launch,
    c10::string_view direction) {
  const Launch la = check_launch(schedule, launch);
  check_x(x);
  check_rows(weight, "weight", x);
  check_rows(grad, "grad", x);
  check_rows(out, "out", x);
  const int dir = direction_code(direction);
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw = at::empty_like(x);
  if (x.size(0) == 0 || x.size(1) == 0) return {gx, gw};
  if (schedule == "columns") {
    run_columns(Columns(x.size(0), x, p0, p1, p2, p3), dir, true, grad, x, weight, out, gx, gw);
    return {gx, gw};
  }
  const int vec = vec_width(x.size(1), x.element_size(), {&grad, &x, &weight, &out, &gx, &gw});
  with_plan(x, schedule, p0, p1, p2, p3, p4, [&](const auto& pl) {
    scan(x, pl, la, vec, backward_buffers(dir), [&](auto&& pass, auto&& acc) {
      backward_passes(dir, grad, x, weight, out, gx, gw, pass, acc);
    });
  });
  return {gx, gw};
}

namespace {

// The ops are called through the dispatcher, so that traced and fake-tensor runs reach the
// fake kernels registered in Python.
using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, c10::string_view, at::IntArrayRef,
                              c10::string_view);
using BackwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
    at::IntArrayRef, c10::string_view);

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
                            const at::Tensor& weight, const at::Tensor& p0, const at::Tensor& p1,
                            const at::Tensor& p2, const at::Tensor& p3, const at::Tensor& p4,
                            c10::string_view schedule, at::IntArrayRef launch,
                            c10::string_view direction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = forward_op().call(x, weight, p0, p1, p2, p3, p4, schedule, launch, direction);
    ctx->save_for_backward({x, weight, out, p0, p1, p2, p3, p4});
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
                                       s[6], s[7], ctx->saved_data["schedule"].toStringRef(), launch,
                                       ctx->saved_data["direction"].toStringRef());
    return {gx, gw, {}, {}, {}, {}, {}, {}, {}, {}};
  }
};

at::Tensor tree_scan_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& p0,
                              const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& p3,
                              const at::Tensor& p4, c10::string_view schedule,
                              at::IntArrayRef launch, c10::string_view direction) {
  return TreeScanFunction::apply(x, weight, p0, p1, p2, p3, p4, schedule, launch, direction);
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
      "cuda_tree_scan(Tensor x, Tensor weight, Tensor p0, Tensor p1, Tensor p2, Tensor p3, "
      "Tensor p4, str schedule, int[] launch, str direction) -> Tensor");
  m.def(
      "cuda_tree_scan_backward(Tensor grad, Tensor x, Tensor weight, Tensor out, Tensor p0, "
      "Tensor p1, Tensor p2, Tensor p3, Tensor p4, str schedule, int[] launch, str direction) -> "
      "(Tensor, Tensor)");
  m.def("cuda_device_limits(int device) -> int[]", &device_limits);
}

TORCH_LIBRARY_IMPL(treessm, CUDA, m) {
  m.impl("cuda_tree_scan", &tree_scan_cuda);
  m.impl("cuda_tree_scan_backward", &tree_scan_backward_cuda);
}

TORCH_LIBRARY_IMPL(treessm, Autograd, m) { m.impl("cuda_tree_scan", &tree_scan_autograd); }

}  // namespace treessm_cuda
