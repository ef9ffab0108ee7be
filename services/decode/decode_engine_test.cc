// DecodeEngine without gRPC: a sequence whose consumer does not read is paused
// without stalling the others, resumes when it reads again, and is dropped
// (slot freed) when its lease expires; tokens equal the single-process engine.
#include "services/decode/decode_engine.h"

#include <memory>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "engine/runtime/generator.h"
#include "engine/runtime/local_engine.h"
#include "gtest/gtest.h"
#include "services/decode/test_util.h"

namespace kl {
namespace {

constexpr absl::Duration kTtl = absl::Seconds(30);

// A TokenSink + lease consumer whose room is switched by the test.
class FakeSink : public TokenSink, public StateConsumer {
 public:
  explicit FakeSink(DecodeEngine** engine) : engine_(engine) {}
  bool HasRoom() override {
    absl::MutexLock l(&mu_);
    return room_;
  }
  bool Cancelled() override {
    absl::MutexLock l(&mu_);
    return cancelled_;
  }
  void Emit(int32_t token, int64_t index, bool finished) override {
    absl::MutexLock l(&mu_);
    if (index != next_index_) contiguous_ = false;
    next_index_ = index + 1;
    tokens_.push_back(token);
    finished_ = finished;
  }
  void End(const absl::Status& status) override {
    absl::MutexLock l(&mu_);
    end_ = status;
  }
  void OnStateReady(SequenceState) override {}
  void OnLeaseRevoked(const absl::Status&) override {
    {
      absl::MutexLock l(&mu_);
      cancelled_ = true;
    }
    (*engine_)->Wake();
  }
  void SetRoom(bool room) {
    {
      absl::MutexLock l(&mu_);
      room_ = room;
    }
    (*engine_)->Wake();
  }
  std::vector<int32_t> tokens() {
    absl::MutexLock l(&mu_);
    return tokens_;
  }
  std::optional<absl::Status> end() {
    absl::MutexLock l(&mu_);
    return end_;
  }
  bool finished() {
    absl::MutexLock l(&mu_);
    return finished_ && contiguous_;
  }

 private:
  DecodeEngine** engine_;
  absl::Mutex mu_;
  bool room_ = true;
  bool cancelled_ = false;
  bool finished_ = false;
  bool contiguous_ = true;
  int64_t next_index_ = 1;
  std::vector<int32_t> tokens_;
  std::optional<absl::Status> end_;
};

class DecodeEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = OpenTinyEngine(kTinySeed);
    ASSERT_NE(model_, nullptr);
    LeaseManagerOptions lo;
    lo.ttl = kTtl;
    leases_ = std::make_unique<LeaseManager>(lo, [this] { return now_; });
    DecodeEngineOptions eo;
    eo.max_batch = 8;
    eo.eos_token_id = static_cast<int32_t>(model_->config().eos_token_id);
    engine_ = std::make_unique<DecodeEngine>(&model_->model(), leases_.get(), eo);
    raw_engine_ = engine_.get();
  }
  void TearDown() override {
    engine_.reset();
    leases_.reset();
  }

  std::vector<int32_t> Prompt(int n, int salt) {
    std::vector<int32_t> p;
    for (int i = 0; i < n; ++i) p.push_back((i * 29 + salt * 13 + 3) % 4000);
    return p;
  }

  // Prefills `prompt`, reserves a lease claimed by `sink`, joins the batch.
  // Returns the first (prefill) token.
  int32_t JoinSequence(const std::vector<int32_t>& prompt, int64_t max_new,
                       const std::shared_ptr<FakeSink>& sink) {
    SequenceState st = model_->model().NewState();
    ForwardItem it{&st, prompt, false};
    ForwardOutput out;
    EXPECT_TRUE(model_->model().Forward(absl::MakeSpan(&it, 1), &out).ok());
    const int32_t first = Argmax(out.logits[0].data(), model_->config().vocab_size);
    auto grant = leases_->Reserve("r", 0);
    EXPECT_TRUE(grant.ok());
    EXPECT_TRUE(leases_->Claim(grant->lease_id, sink).ok());
    DecodeSpec spec;
    spec.lease_id = grant->lease_id;
    spec.params.temperature = 0;
    spec.params.ignore_eos = true;
    spec.params.max_tokens = max_new;
    spec.last_token = first;
    spec.next_index = 1;
    spec.max_new_tokens = max_new;
    EXPECT_TRUE(engine_->Join(spec, std::move(st), sink).ok());
    return first;
  }

  std::vector<int32_t> Reference(const std::vector<int32_t>& prompt, int n) {
    SamplingParams p;
    p.temperature = 0;
    p.max_tokens = n;
    p.ignore_eos = true;
    auto r = Generate(model_->model(), model_->tokenizer(), prompt, p);
    EXPECT_TRUE(r.ok());
    return r.ok() ? r->tokens : std::vector<int32_t>();
  }

  std::unique_ptr<LocalEngine> model_;
  absl::Time now_ = absl::FromUnixSeconds(1000);
  std::unique_ptr<LeaseManager> leases_;
  std::unique_ptr<DecodeEngine> engine_;
  DecodeEngine* raw_engine_ = nullptr;
};

TEST_F(DecodeEngineTest, ASlowConsumerPausesOnlyItsOwnSequence) {
  auto fast = std::make_shared<FakeSink>(&raw_engine_);
  auto slow = std::make_shared<FakeSink>(&raw_engine_);
  slow->SetRoom(false);
  const auto p_fast = Prompt(17, 1), p_slow = Prompt(33, 2);
  const int32_t f0 = JoinSequence(p_fast, 20, fast);
  const int32_t s0 = JoinSequence(p_slow, 10, slow);

  ASSERT_TRUE(WaitFor([&] { return fast->end().has_value(); }));
  EXPECT_TRUE(fast->end()->ok());
  EXPECT_TRUE(fast->finished());
  std::vector<int32_t> got = {f0};
  for (int32_t t : fast->tokens()) got.push_back(t);
  EXPECT_EQ(got, Reference(p_fast, 21));
  EXPECT_TRUE(slow->tokens().empty());  // paused the whole time
  EXPECT_FALSE(slow->end().has_value());
  // The fast one's lease is gone (released just after its sink ended).
  EXPECT_TRUE(WaitFor([&] { return leases_->Stats().slots_used == 1; }))
      << leases_->Stats().slots_used;

  slow->SetRoom(true);
  ASSERT_TRUE(WaitFor([&] { return slow->end().has_value(); }));
  EXPECT_TRUE(slow->end()->ok());
  got = {s0};
  for (int32_t t : slow->tokens()) got.push_back(t);
  EXPECT_EQ(got, Reference(p_slow, 11));
  EXPECT_TRUE(WaitFor([&] { return leases_->Stats().slots_used == 0; }))
      << leases_->Stats().slots_used;
  EXPECT_TRUE(WaitFor([&] { return engine_->Stats().completed == 2; }))
      << engine_->Stats().completed;
}

TEST_F(DecodeEngineTest, APausedSequenceIsDroppedWhenItsLeaseExpires) {
  auto stuck = std::make_shared<FakeSink>(&raw_engine_);
  stuck->SetRoom(false);
  JoinSequence(Prompt(9, 3), 50, stuck);
  ASSERT_TRUE(WaitFor([&] { return engine_->Stats().running == 1; }));
  now_ += kTtl + absl::Seconds(1);  // no progress for a whole TTL
  EXPECT_EQ(leases_->ExpireOverdue(), 1);
  ASSERT_TRUE(WaitFor([&] { return stuck->end().has_value(); }));
  EXPECT_FALSE(stuck->end()->ok());
  EXPECT_TRUE(stuck->tokens().empty());
  EXPECT_TRUE(WaitFor([&] { return engine_->Stats().running == 0; }));
  EXPECT_TRUE(WaitFor([&] { return leases_->Stats().slots_used == 0; }));
}

TEST_F(DecodeEngineTest, StopTokenEndsTheSequenceWithFinished) {
  auto sink = std::make_shared<FakeSink>(&raw_engine_);
  const auto prompt = Prompt(21, 4);
  const auto ref = Reference(prompt, 8);
  // Stop at the 4th generated token (index 3): the decode emits indices 1..3.
  SequenceState st = model_->model().NewState();
  ForwardItem it{&st, prompt, false};
  ForwardOutput out;
  ASSERT_TRUE(model_->model().Forward(absl::MakeSpan(&it, 1), &out).ok());
  auto grant = leases_->Reserve("r", 0);
  ASSERT_TRUE(grant.ok());
  DecodeSpec spec;
  spec.lease_id = grant->lease_id;
  spec.params.temperature = 0;
  spec.params.stop_token_ids = {ref[3]};
  spec.params.ignore_eos = true;
  spec.last_token = ref[0];
  spec.max_new_tokens = 100;
  ASSERT_TRUE(engine_->Join(spec, std::move(st), sink).ok());
  ASSERT_TRUE(WaitFor([&] { return sink->end().has_value(); }));
  EXPECT_TRUE(sink->finished());
  // The tokens follow the reference up to the first occurrence of the stop id
  // (ref[3], or earlier if it occurs before), which ends the stream.
  const auto got = sink->tokens();
  ASSERT_FALSE(got.empty());
  ASSERT_LE(got.size(), 3u);
  EXPECT_EQ(got, std::vector<int32_t>(ref.begin() + 1, ref.begin() + 1 + got.size()));
  EXPECT_EQ(got.back(), ref[3]);
  EXPECT_TRUE(WaitFor([&] { return leases_->Stats().slots_used == 0; }));
}

// The device-sampling path (a backend that picks tokens itself, ForwardItem::sample;
// here the CPU backend's test switch) gives the tokens of the host path: the draw of
// each token is the host Sampler's for the same seed and token index. Stochastic
// sequences of different lengths share the batch, and one joins late.
TEST(DecodeEngineSamplingTest, BackendSamplingGivesTheHostSamplersTokens) {
  struct Setup {
    std::unique_ptr<LocalEngine> engine;
    absl::Time now = absl::FromUnixSeconds(1000);
    std::unique_ptr<LeaseManager> leases;
    std::unique_ptr<DecodeEngine> decode;
    DecodeEngine* raw = nullptr;
  };
  auto make = [](bool backend_sampling) {
    auto s = std::make_unique<Setup>();
    CpuBackendOptions cpu;
    cpu.backend_sampling = backend_sampling;
    s->engine = OpenTinyEngine(kTinySeed, cpu);
    if (s->engine == nullptr) return std::unique_ptr<Setup>();
    LeaseManagerOptions lo;
    lo.ttl = kTtl;
    Setup* raw = s.get();
    s->leases = std::make_unique<LeaseManager>(lo, [raw] { return raw->now; });
    DecodeEngineOptions eo;
    eo.max_batch = 8;
    s->decode = std::make_unique<DecodeEngine>(&s->engine->model(), s->leases.get(), eo);
    s->raw = s->decode.get();
    return s;
  };
  auto host = make(false), dev = make(true);
  ASSERT_TRUE(host && dev);
  ASSERT_FALSE(host->engine->model().backend()->SamplesOnDevice());
  ASSERT_TRUE(dev->engine->model().backend()->SamplesOnDevice());

  struct Req {
    std::vector<int32_t> prompt;
    double temperature, top_p;
    int64_t top_k, max_new;
    uint64_t seed;
  };
  const std::vector<Req> reqs = {{{5, 17, 300, 41, 9, 77}, 1.0, 1.0, 0, 24, 11},
                                 {{8, 3, 3, 1000, 64}, 0.8, 0.9, 0, 18, 12},
                                 {{2, 200, 13}, 1.2, 1.0, 20, 30, 13},
                                 {{99, 98, 97, 96}, 0.0, 1.0, 0, 12, 14}};
  auto run = [&](Setup& s, std::vector<std::vector<int32_t>>* tokens) {
    std::vector<std::shared_ptr<FakeSink>> sinks;
    for (size_t i = 0; i < reqs.size(); ++i) {
      const Req& r = reqs[i];
      SequenceState st = s.engine->model().NewState();
      ForwardItem it{&st, r.prompt, false};
      ForwardOutput out;
      ASSERT_TRUE(s.engine->model().Forward(absl::MakeSpan(&it, 1), &out).ok());
      ASSERT_EQ(out.logits.size(), 1u);  // no `sample`: logits, on either backend
      auto sink = std::make_shared<FakeSink>(&s.raw);
      auto grant = s.leases->Reserve("r", 0);
      ASSERT_TRUE(grant.ok());
      ASSERT_TRUE(s.leases->Claim(grant->lease_id, sink).ok());
      DecodeSpec spec;
      spec.lease_id = grant->lease_id;
      spec.params.temperature = r.temperature;
      spec.params.top_p = r.top_p;
      spec.params.top_k = r.top_k;
      spec.params.seed = r.seed;
      spec.params.ignore_eos = true;
      spec.last_token = Argmax(out.logits[0].data(), s.engine->config().vocab_size);
      spec.next_index = 1;
      spec.max_new_tokens = r.max_new;
      ASSERT_TRUE(s.decode->Join(spec, std::move(st), sink).ok());
      sinks.push_back(sink);
      if (i == 2) {  // the last one joins once the others are under way
        ASSERT_TRUE(WaitFor([&] { return s.decode->Stats().steps >= 3; }));
      }
    }
    for (auto& sink : sinks) {
      ASSERT_TRUE(WaitFor([&] { return sink->end().has_value(); }));
      EXPECT_TRUE(sink->end()->ok());
      EXPECT_TRUE(sink->finished());
      tokens->push_back(sink->tokens());
    }
  };
  std::vector<std::vector<int32_t>> want, got;
  run(*host, &want);
  run(*dev, &got);
  ASSERT_EQ(got.size(), reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(got[i].size(), static_cast<size_t>(reqs[i].max_new)) << "sequence " << i;
    EXPECT_EQ(got[i], want[i]) << "sequence " << i;
  }
  EXPECT_NE(want[0], want[3]);  // the stochastic streams are not all alike
}

}  // namespace
}  // namespace kl
