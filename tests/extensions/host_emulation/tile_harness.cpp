// Host emulation of the tiled tree-scan kernels (tile_kernels.cuh): one std::thread per CUDA
// thread, blocks in turn, the three phases launched as tile_scan.cu launches them, on
// double data. Shared memory and scratch are poisoned (NaN bytes / -999) before use.
// usage: tile_harness IN OUT S THREADS
//   IN: int64 header N, C, M, L, tile, then x and w (double [N, C], by vertex), then the
//   plan's int32 tensors in TilePlan order; OUT: h of down, then h of up (double [N, C]).
//   S: channels of a block (1, 2 or 4); THREADS: threads of a tile block.
#include <cstdio>
#include <cstdlib>
#include <vector>
namespace treessm_cuda { alignas(16) unsigned char smem_raw_storage[1 << 21]; }
#include "tile_kernels.cuh"
using namespace treessm_cuda;

template <typename F>
void launch(unsigned gx, unsigned gy, int threads, F body) {
  for (unsigned bx = 0; bx < gx; ++bx)
    for (unsigned by = 0; by < gy; ++by)
      emu_run_block(bx, by, threads, [] {
        std::memset(smem_raw_storage, 0xff, sizeof(smem_raw_storage));  // poison: NaN
      }, body);
}

template <int S, bool UP>
void run(TileArgs a, int threads, int64_t N) {
  const int64_t rows = (N > 0 ? N : 1) * a.C;
  std::vector<double> sa(rows, -999.0), sb(rows, -999.0), se(rows, -999.0), ss(rows, -999.0);
  a.sa = sa.data();
  a.sb = sb.data();
  a.se = se.data();
  a.ss = ss.data();
  if (tile_smem_bytes<double, S>(a.tile, threads) > static_cast<int64_t>(sizeof(smem_raw_storage))) {
    std::fprintf(stderr, "shared memory too small\n");
    std::exit(3);
  }
  const unsigned slices = static_cast<unsigned>((a.C + S - 1) / S);
  if (a.M == 0 || a.C == 0) return;
  launch(a.M, slices, threads, [&] { tile_phase1_kernel<double, double, S, UP>(a); });
  launch(static_cast<unsigned>(a.C), 1, 32, [&] { tile_phase2_kernel<double, double, UP>(a); });
  launch(a.M, slices, threads, [&] { tile_phase3_kernel<double, double, S, UP>(a); });
}

template <int S>
void run_both(TileArgs a, int threads, int64_t N, FILE* o) {
  std::vector<double> h(N * a.C, -777.0);
  a.h = h.data();
  run<S, false>(a, threads, N);
  if (N * a.C > 0) std::fwrite(h.data(), 8, N * a.C, o);
  std::fill(h.begin(), h.end(), -777.0);
  run<S, true>(a, threads, N);
  if (N * a.C > 0) std::fwrite(h.data(), 8, N * a.C, o);
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: tile_harness IN OUT S THREADS\n");
    return 2;
  }
  FILE* f = std::fopen(argv[1], "rb");
  const auto hdr = read<int64_t>(f, 6);
  const int64_t N = hdr[0], C = hdr[1], M = hdr[2], L = hdr[3], tile = hdr[4], T = hdr[5];
  auto x = read<double>(f, N * C), w = read<double>(f, N * C);
  auto ri = [&](int64_t n) { return read<int>(f, n); };
  auto vertex = ri(N), parent = ri(N), size = ri(N), light_depth = ri(N), flags = ri(N),
       top = ri(N), tree_ptr = ri(T + 1), tile_ptr = ri(M + 1), scan = ri(N),
       level_ptr = ri(M * (L + 1)), tile_levels = ri(M), boundary = ri(N), boundary_pos = ri(N),
       feeder = ri(N), boundary_level_ptr = ri(M + 1), tile_boundary = ri(2 * M), entries = ri(N),
       entry_ptr = ri(N + 1);
  std::fclose(f);
  TileArgs a{};
  a.x = x.data();
  a.w = w.data();
  a.C = C;
  a.N = static_cast<int>(N);
  a.M = static_cast<int>(M);
  a.L = static_cast<int>(L);
  a.tile = static_cast<int>(tile);
  a.vertex = vertex.data();
  a.parent = parent.data();
  a.size = size.data();
  a.flags = flags.data();
  a.top = top.data();
  a.tile_ptr = tile_ptr.data();
  a.scan = scan.data();
  a.level_ptr = level_ptr.data();
  a.tile_levels = tile_levels.data();
  a.boundary = boundary.data();
  a.boundary_pos = boundary_pos.data();
  a.feeder = feeder.data();
  a.boundary_level_ptr = boundary_level_ptr.data();
  a.tile_boundary = tile_boundary.data();
  a.entries = entries.data();
  a.entry_ptr = entry_ptr.data();
  const int S = std::atoi(argv[3]), threads = std::atoi(argv[4]);
  FILE* o = std::fopen(argv[2], "wb");
  if (S == 4) run_both<4>(a, threads, N, o);
  else if (S == 2) run_both<2>(a, threads, N, o);
  else run_both<1>(a, threads, N, o);
  std::fclose(o);
  return 0;
}
