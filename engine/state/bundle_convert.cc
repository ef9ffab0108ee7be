#include "engine/state/bundle_convert.h"

#include <algorithm>
#include <cstring>

#include "kernels/common/crc32c.h"

namespace kl {
namespace {

// Elements per block: 16 KiB of f32, small enough to stay in L1 between the
// CRC and the conversion.
constexpr size_t kBlockElems = 4096;

template <bool kBf16>
inline float Load(const char* src, size_t i) {
  if constexpr (kBf16) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    return Bf16ToF32(h);
  } else {
    float f;
    std::memcpy(&f, src + 4 * i, 4);
    return f;
  }
}

// Branch-free F32ToBf16 (same rounding and NaN handling) so the loop vectorises.
inline uint16_t ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

// Copies / converts n values and ORs their bit patterns into the accumulators.
template <bool kBf16>
void ConvertBlock(const char* src, float* dst, size_t n, uint32_t* magnitude_bits,
                  uint32_t* nonfinite) {
  uint32_t mag = 0, inf = 0;
  for (size_t i = 0; i < n; ++i) {
    const float f = Load<kBf16>(src, i);
    dst[i] = f;
    uint32_t u;
    std::memcpy(&u, &f, 4);
    mag |= u & 0x7FFFFFFFu;
    inf |= (u & 0x7F800000u) == 0x7F800000u;
  }
  *magnitude_bits |= mag;
  *nonfinite |= inf;
}

template <bool kBf16>
ImportStats Contiguous(const char* src, float* dst, size_t n, uint32_t* crc) {
  constexpr size_t kSize = kBf16 ? 2 : 4;
  uint32_t mag = 0, inf = 0;
  for (size_t i = 0; i < n; i += kBlockElems) {
    const size_t m = std::min(kBlockElems, n - i);
    const char* block = src + i * kSize;
    if (crc != nullptr) *crc = Crc32c(block, m * kSize, *crc);
    ConvertBlock<kBf16>(block, dst + i, m, &mag, &inf);
  }
  return {mag != 0, inf != 0};
}

template <bool kBf16>
ImportStats Transposed(const char* src, size_t rows, size_t cols, float* dst, size_t stride) {
  constexpr size_t kTile = 16;  // 16x16 tiles keep both sides in L1
  uint32_t mag = 0, inf = 0;
  for (size_t r0 = 0; r0 < rows; r0 += kTile) {
    const size_t r1 = std::min(rows, r0 + kTile);
    for (size_t c0 = 0; c0 < cols; c0 += kTile) {
      const size_t c1 = std::min(cols, c0 + kTile);
      for (size_t c = c0; c < c1; ++c) {
        float* out = dst + c * stride;
        for (size_t r = r0; r < r1; ++r) {
          const float f = Load<kBf16>(src, r * cols + c);
          out[r] = f;
          uint32_t u;
          std::memcpy(&u, &f, 4);
          mag |= u & 0x7FFFFFFFu;
          inf |= (u & 0x7F800000u) == 0x7F800000u;
        }
      }
    }
  }
  return {mag != 0, inf != 0};
}

}  // namespace

uint32_t ExportPayload(const float* src, size_t n, DType dtype, std::string* out, uint32_t crc) {
  if (dtype == DType::kF32) {
    for (size_t i = 0; i < n; i += kBlockElems) {
      const size_t bytes = std::min(kBlockElems, n - i) * sizeof(float);
      out->append(reinterpret_cast<const char*>(src + i), bytes);
      crc = Crc32c(out->data() + out->size() - bytes, bytes, crc);
    }
    return crc;
  }
  uint16_t half[kBlockElems];
  for (size_t i = 0; i < n; i += kBlockElems) {
    const size_t m = std::min(kBlockElems, n - i);
    for (size_t j = 0; j < m; ++j) half[j] = ToBf16(src[i + j]);
    out->append(reinterpret_cast<const char*>(half), m * sizeof(uint16_t));
    crc = Crc32c(half, m * sizeof(uint16_t), crc);
  }
  return crc;
}

ImportStats ImportContiguous(DType dtype, const char* src, float* dst, size_t n, uint32_t* crc) {
  return dtype == DType::kBF16 ? Contiguous<true>(src, dst, n, crc)
                               : Contiguous<false>(src, dst, n, crc);
}

ImportStats ImportTransposed(DType dtype, const char* src, size_t rows, size_t cols, float* dst,
                             size_t dst_stride) {
  return dtype == DType::kBF16 ? Transposed<true>(src, rows, cols, dst, dst_stride)
                               : Transposed<false>(src, rows, cols, dst, dst_stride);
}

}  // namespace kl
