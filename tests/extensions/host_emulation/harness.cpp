// Host emulation of the tree-scan kernels: one std::thread per CUDA thread, blocks in turn,
// __syncthreads as a std::barrier. Reads a problem written by tests/extensions, runs the
// passes the CUDA backend launches for every direction (double, V = 2) and writes results.
// usage: harness IN OUT CAP RING COPIES           level kernels, R = RING staged positions
//        harness IN OUT RECCAP path COPIES [PARTS]  path kernels, RECCAP plan records in
//                                                shared memory; PARTS blocks per tree, one
//                                                launch per phase (RECCAP must then be 0)
// COPIES: "eager" or "deferred" (when cp.async copies land, see async_copy.h)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
namespace treessm_cuda { alignas(16) unsigned char smem_raw_storage[1 << 20]; }
#include "path_scan_kernels.cuh"
using namespace treessm_cuda;
template <typename F>
void launch(dim3 grid, int threads, F body) {
  for (unsigned bx = 0; bx < grid.x; ++bx)
    for (unsigned by = 0; by < grid.y; ++by)
      emu_run_block(bx, by, threads, [] {
        std::memset(treessm_cuda::smem_raw_storage, 0xff, sizeof(treessm_cuda::smem_raw_storage));  // poison
      }, body);
}
auto rd = [](FILE* f, int64_t n) { return read<double>(f, n); };
auto ri = [](FILE* f, int64_t n) { return read<int64_t>(f, n); };
int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: harness IN OUT CAP RING|path COPIES [PARTS]\n");
    return 2;
  }
  FILE* f = fopen(argv[1], "rb");
  const auto hdr = ri(f, 6);
  int64_t N = hdr[0], C = hdr[1], T = hdr[2], L = hdr[3];
  int lpv = (int)hdr[4], threads = (int)hdr[5];
  auto x = rd(f, N * C), w = rd(f, N * C), g = rd(f, N * C), h = rd(f, N * C);
  auto order = ri(f, N), child_ptr = ri(f, N + 1), level_pos = ri(f, L + 1), tlp = ri(f, T + 1),
       ppos = ri(f, N), parent_at_pos = ri(f, N);
  auto prec = read<int>(f, (N + 1) * 4), plight = read<int>(f, N), pptr = read<int>(f, N + 1),
       pphase = read<int>(f, T * (kMaxPhases + 1));
  fclose(f);
  const bool path = std::string(argv[4]) == "path";
  treessm_emu::eager_copies = std::string(argv[5]) == "eager";
  const int parts = argc > 6 ? atoi(argv[6]) : 1;
  const int cap = atoi(argv[3]);
  const int ring = path ? 0 : atoi(argv[4]);
  Plan plan{order.data(), child_ptr.data(), level_pos.data(), tlp.data(), ppos.data(), parent_at_pos.data()};
  const PathPlan pplan{reinterpret_cast<const PathRec*>(prec.data()), plight.data(), pptr.data(),
                       pphase.data()};
  int phases = 0;  // phases used by any tree (the host's num_phases)
  for (int64_t t = 0; t < T; ++t)
    for (int p = 0; p < kMaxPhases; ++p)
      if (pphase[t * (kMaxPhases + 1) + p + 1] > pphase[t * (kMaxPhases + 1) + p] && p + 1 > phases)
        phases = p + 1;
  constexpr int V = 2;
  int64_t groups = (C / V + lpv - 1) / lpv;
  dim3 grid; grid.x = path ? T * parts : T; grid.y = groups;
  std::vector<double> out(N * C, -777), gx(N * C, -777), gw(N * C, -777), U(N * C), G(N * C),
      s1(N * C, -999), s2(N * C, -999);
  FILE* o = fopen(argv[2], "wb");
  auto dump = [&](std::vector<double>& v) { fwrite(v.data(), 8, N * C, o); };
  auto run = [&](auto mode, const double* in0, const double* in1, const double* hh, double* up0,
                 double* up1, double* outp, double* gwp) {
    constexpr int M = decltype(mode)::value;
    const ScanIO io{in0, in1, w.data(), hh, up0, up1, outp, gwp, s1.data(), s2.data()};
    if (path) {
      PathArgs a{io, pplan, C, lpv, cap, parts, 0, kMaxPhases};
      if (parts == 1) {
        launch(grid, threads, [&] { path_scan_kernel<double, double, V, M>(a); });
        return;
      }
      for (int q = 0; q < phases; ++q) {  // one launch per phase, in the pass's order
        const int p = StagedTraits<M>::UP ? phases - 1 - q : q;
        a.phase_lo = p;
        a.phase_hi = p + 1;
        launch(grid, threads, [&] { path_scan_kernel<double, double, V, M>(a); });
      }
      return;
    }
    StagedArgs a{io, plan, C, lpv, cap, ring};
    launch(grid, threads, [&] { staged_scan_kernel<double, double, V, M>(a); });
  };
  using std::integral_constant;
  run(integral_constant<int, S_UP>{}, x.data(), nullptr, nullptr, nullptr, nullptr, out.data(), nullptr);
  dump(out);
  run(integral_constant<int, S_DOWN>{}, x.data(), nullptr, nullptr, nullptr, nullptr, out.data(), nullptr);
  dump(out);
  run(integral_constant<int, S_UP>{}, x.data(), nullptr, nullptr, U.data(), nullptr, nullptr, nullptr);
  run(integral_constant<int, S_BOTH>{}, U.data(), nullptr, nullptr, nullptr, nullptr, out.data(), nullptr);
  dump(out);
  std::vector<double> hu(N * C), hd(N * C), hb = out;
  run(integral_constant<int, S_UP>{}, x.data(), nullptr, nullptr, nullptr, nullptr, hu.data(), nullptr);
  run(integral_constant<int, S_DOWN>{}, x.data(), nullptr, nullptr, nullptr, nullptr, hd.data(), nullptr);
  run(integral_constant<int, S_UP_BWD>{}, g.data(), nullptr, hu.data(), nullptr, nullptr, gx.data(), gw.data());
  dump(gx); dump(gw);
  run(integral_constant<int, S_UP_GW>{}, g.data(), nullptr, hd.data(), nullptr, nullptr, gx.data(), gw.data());
  dump(gx); dump(gw);
  run(integral_constant<int, S_UP2>{}, x.data(), g.data(), nullptr, U.data(), G.data(), nullptr, nullptr);
  run(integral_constant<int, S_BOTH_BWD>{}, U.data(), G.data(), hb.data(), nullptr, nullptr, gx.data(), gw.data());
  dump(gx); dump(gw);
  fclose(o);
  return 0;
}
