// Host emulation of the grid-tree kernels: one std::thread per CUDA thread, blocks in turn,
// __syncthreads as a std::barrier and warp shuffles through a per-warp barrier. Reads a
// problem written by tests/extensions, runs the three launches of grid_tree.cu and writes
// the eight output arrays (int64), each prefilled with a poison value.
// usage: grid_harness IN OUT
// IN: int64 B, H, W, connectivity, wide (0: float32 costs, 1: float64), threads per block,
//     solo width, threads of the scan block; then the B * E costs.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>
namespace treessm_cuda::grid { alignas(16) unsigned char smem_raw_storage[1 << 20]; }
#include "grid_tree_kernels.cuh"
using namespace treessm_cuda;

template <typename F>
void launch(unsigned blocks, int threads, F body) {
  if (threads % 32 != 0 || threads > 1024) {
    std::fprintf(stderr, "threads must be a multiple of 32, at most 1024\n");
    std::exit(2);
  }
  for (unsigned bx = 0; bx < blocks; ++bx)
    emu_run_block(bx, 0, threads, [] {
      std::memset(grid::smem_raw_storage, 0xff, sizeof(grid::smem_raw_storage));  // poison
    }, body);
}

template <typename T>
void run(FILE* f, int64_t B, int H, int W, int conn, int threads, int solo, int scan_threads,
         FILE* out) {
  const grid::Grid g(H, W, conn);
  const int64_t n = g.n, N = B * n;
  if (grid::smem_bytes(g.n, g.E) > sizeof(grid::smem_raw_storage)) {
    std::fprintf(stderr, "image too large for the emulated shared memory\n");
    std::exit(2);
  }
  std::vector<T> cost = read<T>(f, B * g.E);
  constexpr int64_t poison = -777;
  std::vector<int64_t> parent(N, poison), order(N, poison), child_ptr(N + 1, poison),
      tree_ptr(B + 1, poison), depth(N, poison), level_pos(N + 1, poison),
      tree_level_ptr(B + 1, poison), parent_pos(N, poison);
  std::vector<int> level_start(N, -5), level_count(B, -5);
  grid::TreeOut o{parent.data(), order.data(), child_ptr.data(), tree_ptr.data(),
                  depth.data(), parent_pos.data(), level_start.data(), level_count.data()};
  launch(static_cast<unsigned>(B), threads, [&] {
    grid::grid_tree_kernel<T>(cost.data(), H, W, conn, solo, B, o);
  });
  launch(1, scan_threads, [&] {
    grid::level_scan_kernel(level_count.data(), B, tree_level_ptr.data());
  });
  launch(static_cast<unsigned>(B), 32, [&] {
    grid::level_scatter_kernel(level_start.data(), level_count.data(), tree_level_ptr.data(),
                               g.n, B, level_pos.data());
  });
  for (auto* v : {&parent, &order, &child_ptr, &tree_ptr, &depth, &level_pos, &tree_level_ptr,
                  &parent_pos})
    std::fwrite(v->data(), sizeof(int64_t), v->size(), out);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: grid_harness IN OUT\n");
    return 2;
  }
  FILE* f = std::fopen(argv[1], "rb");
  if (f == nullptr) return 2;
  const std::vector<int64_t> h = read<int64_t>(f, 8);
  FILE* out = std::fopen(argv[2], "wb");
  if (out == nullptr) return 2;
  const int H = static_cast<int>(h[1]), W = static_cast<int>(h[2]), conn = static_cast<int>(h[3]);
  const int threads = static_cast<int>(h[5]), solo = static_cast<int>(h[6]);
  const int scan_threads = static_cast<int>(h[7]);
  if (h[4]) run<double>(f, h[0], H, W, conn, threads, solo, scan_threads, out);
  else run<float>(f, h[0], H, W, conn, threads, solo, scan_threads, out);
  std::fclose(f);
  std::fclose(out);
  return 0;
}
