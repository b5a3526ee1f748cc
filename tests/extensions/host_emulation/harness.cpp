// Host emulation of the tree-scan kernels: one std::thread per CUDA thread, blocks in turn,
// __syncthreads as a std::barrier. Reads a problem written by tests/extensions, runs the
// passes the CUDA backend launches for every direction (double) and writes the results.
// usage: harness IN OUT SCHEDULE V
//   SCHEDULE: "trees" (one block per tree and channel slice) or "phases" (per phase,
//   chunk composites, carries and rescans, as tree_scan.cu launches them); V: channels a
//   thread moves (1 or 2)
#include <cstdio>
#include <cstdlib>
#include <string>
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
  int lpv, threads;
  std::vector<double> x, w, g;
  std::vector<int> rec, light, path_ptr, phase_path;       // "trees" layout
  std::vector<int> prec, plight;                           // "phases" layout
  std::vector<int> phase_ptr;
};

template <int V>
struct Runner {
  const Problem& pb;
  bool phases;
  int64_t groups;
  std::vector<std::vector<double>> scratch;
  double* acc() {
    scratch.emplace_back(pb.N * pb.C, -999.0);  // poison: every value read must be written
    return scratch.back().data();
  }
  template <int MODE>
  void pass(ScanIO io) {
    using Tr = ModeTraits<MODE>;
    ScanArgs a{};
    a.io = io;
    a.C = pb.C;
    a.lpv = pb.lpv;
    if (!phases) {
      a.rec = reinterpret_cast<const PathRec*>(pb.rec.data());
      a.light = pb.light.data();
      a.path_ptr = pb.path_ptr.data();
      a.phase_path = pb.phase_path.data();
      launch(pb.T, groups, pb.threads, [&] { tree_scan_kernel<double, double, V, MODE>(a); });
      return;
    }
    a.rec = reinterpret_cast<const PathRec*>(pb.prec.data());
    a.light = pb.plight.data();
    const int chunk = kLanes * Tr::RMAX;
    for (int n = 0; n < kMaxPhases; ++n) {
      const int p = Tr::UP ? kMaxPhases - 1 - n : n;
      const int s = pb.phase_ptr[p], e = pb.phase_ptr[p + 1];
      if (s >= e) continue;
      a.s = s;
      a.e = e;
      const int chunks = (e - s + chunk - 1) / chunk;
      std::vector<double> agg(chunks * 2 * Tr::NS * pb.C, -555.0), carry(chunks * Tr::NS * pb.C, -555.0);
      std::vector<unsigned char> aggf(chunks, 7);
      a.agg = agg.data();
      a.aggf = aggf.data();
      a.carry = carry.data();
      if (chunks > 1) {
        launch(chunks, groups, pb.threads, [&] { phase_aggregate_kernel<double, double, V, MODE>(a); });
        const int64_t items = Tr::NS * pb.C;
        launch((items + 31) / 32, 1, 32, [&] {
          phase_carry_kernel<double, Tr::NS>(agg.data(), aggf.data(), carry.data(), chunks, pb.C);
        });
      }
      launch(chunks, groups, pb.threads, [&] { phase_apply_kernel<double, double, V, MODE>(a); });
    }
  }
};

template <int V>
void run_all(const Problem& pb, bool phases, FILE* o) {
  const int64_t N = pb.N, C = pb.C;
  Runner<V> r{pb, phases, ((C / V) + pb.lpv - 1) / pb.lpv, {}};
  std::vector<double> out(N * C, -777), gx(N * C, -777), gw(N * C, -777);
  auto dump = [&](std::vector<double>& v) { fwrite(v.data(), 8, N * C, o); };
  auto io = [](const double* i0, const double* i1, const double* w, const double* h, double* out,
               double* gw, double* u0, double* u1, double* l0, double* l1, double* b0, double* b1,
               double* val) {
    ScanIO s;
    s.in[0] = i0; s.in[1] = i1; s.w = w; s.h = h; s.out = out; s.gw = gw;
    s.up[0] = u0; s.up[1] = u1; s.loc[0] = l0; s.loc[1] = l1; s.br[0] = b0; s.br[1] = b1;
    s.val = val;
    return s;
  };
  const double* x = pb.x.data();
  const double* w = pb.w.data();
  const double* g = pb.g.data();
  std::vector<double> hu(N * C), hd(N * C);
  // forward: up, down, both
  r.template pass<M_UP>(io(x, nullptr, w, nullptr, hu.data(), nullptr, r.acc(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr));
  dump(hu);
  r.template pass<M_DOWN>(io(x, nullptr, w, nullptr, hd.data(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, r.acc()));
  dump(hd);
  {
    double* up = r.acc();
    double* loc = r.acc();
    r.template pass<M_UP>(io(x, nullptr, w, nullptr, nullptr, nullptr, up, nullptr, loc, nullptr, nullptr, nullptr, nullptr));
    r.template pass<M_BOTH>(io(x, nullptr, w, nullptr, out.data(), nullptr, up, nullptr, loc, nullptr, r.acc(), nullptr, nullptr));
    dump(out);
  }
  // backward: up, down, both
  r.template pass<M_DOWN_GW>(io(g, nullptr, w, hu.data(), gx.data(), gw.data(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, r.acc()));
  dump(gx); dump(gw);
  r.template pass<M_UP_GW>(io(g, nullptr, w, hd.data(), gx.data(), gw.data(), r.acc(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr));
  dump(gx); dump(gw);
  {
    double *ux = r.acc(), *ug = r.acc(), *lx = r.acc(), *lg = r.acc();
    r.template pass<M_UP2>(io(x, g, w, nullptr, nullptr, nullptr, ux, ug, lx, lg, nullptr, nullptr, nullptr));
    r.template pass<M_BOTH2>(io(x, g, w, nullptr, gx.data(), gw.data(), ux, ug, lx, lg, r.acc(), r.acc(), nullptr));
    dump(gx); dump(gw);
  }
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: harness IN OUT trees|phases V\n");
    return 2;
  }
  FILE* f = fopen(argv[1], "rb");
  Problem pb;
  const auto hdr = read<int64_t>(f, 4);
  pb.N = hdr[0];
  pb.C = hdr[1];
  pb.T = hdr[2];
  pb.lpv = static_cast<int>(hdr[3]);
  pb.threads = kLanes * pb.lpv;
  pb.x = rd(f, pb.N * pb.C);
  pb.w = rd(f, pb.N * pb.C);
  pb.g = rd(f, pb.N * pb.C);
  pb.rec = ri(f, (pb.N + 1) * 4);
  pb.light = ri(f, pb.N);
  pb.path_ptr = ri(f, pb.N + 1);
  pb.phase_path = ri(f, pb.T * (kMaxPhases + 1));
  pb.prec = ri(f, (pb.N + 1) * 4);
  pb.plight = ri(f, pb.N);
  pb.phase_ptr = ri(f, kMaxPhases + 1);
  fclose(f);
  const bool phases = std::string(argv[3]) == "phases";
  const int V = atoi(argv[4]);
  FILE* o = fopen(argv[2], "wb");
  if (V == 2) run_all<2>(pb, phases, o);
  else run_all<1>(pb, phases, o);
  fclose(o);
  return 0;
}
