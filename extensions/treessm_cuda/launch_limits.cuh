// Shared-memory limits of kernel launches, shared by the extension's translation units.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace treessm_cuda {

// A device attribute, queried once per device.
template <cudaDeviceAttr Attr>
int device_attribute(int device) {
  static int cached[64] = {0};
  if (device >= 0 && device < 64 && cached[device] > 0) return cached[device];
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, Attr, device));
  if (device >= 0 && device < 64) cached[device] = v;
  return v;
}

// Dynamic shared memory a block may opt in to on `device`.
inline int max_dynamic_smem(int device) {
  return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device);
}

// Shared memory per block that lets `blocks` blocks run in one wave (every block resident
// at once) on `device`, at most `cap` bytes: latency-bound kernels lose a whole block's
// time for each extra wave.
inline int64_t one_wave_smem(int64_t blocks, int device, int64_t cap) {
  const int64_t sms = device_attribute<cudaDevAttrMultiProcessorCount>(device);
  const int64_t per_sm = device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(device);
  const int64_t per_sm_blocks = (blocks + sms - 1) / (sms > 0 ? sms : 1);
  if (per_sm_blocks <= 1) return cap;
  const int64_t fit = per_sm / per_sm_blocks - 1024;  // the runtime reserves 1 KiB per block
  return fit < cap ? fit : cap;
}

// Lets `Kernel` launch with `bytes` of dynamic shared memory on `device` (the current
// device): the attribute is set when `bytes` exceeds the 48 KiB every kernel may use and
// what this kernel was already allowed on that device.
template <auto Kernel>
void allow_dynamic_smem(int64_t bytes, int device) {
  constexpr int64_t kDefault = 48 * 1024;
  static int64_t allowed[64] = {0};
  const bool known = device >= 0 && device < 64;
  if (bytes <= kDefault || (known && allowed[device] >= bytes)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (known) allowed[device] = bytes;
}

}  // namespace treessm_cuda
