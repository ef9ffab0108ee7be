// GPU tests of the MLA CUDA kernels (mla.h; decode: mla_decode_test.cc, helpers:
// mla_test_util.h) against host references with fp64
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
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/mla_test_util.h"

namespace kl::cuda {
namespace {

using namespace mla_testing;  // NOLINT

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

  // A window: rows [first, first + len) of every sequence (each sequence's
  // window packed like a chunk), past the end of a short one and across its
  // missing page; rows with no page read zeros.
  const int64_t first = 17, len = 40;
  std::vector<int64_t> win_cu(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) win_cu[n + 1] = win_cu[n] + len;
  DeviceBuffer d_win_cu = Upload(win_cu), win = Poisoned(win_cu[N] * row);
  g.num_rows = win_cu[N];
  g.kv_cu_seqlens = d_win_cu.as<int64_t>();
  g.first_row = first;
  g.out = win.as<float>();
  ASSERT_TRUE(MlaCacheGather(g, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> got_win = Download<float>(win);
  std::vector<float> want_win(got_win.size(), 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < len; ++i) {
      const int64_t p = ref.Phys(n, first + i);
      if (p < 0) continue;
      std::memcpy(&want_win[(win_cu[n] + i) * row], &ref.pool[p * row], row * 4);
    }
  }
  EXPECT_EQ(std::memcmp(got_win.data(), want_win.data(), got_win.size() * 4), 0)
      << "window gather differs";
  g.first_row = -1;
  EXPECT_EQ(MlaCacheGather(g, nullptr).code(), absl::StatusCode::kInvalidArgument);
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
