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

// MoeParams::accumulate: y = y0 + (what a plain call writes), bit for bit.
TEST(CpuBackend, MoeAccumulateAddsTheRoutedSumOnce) {
  CpuBackend be;
  const int64_t E = 6, D = 16, I = 8, rows = 5;
  auto router = Rand(E * D, 31, 0.3f), bias = Rand(E, 32, 0.05f), x = Rand(rows * D, 33),
       y0 = Rand(rows * D, 34);
  Weight wr = be.UploadWeight({DType::kF32, router.data(), E, D}).value();
  Weight wb = be.UploadWeight({DType::kF32, bias.data(), 1, E}).value();
  std::vector<std::vector<float>> host;
  std::vector<Weight> w1, w3, w2;
  for (int64_t e = 0; e < E; ++e) {
    host.push_back(Rand(I * D, 40 + e, 0.2f));
    w1.push_back(be.UploadWeight({DType::kF32, host.back().data(), I, D}).value());
    host.push_back(Rand(I * D, 50 + e, 0.2f));
    w3.push_back(be.UploadWeight({DType::kF32, host.back().data(), I, D}).value());
    host.push_back(Rand(D * I, 60 + e, 0.2f));
    w2.push_back(be.UploadWeight({DType::kF32, host.back().data(), D, I}).value());
  }
  MoeParams p;
  p.num_experts = E;
  p.top_k = 2;
  p.routed_scaling_factor = 2.5;
  std::vector<float> plain(rows * D), acc = y0;
  ASSERT_TRUE(be.Moe(x.data(), rows, D, p, {&wr, &wb, &w1, &w3, &w2}, plain.data()).ok());
  p.accumulate = true;
  ASSERT_TRUE(be.Moe(x.data(), rows, D, p, {&wr, &wb, &w1, &w3, &w2}, acc.data()).ok());
  double moved = 0;
  for (int64_t i = 0; i < rows * D; ++i) {
    ASSERT_EQ(acc[i], y0[i] + plain[i]) << i;
    moved += std::fabs(plain[i]);
  }
  EXPECT_GT(moved, 0.0);  // the routed sum is not all zeros
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
