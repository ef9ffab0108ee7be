#include "services/router/request_validation.h"

#include "gtest/gtest.h"

namespace kl {
namespace {

TEST(CheckFitsContext, PromptPlusMaxTokensMustFitTheContext) {
  RequestLimits lim;
  lim.context_tokens = 100;
  EXPECT_TRUE(CheckFitsContext(60, 40, lim).ok());
  const absl::Status s = CheckFitsContext(61, 40, lim);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("sampling.max_tokens"), std::string::npos) << s.message();
  lim.context_tokens = 0;  // unchecked
  EXPECT_TRUE(CheckFitsContext(1 << 30, 1 << 30, lim).ok());
}

}  // namespace
}  // namespace kl
