// Host emulation of the tree-scan kernels: one std::thread per CUDA thread, blocks in turn,
// __syncthreads as a std::barrier. Reads a problem written by tests/extensions, runs every
// kernel configuration the CUDA backend launches (double, V = 2) and writes the results.
// usage: harness IN OUT CAP [RING]   (with RING: the staged kernels, R = RING)
//        harness IN OUT RECCAP path   (the path kernels, RECCAP plan records in shared memory)
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
  FILE* f = fopen(argv[1], "rb");
  const auto hdr = ri(f, 6);
  int64_t N = hdr[0], C = hdr[1], T = hdr[2], L = hdr[3];
  int lpv = (int)hdr[4], threads = (int)hdr[5];
  auto x = rd(f, N * C), w = rd(f, N * C), g = rd(f, N * C), h = rd(f, N * C);
  auto order = ri(f, N), child_ptr = ri(f, N + 1), level_pos = ri(f, L + 1), tlp = ri(f, T + 1),
       ppos = ri(f, N), parent_at_pos = ri(f, N);
  std::vector<int> prec, plight, pptr, pphase;
  const bool path = argc > 4 && std::string(argv[4]) == "path";
  if (path) {
    prec = read<int>(f, (N + 1) * 4);
    plight = read<int>(f, N);
    pptr = read<int>(f, N + 1);
    pphase = read<int>(f, T * (kMaxPhases + 1));
  }
  fclose(f);
  Plan plan{order.data(), child_ptr.data(), level_pos.data(), tlp.data(), ppos.data(), parent_at_pos.data()};
  constexpr int V = 2;
  int64_t groups = (C / V + lpv - 1) / lpv;
  dim3 grid; grid.x = T; grid.y = groups;
  int cap = atoi(argv[3]);
  std::vector<double> out(N * C, -777), gx(N * C, -777), gw(N * C, -777), U(N * C), G(N * C),
      s1(N * C, -999), s2(N * C, -999);
  FILE* o = fopen(argv[2], "wb");
  auto dump = [&](std::vector<double>& v) { fwrite(v.data(), 8, N * C, o); };
  if (argc > 4) {  // staged or path kernels, same sequence of passes
    const int ring = path ? 0 : atoi(argv[4]);
    const PathPlan pplan{reinterpret_cast<const PathRec*>(prec.data()), plight.data(), pptr.data(),
                         pphase.data()};
    auto run = [&](auto mode, const double* in0, const double* in1, const double* hh, double* up0,
                   double* up1, double* outp, double* gwp) {
      constexpr int M = decltype(mode)::value;
      if (path) {
        PathArgs a{in0, in1, w.data(), hh, up0, up1, outp, gwp, s1.data(), s2.data(), pplan, C, lpv, cap};
        launch(grid, threads, [&] { path_scan_kernel<double, double, V, M>(a); });
        return;
      }
      StagedArgs a{in0, in1, w.data(), hh, up0, up1, outp, gwp, s1.data(), s2.data(), plan, C, lpv, cap, ring};
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
  // forward: up, down, both
  launch(grid, threads, [&] { up_pass_kernel<double, double, V, 1>(x.data(), nullptr, w.data(), nullptr, nullptr, out.data(), nullptr, nullptr, s1.data(), nullptr, plan, C, lpv, cap); });
  dump(out);
  launch(grid, threads, [&] { down_pass_kernel<double, double, V, DOWN_FWD>(x.data(), nullptr, nullptr, w.data(), nullptr, out.data(), nullptr, s1.data(), plan, C, lpv, cap); });
  dump(out);
  launch(grid, threads, [&] { up_pass_kernel<double, double, V, 1>(x.data(), nullptr, w.data(), U.data(), nullptr, nullptr, nullptr, nullptr, s1.data(), nullptr, plan, C, lpv, cap); });
  launch(grid, threads, [&] { down_pass_kernel<double, double, V, BOTH_FWD>(nullptr, U.data(), nullptr, w.data(), nullptr, out.data(), nullptr, s1.data(), plan, C, lpv, cap); });
  dump(out);
  // backward with h = given forward output per direction (file holds h for 'both'; we pass each)
  // up bwd (h must be up-forward output: recompute here)
  std::vector<double> hu(N * C), hd(N * C), hb(N * C);
  launch(grid, threads, [&] { up_pass_kernel<double, double, V, 1>(x.data(), nullptr, w.data(), nullptr, nullptr, hu.data(), nullptr, nullptr, s1.data(), nullptr, plan, C, lpv, cap); });
  launch(grid, threads, [&] { down_pass_kernel<double, double, V, DOWN_FWD>(x.data(), nullptr, nullptr, w.data(), nullptr, hd.data(), nullptr, s1.data(), plan, C, lpv, cap); });
  hb = out;
  launch(grid, threads, [&] { down_pass_kernel<double, double, V, UP_BWD>(g.data(), nullptr, nullptr, w.data(), hu.data(), gx.data(), gw.data(), s1.data(), plan, C, lpv, cap); });
  dump(gx); dump(gw);
  launch(grid, threads, [&] { up_pass_kernel<double, double, V, 1>(g.data(), nullptr, w.data(), nullptr, nullptr, gx.data(), hd.data(), gw.data(), s1.data(), nullptr, plan, C, lpv, cap); });
  dump(gx); dump(gw);
  launch(grid, threads, [&] { up_pass_kernel<double, double, V, 2>(x.data(), g.data(), w.data(), U.data(), G.data(), nullptr, nullptr, nullptr, s1.data(), s2.data(), plan, C, lpv, cap); });
  launch(grid, threads, [&] { down_pass_kernel<double, double, V, BOTH_BWD>(nullptr, U.data(), G.data(), w.data(), hb.data(), gx.data(), gw.data(), s1.data(), plan, C, lpv, cap); });
  dump(gx); dump(gw);
  fclose(o);
  return 0;
}
