// kl-decode over real gRPC in one process: PushState verification and its
// status codes, decode streams, cancellation, lease expiry and draining — and
// that every path gives the slot back (Stats).
#include "services/decode/decode_service.h"

#include <thread>

#include "absl/time/time.h"
#include "engine/runtime/generator.h"
#include "engine/state/state_bundle.h"
#include "gtest/gtest.h"
#include "services/decode/test_util.h"
#include "services/decode/worker_codec.h"

namespace kl {
namespace {

std::vector<int32_t> Prompt(int n, int32_t salt) {
  std::vector<int32_t> p;
  for (int i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((i * 37 + salt * 101 + 5) % 4000));
  return p;
}

// Prefills `prompt` on `engine` and encodes the state as bundle frames;
// `first` gets the greedy token after the prompt.
std::vector<std::string> BundleFrames(LocalEngine& engine, const std::vector<int32_t>& prompt,
                                      int32_t* first) {
  Model& m = engine.model();
  SequenceState st = m.NewState();
  ForwardItem it{&st, prompt, false};
  ForwardOutput out;
  EXPECT_TRUE(m.Forward(absl::MakeSpan(&it, 1), &out).ok());
  *first = Argmax(out.logits[0].data(), m.config().vocab_size);
  BundleMeta meta;
  meta.request_id = "test";
  meta.checkpoint_fingerprint = engine.checkpoint_fingerprint();
  auto frames = EncodeBundle(m.config(), st, meta);
  EXPECT_TRUE(frames.ok()) << frames.status();
  std::vector<std::string> bytes;
  for (auto& f : *frames) bytes.push_back(std::move(f.bytes));
  return bytes;
}

std::vector<int32_t> Reference(LocalEngine& engine, const std::vector<int32_t>& prompt, int n) {
  SamplingParams p;
  p.temperature = 0;
  p.max_tokens = n;
  p.ignore_eos = true;
  auto r = Generate(engine.model(), engine.tokenizer(), prompt, p);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->tokens : std::vector<int32_t>();
}

bool Idle(v1::Decode::Stub& stub) {
  const v1::WorkerStats s = GetStats(stub);
  return s.slots_used() == 0 && s.running() == 0 && s.waiting() == 0 &&
         s.transfers_in_flight() == 0 &&
         s.latent_rows_used() == 0;
}

void ExpectReleased(v1::Decode::Stub& stub, const std::string& lease) {
  grpc::ClientContext ctx;
  v1::ReleaseRequest r;
  r.set_lease_id(lease);
  v1::ReleaseResponse resp;
  EXPECT_TRUE(stub.Release(&ctx, r, &resp).ok());
}

class DecodeServiceTest : public ::testing::Test {
 protected:
  void SetUp() override { Start(DecodeServiceOptions()); }
  void Start(DecodeServiceOptions o) {
    w_.reset();
    w_ = StartDecodeWorker(kTinySeed, o);
    ASSERT_NE(w_, nullptr);
  }
  std::unique_ptr<DecodeWorker> w_;
};

TEST_F(DecodeServiceTest, PushedStateDecodesLikeTheSingleProcessEngine) {
  const auto prompt = Prompt(70, 1);
  int32_t first;
  const auto frames = BundleFrames(*w_->engine, prompt, &first);
  const std::string lease = ReserveLease(*w_->stub, 100);
  v1::PushStateResponse resp;
  ASSERT_TRUE(PushFrames(*w_->stub, lease, frames, &resp).ok());
  EXPECT_EQ(resp.frames(), static_cast<int64_t>(frames.size()));
  const v1::WorkerStats s = GetStats(*w_->stub);
  EXPECT_EQ(s.slots_used(), 1);
  EXPECT_EQ(s.latent_rows_used(), 70);
  EXPECT_EQ(s.role(), "decode");
  EXPECT_EQ(s.checkpoint_fingerprint(), FingerprintHex(w_->engine->checkpoint_fingerprint()));

  const DecodeOutcome d = RunDecode(*w_->stub, MakeDecodeRequest(lease, first, 1, 11));
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_TRUE(d.finished);
  EXPECT_TRUE(d.indices_contiguous);
  std::vector<int32_t> got = {first};
  got.insert(got.end(), d.tokens.begin(), d.tokens.end());
  EXPECT_EQ(got, Reference(*w_->engine, prompt, 12));
  EXPECT_TRUE(WaitFor([&] { return Idle(*w_->stub); }));
  EXPECT_EQ(GetStats(*w_->stub).requests_completed(), 1);

  // The finished request's state memory is pooled, and a request imported into
  // those (stale) buffers decodes exactly like a fresh one.
  EXPECT_EQ(w_->service->pooled_states(), 1);
  const auto prompt2 = Prompt(33, 2);
  int32_t first2;
  const auto frames2 = BundleFrames(*w_->engine, prompt2, &first2);
  const std::string lease2 = ReserveLease(*w_->stub, 60);
  ASSERT_TRUE(PushFrames(*w_->stub, lease2, frames2, &resp).ok());
  EXPECT_EQ(w_->service->pooled_states(), 0);  // taken by the import
  const DecodeOutcome d2 = RunDecode(*w_->stub, MakeDecodeRequest(lease2, first2, 1, 7));
  ASSERT_TRUE(d2.status.ok()) << d2.status.error_message();
  std::vector<int32_t> got2 = {first2};
  got2.insert(got2.end(), d2.tokens.begin(), d2.tokens.end());
  EXPECT_EQ(got2, Reference(*w_->engine, prompt2, 8));
  EXPECT_TRUE(WaitFor([&] { return Idle(*w_->stub); }));
}

TEST_F(DecodeServiceTest, BadPushesAreRefusedAndTheLeaseStaysUsable) {
  const auto prompt = Prompt(20, 2);
  int32_t first;
  const auto good = BundleFrames(*w_->engine, prompt, &first);
  const std::string lease = ReserveLease(*w_->stub);

  // Unknown lease: nothing touched.
  EXPECT_EQ(PushFrames(*w_->stub, "0123456789abcdef0123456789abcdef", good).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(PushFrames(*w_->stub, "", good).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // A flipped payload byte in a part.
  auto corrupt = good;
  corrupt[1].back() ^= 0x01;
  EXPECT_EQ(PushFrames(*w_->stub, lease, corrupt).error_code(), grpc::StatusCode::DATA_LOSS);

  // A bundle from another checkpoint (same config, other weights).
  auto other = OpenTinyEngine(kOtherSeed);
  ASSERT_NE(other, nullptr);
  ASSERT_NE(other->checkpoint_fingerprint(), w_->engine->checkpoint_fingerprint());
  int32_t other_first;
  const auto foreign = BundleFrames(*other, prompt, &other_first);
  const grpc::Status fs = PushFrames(*w_->stub, lease, foreign);
  EXPECT_EQ(fs.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << fs.error_message();

  // A stream that ends before the final record.
  std::vector<std::string> truncated(good.begin(), good.end() - 2);
  EXPECT_EQ(PushFrames(*w_->stub, lease, truncated).error_code(), grpc::StatusCode::DATA_LOSS);

  v1::WorkerStats s = GetStats(*w_->stub);
  EXPECT_EQ(s.integrity_failures(), 3);
  EXPECT_EQ(s.slots_used(), 1);  // the lease stays, empty, for a retry
  EXPECT_EQ(s.leases_active(), 1);
  EXPECT_EQ(s.transfers_in_flight(), 0);
  EXPECT_EQ(s.latent_rows_used(), 0);

  // The retry on the same lease succeeds; a second fill is refused.
  ASSERT_TRUE(PushFrames(*w_->stub, lease, good).ok());
  EXPECT_EQ(PushFrames(*w_->stub, lease, good).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  const DecodeOutcome d = RunDecode(*w_->stub, MakeDecodeRequest(lease, first, 1, 5));
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  std::vector<int32_t> got = {first};
  got.insert(got.end(), d.tokens.begin(), d.tokens.end());
  EXPECT_EQ(got, Reference(*w_->engine, prompt, 6));
  EXPECT_TRUE(WaitFor([&] { return Idle(*w_->stub); }));
}

// Every kind of damaged transfer (reliability.md, "corrupt state") is refused
// with a precise status on the first bad frame, frees the partial state and
// leaves the lease empty for a retry; parts legitimately reordered (any order
// after the header, the final record anywhere) are accepted and decode exactly
// like the undamaged bundle.
TEST_F(DecodeServiceTest, EveryKindOfDamagedTransferIsRefusedAndReorderedPartsAreNot) {
  const auto prompt = Prompt(24, 5);
  int32_t first;
  const auto good = BundleFrames(*w_->engine, prompt, &first);
  ASSERT_GE(good.size(), 4u);  // header, parts..., final
  int32_t other_first;
  const auto other = BundleFrames(*w_->engine, Prompt(9, 6), &other_first);
  const std::string lease = ReserveLease(*w_->stub);

  struct Case {
    std::string name;
    std::vector<std::string> frames;
    grpc::StatusCode code;
  };
  std::vector<Case> cases;
  auto with = [&](const std::string& name, grpc::StatusCode code, auto&& damage) {
    Case c{name, good, code};
    damage(c.frames);
    cases.push_back(std::move(c));
  };
  with("payload bit flip", grpc::StatusCode::DATA_LOSS,
       [](auto& f) { f[1].back() ^= 0x10; });
  with("record header bit flip", grpc::StatusCode::DATA_LOSS,
       [](auto& f) { f[1][20] ^= 0x01; });  // inside the bundle id
  with("truncated frame", grpc::StatusCode::DATA_LOSS,
       [](auto& f) { f[1].resize(f[1].size() - 8); });
  with("duplicated part", grpc::StatusCode::DATA_LOSS,
       [](auto& f) { f.insert(f.begin() + 2, f[1]); });
  with("duplicated header", grpc::StatusCode::DATA_LOSS,
       [](auto& f) { f.insert(f.begin() + 1, f[0]); });
  with("duplicated final record", grpc::StatusCode::DATA_LOSS,
       [](auto& f) { f.push_back(f.back()); });
  with("part before the header", grpc::StatusCode::INVALID_ARGUMENT,
       [](auto& f) { std::swap(f[0], f[1]); });
  with("part of another bundle", grpc::StatusCode::INVALID_ARGUMENT,
       [&](auto& f) { f[1] = other[1]; });
  with("missing final record", grpc::StatusCode::DATA_LOSS, [](auto& f) { f.pop_back(); });
  with("missing part", grpc::StatusCode::DATA_LOSS,
       [](auto& f) { f.erase(f.begin() + 1); });
  with("empty frame", grpc::StatusCode::DATA_LOSS,
       [](auto& f) { f.insert(f.begin() + 1, std::string()); });

  for (const Case& c : cases) {
    const grpc::Status s = PushFrames(*w_->stub, lease, c.frames);
    EXPECT_EQ(s.error_code(), c.code) << c.name << ": " << s.error_message();
    EXPECT_FALSE(s.error_message().empty()) << c.name;
    const v1::WorkerStats st = GetStats(*w_->stub);
    EXPECT_EQ(st.slots_used(), 1) << c.name;  // the lease stays, empty
    EXPECT_EQ(st.transfers_in_flight(), 0) << c.name;
    EXPECT_EQ(st.latent_rows_used(), 0) << c.name;
    EXPECT_EQ(st.running(), 0) << c.name;
  }
  EXPECT_EQ(GetStats(*w_->stub).integrity_failures(), static_cast<int64_t>(cases.size()));

  // Legitimate reordering: the final record right after the header, the parts
  // in reverse.
  std::vector<std::string> reordered = {good.front(), good.back()};
  reordered.insert(reordered.end(), good.rbegin() + 1, good.rend() - 1);
  ASSERT_TRUE(PushFrames(*w_->stub, lease, reordered).ok());
  const DecodeOutcome d = RunDecode(*w_->stub, MakeDecodeRequest(lease, first, 1, 6));
  ASSERT_TRUE(d.status.ok()) << d.status.error_message();
  std::vector<int32_t> got = {first};
  got.insert(got.end(), d.tokens.begin(), d.tokens.end());
  EXPECT_EQ(got, Reference(*w_->engine, prompt, 7));
  EXPECT_TRUE(WaitFor([&] { return Idle(*w_->stub); }));
}

TEST_F(DecodeServiceTest, DecodeOnARefusedLeaseNeverProducesTokens) {
  const auto prompt = Prompt(12, 3);
  int32_t first;
  auto frames = BundleFrames(*w_->engine, prompt, &first);
  frames[2].back() ^= 0x40;
  const std::string lease = ReserveLease(*w_->stub);
  EXPECT_EQ(PushFrames(*w_->stub, lease, frames).error_code(), grpc::StatusCode::DATA_LOSS);

  DecodeOutcome d;
  std::thread reader([&] { d = RunDecode(*w_->stub, MakeDecodeRequest(lease, first, 1, 8)); });
  // The stream waits for a state that never comes; a second claim is refused.
  ASSERT_TRUE(WaitFor([&] { return GetStats(*w_->stub).waiting() == 1; }));
  EXPECT_EQ(RunDecode(*w_->stub, MakeDecodeRequest(lease, first, 1, 8)).status.error_code(),
            grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_EQ(GetStats(*w_->stub).running(), 0);
  ExpectReleased(*w_->stub, lease);
  reader.join();
  EXPECT_TRUE(d.tokens.empty());
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::CANCELLED) << d.status.error_message();
  EXPECT_TRUE(WaitFor([&] { return Idle(*w_->stub); }));
  EXPECT_EQ(RunDecode(*w_->stub, MakeDecodeRequest(lease, first, 1, 8)).status.error_code(),
            grpc::StatusCode::NOT_FOUND);
}

TEST_F(DecodeServiceTest, CancellingADecodeMidStreamFreesSlotAndLease) {
  const auto prompt = Prompt(30, 4);
  int32_t first;
  const auto frames = BundleFrames(*w_->engine, prompt, &first);
  const std::string lease = ReserveLease(*w_->stub);
  ASSERT_TRUE(PushFrames(*w_->stub, lease, frames).ok());

  grpc::ClientContext ctx;
  auto reader = w_->stub->Decode(&ctx, MakeDecodeRequest(lease, first, 1, 1 << 20));
  v1::DecodeResponse msg;
  int64_t got = 0;
  while (got < 5 && reader->Read(&msg)) got += msg.token_ids_size();
  ASSERT_GE(got, 5);
  EXPECT_EQ(GetStats(*w_->stub).running(), 1);
  ctx.TryCancel();
  while (reader->Read(&msg)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitFor([&] { return Idle(*w_->stub); }));
  EXPECT_EQ(GetStats(*w_->stub).requests_completed(), 0);
  // The slot is reusable.
  EXPECT_FALSE(ReserveLease(*w_->stub).empty());
}

TEST_F(DecodeServiceTest, LeaseExpiryFreesTheSlotAndEndsAWaitingDecode) {
  DecodeServiceOptions o;
  // Long enough for both Reserves and the Stats call on a loaded machine.
  o.lease_ttl = absl::Seconds(1);
  o.reap_interval = absl::Milliseconds(20);
  Start(o);
  const std::string idle = ReserveLease(*w_->stub);
  const std::string waited = ReserveLease(*w_->stub);
  EXPECT_EQ(GetStats(*w_->stub).slots_used(), 2);
  const DecodeOutcome d = RunDecode(*w_->stub, MakeDecodeRequest(waited, 1, 1, 8));
  EXPECT_EQ(d.status.error_code(), grpc::StatusCode::NOT_FOUND) << d.status.error_message();
  EXPECT_TRUE(d.tokens.empty());
  EXPECT_TRUE(WaitFor([&] { return Idle(*w_->stub); }));
  int32_t first;
  const auto frames = BundleFrames(*w_->engine, Prompt(8, 5), &first);
  EXPECT_EQ(PushFrames(*w_->stub, idle, frames).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(DecodeServiceTest, ReserveIsRefusedWhenFullAndWhileDraining) {
  DecodeServiceOptions o;
  o.slots = 2;
  Start(o);
  const std::string a = ReserveLease(*w_->stub);
  const std::string b = ReserveLease(*w_->stub);
  {
    grpc::ClientContext ctx;
    v1::ReserveResponse r;
    EXPECT_EQ(w_->stub->Reserve(&ctx, v1::ReserveRequest(), &r).error_code(),
              grpc::StatusCode::RESOURCE_EXHAUSTED);
  }
  ExpectReleased(*w_->stub, b);
  ExpectReleased(*w_->stub, b);  // idempotent
  w_->service->Drain();
  EXPECT_TRUE(GetStats(*w_->stub).draining());
  {
    grpc::ClientContext ctx;
    v1::ReserveResponse r;
    EXPECT_EQ(w_->stub->Reserve(&ctx, v1::ReserveRequest(), &r).error_code(),
              grpc::StatusCode::UNAVAILABLE);
  }
  // The lease granted before the drain still completes.
  EXPECT_FALSE(w_->service->WaitIdle(absl::Milliseconds(50)));
  int32_t first;
  const auto frames = BundleFrames(*w_->engine, Prompt(9, 6), &first);
  ASSERT_TRUE(PushFrames(*w_->stub, a, frames).ok());
  const DecodeOutcome d = RunDecode(*w_->stub, MakeDecodeRequest(a, first, 1, 4));
  EXPECT_TRUE(d.status.ok()) << d.status.error_message();
  EXPECT_EQ(d.tokens.size(), 4u);
  EXPECT_TRUE(w_->service->WaitIdle(absl::Seconds(10)));
}

TEST_F(DecodeServiceTest, BadDecodeRequestsAreRefused) {
  {  // A reservation larger than the model's context is refused, nothing leased.
    grpc::ClientContext ctx;
    v1::ReserveRequest rr;
    rr.set_max_total_tokens(w_->engine->config().model_max_length + 1);
    v1::ReserveResponse resp;
    const grpc::Status st = w_->stub->Reserve(&ctx, rr, &resp);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(st.error_message().find("context"), std::string::npos) << st.error_message();
    EXPECT_EQ(GetStats(*w_->stub).slots_used(), 0);
  }
  const std::string lease = ReserveLease(*w_->stub);
  EXPECT_EQ(RunDecode(*w_->stub, MakeDecodeRequest(lease, 1, 1, 0)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(RunDecode(*w_->stub, MakeDecodeRequest(lease, 1 << 20, 1, 4)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(RunDecode(*w_->stub, MakeDecodeRequest("", 1, 1, 4)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // Refused requests did not consume the lease.
  EXPECT_EQ(GetStats(*w_->stub).slots_used(), 1);
}

}  // namespace
}  // namespace kl
