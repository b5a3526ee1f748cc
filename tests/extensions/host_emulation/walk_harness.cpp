// Host emulation of the fused selective walk (walk_kernels.cuh), "down" or "up", in double
// or float with P lanes per channel: the forward of a training step (keeping the backward's
// checkpoints), then the backward walk from them (or, where header word 12 says so, the
// chain kernel's backward), with the partial sums added as the host side adds them (in
// double); and the checkpoints of a walk of their own (as the backward writes them when the
// forward kept none), compared with the kept ones (the last output value: 1 where equal).
// Inputs and outputs are double. usage: walk_harness IN OUT
#include <cstdio>
#include <cstdlib>
#include <vector>
namespace treessm_cuda::walk { alignas(16) unsigned char smem_raw_storage[1 << 20]; }
#include <math.h>
#include "walk_kernels.cuh"
using namespace treessm_cuda;
using namespace treessm_cuda::walk;

template <typename F>
void launch(unsigned gx, unsigned gy, F body, int threads = kThreads) {
  gridDim.x = gx;
  gridDim.y = gy;
  for (unsigned bx = 0; bx < gx; ++bx)
    for (unsigned by = 0; by < gy; ++by)
      emu_run_block(bx, by, threads, [] {
        std::memset(smem_raw_storage, 0xff, sizeof(smem_raw_storage));  // poison
      }, body);
}

template <typename T>
void put(const std::vector<T>& v, int64_t n, FILE* o) {
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(v[i]);
    fwrite(&x, 8, 1, o);
  }
}

// header: N, D, S, T, K, slots, rule, has_h0, has_gs, rows, up, log2 lanes
template <typename T, int L>
void run(FILE* in, FILE* o, const std::vector<int64_t>& h) {
  const int64_t N = h[0], D = h[1], Sr = h[2], T_ = h[3], K = h[4], slots = h[5];
  const int rule = static_cast<int>(h[6]);
  const bool has_h0 = h[7], has_gs = h[8];
  const unsigned rows = static_cast<unsigned>(h[9]);
  const bool up = h[10] != 0;
  const int log2p = static_cast<int>(h[11]);
  const bool chains = h[12] != 0;  // the chain kernel's backward ("down" only)
  auto u = read_as<T>(in, N * D), dx = read_as<T>(in, N * D), de = read_as<T>(in, N * D);
  auto A = read_as<T>(in, D * Sr), B = read_as<T>(in, N * Sr), C = read_as<T>(in, N * Sr);
  auto h0 = read_as<T>(in, T_ * D * Sr), gy = read_as<T>(in, N * D);
  auto gs = read_as<T>(in, K * D * Sr);
  auto rec = read<int>(in, N * 4), tree_ptr = read<int>(in, T_ + 1);
  auto srow = read<int64_t>(in, N), snext = read<int64_t>(in, K);
  const int64_t channels = kThreads >> log2p;  // selective_walk.cu: grid_of
  const unsigned gx = static_cast<unsigned>((D + channels - 1) / channels);
  const unsigned cgx = static_cast<unsigned>((D + kChainWarps - 1) / kChainWarps);  // chains
  const int64_t blocks = chains ? cgx : gx;  // rows of the partial sums of dL/dB and dL/dC
  Args<T> a{};
  a.u = u.data(); a.dx = dx.data(); a.de = rule == kGiven ? de.data() : nullptr;
  a.A = A.data(); a.B = B.data(); a.C = C.data(); a.h0 = has_h0 ? h0.data() : nullptr;
  a.rec = reinterpret_cast<const int4*>(rec.data()); a.tree_ptr = tree_ptr.data();
  a.srow = srow.data(); a.snext = snext.data();
  a.n = static_cast<int>(N); a.d = static_cast<int>(D); a.s = static_cast<int>(Sr);
  a.num_trees = static_cast<int>(T_); a.rule = rule; a.log2_lanes = log2p;
  a.deferred = deferred_sums(rule, log2p);
  std::vector<T> y(N * D, -777), states(K * D * Sr, 0), ckpt(slots * D * Sr + 1, -555);
  std::vector<T> own(ckpt);
  auto walk = [&] {
    launch(gx, rows, [&] {
      if (up) up_forward_kernel<T, L>(a);
      else down_forward_kernel<T, L>(a);
    });
  };
  // the forward of a training step, keeping the backward's checkpoints
  a.y = y.data(); a.states = K ? states.data() : nullptr; a.ckpt = ckpt.data();
  walk();
  put(y, N * D, o);
  put(states, K * D * Sr, o);
  // the checkpoints from a walk of their own (a forward that kept none): the same bits
  a.y = nullptr; a.states = nullptr; a.ckpt = own.data();
  walk();
  const double same = own == ckpt ? 1.0 : 0.0;
  // backward, from the forward's checkpoints
  a.ckpt = ckpt.data();
  std::vector<T> gu(N * D, 0), gdx(N * D, 0), gde(N * D, 0), gh0(T_ * D * Sr, 0);
  std::vector<T> gA(rows * D * Sr, -444), gB(blocks * N * Sr, -444), gC(blocks * N * Sr, -444);
  a.gy = gy.data(); a.gstates = has_gs ? gs.data() : nullptr;
  a.gu = gu.data(); a.gdx = gdx.data(); a.gde = rule == kGiven ? gde.data() : nullptr;
  a.gA = gA.data(); a.gB = gB.data(); a.gC = gC.data(); a.gh0 = has_h0 ? gh0.data() : nullptr;
  if (chains)
    launch(cgx, rows, [&] { chain_backward_kernel<T>(a); }, kChainWarps * 32);
  else
    launch(gx, rows, [&] {
      if (up) up_backward_kernel<T, L>(a);
      else down_backward_kernel<T, L>(a);
    });
  auto sum_rows = [](const std::vector<T>& p, int64_t r, int64_t m) {
    std::vector<double> out(m, 0.0);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < m; ++j) out[j] += p[i * m + j];
    return out;
  };
  for (auto* v : {&gu, &gdx, &gde}) put(*v, N * D, o);
  auto tA = sum_rows(gA, rows, D * Sr), tB = sum_rows(gB, blocks, N * Sr),
       tC = sum_rows(gC, blocks, N * Sr);
  put(tA, D * Sr, o);
  put(tB, N * Sr, o);
  put(tC, N * Sr, o);
  put(gh0, T_ * D * Sr, o);
  fwrite(&same, 8, 1, o);
}

template <typename T>
void run_lanes(FILE* in, FILE* o, int64_t lane_states, const std::vector<int64_t>& h) {
  if (lane_states == 1) run<T, 1>(in, o, h);
  else if (lane_states == 2) run<T, 2>(in, o, h);
  else if (lane_states == 4) run<T, 4>(in, o, h);
  else if (lane_states == 8) run<T, 8>(in, o, h);
  else run<T, 16>(in, o, h);
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  FILE* o = std::fopen(argv[2], "wb");
  // the states a lane holds, the element type (0 double, 1 float), then the problem
  auto head = read<int64_t>(in, 2);
  auto h = read<int64_t>(in, 13);
  if (head[1] == 1) run_lanes<float>(in, o, head[0], h);
  else run_lanes<double>(in, o, head[0], h);
  std::fclose(o);
  return 0;
}
