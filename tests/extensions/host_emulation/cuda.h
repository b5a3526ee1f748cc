// Host stand-ins for the CUDA names the kernels use, so that the kernel headers compile
// with a plain C++20 compiler and run with one host thread per CUDA thread (see harness.cpp).
// Only float and double are meaningful here; the half types are float-backed stubs.
#pragma once
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <barrier>
#include <cstdint>
#include <cstring>
using std::min;
using std::max;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;  // set by a launcher whose kernels read it (grid_costs_harness.cpp)
inline std::barrier<>* g_barrier = nullptr;
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

#define smem_raw smem_raw_storage
struct __half { float f; };
struct __nv_bfloat16 { float f; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct int4 { int x, y, z, w; };
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __half2float(__half h) { return h.f; }
inline float __bfloat162float(__nv_bfloat16 h) { return h.f; }
inline __half __float2half_rn(float f) { return {f}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {f}; }

// ---- block votes, warp exchange, atomics and bit casts (grid_tree_kernels.cuh)
// A launcher that uses them calls emu_begin_block() before starting a block's threads and
// points g_warp_barrier[w] at a 32-thread barrier per warp (blockDim.x a multiple of 32).
#include <atomic>
#include <bit>
#include <memory>
#include <thread>
#include <vector>
inline std::barrier<>* g_warp_barrier[32] = {};
inline uint64_t g_warp_slot[32][32];
// __syncthreads_count: call i counts in slot i % 3 and clears slot (i + 1) % 3, whose last
// readers (call i - 2) are all past the barrier of call i - 1.
inline std::atomic<int> g_vote[3];
inline thread_local unsigned g_vote_calls = 0;
inline void emu_begin_block() {
  for (auto& v : g_vote) v.store(0);
}
inline int __syncthreads_count(int pred) {
  const unsigned k = g_vote_calls++ % 3;
  if (threadIdx.x == 0) g_vote[(k + 1) % 3].store(0, std::memory_order_relaxed);
  if (pred) g_vote[k].fetch_add(1, std::memory_order_relaxed);
  g_barrier->arrive_and_wait();
  return g_vote[k].load(std::memory_order_relaxed);
}
inline int __syncthreads_or(int pred) { return __syncthreads_count(pred != 0) != 0; }
inline int __syncthreads_and(int pred) {
  return __syncthreads_count(pred != 0) == static_cast<int>(blockDim.x);
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  g_warp_barrier[threadIdx.x / 32]->arrive_and_wait();
}
// n elements of T from a harness's input file; a short file ends the harness.
template <typename T>
std::vector<T> read(FILE* f, int64_t n) {
  std::vector<T> v(n);
  if (n && std::fread(v.data(), sizeof(T), n, f) != static_cast<size_t>(n)) {
    std::fprintf(stderr, "short input\n");
    std::exit(2);
  }
  return v;
}
// n doubles from a harness's input file, as T.
template <typename T>
std::vector<T> read_as(FILE* f, int64_t n) {
  auto v = read<double>(f, n);
  return std::vector<T>(v.begin(), v.end());
}
// Runs one block (bx, by) of `threads` CUDA threads (a multiple of 32) on a pool of worker
// threads kept between blocks (creating threads per block dominated the emulation's time),
// with the block and warp barriers set up; `setup` runs before the threads start
// (shared-memory poisoning).
#include <condition_variable>
#include <functional>
#include <mutex>
class EmuPool {
 public:
  ~EmuPool() {
    {
      std::lock_guard<std::mutex> l(m_);
      stop_ = true;
      ++epoch_;
    }
    go_.notify_all();
    for (auto& t : workers_) t.join();
  }
  void run(int threads, unsigned bx, unsigned by, const std::function<void()>& body) {
    while (static_cast<int>(workers_.size()) < threads) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
    std::unique_lock<std::mutex> l(m_);
    body_ = &body;
    active_ = threads;
    remaining_ = threads;
    bx_ = bx;
    by_ = by;
    ++epoch_;
    go_.notify_all();
    done_.wait(l, [&] { return remaining_ == 0; });
  }

 private:
  void loop(int id) {
    unsigned long seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> l(m_);
      go_.wait(l, [&] { return epoch_ != seen; });
      seen = epoch_;
      if (stop_) return;
      if (id >= active_) continue;
      const std::function<void()>* body = body_;
      const unsigned bx = bx_, by = by_;
      l.unlock();
      threadIdx.x = id;
      blockIdx.x = bx;
      blockIdx.y = by;
      g_vote_calls = 0;
      (*body)();
      l.lock();
      if (--remaining_ == 0) done_.notify_all();
    }
  }
  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable go_, done_;
  const std::function<void()>* body_ = nullptr;
  int active_ = 0, remaining_ = 0;
  unsigned bx_ = 0, by_ = 0;
  unsigned long epoch_ = 0;
  bool stop_ = false;
};
inline EmuPool& emu_pool() {
  static EmuPool pool;
  return pool;
}
template <typename Setup, typename Body>
inline void emu_run_block(unsigned bx, unsigned by, int threads, Setup setup, Body body) {
  blockDim.x = threads;
  std::barrier<> bar(threads);
  g_barrier = &bar;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  for (int w = 0; w < threads / 32; ++w) {
    warps.push_back(std::make_unique<std::barrier<>>(32));
    g_warp_barrier[w] = warps.back().get();
  }
  emu_begin_block();
  setup();
  const std::function<void()> run = [&] { body(); };
  emu_pool().run(threads, bx, by, run);
}
// Every lane publishes v; each then reads lane `src` (its own v when src < 0).
template <typename T>
inline T emu_shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_warp_slot[w][l] = bits;
  __syncwarp();
  T r = v;
  if (src >= 0) std::memcpy(&r, &g_warp_slot[w][src], sizeof(T));
  __syncwarp();
  return r;
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
  const int l = static_cast<int>(threadIdx.x % 32);
  return emu_shfl(v, l >= static_cast<int>(delta) ? l - static_cast<int>(delta) : -1);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) { return emu_shfl(v, src & 31); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  return emu_shfl(v, static_cast<int>(threadIdx.x % 32) ^ (lane_mask & 31));
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  const unsigned l = threadIdx.x % 32;
  return emu_shfl(v, l + delta < 32 ? static_cast<int>(l + delta) : -1);
}
template <typename T>
inline T emu_atomic_min(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  return emu_atomic_min(p, v);
}
inline long long atomicMin(long long* p, long long v) { return emu_atomic_min(p, v); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return emu_atomic_min(p, v); }
inline int atomicMin(int* p, int v) { return emu_atomic_min(p, v); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline long long __double_as_longlong(double d) { return std::bit_cast<long long>(d); }
inline int __popc(unsigned x) { return std::popcount(x); }
// products rounded on their own (the device never fuses them into an FMA; the harnesses
// compile with -ffp-contract=off)
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
