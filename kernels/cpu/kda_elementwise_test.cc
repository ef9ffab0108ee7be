// fp32 gate / sigmoid / L2 norm / short conv kernels against the fp64 references
// and the spec vectors (A intermediates, C), plus invariants 8 (gate) and 9
// (conv tail carry) of kda_test_vectors.md.
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/kda.h"
#include "kernels/cpu/kda_reference.h"
#include "kernels/cpu/kda_test_vectors.h"
#include "kernels/cpu/test_util.h"

namespace kl::cpu {
namespace {

using testing::MaxAbsDiff;
using testing::SplitMix64;
using testing::ToF32;
using testing::ToF64;

// fp32 elementwise results vs exact values, relative (brief: 1e-6 for vector A).
constexpr double kF32RelTol = 1e-6;
// Printed vector values (12 decimals) vs fp32 results, absolute.
constexpr double kF32AbsTol = 1e-6;
// L2-normalised entries (<= 1) vs printed values: ~2 ulp of fp32 at 1, tight
// enough to see eps misplaced outside the sqrt (k = [0, 2] -> 0.9999995).
constexpr double kNormTol = 1.5e-7;

// max_i |a - b| / max(|b|, floor).
double MaxRelDiff(const std::vector<float>& a, const std::vector<double>& b, double floor = 1e-30) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::fabs(a[i] - b[i]) / std::max(std::fabs(b[i]), floor));
  }
  return m;
}

TEST(KdaGate, VectorA) {
  const testing::VectorA a;
  std::vector<float> g(a.f.size());
  KdaGate(ToF32(a.f).data(), ToF32(a.a_log).data(), ToF32(a.dt_bias).data(), a.kT, a.kH, a.kK,
          g.data());
  EXPECT_LT(MaxAbsDiff(g, a.g_expected), kF32AbsTol);
}

// Invariant 8: f + dt_bias on both sides of the softplus switch at 20.
TEST(KdaGate, SoftplusSwitchAt20) {
  const std::vector<double> y = {-30, -1, 0, 19.9, 20.1, 50};
  constexpr int64_t H = 2, K = 6;
  const std::vector<float> a_log = {std::log(2.0f), std::log(16.0f)};
  std::vector<float> dt_bias(H * K), f(H * K);
  std::vector<double> expected(H * K);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t d = 0; d < K; ++d) {
      dt_bias[h * K + d] = 0.25f * (d - 2);  // exactly representable, so f + dt_bias == y
      f[h * K + d] = static_cast<float>(y[d]) - dt_bias[h * K + d];
      const double yy = static_cast<double>(f[h * K + d]) + dt_bias[h * K + d];
      expected[h * K + d] = -std::exp(static_cast<double>(a_log[h])) * reference::Softplus(yy);
    }
  }
  std::vector<float> g(H * K);
  KdaGate(f.data(), a_log.data(), dt_bias.data(), 1, H, K, g.data());
  EXPECT_LT(MaxRelDiff(g, expected), kF32RelTol);
  for (float x : g) EXPECT_LE(x, 0.0f);
  // Above the switch softplus is the identity: g = -exp(a_log) * y.
  EXPECT_FLOAT_EQ(g[4], -2.0f * 20.1f);
  EXPECT_FLOAT_EQ(g[K + 5], -16.0f * 50.0f);
  // Below it the log1p term is visible: softplus(0) = ln 2.
  EXPECT_NEAR(g[2], -2.0 * std::log(2.0), 1e-6);
}

TEST(KdaGate, RandomWideRangeMatchesReferenceAndIsNonPositive) {
  constexpr int64_t T = 7, H = 3, K = 13;  // K not a multiple of 8: vector body + tail
  SplitMix64 rng(8);
  std::vector<double> f(T * H * K), dt(H * K), a_log(H);
  for (double& x : f) x = rng.Uniform(-100, 100);
  for (double& x : dt) x = 0.5 * rng.Normal();
  for (double& x : a_log) x = std::log(rng.Uniform(1, 16));
  const auto f32 = ToF32(f), dt32 = ToF32(dt), al32 = ToF32(a_log);
  // Reference on the fp32 inputs and on the fp32 sum y = f + dt_bias (the spec
  // computes the gate in fp32; at |y| ~ 100 the rounding of y alone moves
  // softplus(y) ~ e^y by 4e-6 relative), so only the kernel's own error is measured.
  std::vector<double> y(f.size()), zero_bias(H * K, 0.0), expected(f.size());
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < H * K; ++i) y[t * H * K + i] = f32[t * H * K + i] + dt32[i];
  }
  reference::Gate(y.data(), ToF64(al32).data(), zero_bias.data(), T, H, K, expected.data());
  std::vector<float> g(f.size());
  KdaGate(f32.data(), al32.data(), dt32.data(), T, H, K, g.data());
  // Below y ~ -86 the kernel's softplus underflows to 0 (true value < 1e-37).
  EXPECT_LT(MaxRelDiff(g, expected, 1e-30), kF32RelTol);
  for (float x : g) {
    EXPECT_LE(x, 0.0f);
    EXPECT_TRUE(std::isfinite(x));
  }
}

TEST(Sigmoid, MatchesReferenceAndVectorA) {
  const testing::VectorA a;
  std::vector<float> beta(a.b.size());
  Sigmoid(ToF32(a.b).data(), static_cast<int64_t>(a.b.size()), beta.data());
  EXPECT_LT(MaxAbsDiff(beta, a.beta_expected), kF32AbsTol);
  SplitMix64 rng(9);
  const std::vector<float> x = ToF32(rng.Normals(1001, 8.0));
  std::vector<double> expected;
  for (float v : x) expected.push_back(reference::Sigmoid<double>(v));
  std::vector<float> y(x.size());
  Sigmoid(x.data(), static_cast<int64_t>(x.size()), y.data());
  EXPECT_LT(MaxRelDiff(y, expected), kF32RelTol);
  // In place.
  std::vector<float> z = x;
  Sigmoid(z.data(), static_cast<int64_t>(z.size()), z.data());
  EXPECT_EQ(z, y);
}

TEST(L2NormScaleRows, VectorAAndReference) {
  const testing::VectorA a;
  std::vector<float> q = ToF32(a.q_raw), k = ToF32(a.k_raw);
  L2NormScaleRows(q.data(), a.kT * a.kH, a.kK, 1.0f);
  L2NormScaleRows(k.data(), a.kT * a.kH, a.kK, 1.0f);
  EXPECT_LT(MaxAbsDiff(q, a.q_norm_expected), kNormTol);
  EXPECT_LT(MaxAbsDiff(k, a.k_norm_expected), kNormTol);
  // The eps is inside the sqrt: k = [0, 2] normalises to 0.999999875, not 1.
  EXPECT_LT(k[5], 1.0f);

  for (int64_t K : {13, 128}) {
    SplitMix64 rng(K);
    const std::vector<float> x = ToF32(rng.Normals(5 * K, 3.0));
    std::vector<double> expected = ToF64(x);
    reference::L2NormScale<double>(expected.data(), 5, K, 0.125);
    std::vector<float> y = x;
    L2NormScaleRows(y.data(), 5, K, 0.125f);
    EXPECT_LT(MaxRelDiff(y, expected, 1e-3), kF32RelTol) << K;
  }
}

// Vector C: one channel, W = 4, x = 1..5, zero history, then one decode step.
TEST(ShortConvSilu, VectorC) {
  const std::vector<float> w = {0.1f, 0.2f, 0.3f, 0.4f};
  const std::vector<float> x = {1, 2, 3, 4, 5};
  std::vector<float> tail(3, 0.0f), out(5);
  ShortConvSilu(x.data(), w.data(), 5, 1, 4, tail.data(), out.data());
  EXPECT_LT(MaxAbsDiff(out, std::vector<double>{0.239475064045, 0.825286116155, 1.761594155956,
                                                 2.857722380467, 3.928055160152}),
            kF32AbsTol);
  EXPECT_EQ(tail, (std::vector<float>{3, 4, 5}));
  const float x6 = 6;
  float o6 = 0;
  ShortConvSilu(&x6, w.data(), 1, 1, 4, tail.data(), &o6);
  EXPECT_NEAR(o6, 4.966535745379, kF32AbsTol);
  EXPECT_EQ(tail, (std::vector<float>{4, 5, 6}));
}

TEST(ShortConvSilu, MatchesReferenceForAllShapes) {
  constexpr int64_t D = 77;  // 64-channel tile + 13; vector body + scalar tail
  for (int64_t W : {1, 2, 4, 6}) {
    for (int64_t T : {0, 1, 2, 3, 10}) {
      SCOPED_TRACE(::testing::Message() << "W=" << W << " T=" << T);
      SplitMix64 rng(W * 100 + T);
      const std::vector<float> x = ToF32(rng.Normals(T * D));
      const std::vector<float> w = ToF32(rng.Normals(D * W, 0.5));
      const std::vector<float> tail0 = ToF32(rng.Normals((W - 1) * D));
      std::vector<double> tail_ref = ToF64(tail0), out_ref(T * D);
      reference::ShortConvSilu(ToF64(x).data(), ToF64(w).data(), T, D, W, tail_ref.data(),
                               out_ref.data());
      std::vector<float> tail = tail0, out(T * D);
      ShortConvSilu(x.data(), w.data(), T, D, W, tail.data(), out.data());
      EXPECT_LT(MaxAbsDiff(out, out_ref), kF32AbsTol);
      EXPECT_EQ(MaxAbsDiff(tail, tail_ref), 0.0);  // the tail is a copy of inputs
    }
  }
}

// Invariant 9: a prompt of p tokens then one token at a time == the whole
// sequence at once, for every p (incl. p < W - 1, whose tail is left-zero-padded).
TEST(ShortConvSilu, TailCarryEqualsOneShot) {
  constexpr int64_t D = 20, W = 4, T = 12;
  SplitMix64 rng(3);
  const std::vector<float> x = ToF32(rng.Normals(T * D));
  const std::vector<float> w = ToF32(rng.Normals(D * W, 0.5));
  std::vector<float> tail_full((W - 1) * D, 0.0f), out_full(T * D);
  ShortConvSilu(x.data(), w.data(), T, D, W, tail_full.data(), out_full.data());
  for (int64_t p : {0, 1, 2, 3, 5, 12}) {
    SCOPED_TRACE(p);
    std::vector<float> tail((W - 1) * D, 0.0f), out(T * D);
    ShortConvSilu(x.data(), w.data(), p, D, W, tail.data(), out.data());
    if (p < W - 1) {  // left-zero-padded: [0 .. 0, x_0 .. x_{p-1}]
      for (int64_t i = 0; i < W - 1; ++i) {
        const int64_t src = i - (W - 1 - p);
        for (int64_t c = 0; c < D; ++c) {
          ASSERT_EQ(tail[i * D + c], src < 0 ? 0.0f : x[src * D + c]) << i << " " << c;
        }
      }
    }
    for (int64_t t = p; t < T; ++t) {
      ShortConvSilu(x.data() + t * D, w.data(), 1, D, W, tail.data(), out.data() + t * D);
    }
    // Same arithmetic in the same order whichever call a window row came from.
    EXPECT_EQ(out, out_full);
    EXPECT_EQ(tail, tail_full);
  }
}

TEST(ShortConvSilu, Causality) {
  constexpr int64_t D = 9, W = 4, T = 10, kChanged = 6;
  SplitMix64 rng(4);
  std::vector<float> x = ToF32(rng.Normals(T * D));
  const std::vector<float> w = ToF32(rng.Normals(D * W, 0.5));
  std::vector<float> tail((W - 1) * D, 0.0f), out(T * D);
  ShortConvSilu(x.data(), w.data(), T, D, W, tail.data(), out.data());
  x[kChanged * D + 3] += 1.0f;
  std::vector<float> tail2((W - 1) * D, 0.0f), out2(T * D);
  ShortConvSilu(x.data(), w.data(), T, D, W, tail2.data(), out2.data());
  for (int64_t i = 0; i < kChanged * D; ++i) ASSERT_EQ(out[i], out2[i]) << i;
  EXPECT_NE(out[kChanged * D + 3], out2[kChanged * D + 3]);
}

}  // namespace
}  // namespace kl::cpu
