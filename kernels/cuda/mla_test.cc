// GPU tests of the MLA CUDA kernels (mla.h) against host references with fp64
// accumulation, on fresh random inputs. Tagged "gpu"; every test skips when no CUDA
// device is visible (the argument-validation test runs everywhere). Outputs are
// poisoned with NaN bytes before each launch and must all be written.
//
// Tolerances (relative L2 error ||gpu - ref|| / ||ref||, per sequence):
//  - fp32 paths (prefill, SIMT decode on an fp32 or bf16 cache): 1e-5 (exact fp32 math,
//    no tensor cores); 1e-4 for the large-magnitude (scores ~ +-100) cases, where the
//    fp32 rounding of the scores themselves is ~1e-5 of a logit.
//  - bf16 tensor-core decode: 5e-3 against a reference that sees the same bf16 cache
//    values and q rounded to bf16 (the kernel's MMA input); what remains is the bf16
//    rounding of the softmax weights P (2^-9 relative each) before P.V (measured <= 1.7e-3).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/dtype.h"
#include "kernels/cpu/test_util.h"
#include "kernels/cuda/kda_test_util.h"
#include "kernels/cuda/mla.h"

namespace kl::cuda {
namespace {

using testing::DeviceBuffer;
using Rng = kl::cpu::testing::SplitMix64;

constexpr double kFp32RelTol = 1e-5;
constexpr double kFp32LargeRelTol = 1e-4;
constexpr double kBf16RelTol = 5e-3;

#define SKIP_WITHOUT_GPU() \
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device"

template <class T>
DeviceBuffer Upload(const std::vector<T>& h) {
  DeviceBuffer d(h.size() * sizeof(T));
  if (d.ok() && !h.empty()) {
    EXPECT_EQ(cudaMemcpy(d.get(), h.data(), d.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  return d;
}
template <class T>
std::vector<T> Download(const DeviceBuffer& d) {
  std::vector<T> h(d.bytes() / sizeof(T));
  if (!h.empty()) {
    EXPECT_EQ(cudaMemcpy(h.data(), d.get(), d.bytes(), cudaMemcpyDeviceToHost), cudaSuccess);
  }
  return h;
}
DeviceBuffer Poisoned(size_t floats) {
  DeviceBuffer d(floats * sizeof(float));
  EXPECT_TRUE(d.ok());
  if (floats > 0) {
    EXPECT_EQ(cudaMemset(d.get(), 0xff, d.bytes()), cudaSuccess);  // NaN
  }
  return d;
}

std::vector<float> Normals(Rng& rng, size_t n, double scale = 1.0) {
  return kl::cpu::testing::ToF32(rng.Normals(static_cast<int64_t>(n), scale));
}

double RelErr(const float* a, const float* b, size_t n) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  if (!(num == num)) return std::numeric_limits<double>::infinity();  // NaN
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
bool AllFinite(const std::vector<float>& v) {
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
HostCache MakeCache(Rng& rng, DType dtype, int64_t page_size, int64_t latent, int64_t rope,
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

// ----------------------------------------------------------------------------------
// Cache write + gather.
void RunWriteGather(DType dtype, uint64_t seed) {
  Rng rng(seed);
  const int64_t page = 16, latent = 64, rope = 16, row = latent + rope;
  const std::vector<int64_t> start = {0, 5, 64, 130, 7};
  const std::vector<int64_t> add = {1, 70, 0, 33, 20};
  std::vector<int64_t> total(start.size());
  for (size_t i = 0; i < start.size(); ++i) total[i] = start[i] + add[i];
  HostCache h = MakeCache(rng, dtype, page, latent, rope, total);
  // Sequence 4 loses its second page: writes there are dropped, gathers read zeros.
  h.table[4 * h.max_pages + 1] = -1;
  const int64_t N = static_cast<int64_t>(start.size());
  std::vector<int64_t> cu(N + 1, 0), kv_cu(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    cu[n + 1] = cu[n] + add[n];
    kv_cu[n + 1] = kv_cu[n] + total[n];
  }
  const std::vector<float> rows = Normals(rng, cu[N] * row);
  std::vector<int32_t> start32(start.begin(), start.end());

  DeviceCache d(h);
  DeviceBuffer d_rows = Upload(rows), d_cu = Upload(cu), d_start = Upload(start32),
               d_kv_cu = Upload(kv_cu);
  MlaCacheWriteParams w;
  w.num_seqs = N;
  w.num_tokens = cu[N];
  w.cache = d.view;
  w.rows = d_rows.as<float>();
  w.cu_seqlens = d_cu.as<int64_t>();
  w.start_pos = d_start.as<int32_t>();
  ASSERT_TRUE(MlaCacheWrite(w, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  HostCache ref = h;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < add[n]; ++i) {
      const int64_t p = ref.Phys(n, start[n] + i);
      if (p < 0) continue;
      for (int64_t e = 0; e < row; ++e) ref.pool[p * row + e] = ref.Stored(rows[(cu[n] + i) * row + e]);
    }
  }
  const std::vector<float> got_pool = d.PoolFloats(dtype);
  ASSERT_EQ(got_pool.size(), ref.pool.size());
  EXPECT_EQ(std::memcmp(got_pool.data(), ref.pool.data(), got_pool.size() * 4), 0)
      << "pool differs from the host model (written rows or untouched rows)";

  DeviceBuffer out = Poisoned(kv_cu[N] * row);
  MlaCacheGatherParams g;
  g.num_seqs = N;
  g.num_rows = kv_cu[N];
  g.cache = d.view;
  g.kv_cu_seqlens = d_kv_cu.as<int64_t>();
  g.out = out.as<float>();
  ASSERT_TRUE(MlaCacheGather(g, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = Download<float>(out);
  std::vector<float> want(got.size(), 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < total[n]; ++i) {
      const int64_t p = ref.Phys(n, i);
      if (p < 0) continue;
      std::memcpy(&want[(kv_cu[n] + i) * row], &ref.pool[p * row], row * 4);
    }
  }
  EXPECT_EQ(std::memcmp(got.data(), want.data(), got.size() * 4), 0) << "gather differs";
}

TEST(MlaCache, WriteGatherF32) {
  SKIP_WITHOUT_GPU();
  RunWriteGather(DType::kF32, 11);
}
TEST(MlaCache, WriteGatherBf16) {
  SKIP_WITHOUT_GPU();
  RunWriteGather(DType::kBF16, 12);
}

// ----------------------------------------------------------------------------------
// Prefill.
struct PrefillCase {
  std::vector<int64_t> q_lens, prefix;
  int64_t H, dq, dv;
  double q_scale = 1.0;
  double tol = kFp32RelTol;
  bool tensor_cores = false;  // MlaPrefillAttentionBf16
};

void RefPrefill(const PrefillCase& pc, const std::vector<float>& q, const std::vector<float>& k,
                const std::vector<float>& v, const std::vector<int64_t>& q_cu,
                const std::vector<int64_t>& kv_cu, double scale, std::vector<float>& out) {
  const int64_t H = pc.H, dq = pc.dq, dv = pc.dv;
  out.assign(q_cu.back() * H * dv, 0.0f);
  std::vector<double> s, acc(dv);
  for (size_t n = 0; n + 1 < q_cu.size(); ++n) {
    const int64_t ql = q_cu[n + 1] - q_cu[n], kl = kv_cu[n + 1] - kv_cu[n];
    for (int64_t i = 0; i < ql; ++i) {
      const int64_t pos = kl - ql + i;
      for (int64_t h = 0; h < H; ++h) {
        const float* qr = &q[((q_cu[n] + i) * H + h) * dq];
        s.assign(pos + 1, 0.0);
        double mx = -INFINITY;
        for (int64_t j = 0; j <= pos; ++j) {
          const float* kr = &k[((kv_cu[n] + j) * H + h) * dq];
          double d = 0.0;
          for (int64_t e = 0; e < dq; ++e) d += static_cast<double>(qr[e]) * kr[e];
          s[j] = d * scale;
          mx = std::max(mx, s[j]);
        }
        double l = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j <= pos; ++j) {
          const double p = std::exp(s[j] - mx);
          l += p;
          const float* vr = &v[((kv_cu[n] + j) * H + h) * dv];
          for (int64_t e = 0; e < dv; ++e) acc[e] += p * vr[e];
        }
        float* o = &out[((q_cu[n] + i) * H + h) * dv];
        for (int64_t e = 0; e < dv; ++e) o[e] = pos >= 0 ? static_cast<float>(acc[e] / l) : 0.0f;
      }
    }
  }
}

void RunPrefill(const PrefillCase& pc, uint64_t seed) {
  Rng rng(seed);
  const int64_t N = static_cast<int64_t>(pc.q_lens.size()), H = pc.H;
  std::vector<int64_t> q_cu(N + 1, 0), kv_cu(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    q_cu[n + 1] = q_cu[n] + pc.q_lens[n];
    kv_cu[n + 1] = kv_cu[n] + pc.prefix[n] + pc.q_lens[n];
  }
  const std::vector<float> q = Normals(rng, q_cu[N] * H * pc.dq, pc.q_scale);
  const std::vector<float> k = Normals(rng, kv_cu[N] * H * pc.dq);
  const std::vector<float> v = Normals(rng, kv_cu[N] * H * pc.dv);
  const double scale = 1.0 / std::sqrt(static_cast<double>(pc.dq));
  std::vector<float> want;
  RefPrefill(pc, q, k, v, q_cu, kv_cu, static_cast<float>(scale), want);

  DeviceBuffer d_q = Upload(q), d_k = Upload(k), d_v = Upload(v), d_qcu = Upload(q_cu),
               d_kvcu = Upload(kv_cu);
  DeviceBuffer out = Poisoned(q_cu[N] * H * pc.dv);
  MlaPrefillParams p;
  p.num_seqs = N;
  p.num_q = q_cu[N];
  p.num_heads = H;
  p.qk_dim = pc.dq;
  p.v_dim = pc.dv;
  p.q = d_q.as<float>();
  p.k = d_k.as<float>();
  p.v = d_v.as<float>();
  p.q_cu_seqlens = d_qcu.as<int64_t>();
  p.kv_cu_seqlens = d_kvcu.as<int64_t>();
  p.out = out.as<float>();
  const absl::Status st =
      pc.tensor_cores ? MlaPrefillAttentionBf16(p, nullptr) : MlaPrefillAttention(p, nullptr);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got = Download<float>(out);
  ASSERT_TRUE(AllFinite(got)) << "unwritten (NaN) or non-finite output";
  double worst = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const size_t off = q_cu[n] * H * pc.dv, cnt = pc.q_lens[n] * H * pc.dv;
    const double err = RelErr(got.data() + off, want.data() + off, cnt);
    worst = std::max(worst, err);
    EXPECT_LE(err, pc.tol) << "sequence " << n << " (q " << pc.q_lens[n] << ", prefix "
                           << pc.prefix[n] << ")";
  }
  std::printf("prefill%s dq=%ld dv=%ld: worst rel err %.2e (tol %.0e)\n",
              pc.tensor_cores ? " (bf16 tensor cores)" : "", static_cast<long>(pc.dq),
              static_cast<long>(pc.dv), worst, pc.tol);
}

TEST(MlaPrefill, VarlenWithPrefixAndEmpty) {
  SKIP_WITHOUT_GPU();
  RunPrefill({{37, 0, 1, 100, 64}, {0, 10, 63, 29, 0}, 3, 80, 64}, 21);
}
TEST(MlaPrefill, ModelDims) {
  SKIP_WITHOUT_GPU();
  RunPrefill({{70, 33}, {130, 0}, 2, 192, 128}, 22);
}
TEST(MlaPrefill, OddAndMaxDims) {
  SKIP_WITHOUT_GPU();
  RunPrefill({{45, 3}, {20, 31}, 2, 13, 7}, 23);
  RunPrefill({{40}, {25}, 1, 256, 256}, 24);
  RunPrefill({{33}, {0}, 1, 1, 1}, 25);
}
// bf16 operands, fp32 accumulation: ~1e-2 relative against the fp64 reference.
constexpr double kPrefillBf16RelTol = 2e-2;

TEST(MlaPrefill, TensorCoresModelDims) {
  SKIP_WITHOUT_GPU();
  // Lengths around the 64-row tiles, prefixes (chunked prefill), an empty sequence.
  RunPrefill({{70, 33, 200, 0, 1, 64}, {130, 0, 77, 5, 64, 0}, 4, 192, 128, 1.0,
              kPrefillBf16RelTol, true},
             27);
}
TEST(MlaPrefill, TensorCoresSmallDims) {
  SKIP_WITHOUT_GPU();
  RunPrefill({{1, 65, 129, 63}, {0, 3, 64, 1}, 6, 96, 64, 1.0, kPrefillBf16RelTol, true}, 28);
}
TEST(MlaPrefill, TensorCoresRejectOtherDims) {
  MlaPrefillParams p;
  p.qk_dim = 80;
  p.v_dim = 64;
  EXPECT_FALSE(MlaPrefillUsesTensorCores(p));
  EXPECT_TRUE(absl::IsInvalidArgument(MlaPrefillAttentionBf16(p, nullptr)));
}
TEST(MlaPrefill, LargeMagnitudeScores) {
  SKIP_WITHOUT_GPU();
  // scale * q.k ~ 30 sigma: a plain exp would overflow.
  RunPrefill({{50, 17}, {40, 0}, 2, 80, 64, 30.0, kFp32LargeRelTol}, 26);
}

// ----------------------------------------------------------------------------------
// Decode.
void RefDecode(const HostCache& c, const std::vector<float>& q, const std::vector<int32_t>& lens,
               int64_t H, double scale, std::vector<float>& out) {
  const int64_t D = c.row(), dl = c.latent, N = static_cast<int64_t>(lens.size());
  out.assign(N * H * dl, 0.0f);
  std::vector<double> s, acc(dl);
  std::vector<int64_t> rows;
  for (int64_t n = 0; n < N; ++n) {
    rows.clear();
    for (int64_t j = 0; j < lens[n]; ++j) {
      const int64_t p = c.Phys(n, j);
      if (p >= 0) rows.push_back(p);
    }
    if (rows.empty()) continue;  // padding: zeros
    for (int64_t h = 0; h < H; ++h) {
      const float* qr = &q[(n * H + h) * D];
      s.assign(rows.size(), 0.0);
      double mx = -INFINITY;
      for (size_t j = 0; j < rows.size(); ++j) {
        const float* r = &c.pool[rows[j] * D];
        double d = 0.0;
        for (int64_t e = 0; e < D; ++e) d += static_cast<double>(qr[e]) * r[e];
        s[j] = d * scale;
        mx = std::max(mx, s[j]);
      }
      double l = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (size_t j = 0; j < rows.size(); ++j) {
        const double p = std::exp(s[j] - mx);
        l += p;
        const float* r = &c.pool[rows[j] * D];
        for (int64_t e = 0; e < dl; ++e) acc[e] += p * r[e];
      }
      for (int64_t e = 0; e < dl; ++e) out[(n * H + h) * dl + e] = static_cast<float>(acc[e] / l);
    }
  }
}

struct DecodeCase {
  DType dtype;
  std::vector<int32_t> lens;
  int64_t H, latent, rope, page_size;
  double q_scale = 1.0;
  int expect_tc = -1;  // 1 / 0: the case must (not) take the tensor-core path; -1: either
  double tol = kFp32RelTol;
  bool graph = false;  // also replay the launch from a captured CUDA graph
  MlaDecodeParams::Kernel kernel = MlaDecodeParams::Kernel::kAuto;
  const char* expect_kernel = nullptr;  // on a compute capability 9.0 device: this kernel
  // Block-table entries (sequence, page index) replaced by `hole_id` (unmapped pages
  // inside a sequence: their rows are not attended to).
  std::vector<std::pair<int64_t, int64_t>> holes;
  int32_t hole_id = -1;
};

bool DeviceIsSm90() {
  int dev = 0, major = 0, minor = 0;
  return cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
         major == 9 && minor == 0;
}

void RunDecode(const DecodeCase& dc, int64_t num_splits, uint64_t seed) {
  Rng rng(seed);
  const int64_t N = static_cast<int64_t>(dc.lens.size()), H = dc.H, D = dc.latent + dc.rope;
  std::vector<int64_t> lens64(dc.lens.begin(), dc.lens.end());
  HostCache h = MakeCache(rng, dc.dtype, dc.page_size, dc.latent, dc.rope, lens64);
  for (const auto& [seq, page] : dc.holes) h.table[seq * h.max_pages + page] = dc.hole_id;
  std::vector<float> q = Normals(rng, N * H * D, dc.q_scale);
  const double scale = 1.0 / std::sqrt(192.0);

  DeviceCache d(h);
  DeviceBuffer d_q = Upload(q), d_lens = Upload(dc.lens);
  DeviceBuffer out = Poisoned(N * H * dc.latent);
  MlaDecodeParams p;
  p.num_seqs = N;
  p.num_heads = H;
  p.cache = d.view;
  p.q = d_q.as<float>();
  p.seq_lens = d_lens.as<int32_t>();
  p.out = out.as<float>();
  p.scale = static_cast<float>(scale);
  p.max_seq_len_hint = *std::max_element(dc.lens.begin(), dc.lens.end());
  p.num_splits = num_splits;
  p.kernel = dc.kernel;
  const bool tc = MlaDecodeUsesTensorCores(p);
  const char* kname = MlaDecodeKernelName(p);
  if (dc.expect_tc >= 0) {
    ASSERT_EQ(tc, dc.expect_tc == 1);
  }
  if (dc.expect_kernel != nullptr && DeviceIsSm90()) {
    ASSERT_STREQ(kname, dc.expect_kernel);
  }
  DeviceBuffer ws(MlaDecodeWorkspaceBytes(p));
  ASSERT_TRUE(ws.ok());
  if (ws.bytes() > 0) {
    ASSERT_EQ(cudaMemset(ws.get(), 0xff, ws.bytes()), cudaSuccess);
  }

  // The reference sees what the kernel multiplies: bf16-rounded q on the MMA path.
  std::vector<float> q_ref = q;
  if (tc) testing::RoundBf16InPlace(q_ref);
  std::vector<float> want;
  RefDecode(h, q_ref, dc.lens, H, scale, want);

  auto check = [&](const char* what) {
    const std::vector<float> got = Download<float>(out);
    ASSERT_TRUE(AllFinite(got)) << what << ": unwritten (NaN) or non-finite output";
    double worst = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const size_t off = n * H * dc.latent, cnt = H * dc.latent;
      if (dc.lens[n] <= 0) {
        for (size_t i = 0; i < cnt; ++i) ASSERT_EQ(got[off + i], 0.0f) << what << ": padding row " << n;
        continue;
      }
      const double err = RelErr(got.data() + off, want.data() + off, cnt);
      worst = std::max(worst, err);
      EXPECT_LE(err, dc.tol) << what << ": sequence " << n << " (len " << dc.lens[n]
                             << "), splits " << MlaDecodeNumSplits(p)
                             << ", kernel " << kname;
    }
    std::printf("decode %s H=%ld latent=%ld rope=%ld page=%ld splits=%ld %s: worst rel err %.2e (tol %.0e)\n",
                what, static_cast<long>(H), static_cast<long>(dc.latent), static_cast<long>(dc.rope),
                static_cast<long>(dc.page_size), static_cast<long>(MlaDecodeNumSplits(p)), kname,
                worst, dc.tol);
  };
  cudaStream_t s;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  const absl::Status st = MlaDecodeAttention(p, ws.get(), ws.bytes(), s);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  check("stream");
  if (dc.graph) {
    ASSERT_EQ(cudaMemset(out.get(), 0xff, out.bytes()), cudaSuccess);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    const absl::Status cs = MlaDecodeAttention(p, ws.get(), ws.bytes(), s);
    ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
    ASSERT_TRUE(cs.ok()) << cs;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    check("graph");
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  cudaStreamDestroy(s);
}

// Lengths: 1, < page, not a page multiple, exact page multiples, padding (0 and -1),
// short next to long.
const std::vector<int32_t> kMixedLens = {1, 17, 64, 100, 0, 1500, -1, 129};

TEST(MlaDecode, F32CacheSimt) {
  SKIP_WITHOUT_GPU();
  DecodeCase dc{DType::kF32, kMixedLens, 5, 64, 16, 16};
  dc.expect_tc = 0;
  for (int64_t splits : {0, 1, 3, 7}) RunDecode(dc, splits, 31 + splits);
}
TEST(MlaDecode, F32CacheModelDims) {
  SKIP_WITHOUT_GPU();
  DecodeCase dc{DType::kF32, {1, 777, 2050}, 32, 512, 64, 64};
  dc.expect_tc = 0;
  RunDecode(dc, 0, 32);
}
TEST(MlaDecode, Bf16TensorCoresModelDims) {
  SKIP_WITHOUT_GPU();
  DecodeCase dc{DType::kBF16, {1, 65, 1000, 3001, -1, 64, 0, 200}, 32, 512, 64, 64};
  dc.expect_tc = 1;
  dc.tol = kBf16RelTol;
  dc.graph = true;
  dc.expect_kernel = "wgmma";
  for (int64_t splits : {0, 1, 5}) RunDecode(dc, splits, 41 + splits);
  // The same on the mma.sync kernel (the path of the shapes wgmma does not take).
  dc.kernel = MlaDecodeParams::Kernel::kMmaSync;
  dc.expect_kernel = "mma";
  for (int64_t splits : {0, 1, 5}) RunDecode(dc, splits, 44 + splits);
}
// Edge cases of the wgmma kernel: one sequence, contexts shorter than a tile / not a
// multiple of it / one past it, TMA boxes of 8, 16 and 64 rows (page 8, 24, 16, 64, 128),
// unmapped pages inside a sequence (-1 and an id past the pool), heads 1 / 20 / 32,
// the other latent / rope shapes, forced and auto splits.
TEST(MlaDecode, Bf16WgmmaEdgeCases) {
  SKIP_WITHOUT_GPU();
  auto wg = [](std::vector<int32_t> lens, int64_t H, int64_t latent, int64_t rope, int64_t page) {
    DecodeCase dc{DType::kBF16, std::move(lens), H, latent, rope, page};
    dc.expect_tc = 1;
    dc.tol = kBf16RelTol;
    dc.expect_kernel = "wgmma";
    return dc;
  };
  uint64_t seed = 100;
  for (int32_t len : {1, 63, 64, 65, 4097}) {  // B = 1
    for (int64_t splits : {0, 1, 3}) RunDecode(wg({len}, 32, 512, 64, 64), splits, ++seed);
  }
  for (int64_t splits : {0, 1, 3}) RunDecode(wg(kMixedLens, 32, 512, 64, 16), splits, ++seed);
  RunDecode(wg({5, 200, 777, 0}, 20, 512, 64, 8), 0, ++seed);
  RunDecode(wg({5, 200, 777}, 20, 512, 64, 24), 2, ++seed);
  RunDecode(wg({1, 130, 1000}, 1, 512, 64, 128), 0, ++seed);
  DecodeCase holes = wg({1000, 300, 129}, 32, 512, 64, 64);
  holes.holes = {{0, 3}, {1, 0}, {2, 2}};  // mid-sequence, first page, the partial last page
  for (int64_t splits : {0, 1, 4}) RunDecode(holes, splits, ++seed);
  holes.hole_id = 1 << 30;  // outside the pool
  RunDecode(holes, 0, ++seed);
  for (int64_t latent : {64, 128, 256}) {
    for (int64_t rope : {0, 64}) RunDecode(wg(kMixedLens, 8, latent, rope, 16), 0, ++seed);
  }
}
TEST(MlaDecode, Bf16TensorCoresSmallShapes) {
  SKIP_WITHOUT_GPU();
  for (int64_t H : {1, 8, 16, 20}) {  // one and two 16-head tiles, padded heads
    for (int64_t latent : {64, 128, 256}) {
      DecodeCase dc{DType::kBF16, kMixedLens, H, latent, latent == 128 ? 0 : 16, 16};
      dc.expect_tc = 1;
      dc.tol = kBf16RelTol;
      RunDecode(dc, 0, 50 + H * 7 + latent);
    }
  }
}
TEST(MlaDecode, Bf16SimtFallback) {
  SKIP_WITHOUT_GPU();
  // H > 32 and a rope_dim that is not a multiple of 16: exact fp32 math on bf16 data.
  DecodeCase dc{DType::kBF16, kMixedLens, 40, 64, 8, 32};
  dc.expect_tc = 0;
  RunDecode(dc, 0, 61);
  RunDecode(dc, 2, 62);
}
TEST(MlaDecode, LargeMagnitudeScores) {
  SKIP_WITHOUT_GPU();
  DecodeCase f32{DType::kF32, {300, 1, 90}, 4, 64, 16, 16, 20.0};
  f32.tol = kFp32LargeRelTol;
  RunDecode(f32, 0, 71);
  DecodeCase bf{DType::kBF16, {300, 1, 2000}, 32, 512, 64, 64, 20.0};
  bf.expect_tc = 1;
  bf.tol = kBf16RelTol;
  RunDecode(bf, 0, 72);
  bf.kernel = MlaDecodeParams::Kernel::kMmaSync;
  RunDecode(bf, 0, 73);
}

// ----------------------------------------------------------------------------------
// Argument validation (no launch; runs without a GPU too).
TEST(MlaArgs, Rejected) {
  float dummy_f[4] = {};
  int32_t dummy_i[4] = {};
  int64_t dummy_l[4] = {};
  MlaPagedCache c;
  c.pool = dummy_f;
  c.block_table = dummy_i;
  c.num_pages = 1;
  c.max_pages_per_seq = 1;
  MlaCacheWriteParams w;
  w.num_seqs = 1;
  w.num_tokens = 1;
  w.cache = c;
  w.rows = dummy_f;
  w.cu_seqlens = dummy_l;
  w.start_pos = dummy_i;
  w.cache.dtype = DType::kF16;
  EXPECT_TRUE(absl::IsInvalidArgument(MlaCacheWrite(w, nullptr)));
  w.cache = c;
  w.cache.page_size = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(MlaCacheWrite(w, nullptr)));
  w.cache = c;
  w.rows = nullptr;
  EXPECT_TRUE(absl::IsInvalidArgument(MlaCacheWrite(w, nullptr)));

  MlaPrefillParams p;
  p.num_seqs = 1;
  p.num_q = 1;
  p.num_heads = 1;
  p.qk_dim = 300;
  p.q = p.k = p.v = dummy_f;
  p.out = dummy_f;
  p.q_cu_seqlens = p.kv_cu_seqlens = dummy_l;
  EXPECT_TRUE(absl::IsInvalidArgument(MlaPrefillAttention(p, nullptr)));
  p.qk_dim = 64;
  p.num_heads = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(MlaPrefillAttention(p, nullptr)));

  MlaDecodeParams d;
  d.num_seqs = 4;
  d.num_heads = 32;
  d.cache = c;
  d.cache.dtype = DType::kF32;
  d.cache.latent_dim = 64;
  d.cache.rope_dim = 16;
  d.q = dummy_f;
  d.seq_lens = dummy_i;
  d.out = dummy_f;
  d.num_splits = 4;
  ASSERT_GT(MlaDecodeWorkspaceBytes(d), 0u);
  EXPECT_TRUE(absl::IsInvalidArgument(MlaDecodeAttention(d, nullptr, 0, nullptr)));
  d.num_seqs = 70000;
  EXPECT_TRUE(absl::IsInvalidArgument(MlaDecodeAttention(d, nullptr, 0, nullptr)));
  d.num_seqs = 0;  // nothing to do
  EXPECT_TRUE(MlaDecodeAttention(d, nullptr, 0, nullptr).ok());
}

}  // namespace
}  // namespace kl::cuda
