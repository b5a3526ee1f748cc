// Host emulation of Borůvka's kernels (boruvka_kernels.cuh): one std::thread per CUDA
// thread, blocks in turn, the grid-stride loops as launched by boruvka.cu.
// usage: boruvka_harness IN OUT           (the selection step)
// IN: int64 N, E, sentinel, blocks, threads; then edge_index [2, E], key [E], comp [N].
// OUT: best [N] (int64).
// usage: boruvka_harness IN OUT roots     (the roots of a forest of parent pointers)
// IN: int64 N, blocks, threads; then parent [N]. OUT: roots [N] (int64).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "boruvka_kernels.cuh"
using namespace treessm_cuda;

static int find_roots(const char* in, const char* out) {
  FILE* f = std::fopen(in, "rb");
  const auto hdr = read<int64_t>(f, 3);
  const int64_t N = hdr[0];
  const unsigned blocks = static_cast<unsigned>(hdr[1]);
  const int threads = static_cast<int>(hdr[2]);
  auto parent = read<int64_t>(f, N);
  std::fclose(f);
  std::vector<long long> scratch(parent.begin(), parent.end()), roots(N, -1);
  gridDim.x = blocks;
  for (unsigned b = 0; b < blocks; ++b)
    emu_run_block(b, 0, threads, [] {}, [&] {
      boruvka::find_roots_kernel(scratch.data(), roots.data(), N);
    });
  FILE* o = std::fopen(out, "wb");
  if (N > 0) std::fwrite(roots.data(), 8, N, o);
  std::fclose(o);
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 3 && std::strcmp(argv[3], "roots") == 0) return find_roots(argv[1], argv[2]);
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
