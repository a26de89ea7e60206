// mixpeft/io/dtype.hpp — on-disk element types and their conversions to and from host scalars.
//
// DType names follow the safetensors spelling (F32, BF16, I64, ...). Stored bytes are little-endian.
//   F16  (IEEE binary16): 1 sign, 5 exponent (bias 15), 10 mantissa bits; max 65504, min normal 2^-14,
//                         subnormals down to 2^-24.
//   BF16 (bfloat16):      the top 16 bits of a binary32: 1 sign, 8 exponent (bias 127), 7 mantissa bits.
//   F8_E4M3 (e4m3fn):     bias 7, no infinities, S.1111.111 is NaN (read only).
//   F8_E5M2:              the top 8 bits of a binary16 (read only).
// float -> F16 / BF16 rounds to nearest, ties to even; values beyond the largest finite half become
// +-Inf, values below half the smallest subnormal become +-0, NaN stays NaN (quiet, sign kept).
// A double is narrowed to float first (as torch's double -> half does). Narrow -> float is exact.
//
// decode_values / encode_values convert n elements between a little-endian byte buffer of a DType and
// host scalars T (float, double or an integer type). Integer DTypes are written only from integer T.
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string_view>
#include <type_traits>

#include "mixpeft/core/error.hpp"

namespace mixpeft {

enum class DType : std::uint8_t { BOOL, U8, I8, U16, I16, U32, I32, U64, I64, F8_E4M3, F8_E5M2, F16, BF16, F32, F64 };

inline constexpr DType all_dtypes[] = {DType::BOOL, DType::U8,      DType::I8,      DType::U16, DType::I16,
                                       DType::U32,  DType::I32,     DType::U64,     DType::I64, DType::F8_E4M3,
                                       DType::F8_E5M2, DType::F16,  DType::BF16,    DType::F32, DType::F64};

constexpr std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::BOOL: case DType::U8: case DType::I8: case DType::F8_E4M3: case DType::F8_E5M2: return 1;
    case DType::U16: case DType::I16: case DType::F16: case DType::BF16: return 2;
    case DType::U32: case DType::I32: case DType::F32: return 4;
    case DType::U64: case DType::I64: case DType::F64: return 8;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType d) {
  switch (d) {
    case DType::BOOL: return "BOOL";
    case DType::U8: return "U8";
    case DType::I8: return "I8";
    case DType::U16: return "U16";
    case DType::I16: return "I16";
    case DType::U32: return "U32";
    case DType::I32: return "I32";
    case DType::U64: return "U64";
    case DType::I64: return "I64";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E5M2: return "F8_E5M2";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F32: return "F32";
    case DType::F64: return "F64";
  }
  return "?";
}

constexpr std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType d : all_dtypes)
    if (dtype_name(d) == name) return d;
  return std::nullopt;
}

constexpr bool is_floating(DType d) {
  return d == DType::F8_E4M3 || d == DType::F8_E5M2 || d == DType::F16 || d == DType::BF16 || d == DType::F32 ||
         d == DType::F64;
}

// The DType that stores a host scalar exactly.
template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::F32;
  else if constexpr (std::is_same_v<T, double>) return DType::F64;
  else if constexpr (std::is_same_v<T, bool>) return DType::BOOL;
  else if constexpr (std::is_integral_v<T>) {
    constexpr DType s[] = {DType::I8, DType::I16, DType::I32, DType::I64};
    constexpr DType u[] = {DType::U8, DType::U16, DType::U32, DType::U64};
    constexpr int k = std::bit_width(sizeof(T)) - 1;
    return std::is_signed_v<T> ? s[k] : u[k];
  } else static_assert(sizeof(T) == 0, "dtype_of: no DType for this scalar type");
}

// ---- binary16 and bfloat16 ------------------------------------------------------------------------

inline std::uint16_t float_to_f16(float value) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(value);
  const std::uint16_t sign = std::uint16_t((x >> 16) & 0x8000u);
  const std::uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u)  // Inf, or NaN with its top payload bits kept and the quiet bit set
    return std::uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u));
  if (a >= 0x47800000u) return std::uint16_t(sign | 0x7c00u);  // >= 65536: overflow
  const auto round_shift = [](std::uint32_t v, int shift) {    // v >> shift, ties to even
    const std::uint32_t kept = v >> shift, rest = v & ((1u << shift) - 1u), half = 1u << (shift - 1);
    return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
  };
  if (a >= 0x38800000u)  // normal half: rebias the exponent; a carry out of the mantissa is correct
    return std::uint16_t(sign | round_shift(a - 0x38000000u, 13));
  const int shift = 126 - int(a >> 23);  // subnormal half: value = m * 2^-24 with m = mantissa >> shift
  if (shift > 24) return sign;
  return std::uint16_t(sign | round_shift((a & 0x7fffffu) | 0x800000u, shift));
}

inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    const float magnitude = float(mantissa) * 0x1p-24f;  // exact: at most 10 significant bits
    return sign ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline std::uint16_t float_to_bf16(float value) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((x >> 16) | 0x40u);  // quiet NaN
  return std::uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);  // overflow rounds into Inf, as it should
}

inline float bf16_to_float(std::uint16_t b) { return std::bit_cast<float>(std::uint32_t(b) << 16); }

inline float f8_e4m3_to_float(std::uint8_t v) {
  const bool negative = v & 0x80u;
  const int exponent = (v >> 3) & 0xf, mantissa = v & 0x7;
  float magnitude;
  if (exponent == 0xf && mantissa == 0x7) magnitude = std::numeric_limits<float>::quiet_NaN();
  else if (exponent == 0) magnitude = std::ldexp(float(mantissa), -9);
  else magnitude = std::ldexp(float(8 + mantissa), exponent - 10);
  return negative ? -magnitude : magnitude;
}

inline float f8_e5m2_to_float(std::uint8_t v) { return f16_to_float(std::uint16_t(v) << 8); }

// ---- byte buffers -----------------------------------------------------------------------------------

namespace detail::dtype {

template <class U>
U load_le(const std::byte* p) {
  U u;
  std::memcpy(&u, p, sizeof(U));
  if constexpr (std::endian::native == std::endian::big && sizeof(U) > 1) {
    unsigned char b[sizeof(U)];
    std::memcpy(b, &u, sizeof(U));
    for (std::size_t i = 0; i < sizeof(U) / 2; ++i) std::swap(b[i], b[sizeof(U) - 1 - i]);
    std::memcpy(&u, b, sizeof(U));
  }
  return u;
}

template <class U>
void store_le(std::byte* p, U u) {
  if constexpr (std::endian::native == std::endian::big && sizeof(U) > 1) u = load_le<U>(reinterpret_cast<std::byte*>(&u));
  std::memcpy(p, &u, sizeof(U));
}

template <class T, class Convert>
void decode_loop(const std::byte* in, std::size_t n, std::size_t stride, T* out, Convert convert) {
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(convert(in + i * stride));
}

template <class U, class T>
void encode_loop(const T* in, std::size_t n, std::byte* out) {
  for (std::size_t i = 0; i < n; ++i) store_le<U>(out + i * sizeof(U), static_cast<U>(in[i]));
}

}  // namespace detail::dtype

// Converts n stored elements of type `src` (little-endian bytes) to host scalars.
template <class T>
void decode_values(DType src, const std::byte* in, std::size_t n, T* out) {
  namespace dd = detail::dtype;
  const std::size_t w = dtype_size(src);
  switch (src) {
    case DType::BOOL: return dd::decode_loop(in, n, w, out, [](const std::byte* p) { return *p != std::byte{0}; });
    case DType::U8: return dd::decode_loop(in, n, w, out, dd::load_le<std::uint8_t>);
    case DType::I8: return dd::decode_loop(in, n, w, out, dd::load_le<std::int8_t>);
    case DType::U16: return dd::decode_loop(in, n, w, out, dd::load_le<std::uint16_t>);
    case DType::I16: return dd::decode_loop(in, n, w, out, dd::load_le<std::int16_t>);
    case DType::U32: return dd::decode_loop(in, n, w, out, dd::load_le<std::uint32_t>);
    case DType::I32: return dd::decode_loop(in, n, w, out, dd::load_le<std::int32_t>);
    case DType::U64: return dd::decode_loop(in, n, w, out, dd::load_le<std::uint64_t>);
    case DType::I64: return dd::decode_loop(in, n, w, out, dd::load_le<std::int64_t>);
    case DType::F8_E4M3:
      return dd::decode_loop(in, n, w, out, [](const std::byte* p) { return f8_e4m3_to_float(std::uint8_t(*p)); });
    case DType::F8_E5M2:
      return dd::decode_loop(in, n, w, out, [](const std::byte* p) { return f8_e5m2_to_float(std::uint8_t(*p)); });
    case DType::F16:
      return dd::decode_loop(in, n, w, out,
                             [](const std::byte* p) { return f16_to_float(dd::load_le<std::uint16_t>(p)); });
    case DType::BF16:
      return dd::decode_loop(in, n, w, out,
                             [](const std::byte* p) { return bf16_to_float(dd::load_le<std::uint16_t>(p)); });
    case DType::F32: return dd::decode_loop(in, n, w, out, dd::load_le<float>);
    case DType::F64: return dd::decode_loop(in, n, w, out, dd::load_le<double>);
  }
}

// Whether encode_values<T> can write `dst` (floating DTypes from any T, integer DTypes from integer T).
template <class T>
constexpr bool can_encode(DType dst) {
  if (dst == DType::F8_E4M3 || dst == DType::F8_E5M2) return false;
  return is_floating(dst) || std::is_integral_v<T>;
}

// Converts n host scalars to `dst` little-endian bytes (out holds n * dtype_size(dst) bytes).
template <class T>
void encode_values(DType dst, const T* in, std::size_t n, std::byte* out) {
  namespace dd = detail::dtype;
  require<ConfigError>(can_encode<T>(dst), "encode_values: cannot write ", dtype_name(dst),
                       is_floating(dst) ? "" : " from a floating-point tensor");
  switch (dst) {
    case DType::F16:
      for (std::size_t i = 0; i < n; ++i) dd::store_le(out + 2 * i, float_to_f16(static_cast<float>(in[i])));
      return;
    case DType::BF16:
      for (std::size_t i = 0; i < n; ++i) dd::store_le(out + 2 * i, float_to_bf16(static_cast<float>(in[i])));
      return;
    case DType::F32: return dd::encode_loop<float>(in, n, out);
    case DType::F64: return dd::encode_loop<double>(in, n, out);
    case DType::BOOL:
      for (std::size_t i = 0; i < n; ++i) out[i] = std::byte(in[i] != T(0) ? 1 : 0);
      return;
    case DType::U8: return dd::encode_loop<std::uint8_t>(in, n, out);
    case DType::I8: return dd::encode_loop<std::int8_t>(in, n, out);
    case DType::U16: return dd::encode_loop<std::uint16_t>(in, n, out);
    case DType::I16: return dd::encode_loop<std::int16_t>(in, n, out);
    case DType::U32: return dd::encode_loop<std::uint32_t>(in, n, out);
    case DType::I32: return dd::encode_loop<std::int32_t>(in, n, out);
    case DType::U64: return dd::encode_loop<std::uint64_t>(in, n, out);
    case DType::I64: return dd::encode_loop<std::int64_t>(in, n, out);
    case DType::F8_E4M3: case DType::F8_E5M2: return;
  }
}

}  // namespace mixpeft
