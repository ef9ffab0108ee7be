// The hot loops of a StateBundle: fp32 -> wire payload (writer) and wire
// payload -> fp32 import (assembler), with the CRC-32C computed block by block
// while the data is in L1, dtype conversion (F32, BF16), the transposing
// imports for V-first KDA states and channel-major conv tails, and a scan for
// all-zero / non-finite values in the same pass. Sources may be unaligned
// (frames sit at any offset of a blob). Built with -O3 so the loops vectorise.
#ifndef KL_ENGINE_STATE_BUNDLE_CONVERT_H_
#define KL_ENGINE_STATE_BUNDLE_CONVERT_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/common/dtype.h"

namespace kl {

// What the imported values looked like (as fp32).
struct ImportStats {
  bool any_nonzero = false;    // some value is not +-0
  bool any_nonfinite = false;  // some value is Inf or NaN
  void Merge(const ImportStats& o) {
    any_nonzero |= o.any_nonzero;
    any_nonfinite |= o.any_nonfinite;
  }
};

// Appends src[0, n) to `out` in `dtype` (kF32, or kBF16 rounded to nearest
// even); returns Crc32c of the appended bytes continuing from `crc`.
uint32_t ExportPayload(const float* src, size_t n, DType dtype, std::string* out, uint32_t crc);

// dst[i] = src[i] for i < n; `dtype` is kF32 or kBF16. If `crc` is not null it
// is extended (Crc32c) over the n * DTypeSize(dtype) source bytes.
ImportStats ImportContiguous(DType dtype, const char* src, float* dst, size_t n, uint32_t* crc);

// src holds a [rows][cols] matrix; writes dst[c * dst_stride + r] = src[r][c].
// V-first KDA state head: rows = V, cols = K, dst_stride = V gives [K][V].
// Channel-major conv tail: rows = channels, cols = W-1, dst_stride = KdaDim.
ImportStats ImportTransposed(DType dtype, const char* src, size_t rows, size_t cols, float* dst,
                             size_t dst_stride);

}  // namespace kl

#endif  // KL_ENGINE_STATE_BUNDLE_CONVERT_H_
