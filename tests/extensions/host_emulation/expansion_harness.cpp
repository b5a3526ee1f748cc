// Host emulation of the expanded selective scan's kernels (expansion_kernels.cuh) for one
// block of channels: expand, readout (with moments), readout_backward and expand_backward,
// launched as expansion.cu launches them (row blocks a fixed function of N), shared memory
// poisoned, the outputs poisoned where a kernel must write them, the blocks' partial sums
// added in order as the host adds them. Inputs and outputs are double; the kernels run in
// double or float. usage: expansion_harness IN OUT
#include <cstdio>
#include <cstdlib>
#include <vector>
namespace treessm_cuda::expansion { alignas(16) unsigned char smem_raw_storage[1 << 16]; }
#include <math.h>
#include "expansion_kernels.cuh"
#include "rows_harness.h"
using namespace treessm_cuda;
using namespace treessm_cuda::expansion;

template <typename F>
void launch(unsigned blocks, int threads, F body) {
  launch_poisoned(blocks, threads, smem_raw_storage, sizeof(smem_raw_storage), body);
}

// header: N, D, S, c0, W, has_g, moments, accumulate, expand blocks, two parts (h + h2 and
// gx + gx2 for the read-out's and the expansion's backwards)
template <typename T>
void run(FILE* in, FILE* o, const std::vector<int64_t>& hd) {
  const int64_t N = hd[0], D = hd[1], S = hd[2], c0 = hd[3], W = hd[4];
  const bool has_g = hd[5], moments = hd[6], accumulate = hd[7];
  const unsigned expand_blocks = static_cast<unsigned>(hd[8]);
  const bool two = hd[9];
  const int64_t K = W * S;
  auto u = read_as<T>(in, N * D), dx = read_as<T>(in, N * D), de = read_as<T>(in, N * D);
  auto A = read_as<T>(in, D * S), B = read_as<T>(in, N * S), C = read_as<T>(in, N * S);
  auto g = read_as<T>(in, W * S), h = read_as<T>(in, N * K), gy1 = read_as<T>(in, N * D);
  auto share_mean = read_as<T>(in, N), share_m2 = read_as<T>(in, N), mu = read_as<T>(in, N);
  auto gx = read_as<T>(in, N * K), gw = read_as<T>(in, N * K);
  auto gC = read_as<T>(in, N * S), gB = read_as<T>(in, N * S);
  auto y1 = read_as<T>(in, N * D);  // the columns outside the block must stay as they are
  auto h2 = read_as<T>(in, N * K), gx2 = read_as<T>(in, N * K);
  const T* h2p = two ? h2.data() : nullptr;
  const T* gx2p = two ? gx2.data() : nullptr;
  Args<T> a{};
  a.u = u.data(); a.dx = dx.data(); a.de = de.data(); a.a = A.data(); a.b = B.data();
  a.c = C.data(); a.g = has_g ? g.data() : nullptr;
  a.n = N; a.d = static_cast<int>(D); a.s = static_cast<int>(S);
  a.c0 = static_cast<int>(c0); a.w = static_cast<int>(W);
  const unsigned rows = static_cast<unsigned>(row_blocks(N));
  // expand
  std::vector<T> x(N * K, -777), w(N * K, -777);
  launch(expand_blocks, kThreads, [&] { expand_kernel<T>(a, x.data(), w.data()); });
  put(x, o);
  put(w, o);
  // readout
  std::vector<T> mean(N, -777), m2(N, -777);
  launch(rows, kThreads, [&] {
    readout_kernel<T>(a, h.data(), h2p, y1.data(), moments ? mean.data() : nullptr,
                      moments ? m2.data() : nullptr);
  });
  put(y1, o);
  put(mean, o);
  put(m2, o);
  // readout backward
  std::vector<T> gh(N * K, -777), gg_part(rows * K, -777);
  launch(rows, kThreads, [&] {
    readout_backward_kernel<T>(a, gy1.data(), moments ? share_mean.data() : nullptr,
                               moments ? share_m2.data() : nullptr,
                               moments ? mu.data() : nullptr, h.data(), h2p, gh.data(),
                               gC.data(),
                               accumulate, has_g ? gg_part.data() : nullptr);
  });
  put(gh, o);
  put(gC, o);
  put(has_g ? sum_rows(gg_part, rows, K) : std::vector<T>(K, 0), o);
  // expand backward
  std::vector<T> gu(N * D, -777), gdx(N * D, -777), ge(N * D, -777), ga_part(rows * K, -777);
  launch(rows, kThreads, [&] {
    expand_backward_kernel<T>(a, gx.data(), gx2p, gw.data(), gu.data(), gdx.data(), ge.data(),
                              gB.data(), accumulate, ga_part.data());
  });
  put(gu, o);
  put(gdx, o);
  put(ge, o);
  put(gB, o);
  put(sum_rows(ga_part, rows, K), o);
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  FILE* o = std::fopen(argv[2], "wb");
  auto head = read<int64_t>(in, 1);  // the element type: 0 double, 1 float
  auto hd = read<int64_t>(in, 10);
  if (head[0] == 1) run<float>(in, o, hd);
  else run<double>(in, o, hd);
  std::fclose(o);
  return 0;
}
