// Accuracy and range contracts of the vector transcendental functions, checked
// against libm in double.
#include "kernels/cpu/simd.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"

namespace kl::cpu::simd {
namespace {

// Measured ~1.2e-7; 2 ulp of headroom.
constexpr double kExpRelTol = 2.5e-7;
// Softplus / sigmoid relative to their exact values.
constexpr double kSoftplusRelTol = 5e-7;
constexpr double kSigmoidRelTol = 5e-7;
// Exp returns exactly 0 below kExpMinArg: absolute error up to exp(-86) ~ 4.5e-38.
constexpr double kExpUnderflow = 5e-38;

// Evenly spaced points in [lo, hi].
std::vector<float> Grid(float lo, float hi, int n) {
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) x[i] = lo + (hi - lo) * static_cast<float>(i) / (n - 1);
  return x;
}

template <class Op>
std::vector<float> Apply(const std::vector<float>& x, Op op) {
  std::vector<float> y(x.size());
  MapArray(x.data(), static_cast<int64_t>(x.size()), y.data(), op);
  return y;
}

TEST(Simd, ExpRelativeErrorOverRange) {
  const auto x = Grid(kExpMinArg, kExpMaxArg, 200003);
  const auto y = Apply(x, [](auto v) { return Exp(v); });
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double e = std::exp(static_cast<double>(x[i]));
    worst = std::max(worst, std::fabs(y[i] - e) / e);
  }
  EXPECT_LT(worst, kExpRelTol);
}

TEST(Simd, ExpRangeContract) {
  const std::vector<float> x = {-1000.0f, -87.0f, -86.5f, 0.0f, 88.0f, 89.0f, 1000.0f, -1e30f};
  const auto y = Apply(x, [](auto v) { return Exp(v); });
  EXPECT_EQ(y[0], 0.0f);
  EXPECT_EQ(y[1], 0.0f);
  EXPECT_EQ(y[2], 0.0f);
  EXPECT_EQ(y[3], 1.0f);
  for (float v : y) EXPECT_TRUE(std::isfinite(v)) << v;
  EXPECT_GT(y[4], 1e38f);
  EXPECT_EQ(y[5], y[4]);  // saturates, never Inf
  EXPECT_EQ(y[7], 0.0f);
}

TEST(Simd, ScalarTailMatchesVectorLanes) {
  // 11 elements: one vector of 8 and a scalar tail of 3 holding the same values
  // as lanes 0..2; the results must be identical.
  std::vector<float> x = {-3.7f, 0.25f, 12.5f, -50.0f, 1.0f, -0.5f, 7.0f, -20.0f, -3.7f, 0.25f, 12.5f};
  const auto y = Apply(x, [](auto v) { return Softplus(v) + Sigmoid(v) + Exp(v); });
  EXPECT_EQ(y[8], y[0]);
  EXPECT_EQ(y[9], y[1]);
  EXPECT_EQ(y[10], y[2]);
}

TEST(Simd, SoftplusMatchesLibmIncludingSwitchAt20) {
  auto x = Grid(-90.0f, 60.0f, 150001);
  for (float v : {-30.0f, -1.0f, 0.0f, 19.9f, 20.0f, 20.1f, 50.0f}) x.push_back(v);
  const auto y = Apply(x, [](auto v) { return Softplus(v); });
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double v = x[i];
    const double e = v > 20 ? v : std::log1p(std::exp(v));
    if (e < kExpUnderflow) {
      ASSERT_LE(std::fabs(y[i] - e), kExpUnderflow) << v;  // Exp underflows to 0 below -86
    } else {
      worst = std::max(worst, std::fabs(y[i] - e) / e);
    }
    ASSERT_GE(y[i], 0.0f);
  }
  EXPECT_LT(worst, kSoftplusRelTol);
  // Above the threshold softplus is exactly the identity.
  EXPECT_EQ(Apply({20.1f, 50.0f}, [](auto v) { return Softplus(v); }),
            (std::vector<float>{20.1f, 50.0f}));
}

TEST(Simd, SigmoidMatchesLibm) {
  const auto x = Grid(-80.0f, 80.0f, 100001);
  const auto y = Apply(x, [](auto v) { return Sigmoid(v); });
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double e = 1.0 / (1.0 + std::exp(-static_cast<double>(x[i])));
    worst = std::max(worst, std::fabs(y[i] - e) / e);
  }
  EXPECT_LT(worst, kSigmoidRelTol);
  const auto extreme = Apply({-1e4f, 1e4f}, [](auto v) { return Sigmoid(v); });
  EXPECT_GE(extreme[0], 0.0f);
  EXPECT_LT(extreme[0], 1e-37f);
  EXPECT_EQ(extreme[1], 1.0f);
}

TEST(Simd, ReduceAddAndFlush) {
  const F32x8 v = {1, 2, 3, 4, 5, 6, 7, 8};
  EXPECT_EQ(ReduceAdd(v), 36.0f);
  const F32x8 f = FlushBelow(F32x8{1e-19f, 1e-17f, 0.5f, 0, 1, 2e-18f, 3, 4}, 1e-18f);
  EXPECT_EQ(f[0], 0.0f);
  EXPECT_EQ(f[1], 1e-17f);
  EXPECT_EQ(f[5], 2e-18f);
}

}  // namespace
}  // namespace kl::cpu::simd
