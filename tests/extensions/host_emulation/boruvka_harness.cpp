// Host emulation of Borůvka's kernels (boruvka_kernels.cuh): one std::thread per CUDA
// thread, blocks in turn, the grid-stride loops and the rounds as boruvka.cu launches them.
// usage: boruvka_harness IN OUT           (the selection step of one round)
// IN: int64 N, E, sentinel, blocks, threads; then edge_index [2, E], key [E], comp [N].
// OUT: best [N] (int64).
// usage: boruvka_harness IN OUT forest    (all rounds: cuda_boruvka)
// IN: int64 N, E, sentinel, blocks, threads, rounds; then edge_index [2, E], key [E].
// OUT: chosen [E] (int64 0 or 1), comp [N] (int64), active [rounds + 1] (int64).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <vector>

#include "boruvka_kernels.cuh"
using namespace treessm_cuda;

template <typename F>
static void launch(unsigned blocks, int threads, F&& kernel) {
  gridDim.x = blocks;
  for (unsigned b = 0; b < blocks; ++b) emu_run_block(b, 0, threads, [] {}, kernel);
}

static int forest(const char* in, const char* out) {
  FILE* f = std::fopen(in, "rb");
  const auto hdr = read<int64_t>(f, 6);
  const int64_t N = hdr[0], E = hdr[1];
  const long long sentinel = hdr[2];
  const unsigned blocks = static_cast<unsigned>(hdr[3]);
  const int threads = static_cast<int>(hdr[4]);
  const int64_t rounds = hdr[5];
  auto edge_index = read<int64_t>(f, 2 * E), key = read<int64_t>(f, E);
  std::fclose(f);
  std::vector<long long> best(N, sentinel), hook(N, -1);
  std::vector<int64_t> comp(N);
  std::iota(comp.begin(), comp.end(), int64_t{0});
  std::unique_ptr<bool[]> chosen(new bool[E + 1]());
  std::vector<int> active(rounds + 1, 0);
  active[0] = 1;
  for (int64_t k = 0; k < rounds; ++k) {
    launch(blocks, threads, [&] {
      boruvka::lightest_edges_kernel(edge_index.data(), key.data(), comp.data(), best.data(),
                                     E, active.data() + k);
    });
    launch(blocks, threads, [&] {
      boruvka::hook_kernel(edge_index.data(), comp.data(), best.data(), hook.data(),
                           chosen.get(), N, E, sentinel, active.data() + k,
                           active.data() + k + 1);
    });
    launch(blocks, threads, [&] {
      boruvka::relabel_kernel(hook.data(), comp.data(), best.data(), N, sentinel,
                              active.data() + k + 1);
    });
  }
  FILE* o = std::fopen(out, "wb");
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = chosen[e] ? 1 : 0;
    std::fwrite(&c, 8, 1, o);
  }
  if (N > 0) std::fwrite(comp.data(), 8, N, o);
  for (int a : active) {
    const int64_t x = a;
    std::fwrite(&x, 8, 1, o);
  }
  std::fclose(o);
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 3 && std::strcmp(argv[3], "forest") == 0) return forest(argv[1], argv[2]);
  FILE* f = std::fopen(argv[1], "rb");
  const auto hdr = read<int64_t>(f, 5);
  const int64_t N = hdr[0], E = hdr[1], sentinel = hdr[2];
  const unsigned blocks = static_cast<unsigned>(hdr[3]);
  const int threads = static_cast<int>(hdr[4]);
  auto edge_index = read<int64_t>(f, 2 * E), key = read<int64_t>(f, E), comp = read<int64_t>(f, N);
  std::fclose(f);
  std::vector<long long> best(N, static_cast<long long>(sentinel));
  const int active = 1;
  launch(blocks, threads, [&] {
    boruvka::lightest_edges_kernel(edge_index.data(), key.data(), comp.data(), best.data(), E,
                                   &active);
  });
  FILE* o = std::fopen(argv[2], "wb");
  std::fwrite(best.data(), 8, N, o);
  std::fclose(o);
  return 0;
}
