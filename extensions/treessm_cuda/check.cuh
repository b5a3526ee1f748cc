// TREESSM_CHECK(cond, parts...): TORCH_CHECK whose message is built without C++ streams.
//
// c10's messages go through an inline std::ostringstream, compiled into this library. Where
// the toolchain links libstdc++ statically into the library (a second copy beside the one
// torch uses), streaming a number through it fails: the message is cut at the first number
// or the process crashes. Every check of the operators' arguments goes through here instead:
// numbers become text with std::to_string / snprintf, c10 values with their own functions,
// and c10 receives one finished std::string.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace treessm_cuda {
namespace check_detail {

inline void append(std::string& s, const char* text) { s += text; }
inline void append(std::string& s, const std::string& text) { s += text; }
inline void append(std::string& s, std::string_view text) { s.append(text.data(), text.size()); }
inline void append(std::string& s, char c) { s += c; }
inline void append(std::string& s, bool value) { s += value ? "true" : "false"; }

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
void append(std::string& s, T value) {
  s += std::to_string(value);
}

template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
void append(std::string& s, T value) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", static_cast<double>(value));
  s += text;
}

inline void append(std::string& s, c10::IntArrayRef values) {
  s += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(values[i]);
  }
  s += ']';
}

inline void append(std::string& s, const c10::Device& device) { s += device.str(); }
inline void append(std::string& s, c10::ScalarType type) { s += c10::toString(type); }

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace check_detail
}  // namespace treessm_cuda

// The parts are evaluated only when `cond` fails, as TORCH_CHECK's.
#define TREESSM_CHECK(cond, ...) \
  TORCH_CHECK(cond, ::treessm_cuda::check_detail::message(__VA_ARGS__))
