// Host emulation of the tiled tree-scan kernels (tile_kernels.cuh): one std::thread per CUDA
// thread, blocks in turn, the three phases launched as tile_scan.cu launches them, on
// double data. Shared memory and scratch are poisoned (NaN bytes / -999) before use.
// usage: tile_harness IN OUT S THREADS [forward]
//   IN: int64 header N, C, M, L, tile, T, then x, w and g (double [N, C], by vertex), then
//   the plan's int32 tensors in TilePlan order; OUT (double [N, C] each): h of down, h of
//   up, then the backward of down at g (grad_x, grad_w), then that of up; then h of both
//   and its backward at g (grad_x, grad_w), composed as tile_scan.cu composes them.
//   S: channels of a block (1, 2 or 4); THREADS: threads of a tile block; `forward`: only
//   the three h (the gradients' rows are left at -777).
// Kernels without shared memory or barriers (one thread per row) run their threads in turn.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
namespace treessm_cuda { alignas(16) unsigned char smem_raw_storage[1 << 18]; }
#include "tile_kernels.cuh"
using namespace treessm_cuda;

// Runs the grid's blocks in turn, the first `smem` bytes of shared memory poisoned (NaN).
template <typename F>
void launch(unsigned gx, unsigned gy, int threads, int64_t smem, F body) {
  for (unsigned bx = 0; bx < gx; ++bx)
    for (unsigned by = 0; by < gy; ++by)
      emu_run_block(bx, by, threads, [smem] { std::memset(smem_raw_storage, 0xff, smem); }, body);
}

// A launch of a kernel that uses neither shared memory nor barriers: threads in turn.
template <typename F>
void launch_serial(int64_t n, F body) {
  const int block = 256;
  blockDim.x = block;
  for (int64_t i = 0; i < n; i += block) {
    blockIdx.x = static_cast<unsigned>(i / block);
    for (int t = 0; t < block; ++t) {
      threadIdx.x = t;
      body();
    }
  }
}

template <int S, bool UP>
void run(TileArgs a, int threads, int64_t N) {
  const int64_t rows = (N > 0 ? N : 1) * a.C;
  std::vector<double> sa(rows, -999.0), sb(rows, -999.0), se(rows, -999.0), ss(rows, -999.0);
  a.sa = sa.data();
  a.sb = sb.data();
  a.se = se.data();
  a.ss = ss.data();
  const int64_t smem = tile_smem_bytes<double, S>(a.tile, threads);
  if (smem > static_cast<int64_t>(sizeof(smem_raw_storage))) {
    std::fprintf(stderr, "shared memory too small\n");
    std::exit(3);
  }
  const unsigned slices = static_cast<unsigned>((a.C + S - 1) / S);
  if (a.M == 0 || a.C == 0) return;
  launch(a.M, slices, threads, smem, [&] { tile_phase1_kernel<double, double, S, UP>(a); });
  launch(static_cast<unsigned>(a.C), 1, 32, 0, [&] { tile_phase2_kernel<double, double, UP>(a); });
  launch(a.M, slices, threads, smem, [&] { tile_phase3_kernel<double, double, S, UP>(a); });
}

template <int S>
void run_all(TileArgs a, const double* g, int threads, int64_t N, bool backward, FILE* o) {
  const int64_t n = N * a.C;
  std::vector<double> hd(n, -777.0), hu(n, -777.0), gx(n, -777.0), gw(n, -777.0);
  auto dump = [&](const std::vector<double>& v) {
    if (n > 0) std::fwrite(v.data(), 8, n, o);
  };
  a.h = hd.data();
  run<S, false>(a, threads, N);
  a.h = hu.data();
  run<S, true>(a, threads, N);
  dump(hd);
  dump(hu);
  // backward: the other direction's scan of g, then the weights' gradient rows
  TileArgs b = a;
  b.x = g;
  for (const bool up : {false, true}) {
    if (!backward) {
      std::fill(gx.begin(), gx.end(), -777.0);
      dump(gx);
      dump(gx);
      continue;
    }
    std::fill(gx.begin(), gx.end(), -777.0);
    std::fill(gw.begin(), gw.end(), -777.0);
    b.h = gx.data();
    if (up) run<S, false>(b, threads, N);
    else run<S, true>(b, threads, N);
    const double* h = up ? hu.data() : hd.data();
    launch_serial(n, [&] {
      tile_grad_weight_kernel<double, double>(gx.data(), h, gw.data(), a.vertex, a.parent, N,
                                              a.C, up);
    });
    dump(gx);
    dump(gw);
  }
}

// both(x) as tile_scan.cu runs it: up, the brackets, down of their inputs; h = up + out.
struct BothParts {
  std::vector<double> up, inner, out, h;
};

template <int S>
BothParts run_both(TileArgs a, const double* x, const std::vector<int>& prev, int threads,
                   int64_t N) {
  const int64_t n = N * a.C;
  BothParts r{std::vector<double>(n, -777.0), std::vector<double>(n, -777.0),
              std::vector<double>(n, -777.0), std::vector<double>(n, -777.0)};
  std::vector<double> b(n, -777.0);
  a.x = x;
  a.h = r.up.data();
  run<S, true>(a, threads, N);
  launch_serial(n, [&] {
    tile_bracket_kernel<double>(x, static_cast<const double*>(a.w), r.up.data(), r.inner.data(),
                                b.data(), a.vertex, a.parent, a.size, prev.data(), N, a.C);
  });
  a.x = b.data();
  a.h = r.out.data();
  run<S, false>(a, threads, N);
  for (int64_t i = 0; i < n; ++i) r.h[i] = r.up[i] + r.out[i];
  return r;
}

template <int S>
void both_all(TileArgs a, const double* g, int threads, int64_t N, bool backward, FILE* o) {
  const int64_t n = N * a.C;
  std::vector<int> prev(N > 0 ? N : 1, 0x3fffffff);  // poison: an index far out of range
  launch_serial(N, [&] {
    tile_sibling_links_kernel(a.parent, a.size, prev.data(), static_cast<int>(N));
  });
  const BothParts px = run_both<S>(a, static_cast<const double*>(a.x), prev, threads, N);
  std::vector<double> gw(n, -777.0);
  if (!backward) {
    if (n > 0) {
      std::fwrite(px.h.data(), 8, n, o);
      std::fwrite(gw.data(), 8, n, o);
      std::fwrite(gw.data(), 8, n, o);
    }
    return;
  }
  const BothParts pg = run_both<S>(a, g, prev, threads, N);
  launch_serial(n, [&] {
    tile_both_grad_weight_kernel<double, double>(px.up.data(), px.inner.data(), px.out.data(),
                                                 pg.up.data(), pg.inner.data(), pg.out.data(),
                                                 gw.data(), a.vertex, a.parent, N, a.C);
  });
  if (n > 0) {
    std::fwrite(px.h.data(), 8, n, o);
    std::fwrite(pg.h.data(), 8, n, o);
    std::fwrite(gw.data(), 8, n, o);
  }
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: tile_harness IN OUT S THREADS [forward]\n");
    return 2;
  }
  FILE* f = std::fopen(argv[1], "rb");
  const auto hdr = read<int64_t>(f, 6);
  const int64_t N = hdr[0], C = hdr[1], M = hdr[2], L = hdr[3], tile = hdr[4], T = hdr[5];
  auto x = read<double>(f, N * C), w = read<double>(f, N * C), g = read<double>(f, N * C);
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
  const bool backward = !(argc > 5 && std::string(argv[5]) == "forward");
  if (S == 4) {
    run_all<4>(a, g.data(), threads, N, backward, o);
    both_all<4>(a, g.data(), threads, N, backward, o);
  } else if (S == 2) {
    run_all<2>(a, g.data(), threads, N, backward, o);
    both_all<2>(a, g.data(), threads, N, backward, o);
  } else {
    run_all<1>(a, g.data(), threads, N, backward, o);
    both_all<1>(a, g.data(), threads, N, backward, o);
  }
  std::fclose(o);
  return 0;
}
