// Host-side helpers of the MLA GPU tests (mla_test.cc, mla_decode_test.cc): device
// upload / download, NaN-poisoned outputs, random inputs, the relative L2 error, and the
// host model of a paged latent cache. Tolerances: see mla_test.cc.
#ifndef KL_KERNELS_CUDA_MLA_TEST_UTIL_H_
#define KL_KERNELS_CUDA_MLA_TEST_UTIL_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/dtype.h"
#include "kernels/cpu/test_util.h"
#include "kernels/cuda/kda_test_util.h"
#include "kernels/cuda/mla.h"

namespace kl::cuda::mla_testing {

using testing::DeviceBuffer;
using Rng = kl::cpu::testing::SplitMix64;

constexpr double kFp32RelTol = 1e-5;
constexpr double kFp32LargeRelTol = 1e-4;
constexpr double kBf16RelTol = 5e-3;

#define SKIP_WITHOUT_GPU() \
  if (!::kl::cuda::testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device"

using testing::Download;
using testing::Upload;
inline DeviceBuffer Poisoned(size_t floats) {
  DeviceBuffer d(floats * sizeof(float));
  EXPECT_TRUE(d.ok());
  if (floats > 0) {
    EXPECT_EQ(cudaMemset(d.get(), 0xff, d.bytes()), cudaSuccess);  // NaN
  }
  return d;
}

inline std::vector<float> Normals(Rng& rng, size_t n, double scale = 1.0) {
  return kl::cpu::testing::ToF32(rng.Normals(static_cast<int64_t>(n), scale));
}

inline double RelErr(const float* a, const float* b, size_t n) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  if (!(num == num)) return std::numeric_limits<double>::infinity();  // NaN
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
inline bool AllFinite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

// ----------------------------------------------------------------------------------
// Host model of a paged cache: values kept as the floats the cache dtype holds.
struct HostCache {
  int64_t num_pages, page_size, latent, rope, max_pages;
  DType dtype;
  std::vector<float> pool;       // [num_pages][page_size][row]
  std::vector<int32_t> table;    // [N][max_pages]
  int64_t row() const { return latent + rope; }
  // Physical row of (n, pos) or -1 (same rule as the kernels).
  int64_t Phys(int64_t n, int64_t pos) const {
    if (pos < 0 || pos / page_size >= max_pages) return -1;
    const int32_t p = table[n * max_pages + pos / page_size];
    if (p < 0 || p >= num_pages) return -1;
    return p * page_size + pos % page_size;
  }
  float Stored(float x) const { return dtype == DType::kBF16 ? testing::RoundBf16(x) : x; }
  std::vector<uint8_t> Bytes() const { return testing::ToAct(pool, dtype); }
};

// Pages of sequence n are a random permutation slice of the pool (non-contiguous,
// shuffled); `lens` are the rows each sequence needs.
inline HostCache MakeCache(Rng& rng, DType dtype, int64_t page_size, int64_t latent, int64_t rope,
                    const std::vector<int64_t>& lens, int64_t spare_pages = 3) {
  HostCache c;
  c.page_size = page_size;
  c.latent = latent;
  c.rope = rope;
  c.dtype = dtype;
  int64_t total = spare_pages, maxp = 1;
  for (int64_t l : lens) {
    const int64_t p = (std::max<int64_t>(l, 0) + page_size - 1) / page_size;
    total += p;
    maxp = std::max(maxp, p);
  }
  c.num_pages = total;
  c.max_pages = maxp + 1;  // one spare column, left -1 (unmapped)
  std::vector<int32_t> perm(total);
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t i = total - 1; i > 0; --i) std::swap(perm[i], perm[rng.Next() % (i + 1)]);
  c.table.assign(lens.size() * c.max_pages, -1);
  int64_t next = 0;
  for (size_t n = 0; n < lens.size(); ++n) {
    const int64_t p = (std::max<int64_t>(lens[n], 0) + page_size - 1) / page_size;
    for (int64_t i = 0; i < p; ++i) c.table[n * c.max_pages + i] = perm[next++];
  }
  c.pool = Normals(rng, total * page_size * c.row());
  for (float& x : c.pool) x = c.Stored(x);
  return c;
}

struct DeviceCache {
  DeviceBuffer pool, table;
  MlaPagedCache view;
  explicit DeviceCache(const HostCache& h)
      : pool(Upload(h.Bytes())), table(Upload(h.table)) {
    view.pool = pool.get();
    view.dtype = h.dtype;
    view.num_pages = h.num_pages;
    view.page_size = h.page_size;
    view.latent_dim = h.latent;
    view.rope_dim = h.rope;
    view.block_table = table.as<int32_t>();
    view.max_pages_per_seq = h.max_pages;
  }
  std::vector<float> PoolFloats(DType dtype) const {
    return testing::FromAct(Download<uint8_t>(pool), dtype);
  }
};

}  // namespace kl::cuda::mla_testing

#endif  // KL_KERNELS_CUDA_MLA_TEST_UTIL_H_
