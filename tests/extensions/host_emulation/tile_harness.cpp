// Host emulation of the tiled tree-scan kernels (tile_kernels.cuh): one std::thread per CUDA
// thread, blocks in turn, the launches of each phase as tile_scan.cu makes them. Shared
// memory and scratch are poisoned (NaN bytes / -999) before use.
// usage: tile_harness IN OUT THREADS GROUPS_PER_BLOCK [OPTIONS]
//   IN: int64 header N, C, M, L, tile, T, then x, w and g (double [N, C], by vertex), then
//   the plan's int32 tensors in TilePlan order; OUT (double [N, C] each): h of down, h of
//   up, then the backward of down at g (grad_x, grad_w), then that of up; then h of both
//   and its backward at g (grad_x, grad_w), composed as tile_scan.cu composes them.
//   THREADS: threads of every block (a multiple of 32); GROUPS_PER_BLOCK: channel groups of
//   32 a tile block takes. OPTIONS, letters: f: only the three h (the gradients' rows are
//   left at -777); g: the tile tree's sums in global memory, not shared; s: float data with
//   double accumulators (h rounded to float, a scratch `store` beside it; x, w and g are
//   rounded to float first, `both` runs in the accumulators as tile_scan.cu runs it).
// Kernels without barriers (one warp per item, or one thread per row) run their threads in
// turn.
#include <cmath>
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
  if (smem > static_cast<int64_t>(sizeof(smem_raw_storage))) {
    std::fprintf(stderr, "shared memory too small\n");
    std::exit(3);
  }
  for (unsigned bx = 0; bx < gx; ++bx)
    for (unsigned by = 0; by < gy; ++by)
      emu_run_block(bx, by, threads, [smem] { std::memset(smem_raw_storage, 0xff, smem); }, body);
}

// A launch of a kernel without shared memory or barriers: blocks and threads in turn.
template <typename F>
void launch_serial(int64_t blocks, int threads, F body) {
  blockDim.x = threads;
  for (int64_t b = 0; b < blocks; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    blockIdx.y = 0;
    for (int t = 0; t < threads; ++t) {
      threadIdx.x = t;
      body();
    }
  }
}

struct Options {
  int threads = 32;
  int gpb = 1;
  bool backward = true, tree_in_smem = true;
};

// h = the scan of x along the plan (`a` holds the plan and x, w, h), as tile_scan.cu's
// tile_scan_into and run_tiles launch it; kScaled: a down scan of w x (both's brackets).
template <typename T, typename A, bool kScaled = false>
void scan(TileArgs a, bool up, const Options& o) {
  const int64_t N = a.N, M = a.M;
  if (N == 0 || a.C == 0 || M == 0) return;
  const int64_t rows = N * a.C;
  std::vector<A> sa(rows, A(-999)), sb(rows, A(-999)), tv(M * a.C, A(-999)),
      tmu(M * a.C, A(-999)), store;
  std::vector<int> tparent(M, -999), etile(N, -999);
  a.sa = sa.data();
  a.sb = sb.data();
  a.tv = tv.data();
  a.tmu = tmu.data();
  a.tparent = tparent.data();
  a.etile = etile.data();
  if constexpr (std::is_same<T, A>::value) {
    a.store = a.h;
  } else {
    store.assign(rows, A(NAN));
    a.store = store.data();
  }
  a.groups = static_cast<int>((a.C + kTileLanes - 1) / kTileLanes);
  a.groups_per_block = o.gpb < a.groups ? o.gpb : a.groups;
  const unsigned slices = static_cast<unsigned>((a.groups + a.groups_per_block - 1) / a.groups_per_block);
  const int warps = o.threads / kTileLanes;
  const int64_t tile_smem = tile_smem_bytes<A>(a.tile, warps);
  const int64_t path_smem = path_smem_bytes<A>(warps);
  const int64_t warp_blocks = (M * a.groups + warps - 1) / warps;
  const unsigned m = static_cast<unsigned>(M);
  if (!up) {
    launch(m, slices, o.threads, path_smem, [&] { tile_down_paths_kernel<T, A, kScaled>(a); });
    launch_serial(warp_blocks, o.threads, [&] { tile_down_feed_kernel<A>(a); });
    launch(m, slices, o.threads, tile_smem, [&] { tile_down_levels_kernel<T, A, kScaled>(a); });
    return;
  }
  launch(m, slices, o.threads, tile_smem, [&] { tile_up_levels_kernel<T, A>(a); });
  // the gathers stride over the boundary vertices from a grid of three blocks
  gridDim.x = 3;
  launch_serial(3, o.threads, [&] { tile_up_gather_kernel<T, A>(a); });
  launch_serial(warp_blocks, o.threads, [&] { tile_up_tiles_kernel<T, A>(a); });
  const bool in_smem = o.tree_in_smem;
  launch(static_cast<unsigned>(a.groups), 1, o.threads, in_smem ? tile_tree_smem_bytes<A>(a.M) : 0,
         [&] { tile_up_tree_kernel<A>(a, in_smem); });
  launch(m, slices, o.threads, path_smem, [&] { tile_up_paths_kernel<T, A>(a); });
}

template <typename T>
std::vector<double> widen(const std::vector<T>& v) {
  return std::vector<double>(v.begin(), v.end());
}

template <typename T, typename A>
void run_all(TileArgs a, const std::vector<T>& x, const std::vector<T>& g, const Options& o,
             FILE* out) {
  const int64_t n = static_cast<int64_t>(a.N) * a.C;
  std::vector<T> hd(n, T(-777)), hu(n, T(-777)), gx(n, T(-777)), gw(n, T(-777));
  auto dump = [&](const std::vector<T>& v) {
    if (n > 0) std::fwrite(widen(v).data(), 8, n, out);
  };
  a.x = x.data();
  a.h = hd.data();
  scan<T, A>(a, false, o);
  a.h = hu.data();
  scan<T, A>(a, true, o);
  dump(hd);
  dump(hu);
  // backward: the other direction's scan of g, then the weights' gradient rows
  for (const bool up : {false, true}) {
    std::fill(gx.begin(), gx.end(), T(-777));
    std::fill(gw.begin(), gw.end(), T(-777));
    if (o.backward) {
      TileArgs b = a;
      b.x = g.data();
      b.h = gx.data();
      scan<T, A>(b, !up, o);
      const T* h = up ? hu.data() : hd.data();
      launch_serial((n + 255) / 256, 256, [&] {
        tile_grad_weight_kernel<T, A>(gx.data(), h, gw.data(), a.vertex, a.parent, a.N, a.C, up);
      });
    }
    dump(gx);
    dump(gw);
  }
}

// both(x) as tile_scan.cu runs it, in the accumulation type: up, the brackets, down of
// w inner; h = up + out.
struct BothParts {
  std::vector<double> up, inner, out, h;
};

BothParts run_both(TileArgs a, const std::vector<double>& x, const std::vector<double>& w,
                   const std::vector<int>& prev, const Options& o) {
  const int64_t n = static_cast<int64_t>(a.N) * a.C;
  BothParts r{std::vector<double>(n, -777.0), std::vector<double>(n, -777.0),
              std::vector<double>(n, -777.0), std::vector<double>(n, -777.0)};
  a.x = x.data();
  a.w = w.data();
  a.h = r.up.data();
  scan<double, double>(a, true, o);
  launch_serial((n + 255) / 256, 256, [&] {
    tile_bracket_kernel<double>(x.data(), w.data(), r.up.data(), r.inner.data(), a.vertex,
                                a.parent, a.size, prev.data(), a.N, a.C);
  });
  a.x = r.inner.data();
  a.h = r.out.data();
  scan<double, double, true>(a, false, o);
  for (int64_t i = 0; i < n; ++i) r.h[i] = r.up[i] + r.out[i];
  return r;
}

// h of both in the data type T (rounded from the accumulators), its backward at g.
template <typename T>
void both_all(TileArgs a, const std::vector<T>& x, const std::vector<T>& w,
              const std::vector<T>& g, const Options& o, FILE* out) {
  const int64_t n = static_cast<int64_t>(a.N) * a.C;
  auto dump = [&](const std::vector<double>& v) {
    std::vector<double> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<double>(static_cast<T>(v[i]));
    if (n > 0) std::fwrite(r.data(), 8, n, out);
  };
  std::vector<int> prev(a.N > 0 ? a.N : 1, 0x3fffffff);  // poison: an index far out of range
  launch_serial((a.N + 255) / 256, 256, [&] {
    tile_sibling_links_kernel(a.parent, a.size, prev.data(), a.N);
  });
  const std::vector<double> xa = widen(x), wa = widen(w), ga = widen(g);
  const BothParts px = run_both(a, xa, wa, prev, o);
  std::vector<double> gw(n, -777.0);
  if (!o.backward) {
    dump(px.h);
    dump(gw);
    dump(gw);
    return;
  }
  const BothParts pg = run_both(a, ga, wa, prev, o);
  launch_serial((n + 255) / 256, 256, [&] {
    tile_both_grad_weight_kernel<double, double>(px.up.data(), px.inner.data(), px.out.data(),
                                                 pg.up.data(), pg.inner.data(), pg.out.data(),
                                                 gw.data(), a.vertex, a.parent, a.N, a.C);
  });
  dump(px.h);
  dump(pg.h);
  dump(gw);
}

template <typename T>
std::vector<T> narrow(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T, typename A>
void run_types(TileArgs a, const std::vector<double>& x, const std::vector<double>& w,
               const std::vector<double>& g, const Options& o, FILE* out) {
  const std::vector<T> xt = narrow<T>(x), wt = narrow<T>(w), gt = narrow<T>(g);
  a.w = wt.data();
  run_all<T, A>(a, xt, gt, o, out);
  both_all<T>(a, xt, wt, gt, o, out);
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: tile_harness IN OUT THREADS GROUPS_PER_BLOCK [OPTIONS]\n");
    return 2;
  }
  FILE* f = std::fopen(argv[1], "rb");
  const auto hdr = read<int64_t>(f, 6);
  const int64_t N = hdr[0], C = hdr[1], M = hdr[2], L = hdr[3], tile = hdr[4], T = hdr[5];
  auto x = read<double>(f, N * C), w = read<double>(f, N * C), g = read<double>(f, N * C);
  auto ri = [&](int64_t n) { return read<int>(f, n); };
  auto vertex = ri(N), parent = ri(N), size = ri(N), light_depth = ri(N), flags = ri(N),
       top = ri(N), tree_ptr = ri(T + 1), tile_ptr = ri(M + 1), scan_ = ri(N),
       level_ptr = ri(M * (L + 1)), tile_levels = ri(M), boundary = ri(N), boundary_pos = ri(N),
       feeder = ri(N), boundary_level_ptr = ri(M + 1), tile_boundary = ri(2 * M), entries = ri(N),
       entry_ptr = ri(N + 1), path = ri(N), path_ptr = ri(M + 1);
  std::fclose(f);
  TileArgs a{};
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
  a.scan = scan_.data();
  a.level_ptr = level_ptr.data();
  a.tile_levels = tile_levels.data();
  a.boundary = boundary.data();
  a.boundary_pos = boundary_pos.data();
  a.feeder = feeder.data();
  a.tile_boundary = tile_boundary.data();
  a.entries = entries.data();
  a.entry_ptr = entry_ptr.data();
  a.path = path.data();
  a.path_ptr = path_ptr.data();
  a.boundary_level_ptr = boundary_level_ptr.data();
  Options o;
  o.threads = std::atoi(argv[3]);
  o.gpb = std::atoi(argv[4]);
  const std::string opts = argc > 5 ? argv[5] : "";
  o.backward = opts.find('f') == std::string::npos;
  o.tree_in_smem = opts.find('g') == std::string::npos;
  if (o.threads < 32 || o.threads % 32 || o.gpb < 1) {
    std::fprintf(stderr, "THREADS must be a positive multiple of 32, GROUPS_PER_BLOCK positive\n");
    return 2;
  }
  FILE* out = std::fopen(argv[2], "wb");
  if (opts.find('s') != std::string::npos) run_types<float, double>(a, x, w, g, o, out);
  else run_types<double, double>(a, x, w, g, o, out);
  std::fclose(out);
  return 0;
}
