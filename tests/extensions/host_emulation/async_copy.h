// Host stand-in for cp.async (see copy_async in tree_scan_kernels.cuh). On the device a copy
// lands at some moment between its issue and the cp.async.wait_group that covers it; the
// emulation takes the two extremes. Deferred (the default): a copy is carried out only when
// a wait says its group must be complete, so a kernel that reads a staged row too early sees
// stale or poisoned shared memory. Eager (eager_copies set by the harness): a copy lands as
// it is issued, so a kernel that overwrites a slot still being read sees the new row too
// early.
#pragma once
#include <cstring>
#include <deque>
#include <vector>

namespace treessm_emu {
struct PendingCopy {
  void* dst;
  std::vector<unsigned char> bytes;  // the source, read at issue (sources are read-only)
};
inline thread_local std::vector<PendingCopy> open_group;
inline thread_local std::deque<std::vector<PendingCopy>> committed;

inline bool eager_copies = false;
inline bool eager() { return eager_copies; }
inline void issue(void* dst, const void* src, int n) {
  if (eager()) {
    std::memcpy(dst, src, n);
    return;
  }
  PendingCopy c{dst, std::vector<unsigned char>(n)};
  std::memcpy(c.bytes.data(), src, n);
  open_group.push_back(std::move(c));
}
inline void commit() {
  committed.push_back(std::move(open_group));
  open_group.clear();
}
// Completes the oldest groups until at most `pending` remain; copies issued since the last
// commit stay pending, as on the device.
inline void wait(int pending) {
  while (static_cast<int>(committed.size()) > pending) {
    for (auto& c : committed.front()) std::memcpy(c.dst, c.bytes.data(), c.bytes.size());
    committed.pop_front();
  }
}
inline void reset() {
  open_group.clear();
  committed.clear();
}
}  // namespace treessm_emu
