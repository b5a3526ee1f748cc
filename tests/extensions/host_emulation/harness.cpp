// Host emulation of the tree-scan kernels: one std::thread per CUDA thread, blocks in turn,
// __syncthreads as a std::barrier. Reads a problem written by tests/extensions, runs the
// passes the CUDA backend launches for every direction (double) and writes the results.
// usage: harness IN OUT SCHEDULE V LANES
//   SCHEDULE: "trees" (one block per tree and channel slice) or "phases" (per phase,
//   chunk composites, carries and rescans, as tree_scan.cu launches them); V: channels a
//   thread moves (1 or 2); LANES: position lanes of a block (a multiple of 16)
// or: harness carry IN OUT
//   the carry kernel alone on chunk composites (header: chunks, C, streams; then a, b per
//   stream [chunks][C] as double, the reset flags [chunks] as bytes): for double, then
//   float, accumulation and every block of 1 to kCarryMaxWarps warps, the carries
//   [chunks][streams][C] as double (row 0 left as the poison -555)
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
  int lpv, lanes, threads;
  std::vector<double> x, w, g;
  std::vector<int> rec, light, slot, path_ptr, phase_path;  // "trees" layout
  std::vector<int> prec, plight, pslot;                     // "phases" layout
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
    a.lanes = pb.lanes;
    a.groups = groups;
    if (!phases) {
      a.rec = reinterpret_cast<const PathRec*>(pb.rec.data());
      a.slot = pb.slot.data();
      a.path_ptr = pb.path_ptr.data();
      a.phase_path = pb.phase_path.data();
      launch(pb.T * groups, 1, pb.threads, [&] { tree_scan_kernel<double, double, V, MODE>(a); });
      return;
    }
    a.rec = reinterpret_cast<const PathRec*>(pb.prec.data());
    a.slot = pb.pslot.data();
    const int chunk = pb.lanes * kRun;
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
        launch(pb.C, 1, phase_carry_threads(chunks), [&] {
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

template <typename A, int NS>
void run_carry(int chunks, int64_t C, const std::vector<double>& a, const std::vector<double>& b,
               const std::vector<unsigned char>& f, FILE* o) {
  std::vector<A> agg(chunks * 2 * NS * C, A(-555));  // [chunks][a, b per stream, unused][C]
  for (int j = 0; j < chunks; ++j)
    for (int64_t c = 0; c < C; ++c) {
      agg[(j * 2 * NS) * C + c] = static_cast<A>(a[j * C + c]);
      for (int st = 0; st < NS; ++st)
        agg[(j * 2 * NS + 1 + st) * C + c] = static_cast<A>(b[(st * chunks + j) * C + c]);
    }
  for (int warps = 1; warps <= kCarryMaxWarps; ++warps) {
    std::vector<A> carry(chunks * NS * C, A(-555));
    launch(C, 1, 32 * warps, [&] {
      phase_carry_kernel<A, NS>(agg.data(), f.data(), carry.data(), chunks, C);
    });
    std::vector<double> wide(carry.begin(), carry.end());
    fwrite(wide.data(), 8, wide.size(), o);
  }
}

int carry_main(const char* in, const char* out) {
  FILE* f = fopen(in, "rb");
  const auto hdr = read<int64_t>(f, 3);
  const int chunks = static_cast<int>(hdr[0]);
  const int64_t C = hdr[1];
  const int NS = static_cast<int>(hdr[2]);
  const auto a = rd(f, chunks * C);
  const auto b = rd(f, NS * chunks * C);
  const auto flags = read<unsigned char>(f, chunks);
  fclose(f);
  FILE* o = fopen(out, "wb");
  if (NS == 2) {
    run_carry<double, 2>(chunks, C, a, b, flags, o);
    run_carry<float, 2>(chunks, C, a, b, flags, o);
  } else {
    run_carry<double, 1>(chunks, C, a, b, flags, o);
    run_carry<float, 1>(chunks, C, a, b, flags, o);
  }
  fclose(o);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "carry") return carry_main(argv[2], argv[3]);
  if (argc < 6) {
    std::fprintf(stderr, "usage: harness IN OUT trees|phases V LANES, or harness carry IN OUT\n");
    return 2;
  }
  FILE* f = fopen(argv[1], "rb");
  Problem pb;
  const auto hdr = read<int64_t>(f, 4);
  pb.N = hdr[0];
  pb.C = hdr[1];
  pb.T = hdr[2];
  pb.lpv = static_cast<int>(hdr[3]);
  pb.lanes = atoi(argv[5]);
  pb.threads = pb.lanes * pb.lpv;
  pb.x = rd(f, pb.N * pb.C);
  pb.w = rd(f, pb.N * pb.C);
  pb.g = rd(f, pb.N * pb.C);
  pb.rec = ri(f, (pb.N + 1) * 4);
  pb.light = ri(f, pb.N);
  pb.slot = ri(f, pb.N);
  pb.path_ptr = ri(f, pb.N + 1);
  pb.phase_path = ri(f, pb.T * (kMaxPhases + 1));
  pb.prec = ri(f, (pb.N + 1) * 4);
  pb.plight = ri(f, pb.N);
  pb.pslot = ri(f, pb.N);
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
