// Host emulation of Borůvka's selection kernel (boruvka_kernels.cuh): one std::thread per
// CUDA thread, blocks in turn, the grid-stride loop as launched by boruvka.cu.
// usage: boruvka_harness IN OUT
// IN: int64 N, E, sentinel, blocks, threads; then edge_index [2, E], key [E], comp [N].
// OUT: best [N] (int64).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "boruvka_kernels.cuh"
using namespace treessm_cuda;

int main(int argc, char** argv) {
  FILE* f = std::fopen(argv[1], "rb");
  const auto hdr = read<int64_t>(f, 5);
  const int64_t N = hdr[0], E = hdr[1], sentinel = hdr[2];
  const unsigned blocks = static_cast<unsigned>(hdr[3]);
  const int threads = static_cast<int>(hdr[4]);
  auto edge_index = read<int64_t>(f, 2 * E), key = read<int64_t>(f, E), comp = read<int64_t>(f, N);
  std::fclose(f);
  std::vector<long long> best(N, static_cast<long long>(sentinel));
  gridDim.x = blocks;
  for (unsigned b = 0; b < blocks; ++b)
    emu_run_block(b, 0, threads, [] {}, [&] {
      boruvka::lightest_edges_kernel(edge_index.data(), key.data(), comp.data(), best.data(), E);
    });
  FILE* o = std::fopen(argv[2], "wb");
  std::fwrite(best.data(), 8, N, o);
  std::fclose(o);
  return 0;
}
