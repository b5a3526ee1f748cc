// Host emulation of the "trees" tree-scan kernels: one std::thread per CUDA thread, blocks
// in turn, __syncthreads as a std::barrier. Reads a problem written by tests/extensions,
// runs the passes the CUDA backend launches for every direction (double), one block per
// tree and channel slice, and writes the results.
// usage: harness IN OUT V LANES
//   V: channels a thread moves (1 or 2); LANES: position lanes of a block (a multiple of 16)
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <type_traits>
#include <vector>
namespace treessm_cuda { alignas(16) unsigned char smem_raw_storage[1 << 20]; }
#include "scan_kernels.cuh"
using namespace treessm_cuda;
template <typename F>
void launch(unsigned gx, unsigned gy, int threads, F body) {
  for (unsigned bx = 0; bx < gx; ++bx)
    for (unsigned by = 0; by < gy; ++by)
      emu_run_block(bx, by, threads, [] {
        std::memset(treessm_cuda::smem_raw_storage, 0xff, sizeof(treessm_cuda::smem_raw_storage));  // poison
      }, body);
}
auto rd = [](FILE* f, int64_t n) { return read<double>(f, n); };
auto ri = [](FILE* f, int64_t n) { return read<int>(f, n); };

struct Problem {
  int64_t N, C, T;
  int lpv, lanes, threads;
  std::vector<double> x, w, g;
  std::vector<int> rec, light, slot, path_ptr, phase_path;
};

template <int V>
struct Runner {
  const Problem& pb;
  int64_t groups;
  std::vector<std::vector<double>> scratch;
  double* acc() {
    scratch.emplace_back(pb.N * pb.C, -999.0);  // poison: every value read must be written
    return scratch.back().data();
  }
  template <int MODE>
  void pass(ScanIO io) {
    ScanArgs a{};
    a.io = io;
    a.C = pb.C;
    a.lpv = pb.lpv;
    a.lanes = pb.lanes;
    a.groups = groups;
    a.rec = reinterpret_cast<const PathRec*>(pb.rec.data());
    a.slot = pb.slot.data();
    a.path_ptr = pb.path_ptr.data();
    a.phase_path = pb.phase_path.data();
    launch(pb.T * groups, 1, pb.threads, [&] { tree_scan_kernel<double, double, V, MODE>(a); });
  }
};

template <int V>
void run_all(const Problem& pb, FILE* o) {
  const int64_t N = pb.N, C = pb.C;
  Runner<V> r{pb, ((C / V) + pb.lpv - 1) / pb.lpv, {}};
  std::vector<double> out(N * C, -777), gx(N * C, -777), gw(N * C, -777);
  auto dump = [&](std::vector<double>& v) { fwrite(v.data(), 8, N * C, o); };
  auto blank = [] {
    ScanIO s;
    std::memset(&s, 0, sizeof(s));
    return s;
  };
  const double* x = pb.x.data();
  const double* w = pb.w.data();
  const double* g = pb.g.data();
  std::vector<double> hu(N * C), hd(N * C);
  // forward: up, down, both
  auto run = [&](auto mode, ScanIO io) { r.template pass<decltype(mode)::value>(io); };
  using std::integral_constant;
  {
    ScanIO s = blank();
    s.in[0] = x; s.w = w; s.out = hu.data(); s.contrib[0] = r.acc();
    run(integral_constant<int, M_UP>{}, s);
    dump(hu);
  }
  {
    ScanIO s = blank();
    s.in[0] = x; s.w = w; s.out = hd.data(); s.val[0] = r.acc();
    run(integral_constant<int, M_DOWN>{}, s);
    dump(hd);
  }
  {
    ScanIO s = blank();
    s.in[0] = x; s.w = w;
    s.up[0] = r.acc(); s.loc[0] = r.acc(); s.share[0] = r.acc(); s.contrib[0] = r.acc();
    s.sib[0] = r.acc();
    run(integral_constant<int, M_UP>{}, s);
    s.out = out.data(); s.val[0] = r.acc();
    run(integral_constant<int, M_BOTH>{}, s);
    dump(out);
  }
  // backward: up, down, both
  {
    ScanIO s = blank();
    s.in[0] = g; s.w = w; s.h = hu.data(); s.out = gx.data(); s.gw = gw.data(); s.val[0] = r.acc();
    run(integral_constant<int, M_DOWN_GW>{}, s);
    dump(gx); dump(gw);
  }
  {
    ScanIO s = blank();
    s.in[0] = g; s.w = w; s.h = hd.data(); s.out = gx.data(); s.gw = gw.data();
    s.contrib[0] = r.acc();
    run(integral_constant<int, M_UP_GW>{}, s);
    dump(gx); dump(gw);
  }
  {
    ScanIO s = blank();
    s.in[0] = x; s.in[1] = g; s.w = w;
    for (int st = 0; st < 2; ++st) {
      s.up[st] = r.acc(); s.loc[st] = r.acc(); s.share[st] = r.acc(); s.contrib[st] = r.acc();
      s.sib[st] = r.acc();
    }
    run(integral_constant<int, M_UP2>{}, s);
    s.out = gx.data(); s.gw = gw.data(); s.val[0] = r.acc(); s.val[1] = r.acc();
    run(integral_constant<int, M_BOTH2>{}, s);
    dump(gx); dump(gw);
  }
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: harness IN OUT V LANES\n");
    return 2;
  }
  FILE* f = fopen(argv[1], "rb");
  Problem pb;
  const auto hdr = read<int64_t>(f, 4);
  pb.N = hdr[0];
  pb.C = hdr[1];
  pb.T = hdr[2];
  pb.lpv = static_cast<int>(hdr[3]);
  pb.lanes = atoi(argv[4]);
  pb.threads = pb.lanes * pb.lpv;
  pb.x = rd(f, pb.N * pb.C);
  pb.w = rd(f, pb.N * pb.C);
  pb.g = rd(f, pb.N * pb.C);
  pb.rec = ri(f, (pb.N + 1) * 4);
  pb.light = ri(f, pb.N);
  pb.slot = ri(f, pb.N);
  pb.path_ptr = ri(f, pb.N + 1);
  pb.phase_path = ri(f, pb.T * (kMaxPhases + 1));
  fclose(f);
  const int V = atoi(argv[3]);
  FILE* o = fopen(argv[2], "wb");
  if (V == 2) run_all<2>(pb, o);
  else run_all<1>(pb, o);
  fclose(o);
  return 0;
}
