// Element types that cross module boundaries (checkpoints, state bundles, kernels)
// and exact scalar conversions between bf16 / fp16 and fp32.
#ifndef KL_KERNELS_COMMON_DTYPE_H_
#define KL_KERNELS_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace kl {

enum class DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3, kI32 = 4, kI64 = 5, kU8 = 6 };

inline size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32: case DType::kI32: return 4;
    case DType::kBF16: case DType::kF16: return 2;
    case DType::kF64: case DType::kI64: return 8;
    case DType::kU8: return 1;
  }
  return 0;
}

// Safetensors spelling ("F32", "BF16", ...).
std::string_view DTypeName(DType t);
// Parses a safetensors dtype string; false if unknown.
bool ParseDTypeName(std::string_view s, DType* out);

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even; NaN stays NaN (quiet).
inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);

// Bulk conversions (n elements).
void Bf16ToF32(const uint16_t* in, float* out, size_t n);
void F32ToBf16(const float* in, uint16_t* out, size_t n);
void F16ToF32(const uint16_t* in, float* out, size_t n);
// Converts n elements of `src` (of type t) to fp32; false for non-float types.
bool ToF32(DType t, const void* src, float* out, size_t n);

}  // namespace kl

#endif  // KL_KERNELS_COMMON_DTYPE_H_
