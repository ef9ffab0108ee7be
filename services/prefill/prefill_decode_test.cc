// Prefill -> decode over real gRPC in one process: a kl-prefill and a kl-decode
// worker on 127.0.0.1:0 run the router's sequence (Reserve, Prefill with the
// decode target, Decode) and must reproduce the single-process engine token for
// token — short prompts, prompts across the 64-token KDA chunk, prompts longer
// than max_batch_tokens (chunked prefill), several requests decoded in one
// batch, seeded sampling resumed at an index — and fail cleanly otherwise.
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "engine/runtime/generator.h"
#include "gtest/gtest.h"
#include "services/decode/test_util.h"
#include "services/prefill/prefill_service.h"

namespace kl {
namespace {

// Small enough that the long prompts below are chunked.
constexpr int64_t kMaxBatchTokens = 128;

std::vector<int32_t> Prompt(int n, int32_t salt) {
  std::vector<int32_t> p;
  for (int i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((i * 53 + salt * 97 + 11) % 4000));
  return p;
}

std::chrono::system_clock::time_point In(absl::Duration d) {
  return std::chrono::system_clock::now() +
         std::chrono::microseconds(absl::ToInt64Microseconds(d));
}

struct PrefillWorker {
  std::unique_ptr<LocalEngine> engine;
  std::unique_ptr<PrefillService> service;
  RunningServer server;
  std::unique_ptr<v1::Prefill::Stub> stub;
  ~PrefillWorker() {
    if (server.server) server.server->Shutdown(In(absl::Seconds(2)));
    service.reset();
  }
};

std::unique_ptr<PrefillWorker> StartPrefillWorker(uint64_t seed, PrefillServiceOptions o,
                                                  const CpuBackendOptions& cpu = {}) {
  auto w = std::make_unique<PrefillWorker>();
  w->engine = OpenTinyEngine(seed, cpu);
  if (!w->engine) return nullptr;
  w->service = std::make_unique<PrefillService>(&w->engine->model(),
                                                w->engine->checkpoint_fingerprint(), o);
  auto rs = StartServer(ServerOptions{}, {w->service.get()});
  EXPECT_TRUE(rs.ok()) << rs.status();
  if (!rs.ok()) return nullptr;
  w->server = *std::move(rs);
  w->stub = v1::Prefill::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", w->server.port),
                                                     grpc::InsecureChannelCredentials()));
  return w;
}

class PrefillDecodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    PrefillServiceOptions po;
    po.max_batch_tokens = kMaxBatchTokens;
    po.prefix_cache_bytes = PrefixCacheBytes();
    CpuBackendOptions cpu;
    cpu.backend_sampling = BackendSampling();
    prefill_ = StartPrefillWorker(kTinySeed, po, cpu);
    DecodeServiceOptions dopts;
    // Leases must outlive the slowest prefill a test queues behind (the long
    // prompt of FullQueueIsResourceExhaustedAndDrainRefuses is slow under the
    // sanitizers on 2 busy cores); no test here is about expiry.
    dopts.lease_ttl = absl::Minutes(10);
    decode_ = StartDecodeWorker(kTinySeed, dopts, cpu);
    ASSERT_NE(prefill_, nullptr);
    ASSERT_NE(decode_, nullptr);
  }

  v1::PrefillRequest MakePrefill(const std::vector<int32_t>& tokens, const std::string& lease,
                                 double temperature = 0, uint64_t seed = 0,
                                 int64_t sample_index = 0) {
    v1::PrefillRequest r;
    r.set_request_id("req");
    for (int32_t t : tokens) r.add_token_ids(t);
    r.mutable_sampling()->set_temperature(temperature);
    r.mutable_sampling()->set_seed(seed);
    r.mutable_sampling()->set_ignore_eos(true);
    r.set_sample_index(sample_index);
    r.mutable_target()->set_address(decode_->address);
    r.mutable_target()->set_lease_id(lease);
    return r;
  }

  grpc::Status CallPrefill(const v1::PrefillRequest& r, v1::PrefillResponse* resp,
                           absl::Duration timeout = absl::Seconds(60)) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(timeout));
    return prefill_->stub->Prefill(&ctx, r, resp);
  }

  // The router's sequence for one request: all `n` tokens (prefill's + decode's).
  std::vector<int32_t> Generate2(const std::vector<int32_t>& prompt, int n, double temperature = 0,
                                 uint64_t seed = 0, int64_t* cached_tokens = nullptr) {
    const std::string lease = ReserveLease(*decode_->stub, prompt.size() + n);
    v1::PrefillResponse pr;
    const grpc::Status ps = CallPrefill(MakePrefill(prompt, lease, temperature, seed), &pr);
    EXPECT_TRUE(ps.ok()) << ps.error_code() << " " << ps.error_message();
    if (!ps.ok()) return {};
    EXPECT_EQ(pr.num_tokens(), static_cast<int64_t>(prompt.size()));
    EXPECT_GT(pr.transfer_bytes(), 0);
    if (cached_tokens != nullptr) *cached_tokens = pr.cached_tokens();
    std::vector<int32_t> out = {pr.token()};
    const DecodeOutcome d = RunDecode(
        *decode_->stub, MakeDecodeRequest(lease, pr.token(), 1, n - 1, temperature, seed));
    EXPECT_TRUE(d.status.ok()) << d.status.error_message();
    EXPECT_TRUE(d.finished);
    EXPECT_TRUE(d.indices_contiguous);
    out.insert(out.end(), d.tokens.begin(), d.tokens.end());
    return out;
  }

  // The single-process oracle.
  std::vector<int32_t> Reference(const std::vector<int32_t>& prompt, int n,
                                 double temperature = 0, uint64_t seed = 0) {
    SamplingParams p;
    p.temperature = temperature;
    p.seed = seed;
    p.max_tokens = n;
    p.ignore_eos = true;
    auto r = Generate(decode_->engine->model(), decode_->engine->tokenizer(), prompt, p);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->tokens : std::vector<int32_t>();
  }

  bool ClusterIdle() {
    const v1::WorkerStats d = GetStats(*decode_->stub);
    const v1::WorkerStats p = prefill_->service->Snapshot();
    return d.slots_used() == 0 && d.running() == 0 && d.waiting() == 0 &&
           d.transfers_in_flight() == 0 && d.latent_rows_used() == 0 && p.running() == 0 &&
           p.waiting() == 0 && p.transfers_in_flight() == 0;
  }

  // Workers whose backend picks the tokens (the path of CUDA workers, kernels/cuda/sampling.h).
  virtual bool BackendSampling() const { return false; }
  virtual int64_t PrefixCacheBytes() const { return 0; }

  std::unique_ptr<PrefillWorker> prefill_;
  std::unique_ptr<DecodeWorker> decode_;
};

class PrefillDecodeBackendSamplingTest : public PrefillDecodeTest {
 protected:
  bool BackendSampling() const override { return true; }
};

// Both workers take the device-sampling path (ForwardItem::sample; the CPU backend's test
// switch): the tokens of the single-process engine, for a batched and a chunked prefill
// (first token) and the decode steps after them, greedy and seeded.
TEST_F(PrefillDecodeBackendSamplingTest, TokensEqualTheSingleProcessEngine) {
  ASSERT_TRUE(prefill_->engine->model().backend()->SamplesOnDevice());
  ASSERT_TRUE(decode_->engine->model().backend()->SamplesOnDevice());
  const auto short_prompt = Prompt(40, 3);
  const auto long_prompt = Prompt(3 * kMaxBatchTokens + 5, 4);  // chunked prefill
  EXPECT_EQ(Generate2(short_prompt, 8), Reference(short_prompt, 8));
  EXPECT_EQ(Generate2(short_prompt, 12, 0.9, 1234), Reference(short_prompt, 12, 0.9, 1234));
  EXPECT_EQ(Generate2(long_prompt, 12, 1.1, 99), Reference(long_prompt, 12, 1.1, 99));
  EXPECT_NE(Reference(short_prompt, 12, 0.9, 1234), Reference(short_prompt, 12, 0.9, 4321));
}

TEST_F(PrefillDecodeTest, GreedyTokensEqualTheSingleProcessEngine) {
  // Shorter than one KDA chunk, across chunk boundaries, and (> 128) chunked
  // prefill with MLA rows shipped chunk by chunk.
  for (int len : {5, 63, 64, 100, 129, 300}) {
    const auto prompt = Prompt(len, len);
    EXPECT_EQ(Generate2(prompt, 12), Reference(prompt, 12)) << "prompt length " << len;
  }
  EXPECT_TRUE(WaitFor([&] { return ClusterIdle(); }));
  EXPECT_EQ(GetStats(*decode_->stub).integrity_failures(), 0);
  EXPECT_EQ(prefill_->service->Snapshot().requests_completed(), 6);
}

TEST_F(PrefillDecodeTest, SeededSamplingResumesAtTheRightIndex) {
  const auto prompt = Prompt(40, 7);
  const auto reference = Reference(prompt, 10, 0.9, 1234);
  EXPECT_EQ(Generate2(prompt, 10, 0.9, 1234), reference);
  // Migration: prefill prompt + 4 generated tokens with sample_index 4 gives token 4.
  std::vector<int32_t> extended = prompt;
  extended.insert(extended.end(), reference.begin(), reference.begin() + 4);
  const std::string lease = ReserveLease(*decode_->stub);
  v1::PrefillResponse pr;
  ASSERT_TRUE(CallPrefill(MakePrefill(extended, lease, 0.9, 1234, 4), &pr).ok());
  EXPECT_EQ(pr.token(), reference[4]);
  const DecodeOutcome d =
      RunDecode(*decode_->stub, MakeDecodeRequest(lease, pr.token(), 5, 5, 0.9, 1234));
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.tokens, std::vector<int32_t>(reference.begin() + 5, reference.end()));
}

TEST_F(PrefillDecodeTest, ConcurrentRequestsDecodeInOneBatch) {
  constexpr int kRequests = 4;
  constexpr int kTokens = 48;
  std::vector<std::vector<int32_t>> prompts, got(kRequests);
  for (int i = 0; i < kRequests; ++i) prompts.push_back(Prompt(20 + 37 * i, 100 + i));
  const int64_t steps_before = decode_->service->engine().Stats().steps;
  // Prefill all four first (concurrently: the prefill worker batches them), then
  // start the four decode streams together, so the sequences overlap in the
  // decode batch however the machine schedules the threads.
  std::vector<std::string> leases(kRequests);
  std::vector<int32_t> first(kRequests);
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] {
      leases[i] = ReserveLease(*decode_->stub, prompts[i].size() + kTokens);
      v1::PrefillResponse pr;
      const grpc::Status ps = CallPrefill(MakePrefill(prompts[i], leases[i], 0, 0), &pr);
      EXPECT_TRUE(ps.ok()) << ps.error_message();
      first[i] = pr.token();
    });
  }
  for (auto& t : threads) t.join();
  threads.clear();
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] {
      const DecodeOutcome d = RunDecode(
          *decode_->stub, MakeDecodeRequest(leases[i], first[i], 1, kTokens - 1, 0, 0));
      EXPECT_TRUE(d.status.ok()) << d.status.error_message();
      got[i] = {first[i]};
      got[i].insert(got[i].end(), d.tokens.begin(), d.tokens.end());
    });
  }
  for (auto& t : threads) t.join();
  const DecodeEngineStats es = decode_->service->engine().Stats();
  for (int i = 0; i < kRequests; ++i) {
    EXPECT_EQ(got[i], Reference(prompts[i], kTokens)) << "request " << i;
  }
  // Each request decodes kTokens - 1 tokens; fewer steps than that in total
  // means steps carried several sequences.
  EXPECT_GT(es.max_batch_seen, 1);
  EXPECT_LT(es.steps - steps_before, kRequests * (kTokens - 1));
  EXPECT_TRUE(WaitFor([&] { return ClusterIdle(); }));
}

TEST_F(PrefillDecodeTest, UnknownLeaseFailsWithNotFoundAndNothingLeaks) {
  v1::PrefillResponse pr;
  const grpc::Status s =
      CallPrefill(MakePrefill(Prompt(200, 3), "00000000000000000000000000000000"), &pr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  EXPECT_TRUE(WaitFor([&] { return ClusterIdle(); }));
  EXPECT_EQ(GetStats(*decode_->stub).integrity_failures(), 0);
  EXPECT_EQ(prefill_->service->Snapshot().requests_completed(), 0);

  // An unreachable decode worker is UNAVAILABLE (the router tries another pair).
  v1::PrefillRequest r = MakePrefill(Prompt(20, 3), "00000000000000000000000000000000");
  r.mutable_target()->set_address("127.0.0.1:1");
  EXPECT_EQ(CallPrefill(r, &pr).error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(WaitFor([&] { return ClusterIdle(); }));
}

TEST_F(PrefillDecodeTest, ForeignCheckpointIsRefusedWithFailedPrecondition) {
  PrefillServiceOptions po;
  auto other = StartPrefillWorker(kOtherSeed, po);
  ASSERT_NE(other, nullptr);
  const std::string lease = ReserveLease(*decode_->stub);
  v1::PrefillResponse pr;
  grpc::ClientContext ctx;
  const grpc::Status s = other->stub->Prefill(&ctx, MakePrefill(Prompt(30, 9), lease), &pr);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  v1::WorkerStats d = GetStats(*decode_->stub);
  EXPECT_EQ(d.integrity_failures(), 1);
  EXPECT_EQ(d.slots_used(), 1);  // the lease stays for a retry ...
  EXPECT_EQ(d.latent_rows_used(), 0);
  // ... which succeeds from a worker with the right weights.
  const auto prompt = Prompt(30, 9);
  ASSERT_TRUE(CallPrefill(MakePrefill(prompt, lease), &pr).ok());
  const DecodeOutcome out = RunDecode(*decode_->stub, MakeDecodeRequest(lease, pr.token(), 1, 5));
  std::vector<int32_t> all = {pr.token()};
  all.insert(all.end(), out.tokens.begin(), out.tokens.end());
  EXPECT_EQ(all, Reference(prompt, 6));
}

TEST_F(PrefillDecodeTest, BadPrefillRequestsAreInvalidArgument) {
  const std::string lease = ReserveLease(*decode_->stub);
  v1::PrefillResponse pr;
  auto expect_invalid = [&](v1::PrefillRequest r, const char* what) {
    const grpc::Status s = CallPrefill(r, &pr);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << what;
  };
  expect_invalid(MakePrefill({}, lease), "empty");
  expect_invalid(MakePrefill({1, 2, 4096}, lease), "id out of range");
  expect_invalid(MakePrefill({1, -1}, lease), "negative id");
  expect_invalid(MakePrefill({1, 2}, lease, 0, 0, -1), "sample_index");
  expect_invalid(MakePrefill({1, 2}, ""), "lease");
  auto r = MakePrefill({1, 2}, lease);
  r.mutable_target()->clear_address();
  expect_invalid(r, "address");
  r = MakePrefill({1, 2}, lease);
  r.mutable_sampling()->set_temperature(-1);
  expect_invalid(r, "temperature");
  EXPECT_EQ(GetStats(*decode_->stub).transfers_in_flight(), 0);
}

TEST_F(PrefillDecodeTest, CancelledPrefillLeavesNoPartialState) {
  const std::string lease = ReserveLease(*decode_->stub);
  v1::PrefillResponse pr;
  // 4000 tokens in 128-token chunks cannot finish in 5 ms.
  const grpc::Status s =
      CallPrefill(MakePrefill(Prompt(4000, 5), lease), &pr, absl::Milliseconds(5));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  // The prefill stops, its push is cancelled, the decode side drops the partial
  // assembly; the lease stays empty and reusable.
  EXPECT_TRUE(WaitFor([&] {
    const v1::WorkerStats d = GetStats(*decode_->stub);
    const v1::WorkerStats p = prefill_->service->Snapshot();
    return d.transfers_in_flight() == 0 && d.latent_rows_used() == 0 && p.running() == 0 &&
           p.waiting() == 0 && p.transfers_in_flight() == 0;
  }));
  EXPECT_EQ(GetStats(*decode_->stub).slots_used(), 1);
  const auto prompt = Prompt(50, 5);
  ASSERT_TRUE(CallPrefill(MakePrefill(prompt, lease), &pr).ok());
  const DecodeOutcome out = RunDecode(*decode_->stub, MakeDecodeRequest(lease, pr.token(), 1, 3));
  std::vector<int32_t> all = {pr.token()};
  all.insert(all.end(), out.tokens.begin(), out.tokens.end());
  EXPECT_EQ(all, Reference(prompt, 4));
  EXPECT_TRUE(WaitFor([&] { return ClusterIdle(); }));
}

TEST_F(PrefillDecodeTest, FullQueueIsResourceExhaustedAndDrainRefuses) {
  PrefillServiceOptions po;
  po.max_queue = 1;
  po.max_batch_tokens = 512;
  auto w = StartPrefillWorker(kTinySeed, po);
  ASSERT_NE(w, nullptr);
  auto call = [&](int n, v1::PrefillResponse* resp) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(120)));
    return w->stub->Prefill(&ctx, MakePrefill(Prompt(n, 1), ReserveLease(*decode_->stub)), resp);
  };
  // A long prompt runs, a second one waits: the queue (of 1) is full. It only
  // has to outlast a few RPCs; sanitizer builds run it 5-10x slower (16,000
  // tokens took over 120 s under ASan on 2 busy cores), so they use fewer.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  constexpr int kLongPrompt = 4000;
#else
  constexpr int kLongPrompt = 16000;
#endif
  grpc::Status long_status, queued_status;
  v1::PrefillResponse r1, r2, r3;
  std::thread a([&] { long_status = call(kLongPrompt, &r1); });
  ASSERT_TRUE(WaitFor([&] { return w->service->Snapshot().running() == 1; }));
  std::thread b([&] { queued_status = call(8, &r2); });
  ASSERT_TRUE(WaitFor([&] { return w->service->Snapshot().waiting() == 1; }));
  EXPECT_EQ(call(8, &r3).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  w->service->Drain();
  EXPECT_TRUE(w->service->Snapshot().draining());
  EXPECT_EQ(call(8, &r3).error_code(), grpc::StatusCode::UNAVAILABLE);
  a.join();
  b.join();
  EXPECT_TRUE(long_status.ok()) << long_status.error_message();  // admitted work finishes
  EXPECT_TRUE(queued_status.ok()) << queued_status.error_message();
  EXPECT_TRUE(w->service->WaitIdle(absl::Seconds(10)));
}

TEST_F(PrefillDecodeTest, Bf16BundlesShipFewerBytes) {
  PrefillServiceOptions po;
  po.bundle_dtype = DType::kBF16;
  auto bf16 = StartPrefillWorker(kTinySeed, po);
  ASSERT_NE(bf16, nullptr);
  const auto prompt = Prompt(90, 11);
  v1::PrefillResponse f32_resp, bf16_resp;
  ASSERT_TRUE(CallPrefill(MakePrefill(prompt, ReserveLease(*decode_->stub)), &f32_resp).ok());
  grpc::ClientContext ctx;
  const grpc::Status s =
      bf16->stub->Prefill(&ctx, MakePrefill(prompt, ReserveLease(*decode_->stub)), &bf16_resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_LT(bf16_resp.transfer_bytes(), f32_resp.transfer_bytes());
  EXPECT_EQ(bf16_resp.token(), f32_resp.token());  // the token comes from prefill's own logits
}

class PrefillDecodePrefixCacheTest : public PrefillDecodeTest {
 protected:
  int64_t PrefixCacheBytes() const override { return 64 << 20; }
  // Waits until the prefill worker has kept `n` states (it keeps one after replying).
  bool Kept(int64_t n) {
    return WaitFor([&] { return prefill_->service->Snapshot().prefix_cache_entries() >= n; });
  }
};

std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// A conversation: each turn's prompt is the previous prompt, the reply and a
// new message. From the second turn on the prefill starts from the state the
// worker kept for the previous prompt, and the tokens are the single-process
// engine's, greedy and seeded, batched and chunked (> kMaxBatchTokens).
TEST_F(PrefillDecodePrefixCacheTest, ConversationTurnsStartFromThePreviousPromptsState) {
  std::vector<int32_t> prompt = Prompt(40, 21);
  int64_t cached = -1;
  std::vector<int32_t> reply = Generate2(prompt, 8, 0, 0, &cached);
  EXPECT_EQ(reply, Reference(prompt, 8));
  EXPECT_EQ(cached, 0);
  int64_t kept = 1, hit_tokens = 0;
  ASSERT_TRUE(Kept(kept));
  // Turn lengths: batched after a hit, then a hit whose rest is chunked, then
  // a chunked prompt whose rest fits one forward.
  const std::vector<std::pair<int, int>> turns = {{17, 0}, {3 * kMaxBatchTokens + 7, 1}, {25, 2}};
  for (const auto& [n, i] : turns) {
    const int64_t previous = static_cast<int64_t>(prompt.size());
    prompt = Concat(Concat(prompt, reply), Prompt(n, 30 + i));
    const double temperature = i == 1 ? 0.9 : 0;
    reply = Generate2(prompt, 8, temperature, 77, &cached);
    EXPECT_EQ(reply, Reference(prompt, 8, temperature, 77)) << "turn " << i;
    EXPECT_EQ(cached, previous) << "turn " << i;
    hit_tokens += previous;
    ASSERT_TRUE(Kept(++kept));
  }
  const v1::WorkerStats st = prefill_->service->Snapshot();
  EXPECT_EQ(st.prefix_cache_queries(), 4);
  EXPECT_EQ(st.prefix_cache_hits(), 3);
  EXPECT_EQ(st.prefix_cache_hit_tokens(), hit_tokens);
  EXPECT_GT(st.prefix_cache_bytes(), 0);
  EXPECT_TRUE(WaitFor([&] { return ClusterIdle(); }));
  EXPECT_EQ(GetStats(*decode_->stub).integrity_failures(), 0);
}

// A state exists only where it was saved: the same prompt again has nothing
// left to prefill for its first token's logits, so it is not a hit; a prompt
// that shares only part of a cached one is not either.
TEST_F(PrefillDecodePrefixCacheTest, OnlyAWholeCachedPromptFollowedByMoreTokensIsAHit) {
  const auto prompt = Prompt(50, 5);
  ASSERT_EQ(Generate2(prompt, 4), Reference(prompt, 4));
  ASSERT_TRUE(Kept(1));
  int64_t cached = -1;
  EXPECT_EQ(Generate2(prompt, 4, 0, 0, &cached), Reference(prompt, 4));
  EXPECT_EQ(cached, 0);
  std::vector<int32_t> partial(prompt.begin(), prompt.begin() + 30);
  partial = Concat(partial, Prompt(30, 6));
  EXPECT_EQ(Generate2(partial, 4, 0, 0, &cached), Reference(partial, 4));
  EXPECT_EQ(cached, 0);
  EXPECT_EQ(prefill_->service->Snapshot().prefix_cache_hits(), 0);
}

// Prompts that hit and prompts that do not, submitted together (one batched
// forward when they meet in the queue): every one gets its own tokens.
TEST_F(PrefillDecodePrefixCacheTest, HitsAndMissesInOneBatch) {
  std::vector<std::vector<int32_t>> bases = {Prompt(30, 40), Prompt(45, 41)};
  for (const auto& b : bases) ASSERT_EQ(Generate2(b, 2), Reference(b, 2));
  ASSERT_TRUE(Kept(2));
  std::vector<std::vector<int32_t>> prompts = {Concat(bases[0], Prompt(9, 42)), Prompt(33, 43),
                                               Concat(bases[1], Prompt(21, 44)), Prompt(12, 45)};
  std::vector<std::vector<int32_t>> got(prompts.size());
  std::vector<int64_t> cached(prompts.size(), -1);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] { got[i] = Generate2(prompts[i], 6, 0, 0, &cached[i]); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(got[i], Reference(prompts[i], 6)) << i;
    EXPECT_EQ(cached[i], i % 2 == 0 ? static_cast<int64_t>(bases[i / 2].size()) : 0) << i;
  }
  EXPECT_TRUE(WaitFor([&] { return ClusterIdle(); }));
}

}  // namespace
}  // namespace kl
