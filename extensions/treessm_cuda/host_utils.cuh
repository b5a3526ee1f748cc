// Host-side helpers shared by the extension's translation units: the CUDA element type of a
// torch scalar type, the dispatch over the element types the scans take, device attributes
// queried once, the dynamic shared-memory opt-in of kernel launches, the check of a
// contiguous matrix argument and the data of an optional one.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>

#include "check.cuh"

namespace treessm_cuda {

// The CUDA type of a torch element type (at::Half -> __half, at::BFloat16 -> __nv_bfloat16).
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

// Runs the statement for the element types of the scans: float32, float64, float16, bfloat16
// (`scalar_t` is the torch type; CudaType<scalar_t>::type the CUDA one).
#define TREESSM_DISPATCH_TYPES(TYPE, NAME, ...)                                              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                              \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)                     \
                     AT_DISPATCH_CASE(at::ScalarType::Double, __VA_ARGS__)                    \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)                      \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// The accumulation type of the scans for an element type: float64 for float64, float32
// otherwise (numeric.cuh's AccType on the device side).
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

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

// Checks that `t` (the argument `name`) is a contiguous CUDA [rows, cols] matrix of dtype.
inline void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols,
                       at::ScalarType dtype) {
  TREESSM_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TREESSM_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TREESSM_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name,
                " must have shape [", rows, ", ", cols, "], got ", t.sizes());
}

// Checks that `t` (the argument `name`) is a contiguous CUDA tensor of `like`'s shape and
// device, of dtype `dtype` where given, else of `like`'s.
inline void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like,
                       std::optional<at::ScalarType> dtype = std::nullopt) {
  const at::ScalarType want = dtype.value_or(like.scalar_type());
  TREESSM_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TREESSM_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ",
                t.sizes());
  TREESSM_CHECK(t.scalar_type() == want, name, " must have dtype ", want, ", got ",
                t.scalar_type());
  TREESSM_CHECK(t.device() == like.device(), name, " must be on ", like.device());
}

// The data of an optional tensor argument, or null where it is absent.
template <typename T>
const T* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace treessm_cuda
