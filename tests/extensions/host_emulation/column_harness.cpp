// Host emulation of the "columns" scan kernels (column_kernels.cuh): the 32 threads of a
// block run as host threads (they share the tree's records, staged behind a barrier). Reads a
// problem written by tests/extensions/test_column_scan_host.py, runs every mode in double
// and in float (the same numbers, float accumulation), with the columns in shared and in
// global memory, and writes, per case, the forward of
// up, down, both and the gradients (x, w) of up, down, both, as double.
// usage: column_harness IN OUT
#include <cstdio>
#include <cstdlib>
#include <vector>
namespace treessm_cuda::columns { alignas(16) unsigned char smem_raw_storage[1 << 20]; }
#include "column_kernels.cuh"
using namespace treessm_cuda;
using namespace treessm_cuda::columns;

// shared: the columns in (emulated) shared memory, else in a global scratch buffer
template <typename T, int MODE>
void launch(Args<T> a, int trees, bool shared) {
  using A = typename AccType<T>::type;
  const int64_t bytes = shared_bytes<A>(MODE, a.stride);
  if (shared && bytes > static_cast<int64_t>(sizeof(smem_raw_storage))) {
    std::fprintf(stderr, "tree too large for the emulated shared memory\n");
    std::exit(3);
  }
  std::vector<A> scratch(columns_of(MODE) * a.N * a.C, A(-555));  // poison
  a.scratch = scratch.data();
  for (int b = 0; b < trees * a.groups; ++b) {
    emu_run_block(b, 0, kThreads, [] {
      std::memset(smem_raw_storage, 0xff, sizeof(smem_raw_storage));  // poison
    }, [&] {
      if (shared) column_scan_kernel<T, MODE, true>(a);
      else column_scan_kernel<T, MODE, false>(a);
    });
  }
}

template <typename T>
void run(const std::vector<double>& xd, const std::vector<double>& wd,
         const std::vector<double>& gd, const std::vector<int>& order,
         const std::vector<int>& parent, const std::vector<int>& tree_ptr, int64_t N, int64_t C,
         int T_, int stride, bool shared, FILE* out) {
  std::vector<T> x(xd.begin(), xd.end()), w(wd.begin(), wd.end()), g(gd.begin(), gd.end());
  const int64_t n = N * C;
  auto fresh = [&] { return std::vector<T>(n, T(-777)); };  // poison: every entry written
  std::vector<std::vector<T>> res;
  Args<T> a{};
  a.w = w.data();
  a.order = order.data();
  a.parent = parent.data();
  a.tree_ptr = tree_ptr.data();
  a.C = C;
  a.groups = static_cast<int>((C + kThreads - 1) / kThreads);
  a.stride = stride;
  a.N = N;
  std::vector<T> h[3];
  for (int dir = 0; dir < 3; ++dir) {  // up, down, both
    h[dir] = fresh();
    a.x = x.data();
    a.out = h[dir].data();
    if (dir == 0) launch<T, kUp>(a, T_, shared);
    if (dir == 1) launch<T, kDown>(a, T_, shared);
    if (dir == 2) launch<T, kBoth>(a, T_, shared);
    res.push_back(h[dir]);
  }
  for (int dir = 0; dir < 3; ++dir) {
    std::vector<T> gx = fresh(), gw = fresh();
    a.x = g.data();
    a.x2 = x.data();
    a.h = h[dir].data();
    a.out = gx.data();
    a.gw = gw.data();
    if (dir == 0) launch<T, kUpGrad>(a, T_, shared);
    if (dir == 1) launch<T, kDownGrad>(a, T_, shared);
    if (dir == 2) launch<T, kBothGrad>(a, T_, shared);
    res.push_back(gx);
    res.push_back(gw);
  }
  for (auto& r : res) {
    std::vector<double> d(r.begin(), r.end());
    std::fwrite(d.data(), sizeof(double), d.size(), out);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) return 1;
  FILE* f = std::fopen(argv[1], "rb");
  auto head = read<int64_t>(f, 4);  // N, C, T, stride
  const int64_t N = head[0], C = head[1];
  const int T_ = static_cast<int>(head[2]), stride = static_cast<int>(head[3]);
  auto x = read<double>(f, N * C), w = read<double>(f, N * C), g = read<double>(f, N * C);
  auto order = read<int>(f, N), parent = read<int>(f, N), tree_ptr = read<int>(f, T_ + 1);
  std::fclose(f);
  FILE* out = std::fopen(argv[2], "wb");
  for (bool shared : {true, false}) {
    run<double>(x, w, g, order, parent, tree_ptr, N, C, T_, stride, shared, out);
    run<float>(x, w, g, order, parent, tree_ptr, N, C, T_, stride, shared, out);
  }
  std::fclose(out);
  return 0;
}
