#include "kernels/common/dtype.h"

#include <cmath>

namespace kl {

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
    case DType::kF64: return "F64";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
    case DType::kU8: return "U8";
  }
  return "?";
}

bool ParseDTypeName(std::string_view s, DType* out) {
  static constexpr struct { std::string_view name; DType t; } kNames[] = {
      {"F32", DType::kF32}, {"BF16", DType::kBF16}, {"F16", DType::kF16}, {"F64", DType::kF64},
      {"I32", DType::kI32}, {"I64", DType::kI64},   {"U8", DType::kU8}};
  for (const auto& n : kNames) {
    if (n.name == s) { *out = n.t; return true; }
  }
  return false;
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(mant), -24);
  else if (exp == 31) v = mant ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(mant | 0x400), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

uint16_t F32ToF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  const uint32_t abs = u & 0x7fffffff;
  if (abs > 0x7f800000) return static_cast<uint16_t>(sign | 0x7e00);  // NaN
  if (abs >= 0x47800000) return static_cast<uint16_t>(sign | 0x7c00);  // >= 65536: inf
  if (abs < 0x38800000) {  // subnormal in fp16
    float a;
    std::memcpy(&a, &abs, 4);
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(a * 16777216.0f));  // 2^24
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t r = abs - 0x38000000;  // rebias exponent 127 -> 15
  r += 0xfff + ((r >> 13) & 1);   // round to nearest even on the dropped 13 bits
  return static_cast<uint16_t>(sign | (r >> 13));
}

void Bf16ToF32(const uint16_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = Bf16ToF32(in[i]);
}
void F32ToBf16(const float* in, uint16_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = F32ToBf16(in[i]);
}
void F16ToF32(const uint16_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = F16ToF32(in[i]);
}

bool ToF32(DType t, const void* src, float* out, size_t n) {
  switch (t) {
    case DType::kF32: std::memcpy(out, src, n * 4); return true;
    case DType::kBF16: Bf16ToF32(static_cast<const uint16_t*>(src), out, n); return true;
    case DType::kF16: F16ToF32(static_cast<const uint16_t*>(src), out, n); return true;
    case DType::kF64: {
      const double* d = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(d[i]);
      return true;
    }
    default: return false;
  }
}

}  // namespace kl
