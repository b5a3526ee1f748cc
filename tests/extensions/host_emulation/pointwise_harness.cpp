// Host emulation of the layers' row-wise kernels (pointwise_kernels.cuh): the mixing's
// forward (elementwise, grid-stride) and backward, the gate's forward and backward, launched
// as pointwise.cu launches the row kernels (row blocks a fixed function of N), shared memory
// poisoned, the outputs poisoned, the blocks' partial sums added in order as the host adds
// them. Inputs and outputs are double; the kernels run in double or float.
// usage: pointwise_harness IN OUT
#include <cstdio>
#include <cstdlib>
#include <vector>
namespace treessm_cuda::pointwise { alignas(16) unsigned char smem_raw_storage[1 << 16]; }
#include <math.h>
#include "pointwise_kernels.cuh"
#include "rows_harness.h"
using namespace treessm_cuda;
using namespace treessm_cuda::pointwise;

template <typename F>
void launch(unsigned blocks, int threads, F body) {
  launch_poisoned(blocks, threads, smem_raw_storage, sizeof(smem_raw_storage), body);
}

// header: N, C, eps (as 1e-9 units), blocks of the elementwise kernel
template <typename T>
void run(FILE* in, FILE* o, const std::vector<int64_t>& hd) {
  const int64_t N = hd[0], C = hd[1];
  const T eps = static_cast<T>(hd[2] * 1e-9);
  const unsigned element_blocks = static_cast<unsigned>(hd[3]);
  auto u = read_as<T>(in, N * C), m = read_as<T>(in, N * C), g = read_as<T>(in, N * C);
  auto a = read_as<T>(in, C), b = read_as<T>(in, C);
  const int c = static_cast<int>(C);
  const unsigned rows = static_cast<unsigned>(row_blocks(N));
  std::vector<T> out(N * C, -777);
  launch(element_blocks, kElementThreads,
         [&] { silu_mix_kernel<T>(u.data(), m.data(), a.data(), b.data(), out.data(), N, c); });
  put(out, o);
  std::vector<T> gu(N * C, -777), gm(N * C, -777), part(rows * 2 * C, -777);
  launch(rows, kThreads, [&] {
    silu_mix_backward_kernel<T>(g.data(), u.data(), m.data(), a.data(), b.data(), gu.data(),
                                gm.data(), part.data(), N, c);
  });
  put(gu, o);
  put(gm, o);
  put(sum_rows(part, rows, 2 * C), o);
  std::vector<T> gate(N * C, -777);
  launch(rows, kThreads, [&] {
    norm_gate_kernel<T>(u.data(), m.data(), a.data(), b.data(), eps, gate.data(), N, c);
  });
  put(gate, o);
  std::vector<T> gy(N * C, -777), gz(N * C, -777);
  std::fill(part.begin(), part.end(), T(-777));
  launch(rows, kThreads, [&] {
    norm_gate_backward_kernel<T>(g.data(), u.data(), m.data(), a.data(), b.data(), eps,
                                 gy.data(), gz.data(), part.data(), N, c);
  });
  put(gy, o);
  put(gz, o);
  put(sum_rows(part, rows, 2 * C), o);
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  FILE* in = std::fopen(argv[1], "rb");
  FILE* o = std::fopen(argv[2], "wb");
  auto head = read<int64_t>(in, 1);  // the element type: 0 double, 1 float
  auto hd = read<int64_t>(in, 4);
  if (head[0] == 1) run<float>(in, o, hd);
  else run<double>(in, o, hd);
  std::fclose(o);
  return 0;
}
