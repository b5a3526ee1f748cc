// Host emulation of the grid-cost kernel: one std::thread per CUDA thread, blocks in turn,
// warp shuffles through a per-warp barrier. Reads a problem written by tests/extensions,
// chooses the pack width and group size as grid_costs.cu does (or takes them from the
// input), runs the kernel and writes the B * E costs into an output prefilled with NaN, so
// a cost the kernel never writes shows.
// usage: grid_costs_harness IN OUT
// IN: int64 B, H, W, C, connectivity, kind (0 cosine, 1 l2), wide (0: float32, 1: float64),
//     threads per block, blocks (0: as many as the pixels need), group (0: choose),
//     scalar (1: force single-element packs), offset (elements the rows are shifted by in
//     memory, to misalign them); float64 eps; then the B*H*W*C features in the element type.
// The last line on stdout reports "pack=V group=G blocks=N".
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "cost_harness.h"
using namespace treessm_cuda;

template <typename T, int V, int KIND>
void run_kind(const T* x, const costs::Shape& s, bool eight, int group, T eps, T* out,
              unsigned blocks, int threads) {
  gridDim.x = blocks;
  for (unsigned bx = 0; bx < blocks; ++bx) {
    emu_run_block(bx, 0, threads, [] {}, [&] {
      if (eight) costs::grid_costs_kernel<T, V, KIND, true>(x, s, group, eps, out);
      else costs::grid_costs_kernel<T, V, KIND, false>(x, s, group, eps, out);
    });
  }
}

template <typename T, int V>
void run_pack(const T* x, const costs::Shape& s, bool eight, int kind, int group, T eps, T* out,
              unsigned blocks, int threads) {
  if (kind == costs::kCosine) run_kind<T, V, costs::kCosine>(x, s, eight, group, eps, out, blocks,
                                                             threads);
  else run_kind<T, V, costs::kL2>(x, s, eight, group, eps, out, blocks, threads);
}

template <typename T>
void run(FILE* f, const std::vector<int64_t>& h, double eps, FILE* out_file) {
  const int64_t B = h[0], C = h[3];
  const int H = static_cast<int>(h[1]), W = static_cast<int>(h[2]);
  const int conn = static_cast<int>(h[4]), kind = static_cast<int>(h[5]);
  const int threads = static_cast<int>(h[7]);
  const int64_t blocks_in = h[8];
  const int group_in = static_cast<int>(h[9]);
  const bool scalar = h[10] != 0;
  const int64_t offset = h[11];
  const costs::Shape s = costs::make_shape(B, H, W, C, conn == 8);
  std::vector<T> storage;
  const T* x = aligned_features<T>(f, s.pixels * C, offset, storage);
  const auto [v, group] = pack_and_group<T>(x, C, scalar, group_in, threads);
  const int64_t per_block = threads / group;
  const int64_t need = (s.pixels + per_block - 1) / per_block;
  const unsigned blocks = static_cast<unsigned>(blocks_in > 0 ? std::min(blocks_in, need) : need);
  std::vector<T> out(B * s.per_image, std::numeric_limits<T>::quiet_NaN());
  if (!out.empty() && blocks > 0) {
    if (v > 1) run_pack<T, costs::kPackBytes / sizeof(T)>(x, s, conn == 8, kind, group,
                                                          static_cast<T>(eps), out.data(), blocks,
                                                          threads);
    else run_pack<T, 1>(x, s, conn == 8, kind, group, static_cast<T>(eps), out.data(), blocks,
                        threads);
  }
  if (!out.empty()) std::fwrite(out.data(), sizeof(T), out.size(), out_file);
  std::printf("pack=%d group=%d blocks=%u\n", v, group, blocks);
}

int main(int argc, char** argv) {
  return harness_main(argc, argv, "grid_costs_harness", 12, 6, run<float>, run<double>);
}
