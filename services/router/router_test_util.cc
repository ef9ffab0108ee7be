#include "services/router/router_test_util.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/config/model_config.h"
#include "engine/tokenizer/synthetic.h"
#include "gtest/gtest.h"

namespace kl {

std::shared_ptr<const ModelMeta> TinyModel() {
  static const std::shared_ptr<const ModelMeta> model = [] {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const std::string dir = absl::StrCat(tmp ? tmp : "/tmp", "/router_tiny_model");
    const ModelConfig config = TinyConfig();
    absl::Status s = WriteSyntheticTokenizer(dir, config.vocab_size, /*seed=*/0);
    EXPECT_TRUE(s.ok()) << s;
    FILE* f = std::fopen((dir + "/config.json").c_str(), "w");
    const std::string json = ModelConfigToJson(config);
    std::fwrite(json.data(), 1, json.size(), f);
    std::fclose(f);
    absl::StatusOr<std::unique_ptr<ModelMeta>> m = ModelMeta::Open(dir);
    EXPECT_TRUE(m.ok()) << m.status();
    return std::shared_ptr<const ModelMeta>(*std::move(m));
  }();
  return model;
}

bool PollUntil(const std::function<bool()>& cond, absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  while (!cond()) {
    if (absl::Now() > end) return cond();
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

std::vector<int32_t> ExpectedTokens(uint64_t seed, int n) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(FakeTokenAt(seed, i));
  return out;
}

v1::GenerateRequest TokenRequest(uint64_t seed, int64_t max_tokens) {
  v1::GenerateRequest r;
  for (int32_t id : {72, 101, 108, 108, 111}) r.mutable_token_ids()->add_ids(id);
  r.mutable_sampling()->set_seed(seed);
  r.mutable_sampling()->set_max_tokens(max_tokens);
  return r;
}

RouterHarness::RouterHarness(int prefill_workers, int decode_workers) {
  for (int i = 0; i < prefill_workers; ++i) {
    prefill_.push_back(FakeWorkerServer::StartPrefill());
    EXPECT_NE(prefill_.back(), nullptr);
  }
  auto budget = std::make_shared<std::atomic<int>>(1);
  for (int i = 0; i < decode_workers; ++i) {
    decode_.push_back(FakeWorkerServer::StartDecode());
    EXPECT_NE(decode_.back(), nullptr);
    decode_.back()->decode()->death_budget = budget;  // at most one death in all
  }
}

RouterHarness::~RouterHarness() {
  if (server_.server) {
    server_.server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }
  service_.reset();
  prefill_.clear();
  decode_.clear();
}

RouterOptions RouterHarness::DefaultOptions() const {
  RouterOptions o;
  o.max_queue = 16;
  o.max_inflight = 4;
  o.default_deadline = absl::Seconds(30);
  o.default_max_tokens = 16;
  o.max_tokens_limit = 1024;
  o.max_prompt_tokens = 512;
  o.release_timeout = absl::Seconds(2);
  for (WorkerPoolOptions* p : {&o.prefill, &o.decode}) {
    p->health_interval = absl::Milliseconds(50);
    p->check_timeout = absl::Milliseconds(500);
    p->dns_interval = absl::Milliseconds(200);
  }
  for (const auto& w : prefill_) o.prefill.addresses.push_back(w->address());
  for (const auto& w : decode_) o.decode.addresses.push_back(w->address());
  return o;
}

void RouterHarness::StartRouter(RouterOptions options, const ServerOptions& server_options) {
  absl::StatusOr<std::unique_ptr<RouterService>> s =
      RouterService::Create(std::move(options), TinyModel());
  ASSERT_TRUE(s.ok()) << s.status();
  service_ = *std::move(s);
  absl::StatusOr<RunningServer> server = StartServer(server_options, {service_.get()});
  ASSERT_TRUE(server.ok()) << server.status();
  server_ = *std::move(server);
  server_.SetServing(true);
  stub_ = v1::Generation::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server_.port), grpc::InsecureChannelCredentials()));
}

GenerateResult RouterHarness::Generate(const v1::GenerateRequest& request,
                                       absl::Duration timeout,
                                       const std::string& metadata_request_id) {
  GenerateResult r;
  const absl::Time start = absl::Now();
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(start + timeout));
  if (!metadata_request_id.empty()) ctx.AddMetadata("x-request-id", metadata_request_id);
  auto reader = stub_->Generate(&ctx, request);
  v1::GenerateResponse chunk;
  while (reader->Read(&chunk)) {
    for (int i = 0; i < chunk.token_ids_size(); ++i) {
      r.tokens.push_back(chunk.token_ids(i));
      r.indices.push_back(chunk.index() + i);
    }
    r.text += chunk.text();
    r.chunks.push_back(chunk);
  }
  r.status = reader->Finish();
  r.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  const auto& md = ctx.GetServerInitialMetadata();
  if (auto it = md.find("x-request-id"); it != md.end()) {
    r.request_id.assign(it->second.data(), it->second.size());
  }
  return r;
}

}  // namespace kl
