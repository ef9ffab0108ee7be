// Helpers shared by the MLA kernels (internal to //kernels/cuda): the paged-cache
// address math on the device, the host-side validation of MlaPagedCache, and what the
// decode kernels (mla_decode.cu, mla_decode_simt.cu) share.
#ifndef KL_KERNELS_CUDA_MLA_DEVICE_CUH_
#define KL_KERNELS_CUDA_MLA_DEVICE_CUH_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/kda_device.cuh"
#include "kernels/cuda/mla.h"

namespace kl::cuda::mla {

// The cache fields the kernels need, by value (kernel argument).
struct CacheView {
  const void* pool;
  const int32_t* block_table;
  int64_t num_pages, page_size, row_dim, max_pages;
};

inline CacheView View(const MlaPagedCache& c) {
  return CacheView{c.pool, c.block_table, c.num_pages, c.page_size, c.row_dim(),
                   c.max_pages_per_seq};
}

// Physical row (page * page_size + offset) of position `pos` of sequence n, or -1 when
// the position is outside the block table or its page id is outside the pool.
__device__ __forceinline__ int64_t PhysRow(const CacheView& c, int64_t n, int64_t pos) {
  if (pos < 0) return -1;
  const int64_t page = pos / c.page_size;
  if (page >= c.max_pages) return -1;
  const int32_t phys = __ldg(c.block_table + n * c.max_pages + page);
  if (phys < 0 || phys >= c.num_pages) return -1;
  return static_cast<int64_t>(phys) * c.page_size + (pos - page * c.page_size);
}

// Sequence that owns packed row t: the largest n with cu[n] <= t, or -1 when t is
// outside [cu[0], cu[N]) (a caller whose host count disagrees with cu[N]).
__device__ __forceinline__ int64_t FindSeq(const int64_t* cu, int64_t N, int64_t t) {
  int64_t lo = 0, hi = N;  // invariant: cu[lo] <= t (if any), answer in [lo, hi]
  if (t < __ldg(cu)) return -1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (__ldg(cu + mid) <= t) lo = mid; else hi = mid - 1;
  }
  return lo < N ? lo : -1;  // lo == N: t >= cu[N]
}

// Host-side checks shared by every launcher.
inline absl::Status ValidateCache(const MlaPagedCache& c) {
  if (c.dtype != DType::kF32 && c.dtype != DType::kBF16) {
    return absl::InvalidArgumentError("MLA cache dtype must be kF32 or kBF16");
  }
  if (c.num_pages < 1 || c.num_pages > INT32_MAX || c.page_size < 1 || c.latent_dim < 1 ||
      c.rope_dim < 0 || c.max_pages_per_seq < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MLA cache shape: num_pages=", c.num_pages, " page_size=", c.page_size,
        " latent_dim=", c.latent_dim, " rope_dim=", c.rope_dim,
        " max_pages_per_seq=", c.max_pages_per_seq));
  }
  if (c.pool == nullptr || c.block_table == nullptr) {
    return absl::InvalidArgumentError("MLA cache: null pool or block table");
  }
  return absl::OkStatus();
}


// ---- shared by the decode kernels (mla_decode.cu, mla_decode_simt.cu) ----------------
constexpr float kLn2 = 0.6931471805599453f;

struct DecodeArgs {
  CacheView c;
  const float* q;
  const int32_t* seq_lens;
  float* out;    // [N][H][dl]               (S == 1)
  float* ws_o;   // [N][S][H][dl] partial o  (S > 1)
  float* ws_ml;  // [N][S][H][2] (max in natural-log units, sum)
  int H, dl, dr, S;
  float scale;  // natural units
};

// Row range [begin, end) of split s of a sequence of length len.
struct SplitRange {
  int64_t begin, end;
};
__device__ __forceinline__ SplitRange RangeOf(int32_t len, int S, int s) {
  if (len <= 0) return {0, 0};
  const int64_t chunk = ((static_cast<int64_t>(len) + S - 1) / S + 63) / 64 * 64;
  const int64_t b = s * chunk;
  const int64_t e = b + chunk < len ? b + chunk : len;
  return {b, e > b ? e : b};
}

// Physical row of position pos (< 2^31) of sequence n, 32-bit division; -1: no page.
__device__ __forceinline__ int64_t PhysRow32(const CacheView& c, int64_t n, int pos) {
  const int ps = static_cast<int>(c.page_size);
  const int page = pos / ps;
  if (page >= c.max_pages) return -1;
  const int32_t phys = __ldg(c.block_table + n * c.max_pages + page);
  if (phys < 0 || phys >= c.num_pages) return -1;
  return static_cast<int64_t>(phys) * ps + (pos - page * ps);
}

// ---- mbarrier / bulk-copy wrappers (sm_90), shared by the tensor-core decode kernels ----
__device__ __forceinline__ void MbarInit(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(dev::SmemAddr(bar)), "r"(count));
}
__device__ __forceinline__ void MbarExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(dev::SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(dev::SmemAddr(bar)) : "memory");
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(dev::SmemAddr(bar)), "r"(parity)
        : "memory");
  }
}
// Bulk global -> shared copy (size and addresses multiples of 16) completing on `bar`.
__device__ __forceinline__ void BulkCopy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          dev::SmemAddr(dst)),
      "l"(src), "r"(bytes), "r"(dev::SmemAddr(bar))
      : "memory");
}

// Device's opt-in shared memory per block (48 KB when it cannot be read).
inline int DeviceSmemOptin() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return 48 * 1024;
  }
  return v;
}

// Raised once per kernel to the device's opt-in limit (the launch's own size is checked
// against that limit before launching).
template <class K>
cudaError_t RaiseSmem(K kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

// SIMT decode kernel (exact fp32; any shape whose shared memory fits) and the split
// combine kernel: mla_decode_simt.cu.
constexpr int kSimtHeads = 8;    // heads per CTA (one warp each for the scores)
constexpr int kSimtRows = 32;    // cache rows per tile (one lane each for the scores)
constexpr int kSimtThreads = 256;
inline size_t SimtSmemBytes(int D, int dl) {
  const int ldt = D | 1;
  return sizeof(float) * (static_cast<size_t>(kSimtHeads) * D + kSimtRows * ldt +
                          kSimtHeads * dl + kSimtHeads * kSimtRows + 3 * kSimtHeads + kSimtRows);
}
cudaError_t LaunchDecodeSimt(const DecodeArgs& a, int N, bool f32_cache, cudaStream_t stream);
cudaError_t LaunchDecodeCombine(const DecodeArgs& a, int N, cudaStream_t stream);

// Warp-specialised wgmma kernel (mla_decode_wg.cu, sm_90a): bf16 cache, latent_dim in
// {64, 128, 256, 512}, rope_dim in {0, 64}, H <= 32, page_size % 8 == 0, pool rows
// < 2^31 - 64, on a compute capability 9.0 device whose driver encodes tensor maps.
bool DecodeWgSupported(const MlaDecodeParams& p);
cudaError_t LaunchDecodeWg(const DecodeArgs& a, int N, cudaStream_t stream);

}  // namespace kl::cuda::mla

#endif  // KL_KERNELS_CUDA_MLA_DEVICE_CUH_
