// Host emulation of the Euler tours' pointer jumping (euler_tour_kernels.cuh): one
// std::thread per CUDA thread, blocks in turn, the rounds as euler_tour.cu launches them.
// usage: euler_harness IN OUT
// IN: int64 M, rounds, combine, blocks, threads; then succ [M], value [M]. OUT: value' [M].
#include <cstdio>
#include <vector>

#include "euler_tour_kernels.cuh"
using namespace treessm_cuda;

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  FILE* f = std::fopen(argv[1], "rb");
  const auto hdr = read<int64_t>(f, 5);
  const int64_t M = hdr[0], rounds = hdr[1];
  const int combine = static_cast<int>(hdr[2]);
  const unsigned blocks = static_cast<unsigned>(hdr[3]);
  const int threads = static_cast<int>(hdr[4]);
  auto succ = read<int64_t>(f, M), value = read<int64_t>(f, M);
  std::fclose(f);
  std::vector<int64_t> next_succ(M), next_value(M);
  gridDim.x = blocks;
  for (int64_t r = 0; r < rounds; ++r) {
    for (unsigned b = 0; b < blocks; ++b)
      emu_run_block(b, 0, threads, [] {}, [&] {
        euler::pointer_jump_kernel(succ.data(), value.data(), next_succ.data(),
                                   next_value.data(), M, combine);
      });
    succ.swap(next_succ);
    value.swap(next_value);
  }
  FILE* o = std::fopen(argv[2], "wb");
  if (M > 0) std::fwrite(value.data(), 8, M, o);
  std::fclose(o);
  return 0;
}
