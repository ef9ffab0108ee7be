// Op-level checks of the CPU backend against plain loops.
#include "engine/backend/cpu_backend.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"

namespace kl {
namespace {

std::vector<float> Rand(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

TEST(CpuBackend, LinearMatchesLoops) {
  CpuBackend be;
  const int64_t rows = 7, in = 33, out = 19;
  auto x = Rand(rows * in, 1), w = Rand(out * in, 2);
  Weight W = be.UploadWeight({DType::kF32, w.data(), out, in}).value();
  std::vector<float> y(rows * out);
  ASSERT_TRUE(be.Linear(x.data(), rows, W, y.data()).ok());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += double(x[r * in + i]) * w[o * in + i];
      EXPECT_NEAR(y[r * out + o], acc, 1e-4);
    }
}

TEST(CpuBackend, UploadWidensBf16Exactly) {
  CpuBackend be;
  std::vector<uint16_t> h = {F32ToBf16(1.5f), F32ToBf16(-0.25f), F32ToBf16(3.0f)};
  Weight W = be.UploadWeight({DType::kBF16, h.data(), 1, 3}).value();
  const float* p = static_cast<const float*>(W.data);
  EXPECT_EQ(p[0], 1.5f);
  EXPECT_EQ(p[1], -0.25f);
  EXPECT_EQ(p[2], 3.0f);
  EXPECT_EQ(be.weight_bytes(), 12);
  EXPECT_FALSE(be.UploadWeight({DType::kI32, h.data(), 1, 1}).ok());
}

// Invariant 11 at op level: absorbed decode == naive attention, and the latent
// cache written by a prefill and extended by decodes == a one-shot prefill.
TEST(CpuBackend, MlaAbsorbedEqualsNaiveAndCacheExtends) {
  const MlaDims d{3, 12, 5, 4, 6};
  const int64_t lat = d.kv_lora_rank + d.qk_rope, qdim = d.heads * (d.qk_nope + d.qk_rope);
  const int64_t T = 20;
  auto q = Rand(T * qdim, 3), latent = Rand(T * lat, 4), kvb = Rand(d.heads * (d.qk_nope + d.v_head) * d.kv_lora_rank, 5, 0.3f);
  CpuBackendOptions naive_opts, absorbed_opts;
  naive_opts.mla_naive_min_rows = 1;
  absorbed_opts.mla_naive_min_rows = 1 << 30;
  CpuBackend naive(naive_opts), absorbed(absorbed_opts);
  Weight wn = naive.UploadWeight({DType::kF32, kvb.data(), d.heads * (d.qk_nope + d.v_head), d.kv_lora_rank}).value();
  Weight wa = absorbed.UploadWeight({DType::kF32, kvb.data(), d.heads * (d.qk_nope + d.v_head), d.kv_lora_rank}).value();
  const int64_t od = d.heads * d.v_head;
  // One-shot prefill with the naive form.
  std::vector<float> cache1(T * lat), out1(T * od);
  ASSERT_TRUE(naive.MlaAttention(q.data(), latent.data(), {{0, T, 0}}, {{cache1.data()}}, d, wn, out1.data()).ok());
  // Prefill 12 then 8 single-token absorbed decodes.
  std::vector<float> cache2(T * lat), out2(T * od);
  ASSERT_TRUE(absorbed.MlaAttention(q.data(), latent.data(), {{0, 12, 0}}, {{cache2.data()}}, d, wa, out2.data()).ok());
  for (int64_t t = 12; t < T; ++t) {
    ASSERT_TRUE(absorbed.MlaAttention(q.data() + t * qdim, latent.data() + t * lat, {{0, 1, t}},
                                      {{cache2.data()}}, d, wa, out2.data() + t * od).ok());
  }
  EXPECT_EQ(cache1, cache2);
  for (int64_t i = 0; i < T * od; ++i) ASSERT_NEAR(out1[i], out2[i], 1e-5) << i;
  // The outputs depend on the cache: a perturbed past row changes later outputs.
  cache2[3 * lat] += 1.0f;
  std::vector<float> out3(od);
  ASSERT_TRUE(absorbed.MlaAttention(q.data() + (T - 1) * qdim, latent.data() + (T - 1) * lat, {{0, 1, T - 1}},
                                    {{cache2.data()}}, d, wa, out3.data()).ok());
  double diff = 0;
  for (int64_t i = 0; i < od; ++i) diff = std::max(diff, std::fabs(out3[i] - out1[(T - 1) * od + i]) * 1.0);
  EXPECT_GT(diff, 1e-6);
}

TEST(CpuBackend, EmbeddingRejectsOutOfRangeIds) {
  CpuBackend be;
  auto t = Rand(4 * 3, 6);
  Weight W = be.UploadWeight({DType::kF32, t.data(), 4, 3}).value();
  std::vector<float> y(6);
  const int32_t ok_ids[] = {3, 0};
  ASSERT_TRUE(be.Embedding(ok_ids, 2, W, y.data()).ok());
  EXPECT_EQ(y[0], t[9]);
  const int32_t bad[] = {4};
  EXPECT_EQ(be.Embedding(bad, 1, W, y.data()).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kl
