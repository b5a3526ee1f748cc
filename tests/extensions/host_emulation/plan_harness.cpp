// Host emulation of the path-plan kernel (path_plan_kernels.cuh): one std::thread per CUDA
// thread, one block per tree. Reads the breadth-first layout written by tests/extensions and
// writes the plan tensors.
// usage: plan_harness IN OUT THREADS
#include <cstdio>
#include <cstdlib>
#include <vector>
namespace treessm_cuda { alignas(16) unsigned char smem_raw_storage[1 << 16]; }
#include "path_plan_kernels.cuh"
using namespace treessm_cuda;
int main(int argc, char** argv) {
  FILE* f = std::fopen(argv[1], "rb");
  const auto hdr = read<int64_t>(f, 2);
  const int64_t N = hdr[0], T = hdr[1];
  auto order = read<int64_t>(f, N), child_ptr = read<int64_t>(f, N + 1),
       tree_ptr = read<int64_t>(f, T + 1), depth = read<int64_t>(f, N),
       parent_pos = read<int64_t>(f, N);
  std::fclose(f);
  const int threads = std::atoi(argv[3]);
  std::vector<PathRec> rec(N + 1, PathRec{-7, -7, -7, -7});
  std::vector<int> light(N, -7), slot(N, -7), path_ptr(N + 1, -7), phase_path(T * (kMaxPhases + 1), -7);
  std::vector<unsigned> work(4 * (N + T) + 9 * N, 0xdeadbeefu);  // poisoned
  PathPlanArgs a{order.data(), child_ptr.data(), tree_ptr.data(), depth.data(), parent_pos.data(),
                 rec.data(), light.data(), slot.data(), path_ptr.data(), phase_path.data(),
                 work.data(), N, T};
  for (int64_t t = 0; t < T; ++t)
    emu_run_block(static_cast<unsigned>(t), 0, threads, [] {}, [&] { path_plan_kernel(a); });
  FILE* o = std::fopen(argv[2], "wb");
  std::fwrite(rec.data(), sizeof(PathRec), N + 1, o);
  std::fwrite(light.data(), 4, N, o);
  std::fwrite(slot.data(), 4, N, o);
  std::fwrite(path_ptr.data(), 4, N + 1, o);
  std::fwrite(phase_path.data(), 4, T * (kMaxPhases + 1), o);
  std::fclose(o);
  return 0;
}
