#include "tests/common/cluster_util.h"

#include <grpcpp/grpcpp.h>

#include <chrono>

#include "gtest/gtest.h"
#include "proto/worker.grpc.pb.h"

namespace kl::testing {

std::string WordPrompt(int words, int seed) {
  std::string s;
  const char* vocab[] = {"alpha", "beta", "KDA", "state", "decode", "prefill", "的", "模型", "42", "\n"};
  for (int i = 0; i < words; ++i) {
    s += vocab[(i * 7 + seed * 13 + i / 3) % 10];
    s += ' ';
  }
  return s;
}

v1::GenerateRequest GreedyRequest(const std::string& prompt, int64_t max_tokens, bool ignore_eos) {
  v1::GenerateRequest r;
  r.set_text(prompt);
  r.mutable_sampling()->set_temperature(0);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  r.mutable_sampling()->set_ignore_eos(ignore_eos);
  return r;
}

v1::WorkerStats DecodeStats(const std::string& address) {
  auto stub = v1::Decode::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::WorkerStats s;
  const grpc::Status st = stub->Stats(&ctx, v1::WorkerStatsRequest(), &s);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return s;
}

}  // namespace kl::testing
