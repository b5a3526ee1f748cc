// Shared by the host harnesses of the cost kernels (grid_costs_harness.cpp,
// edge_costs_harness.cpp): the features laid out as the kernels read them, the launch
// choices of grid_costs.cu, and the harness's main.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

#include "grid_costs_kernels.cuh"

// `count` elements of T from f, stored in `storage` from an address aligned for the widest
// pack plus `offset` elements (to misalign the rows on purpose); returns the first element.
template <typename T>
T* aligned_features(FILE* f, int64_t count, int64_t offset, std::vector<T>& storage) {
  constexpr int64_t per_pack = treessm_cuda::costs::kPackBytes / sizeof(T);
  storage.assign(count + offset + per_pack, T(0));
  T* base = storage.data();
  while (reinterpret_cast<uintptr_t>(base) % treessm_cuda::costs::kPackBytes) ++base;
  T* x = base + offset;
  const std::vector<T> values = read<T>(f, count);
  std::copy(values.begin(), values.end(), x);
  return x;
}

// (pack width, lanes per item) as grid_costs.cu chooses them, or as the input forces them
// (`scalar`: single elements; `group` > 0); a group that does not divide the block ends
// the harness.
template <typename T>
std::pair<int, int> pack_and_group(const T* x, int64_t C, bool scalar, int group, int threads) {
  if (threads % 32 != 0 || threads > treessm_cuda::costs::kThreads) {
    std::fprintf(stderr, "threads must be a multiple of 32, at most %d\n",
                 treessm_cuda::costs::kThreads);
    std::exit(2);
  }
  const int v = scalar ? 1 : treessm_cuda::costs::pack_elements<T>(x, C);
  if (group == 0) group = treessm_cuda::costs::choose_group(C / v);
  if (group < 1 || group > 32 || (group & (group - 1)) != 0 || threads % group != 0) {
    std::fprintf(stderr, "bad group %d\n", group);
    std::exit(2);
  }
  return {v, group};
}

using HarnessRun = void (*)(FILE* in, const std::vector<int64_t>& header, double eps, FILE* out);

// main of a harness called as `NAME IN OUT`: IN starts with `header` int64 values and the
// float64 eps; header[wide] picks the float64 or the float32 run.
inline int harness_main(int argc, char** argv, const char* name, int header, int wide,
                        HarnessRun run_float, HarnessRun run_double) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", name);
    return 2;
  }
  FILE* f = std::fopen(argv[1], "rb");
  if (f == nullptr) return 2;
  const std::vector<int64_t> h = read<int64_t>(f, header);
  const double eps = read<double>(f, 1)[0];
  FILE* out = std::fopen(argv[2], "wb");
  if (out == nullptr) return 2;
  (h[wide] ? run_double : run_float)(f, h, eps, out);
  std::fclose(f);
  std::fclose(out);
  return 0;
}
