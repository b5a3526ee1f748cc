// Helpers of the harnesses of the row kernels (expansion_harness.cpp, pointwise_harness.cpp):
// blocks launched one after another with their shared memory poisoned, outputs written as
// doubles, and the blocks' partial sums added in order, as the host adds them.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda.h"

// Runs `blocks` blocks of `threads` CUDA threads of `body`, the shared memory `smem` (`bytes`
// of it) poisoned before each block.
template <typename F>
void launch_poisoned(unsigned blocks, int threads, unsigned char* smem, size_t bytes, F body) {
  gridDim.x = blocks;
  for (unsigned bx = 0; bx < blocks; ++bx)
    emu_run_block(bx, 0, threads, [&] { std::memset(smem, 0xff, bytes); }, body);
}

// Writes the values of v to o as doubles.
template <typename T>
void put(const std::vector<T>& v, FILE* o) {
  for (const T& e : v) {
    const double x = static_cast<double>(e);
    fwrite(&x, 8, 1, o);
  }
}

// The row blocks' partial sums [blocks, cols] added in order.
template <typename T>
std::vector<T> sum_rows(const std::vector<T>& p, int64_t blocks, int64_t cols) {
  std::vector<T> out(cols, T(0));
  for (int64_t i = 0; i < blocks; ++i)
    for (int64_t k = 0; k < cols; ++k) out[k] += p[i * cols + k];
  return out;
}
