// Kernels of the device-to-device state transport (services/transport): packing
// a sequence's paged latent rows into one contiguous buffer and back, and a
// position-keyed 64-bit checksum of device bytes that both ends of a transfer
// compute on the GPU (memory-bound; a byte-serial CRC would cost more than the
// NVLink transfer it checks).
#ifndef KL_KERNELS_CUDA_TRANSFER_H_
#define KL_KERNELS_CUDA_TRANSFER_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace kl::cuda {

// Rows [row_begin, row_end) of one sequence in a paged pool
// ([pages][page_rows][row_bytes]); row r lives in page pages[r / page_rows].
struct PagedRows {
  void* pool = nullptr;
  const int32_t* pages = nullptr;  // device
  int64_t page_rows = 0;
  int64_t row_bytes = 0;           // a multiple of 16
};

// dst[(r - row_begin) * row_bytes ...] = row r, for r in [row_begin, row_end).
// With `sum` (device), also *sum += Checksum64 of the packed bytes (first word
// 0) in the same pass: the caller zeroes *sum, as for Checksum64Batch.
absl::Status PackRows(const PagedRows& src, int64_t row_begin, int64_t row_end, void* dst,
                      cudaStream_t stream, uint64_t* sum = nullptr);
// The reverse: writes rows [row_begin, row_end) of `dst` from contiguous `src`;
// with `sum`, *sum += Checksum64 of `src`'s bytes in the same pass.
absl::Status UnpackRows(const void* src, int64_t row_begin, int64_t row_end, const PagedRows& dst,
                        cudaStream_t stream, uint64_t* sum = nullptr);

// *out (device) = Checksum64(bytes of p); `bytes` a multiple of 4, p 4-aligned.
// Enqueued on `stream` (zeroes *out first).
absl::Status Checksum64(const void* p, int64_t bytes, uint64_t* out, cudaStream_t stream);

// Many spans in one launch (a transfer's group of messages): *spans[i].out +=
// Checksum64(spans[i]) for every i — the caller zeroes the outputs (the sum is
// additive, so spans may share an output: the sum of their checksums). Any n;
// launches ceil(n / kChecksumBatch) kernels.
struct ChecksumSpan {
  const void* p = nullptr;
  int64_t bytes = 0;        // a multiple of 4, p 4-aligned
  uint64_t* out = nullptr;  // device
  // Position of the span's first 8-byte word: the spans of one message number
  // their words on from one another, so exchanging two of them changes the sum.
  int64_t first_word = 0;
};
inline constexpr int kChecksumBatch = 48;
absl::Status Checksum64Batch(const ChecksumSpan* spans, int n, cudaStream_t stream);

// FAULT INJECTION (tests): flips bit `bit` (0-7) of the byte at device address
// `p`, enqueued on `stream`. Twice restores it. Damages bytes in flight after
// the sender summed them, so that the receiver's own sum must catch it.
absl::Status FlipBit(void* p, int bit, cudaStream_t stream);

// The same function on the host (tests; the definition both sides implement):
// words w_i = little-endian u64 of bytes [8i, 8i + 8) (zero-padded), sum over i
// of Mix(w_i ^ (first_word + i + 1) * 0x9E3779B97F4A7C15), plus
// bytes * 0xD6E8FEB86659FD93, all mod 2^64.
inline uint64_t ChecksumMix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
uint64_t Checksum64Host(const void* p, int64_t bytes, int64_t first_word = 0);

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_TRANSFER_H_
