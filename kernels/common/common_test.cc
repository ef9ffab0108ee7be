#include <atomic>
#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/dtype.h"
#include "kernels/common/parallel.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

TEST(DType, Bf16RoundTripAndRounding) {
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f)), 1.0f);
  EXPECT_EQ(Bf16ToF32(F32ToBf16(-3.5f)), -3.5f);
  // 1 + 2^-8 is exactly half way between bf16 neighbours 1 and 1+2^-7: ties to even (1).
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + 1.0f / 256)), 1.0f);
  // Slightly above the tie rounds up.
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + 1.0f / 256 + 1.0f / 4096)), 1.0f + 1.0f / 128);
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
}

TEST(DType, F16Conversions) {
  for (float v : {0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.960464477539063e-08f, 0.1f}) {
    float back = F16ToF32(F32ToF16(v));
    EXPECT_NEAR(back, v, std::fabs(v) * 1e-3 + 1e-12) << v;
  }
  EXPECT_TRUE(std::isinf(F16ToF32(F32ToF16(70000.0f))));
  EXPECT_EQ(F32ToF16(1.0f), 0x3c00);
  EXPECT_EQ(F16ToF32(0x3555), 0.333251953125f);
}

TEST(DType, Names) {
  DType t;
  ASSERT_TRUE(ParseDTypeName("BF16", &t));
  EXPECT_EQ(t, DType::kBF16);
  EXPECT_FALSE(ParseDTypeName("Q4", &t));
  EXPECT_EQ(DTypeName(DType::kF32), "F32");
}

TEST(Parallel, CoversRangeExactlyOnce) {
  SetNumThreads(3);
  std::vector<std::atomic<int>> hits(1000);
  for (int rep = 0; rep < 20; ++rep) {
    ParallelFor(1000, 7, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
  }
  for (auto& h : hits) EXPECT_EQ(h.load(), 20);
  // Nested calls run inline and still cover everything.
  std::atomic<int> total{0};
  ParallelFor(10, 1, [&](int64_t b, int64_t e) {
    ParallelFor(e - b, 1, [&](int64_t b2, int64_t e2) { total += static_cast<int>(e2 - b2); });
  });
  EXPECT_EQ(total.load(), 10);
  SetNumThreads(0);
}

absl::StatusOr<int> Half(int x) {
  if (x % 2) return absl::InvalidArgumentError("odd");
  return x / 2;
}
absl::Status Quarter(int x, int* out) {
  ASSIGN_OR_RETURN(int h, Half(x));
  ASSIGN_OR_RETURN(*out, Half(h));
  RETURN_IF_ERROR(absl::OkStatus());
  return absl::OkStatus();
}

TEST(StatusMacros, PropagateErrors) {
  int out = 0;
  EXPECT_TRUE(Quarter(8, &out).ok());
  EXPECT_EQ(out, 2);
  EXPECT_EQ(Quarter(6, &out).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kl
