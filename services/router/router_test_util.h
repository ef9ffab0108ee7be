// Shared by the router tests: the tiny model's config + tokenizer folder (no
// weights), pools of fake workers, and a RouterService served on 127.0.0.1:0
// with a client stub.
#ifndef KL_SERVICES_ROUTER_ROUTER_TEST_UTIL_H_
#define KL_SERVICES_ROUTER_ROUTER_TEST_UTIL_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "proto/generation.grpc.pb.h"
#include "services/common/server_util.h"
#include "services/router/fake_workers.h"
#include "services/router/model_meta.h"
#include "services/router/router_service.h"

namespace kl {

// TinyConfig()'s config.json and a synthetic tokenizer under TEST_TMPDIR,
// written and loaded once per test binary.
std::shared_ptr<const ModelMeta> TinyModel();

// Polls `cond` every millisecond until true or `timeout`; returns the last value.
bool PollUntil(const std::function<bool()>& cond, absl::Duration timeout = absl::Seconds(5));

// FakeTokenAt(seed, 0..n-1).
std::vector<int32_t> ExpectedTokens(uint64_t seed, int n);

// A token-id prompt with a fixed seed and max_tokens.
v1::GenerateRequest TokenRequest(uint64_t seed, int64_t max_tokens);

struct GenerateResult {
  grpc::Status status;
  std::vector<v1::GenerateResponse> chunks;
  std::vector<int32_t> tokens;  // token_ids of all chunks, in order
  std::vector<int64_t> indices; // the index of every token, from the chunks
  std::string text;             // concatenated text deltas
  double seconds = 0;           // call start -> status
  std::string request_id;       // x-request-id of the router's initial metadata
};

class RouterHarness {
 public:
  // Starts the fake workers (the router starts in StartRouter).
  RouterHarness(int prefill_workers, int decode_workers);
  ~RouterHarness();

  // Options for tests: fast health polling, the fakes as static members.
  RouterOptions DefaultOptions() const;
  void StartRouter(RouterOptions options) { StartRouter(std::move(options), ServerOptions{}); }
  // With the router's server options (message limits); `server_options`
  // must keep plaintext, the harness's stub dials without TLS.
  void StartRouter(RouterOptions options, const ServerOptions& server_options);
  void StartRouter() { StartRouter(DefaultOptions()); }

  FakeWorkerServer& prefill(int i) { return *prefill_[i]; }
  FakeWorkerServer& decode(int i) { return *decode_[i]; }
  int num_decode() const { return static_cast<int>(decode_.size()); }
  RouterService& service() { return *service_; }
  v1::Generation::Stub& stub() { return *stub_; }
  RunningServer& server() { return server_; }

  // Runs one Generate call to its end (client deadline `timeout`), sending
  // `metadata_request_id` as x-request-id metadata unless empty.
  GenerateResult Generate(const v1::GenerateRequest& request,
                          absl::Duration timeout = absl::Seconds(20),
                          const std::string& metadata_request_id = "");

 private:
  std::vector<std::unique_ptr<FakeWorkerServer>> prefill_, decode_;
  std::unique_ptr<RouterService> service_;
  RunningServer server_;
  std::unique_ptr<v1::Generation::Stub> stub_;
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_ROUTER_TEST_UTIL_H_
