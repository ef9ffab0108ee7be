#include "kernels/cuda/transfer.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_status.h"

namespace kl::cuda {
namespace {

constexpr uint64_t kPosKey = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kLenKey = 0xD6E8FEB86659FD93ull;

__device__ __forceinline__ uint64_t DevMix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One thread per 16-byte chunk of a row; grid-stride over (row, chunk). With
// kSum, the thread also folds the chunk's two 64-bit words of the flat buffer
// (positions 2i, 2i + 1 of the message) into *sum, as Checksum64 of the flat
// bytes would: each block's sum is added atomically and the first thread adds
// the length term. One pass over the bytes instead of a copy and a checksum.
template <bool kPack, bool kSum>
__global__ void CopyRowsKernel(PagedRows paged, int64_t row_begin, int64_t rows, char* flat,
                               unsigned long long* sum) {
  const int64_t chunks = paged.row_bytes / 16;
  const int64_t total = rows * chunks;
  uint64_t acc = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / chunks, c = i % chunks;
    const int64_t row = row_begin + r;
    const int64_t page = paged.pages[row / paged.page_rows];
    char* p = static_cast<char*>(paged.pool) +
              (page * paged.page_rows + row % paged.page_rows) * paged.row_bytes + c * 16;
    char* f = flat + r * paged.row_bytes + c * 16;  // == flat + 16 i
    uint4 v;
    if (kPack) {
      v = *reinterpret_cast<const uint4*>(p);
      *reinterpret_cast<uint4*>(f) = v;
    } else {
      v = *reinterpret_cast<const uint4*>(f);
      *reinterpret_cast<uint4*>(p) = v;
    }
    if (kSum) {
      const uint64_t w0 = v.x | (static_cast<uint64_t>(v.y) << 32);
      const uint64_t w1 = v.z | (static_cast<uint64_t>(v.w) << 32);
      const uint64_t pos = 2 * static_cast<uint64_t>(i) + 1;
      acc += DevMix(w0 ^ (pos * kPosKey)) + DevMix(w1 ^ ((pos + 1) * kPosKey));
    }
  }
  if (kSum) {
    // One atomic per block (the grid is capped for this): thousands of warps
    // adding to one address would serialise behind each other.
    __shared__ uint64_t warp_sums[32];
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      acc += static_cast<uint64_t>(total * 16) * kLenKey;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      uint64_t b = 0;
      for (unsigned w = 0; w < blockDim.x / 32; ++w) b += warp_sums[w];
      if (b != 0) atomicAdd(sum, static_cast<unsigned long long>(b));
    }
  }
}

// Blocks of a summing pack / scatter: enough to stream the bytes, few enough
// that the per-block atomics stay cheap.
constexpr int kMaxSumBlocks = 1024;

// Up to kChecksumBatch spans; blocks [first_block[i], first_block[i + 1]) fold
// span i. Each thread folds the 64-bit words it owns; warp sums go to the
// span's output atomically (integer addition: the order does not matter), and
// the first thread of a span's first block adds the length term.
struct BatchArgs {
  const uint32_t* p[kChecksumBatch];
  int64_t words32[kChecksumBatch];
  unsigned long long* out[kChecksumBatch];
  int64_t first_word[kChecksumBatch];
  int first_block[kChecksumBatch + 1];
  int n;
};

__global__ void ChecksumBatchKernel(const __grid_constant__ BatchArgs a) {
  int s = 0;
  while (s + 1 < a.n && static_cast<int>(blockIdx.x) >= a.first_block[s + 1]) ++s;
  const int64_t blocks = a.first_block[s + 1] - a.first_block[s];
  const int64_t block = blockIdx.x - a.first_block[s];
  const int64_t words32 = a.words32[s];
  const uint32_t* p = a.p[s];
  const uint64_t pos = static_cast<uint64_t>(a.first_word[s]) + 1;
  const int64_t words = (words32 + 1) / 2;
  uint64_t acc = 0;
  for (int64_t i = block * blockDim.x + threadIdx.x; i < words; i += blocks * blockDim.x) {
    const uint64_t lo = p[2 * i];
    const uint64_t hi = 2 * i + 1 < words32 ? p[2 * i + 1] : 0;
    acc += DevMix((lo | (hi << 32)) ^ ((static_cast<uint64_t>(i) + pos) * kPosKey));
  }
  if (block == 0 && threadIdx.x == 0) acc += static_cast<uint64_t>(words32 * 4) * kLenKey;
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0 && acc != 0) atomicAdd(a.out[s], static_cast<unsigned long long>(acc));
}

__global__ void FlipBitKernel(unsigned char* p, unsigned char mask) { *p ^= mask; }

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerSpan = 1024;

int Blocks(int64_t work, int threads) {
  const int64_t b = (work + threads - 1) / threads;
  return static_cast<int>(b < 1 ? 1 : (b > 4096 ? 4096 : b));
}

absl::Status CheckPaged(const PagedRows& p, int64_t row_begin, int64_t row_end) {
  if (p.pool == nullptr || p.pages == nullptr || p.page_rows <= 0 || p.row_bytes <= 0 ||
      p.row_bytes % 16 != 0 || row_begin < 0 || row_end < row_begin) {
    return absl::InvalidArgumentError(absl::StrCat("PagedRows: bad geometry (row_bytes ",
                                                   p.row_bytes, ", rows [", row_begin, ", ",
                                                   row_end, "))"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status PackRows(const PagedRows& src, int64_t row_begin, int64_t row_end, void* dst,
                      cudaStream_t stream, uint64_t* sum) {
  if (absl::Status s = CheckPaged(src, row_begin, row_end); !s.ok()) return s;
  if (row_end == row_begin && sum == nullptr) return absl::OkStatus();
  const int64_t work = (row_end - row_begin) * (src.row_bytes / 16);
  auto* out = reinterpret_cast<unsigned long long*>(sum);
  char* flat = static_cast<char*>(dst);
  if (sum != nullptr) {
    // Even an empty message adds its (zero) length term: launch for one block.
    CopyRowsKernel<true, true><<<std::min(Blocks(work, 256), kMaxSumBlocks), 256, 0, stream>>>(
        src, row_begin, row_end - row_begin, flat, out);
  } else {
    CopyRowsKernel<true, false><<<Blocks(work, 256), 256, 0, stream>>>(
        src, row_begin, row_end - row_begin, flat, nullptr);
  }
  return CudaStatus(cudaGetLastError(), "PackRows");
}

absl::Status UnpackRows(const void* src, int64_t row_begin, int64_t row_end, const PagedRows& dst,
                        cudaStream_t stream, uint64_t* sum) {
  if (absl::Status s = CheckPaged(dst, row_begin, row_end); !s.ok()) return s;
  if (row_end == row_begin && sum == nullptr) return absl::OkStatus();
  const int64_t work = (row_end - row_begin) * (dst.row_bytes / 16);
  auto* out = reinterpret_cast<unsigned long long*>(sum);
  char* flat = const_cast<char*>(static_cast<const char*>(src));
  if (sum != nullptr) {
    CopyRowsKernel<false, true><<<std::min(Blocks(work, 256), kMaxSumBlocks), 256, 0, stream>>>(
        dst, row_begin, row_end - row_begin, flat, out);
  } else {
    CopyRowsKernel<false, false><<<Blocks(work, 256), 256, 0, stream>>>(
        dst, row_begin, row_end - row_begin, flat, nullptr);
  }
  return CudaStatus(cudaGetLastError(), "UnpackRows");
}

namespace {

absl::Status CheckSpans(const ChecksumSpan* spans, int n) {
  for (int i = 0; i < n; ++i) {
    const ChecksumSpan& c = spans[i];
    if (c.bytes < 0 || c.bytes % 4 != 0 || reinterpret_cast<uintptr_t>(c.p) % 4 != 0 ||
        c.out == nullptr || (c.bytes > 0 && c.p == nullptr)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Checksum64: span ", i, " of ", c.bytes, " bytes; needs a multiple of 4, 4-aligned"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Checksum64Batch(const ChecksumSpan* spans, int n, cudaStream_t stream) {
  if (absl::Status s = CheckSpans(spans, n); !s.ok()) return s;
  for (int base = 0; base < n; base += kChecksumBatch) {
    BatchArgs a{};
    a.n = n - base < kChecksumBatch ? n - base : kChecksumBatch;
    int blocks = 0;
    for (int i = 0; i < a.n; ++i) {
      const ChecksumSpan& c = spans[base + i];
      a.p[i] = static_cast<const uint32_t*>(c.p);
      a.words32[i] = c.bytes / 4;
      a.out[i] = reinterpret_cast<unsigned long long*>(c.out);
      a.first_word[i] = c.first_word;
      a.first_block[i] = blocks;
      // About 8 words per thread, at most kMaxBlocksPerSpan blocks (grid-stride beyond).
      const int64_t want = ((a.words32[i] + 1) / 2 + kThreads * 8 - 1) / (kThreads * 8);
      blocks += static_cast<int>(want < 1 ? 1 : (want > kMaxBlocksPerSpan ? kMaxBlocksPerSpan : want));
    }
    a.first_block[a.n] = blocks;
    ChecksumBatchKernel<<<blocks, kThreads, 0, stream>>>(a);
    KL_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

absl::Status Checksum64(const void* p, int64_t bytes, uint64_t* out, cudaStream_t stream) {
  if (out == nullptr) return absl::InvalidArgumentError("Checksum64: no output");
  const ChecksumSpan span{p, bytes, out};
  if (absl::Status s = CheckSpans(&span, 1); !s.ok()) return s;
  KL_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out, 0, sizeof(uint64_t), stream));
  return Checksum64Batch(&span, 1, stream);
}

absl::Status FlipBit(void* p, int bit, cudaStream_t stream) {
  if (p == nullptr || bit < 0 || bit > 7) {
    return absl::InvalidArgumentError("FlipBit: bad byte or bit");
  }
  FlipBitKernel<<<1, 1, 0, stream>>>(static_cast<unsigned char*>(p),
                                     static_cast<unsigned char>(1u << bit));
  KL_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

uint64_t Checksum64Host(const void* p, int64_t bytes, int64_t first_word) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  const int64_t words = (bytes + 7) / 8;
  uint64_t acc = 0;
  for (int64_t i = 0; i < words; ++i) {
    uint64_t w = 0;
    const int64_t n = bytes - 8 * i < 8 ? bytes - 8 * i : 8;
    std::memcpy(&w, b + 8 * i, static_cast<size_t>(n));
    acc += ChecksumMix(w ^ ((static_cast<uint64_t>(first_word) + i + 1) * kPosKey));
  }
  return acc + static_cast<uint64_t>(bytes) * kLenKey;
}

}  // namespace kl::cuda
