// The device-transfer control plane on CPU: a kl-prefill and a kl-decode worker
// over real gRPC in one process, with a fake DeviceTransport in place of NCCL.
// The fake moves each layer's bytes out of the prefill state (host-resident on
// the CPU backend) at the moment the engine reports the layer done, exactly when
// the NCCL transport would queue its send, and the decode side assembles them.
// So the plan, its order against the engine's layer callbacks (batched and
// chunked prefill), the checksums, adoption and every failure path of
// PushState's device mode run in CI; tests/gpu has the same over NCCL.
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/runtime/generator.h"
#include "gtest/gtest.h"
#include "services/decode/test_util.h"
#include "services/prefill/prefill_service.h"
#include "services/transport/device_transport.h"

namespace kl {
namespace {

constexpr int64_t kMaxBatchTokens = 96;  // longer prompts are chunked

std::chrono::system_clock::time_point In(absl::Duration d) {
  return std::chrono::system_clock::now() +
         std::chrono::microseconds(absl::ToInt64Microseconds(d));
}

uint64_t Sum(const std::vector<float>& v) {  // FNV-1a over the bytes
  uint64_t h = 1469598103934665603ull;
  const auto* b = reinterpret_cast<const unsigned char*>(v.data());
  for (size_t i = 0; i < v.size() * sizeof(float); ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

// What went "over the link", per link id: one payload per plan message (only
// once the sender announced its group, as NCCL sends right after announcing).
struct Wire {
  std::mutex mu;
  std::map<uint64_t, std::map<int64_t, std::vector<float>>> payloads;
  std::map<uint64_t, int64_t> posted;  // messages whose receives were posted, per link
  int sends_ended_ok = 0, sends_ended_failed = 0, receives_aborted = 0, receives_ok = 0;
  int groups_posted = 0, messages_posted = 0;
  int sends_stopped_by_peer = 0;  // Complete ended by peer_alive() == false
  int corrupted_kda = 0, corrupted_mla = 0;  // messages damaged after the sender's sum
};

int64_t Ordinal(const ModelConfig& c, int64_t layer) {
  int64_t n = 0;
  for (int64_t l = 0; l < layer; ++l) n += c.IsKda(l) == c.IsKda(layer) ? 1 : 0;
  return n;
}

struct FakeSendOptions {
  bool stall = false;       // the sends never complete
  bool misannounce = false;  // the first group claims to start at message 1
  bool fail_link = false;   // the link fails after the first group
};

// Like NcclSend: the engine thread queues each finished layer; a worker thread
// (the link's) takes what is queued a moment later in groups of up to 3, puts
// their bytes on the wire, announces them and wakes the pusher. The sends
// "complete" once the receiver has posted every message.
class FakeSend final : public DeviceSend {
 public:
  FakeSend(Wire* wire, const ModelConfig& c, uint64_t id, std::vector<v1::DeviceMessage> plan,
           FakeSendOptions o)
      : wire_(wire), c_(c), id_(id), plan_(std::move(plan)), o_(o),
        worker_([this] { Work(); }) {}
  ~FakeSend() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }
  uint64_t link_id() const override { return id_; }
  const std::vector<v1::DeviceMessage>& plan() const override { return plan_; }
  void InjectCut() override { cut_ = true; }
  void InjectCorrupt(bool mla) override { corrupt_at_ = FaultTargetMessage(plan_, mla); }
  absl::Status OnLayer(const SequenceState& s, int64_t layer, int64_t b, int64_t e) override {
    std::lock_guard<std::mutex> l(mu_);
    if (!status_.ok()) return status_;
    absl::StatusOr<int64_t> end = LayerMessagesEnd(plan_, next_, layer, b, e);
    if (!end.ok()) return end.status();
    for (; next_ < *end; ++next_) {
      const v1::DeviceMessage& m = plan_[next_];
      std::vector<float> p;
      if (m.kda()) {
        const KdaLayerState& k = s.kda[Ordinal(c_, layer)];
        for (const auto* v : {&k.recurrent, &k.conv_q, &k.conv_k, &k.conv_v}) {
          p.insert(p.end(), v->begin(), v->end());
        }
      } else {
        const int64_t d = c_.MlaLatentDim();
        const auto& lat = s.mla[Ordinal(c_, layer)].latent;
        p.assign(lat.begin() + m.row_begin() * d, lat.begin() + m.row_end() * d);
      }
      if (static_cast<int64_t>(p.size() * sizeof(float)) != m.bytes()) {
        return absl::InternalError("payload size differs from the plan");
      }
      sums_.push_back(Sum(p));
      if (next_ == corrupt_at_) {  // damaged on the wire, after the sender's sum
        reinterpret_cast<unsigned char*>(p.data())[p.size() * 2] ^= 0x20;
        std::lock_guard<std::mutex> w(wire_->mu);
        ++(m.kda() ? wire_->corrupted_kda : wire_->corrupted_mla);
      }
      if (!(cut_ && next_ >= static_cast<int64_t>(plan_.size()) / 2)) {
        queue_.emplace_back(next_, std::move(p));
        ++queued_;
        cv_.notify_all();
      }
    }
    return absl::OkStatus();
  }
  absl::Status AfterForward(const SequenceState&) override { return absl::OkStatus(); }
  void SetWake(std::function<void()> wake) override {
    std::lock_guard<std::mutex> l(mu_);
    wake_ = std::move(wake);
  }
  absl::Status TakeGroups(std::vector<MessageGroup>* groups, bool* drained) override {
    std::lock_guard<std::mutex> l(mu_);
    if (!status_.ok()) return status_;
    groups->insert(groups->end(), ready_.begin(), ready_.end());
    ready_.clear();
    *drained = announced_ == queued_;
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<uint64_t>> Complete(const std::function<bool()>& alive) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (cut_) return absl::UnavailableError("device transfer cut (fault injection)");
      if (!status_.ok()) return status_;
      if (next_ != static_cast<int64_t>(plan_.size())) return absl::InternalError("plan unfinished");
    }
    const absl::Time deadline = absl::Now() + absl::Seconds(3);  // the fake's transfer budget
    for (int i = 1;; ++i) {
      {
        std::lock_guard<std::mutex> w(wire_->mu);
        if (!o_.stall && wire_->posted[id_] == static_cast<int64_t>(plan_.size())) break;
      }
      if (absl::Now() >= deadline) return absl::DeadlineExceededError("device send timed out");
      if (i % 10 == 0 && !alive()) {
        std::lock_guard<std::mutex> w(wire_->mu);
        ++wire_->sends_stopped_by_peer;
        return absl::UnavailableError("the decode worker ended the transfer");
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    std::lock_guard<std::mutex> l(mu_);
    return sums_;
  }
  void End(bool ok) override {
    if (ended_) return;
    ended_ = true;
    std::lock_guard<std::mutex> l(wire_->mu);
    (ok ? wire_->sends_ended_ok : wire_->sends_ended_failed)++;
  }

 private:
  void Work() {
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      l.unlock();
      absl::SleepFor(absl::Milliseconds(1));  // the compute event, pack, checksum
      l.lock();
      MessageGroup g{queue_.front().first, 0};
      while (!queue_.empty() && g.count < 3) {
        std::lock_guard<std::mutex> w(wire_->mu);
        wire_->payloads[id_][queue_.front().first] = std::move(queue_.front().second);
        queue_.pop_front();
        ++g.count;
      }
      if (o_.misannounce && g.first == 0) g.first = 1;  // not where the plan continues
      ready_.push_back(g);
      announced_ += g.count;
      if (o_.fail_link && status_.ok()) status_ = absl::UnavailableError("NCCL link failed (fake)");
      std::function<void()> wake = wake_;
      l.unlock();
      if (wake) wake();
      l.lock();
    }
  }

  Wire* wire_;
  const ModelConfig c_;
  const uint64_t id_;
  const std::vector<v1::DeviceMessage> plan_;
  const FakeSendOptions o_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::function<void()> wake_;
  std::deque<std::pair<int64_t, std::vector<float>>> queue_;  // queued, not yet announced
  std::vector<MessageGroup> ready_;
  absl::Status status_;
  int64_t queued_ = 0, announced_ = 0;
  bool cut_ = false, ended_ = false, stop_ = false;
  int64_t corrupt_at_ = -1;
  int64_t next_ = 0;
  std::vector<uint64_t> sums_;
  std::thread worker_;  // last: starts after the members it uses
};

// Posts announced groups with the real ValidateGroup; completes only if every
// message was announced and is on the wire.
class FakeReceive final : public DeviceReceive {
 public:
  FakeReceive(Wire* wire, const ModelConfig& c, uint64_t id, v1::DeviceTransfer t, int64_t n,
              bool refuse_last)
      : wire_(wire), c_(c), id_(id), t_(std::move(t)), n_(n), mla_(MlaBytes(t_.messages())),
        refuse_last_(refuse_last) {}
  ~FakeReceive() override { Abort(); }
  absl::Status Receive(const MessageGroup& g) override {
    std::lock_guard<std::mutex> l(mu_);
    if (done_) return absl::AbortedError("receive ended");
    if (absl::Status s = ValidateGroup(mla_, posted_, g, StagingCapacity(mla_)); !s.ok()) return s;
    if (refuse_last_ && posted_ + g.count == t_.messages_size()) {
      return absl::UnavailableError("the link failed under the last group (fake)");
    }
    posted_ += g.count;
    std::lock_guard<std::mutex> w(wire_->mu);
    ++wire_->groups_posted;
    wire_->messages_posted += static_cast<int>(g.count);
    wire_->posted[id_] = posted_;
    return absl::OkStatus();
  }
  absl::StatusOr<SequenceState> Complete(const std::vector<uint64_t>& sums) override {
    std::lock_guard<std::mutex> l(mu_);
    if (posted_ != t_.messages_size() || sums.size() != static_cast<size_t>(posted_)) {
      return absl::DataLossError(absl::StrCat(posted_, " of ", t_.messages_size(), " announced"));
    }
    std::lock_guard<std::mutex> w(wire_->mu);
    auto& got = wire_->payloads[id_];
    SequenceState s = SequenceState::Zero(c_);
    for (auto& m : s.mla) m.latent.assign(n_ * c_.MlaLatentDim(), 0.0f);
    for (int i = 0; i < t_.messages_size(); ++i) {
      if (got.count(i) == 0) return absl::DeadlineExceededError("device receive timed out");
      if (Sum(got[i]) != sums[i]) {
        return absl::DataLossError(absl::StrCat("checksum mismatch in message ", i));
      }
      const v1::DeviceMessage& m = t_.messages(i);
      const float* p = got[i].data();
      if (m.kda()) {
        KdaLayerState& k = s.kda[Ordinal(c_, m.layer())];
        for (auto* v : {&k.recurrent, &k.conv_q, &k.conv_k, &k.conv_v}) {
          std::copy(p, p + v->size(), v->begin());
          p += v->size();
        }
      } else {
        std::copy(p, p + got[i].size(),
                  s.mla[Ordinal(c_, m.layer())].latent.begin() + m.row_begin() * c_.MlaLatentDim());
      }
    }
    s.num_tokens = n_;
    done_ = true;
    ++wire_->receives_ok;
    return s;
  }
  void Abort() override {
    std::lock_guard<std::mutex> l(mu_);
    if (done_) return;
    done_ = true;
    std::lock_guard<std::mutex> w(wire_->mu);
    ++wire_->receives_aborted;
  }

 private:
  Wire* wire_;
  const ModelConfig c_;
  const uint64_t id_;
  const v1::DeviceTransfer t_;
  const int64_t n_;
  const std::vector<int64_t> mla_;
  const bool refuse_last_;
  std::mutex mu_;
  int64_t posted_ = 0;
  bool done_ = false;
};

class FakeTransport final : public DeviceTransport {
 public:
  FakeTransport(Wire* wire, const ModelConfig& c) : wire_(wire), c_(c) {}
  v1::OpenTransportResponse Accept(const v1::OpenTransportRequest&) override {
    v1::OpenTransportResponse r;
    r.set_transport("nccl");
    r.set_link_id(++next_id_);
    return r;
  }
  absl::StatusOr<std::unique_ptr<DeviceReceive>> BeginReceive(
      uint64_t id, const v1::DeviceTransfer& t, int64_t n) override {
    if (id == 0 || id > next_id_) return absl::NotFoundError("no such link");
    if (absl::Status v = ValidateTransferPlan(t.messages(), c_, n, plan_sizes(), nullptr); !v.ok()) {
      return v;
    }
    return std::unique_ptr<DeviceReceive>(new FakeReceive(wire_, c_, id, t, n, refuse_last));
  }
  absl::StatusOr<std::unique_ptr<DeviceSend>> BeginSend(
      const std::string&, const std::shared_ptr<grpc::Channel>& channel,
      std::vector<v1::DeviceMessage> plan) override {
    // The real rendezvous RPC, answered by the decode side's fake.
    auto stub = v1::Decode::NewStub(channel);
    grpc::ClientContext ctx;
    v1::OpenTransportResponse resp;
    grpc::Status s = stub->OpenTransport(&ctx, Offer(), &resp);
    if (!s.ok() || resp.transport() != "nccl") {
      ++fallbacks_;
      return absl::UnavailableError("gRPC it is");
    }
    return std::unique_ptr<DeviceSend>(
        new FakeSend(wire_, c_, resp.link_id(), std::move(plan), send_options));
  }
  v1::OpenTransportRequest Offer() const override { return v1::OpenTransportRequest(); }
  PlanSizes plan_sizes() const override {
    return {KdaLayerBytes(c_), c_.MlaLatentDim() * int64_t{sizeof(float)}, max_message_bytes};
  }
  DeviceTransportStats Stats() const override {  // what the workers export
    std::lock_guard<std::mutex> l(wire_->mu);
    DeviceTransportStats s;
    s.transfers_ok = wire_->sends_ended_ok;
    s.transfers_failed = wire_->sends_ended_failed;
    s.fallbacks = fallbacks_;
    return s;
  }
  FakeSendOptions send_options;
  int64_t max_message_bytes = 0;  // the prefill side's bound on an MLA message (0: none)
  bool refuse_last = false;  // the decode side fails the group holding the last message

 private:
  Wire* wire_;
  const ModelConfig c_;
  std::atomic<uint64_t> next_id_{0};
  std::atomic<int64_t> fallbacks_{0};
};

class DevicePushTest : public ::testing::Test {
 protected:
  void Start(const std::string& fault = "", int64_t every = 1, bool decode_transport = true) {
    engine_ = OpenTinyEngine(kTinySeed);
    ASSERT_NE(engine_, nullptr);
    transport_ = std::make_unique<FakeTransport>(&wire_, engine_->model().config());
    DecodeServiceOptions d;
    d.lease_ttl = absl::Minutes(10);
    d.transport = decode_transport ? transport_.get() : nullptr;
    decode_ = StartDecodeWorker(kTinySeed, d);
    ASSERT_NE(decode_, nullptr);
    PrefillServiceOptions p;
    p.max_batch_tokens = kMaxBatchTokens;
    p.transport = transport_.get();
    if (!fault.empty()) p.fault_injector = StateFaultInjector::Parse(fault, every).value();
    prefill_ = std::make_unique<PrefillService>(&engine_->model(), engine_->checkpoint_fingerprint(), p);
    auto rs = StartServer(ServerOptions{}, {prefill_.get()});
    ASSERT_TRUE(rs.ok()) << rs.status();
    server_ = *std::move(rs);
    stub_ = v1::Prefill::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_.port),
                                                     grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (server_.server) server_.server->Shutdown(In(absl::Seconds(2)));
    prefill_.reset();
    decode_.reset();
  }

  std::vector<int32_t> Prompt(int n, int salt) {
    std::vector<int32_t> p;
    for (int i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((i * 41 + salt * 89 + 7) % 4000));
    return p;
  }

  // Reserve + Prefill (+ Decode when it succeeded): all tokens, or the Prefill status.
  grpc::Status Run(const std::vector<int32_t>& prompt, int n, std::vector<int32_t>* out) {
    const std::string lease = ReserveLease(*decode_->stub, prompt.size() + n);
    v1::PrefillRequest r;
    r.set_request_id("dev");
    for (int32_t t : prompt) r.add_token_ids(t);
    r.mutable_sampling()->set_temperature(0);
    r.mutable_sampling()->set_ignore_eos(true);
    r.mutable_target()->set_address(decode_->address);
    r.mutable_target()->set_lease_id(lease);
    v1::PrefillResponse pr;
    grpc::ClientContext ctx;
    ctx.set_deadline(In(absl::Seconds(60)));
    grpc::Status s = stub_->Prefill(&ctx, r, &pr);
    if (!s.ok()) {
      grpc::ClientContext rc;
      v1::ReleaseRequest rel;
      rel.set_lease_id(lease);
      v1::ReleaseResponse rr;
      decode_->stub->Release(&rc, rel, &rr);
      return s;
    }
    out->assign({pr.token()});
    const DecodeOutcome d = RunDecode(*decode_->stub, MakeDecodeRequest(lease, pr.token(), 1, n - 1));
    EXPECT_TRUE(d.status.ok()) << d.status.error_message();
    out->insert(out->end(), d.tokens.begin(), d.tokens.end());
    return grpc::Status::OK;
  }

  std::vector<int32_t> Reference(const std::vector<int32_t>& prompt, int n) {
    SamplingParams p;
    p.temperature = 0;
    p.max_tokens = n;
    p.ignore_eos = true;
    auto r = Generate(engine_->model(), engine_->tokenizer(), prompt, p);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->tokens : std::vector<int32_t>();
  }

  bool Idle() {
    const v1::WorkerStats d = GetStats(*decode_->stub);
    return d.slots_used() == 0 && d.transfers_in_flight() == 0 && d.latent_rows_used() == 0;
  }

  Wire wire_;
  std::unique_ptr<LocalEngine> engine_;
  std::unique_ptr<FakeTransport> transport_;
  std::unique_ptr<DecodeWorker> decode_;
  std::unique_ptr<PrefillService> prefill_;
  RunningServer server_;
  std::unique_ptr<v1::Prefill::Stub> stub_;
};

TEST_F(DevicePushTest, BatchedAndChunkedPrefillsGiveTheEnginesTokens) {
  Start();
  for (int len : {5, 64, 96, 97, 250}) {  // one chunk, exactly one, just over, several
    const auto prompt = Prompt(len, len);
    std::vector<int32_t> got;
    ASSERT_TRUE(Run(prompt, 10, &got).ok()) << len;
    EXPECT_EQ(got, Reference(prompt, 10)) << "prompt length " << len;
  }
  EXPECT_EQ(wire_.receives_ok, 5);
  EXPECT_EQ(wire_.sends_ended_ok, 5);
  EXPECT_EQ(wire_.sends_ended_failed, 0);
  // Every message was announced, in groups of 1-3 (as the pusher found them ready).
  const int layers = static_cast<int>(engine_->model().config().num_hidden_layers);
  EXPECT_GE(wire_.messages_posted, 5 * layers);
  EXPECT_GE(wire_.groups_posted * 3, wire_.messages_posted);
  EXPECT_LE(wire_.groups_posted, wire_.messages_posted);
  EXPECT_TRUE(WaitFor([&] { return Idle(); }));
  const v1::WorkerStats ps = prefill_->Snapshot();  // what kl_device_* export
  EXPECT_EQ(ps.device_transfers(), 5);
  EXPECT_EQ(ps.device_fallbacks(), 0);
}

// A bound on the message size splits each chunk's MLA rows into several plan
// messages: the engine still reports a layer's rows once, the sender queues
// every piece, the decode side validates the split plan and places each piece.
TEST_F(DevicePushTest, MlaRowsSplitIntoBoundedMessagesGiveTheEnginesTokens) {
  Start();
  const ModelConfig& c = engine_->model().config();
  const int64_t row_bytes = c.MlaLatentDim() * int64_t{sizeof(float)};
  transport_->max_message_bytes = 20 * row_bytes;  // 20 rows a message
  int64_t messages = 0;
  for (int len : {5, 97, 250}) {
    const auto prompt = Prompt(len, len + 1);
    std::vector<int32_t> got;
    ASSERT_TRUE(Run(prompt, 8, &got).ok()) << len;
    EXPECT_EQ(got, Reference(prompt, 8)) << "prompt length " << len;
    PlanSizes sizes = transport_->plan_sizes();
    const auto plan = BuildTransferPlan(c, len, kMaxBatchTokens, sizes);
    for (const auto& m : plan) EXPECT_LE(m.bytes(), m.kda() ? m.bytes() : 20 * row_bytes);
    messages += static_cast<int64_t>(plan.size());
    sizes.max_message_bytes = 0;
    if (len > 20) {
      EXPECT_GT(plan.size(), BuildTransferPlan(c, len, kMaxBatchTokens, sizes).size()) << len;
    }
  }
  EXPECT_EQ(wire_.receives_ok, 3);
  EXPECT_EQ(wire_.sends_ended_ok, 3);
  EXPECT_EQ(wire_.messages_posted, messages);
  EXPECT_TRUE(WaitFor([&] { return Idle(); }));
}

TEST_F(DevicePushTest, ConcurrentPrefillsInOneBatchEachUseTheirOwnTransfer) {
  Start();
  std::vector<std::thread> th;
  std::vector<std::vector<int32_t>> got(4);
  std::vector<grpc::Status> st(4);
  for (int i = 0; i < 4; ++i) th.emplace_back([&, i] { st[i] = Run(Prompt(20 + 15 * i, i), 8, &got[i]); });
  for (auto& t : th) t.join();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(st[i].ok()) << i << ": " << st[i].error_message();
    EXPECT_EQ(got[i], Reference(Prompt(20 + 15 * i, i), 8)) << i;
  }
  EXPECT_TRUE(WaitFor([&] { return Idle(); }));
}

TEST_F(DevicePushTest, CutCorruptAndMissingChecksumsAreRefusedAndLeaveNothingHeld) {
  Start("cut,corrupt,drop_final", /*every=*/2);  // pushes 1, 3, 5 are damaged in turn
  const auto prompt = Prompt(120, 3);              // chunked
  const auto reference = Reference(prompt, 6);
  const grpc::StatusCode want[] = {grpc::StatusCode::OK,        grpc::StatusCode::UNAVAILABLE,
                                   grpc::StatusCode::OK,        grpc::StatusCode::DATA_LOSS,
                                   grpc::StatusCode::OK,        grpc::StatusCode::DATA_LOSS,
                                   grpc::StatusCode::OK};
  for (int i = 0; i < 7; ++i) {
    std::vector<int32_t> got;
    const grpc::Status s = Run(prompt, 6, &got);
    EXPECT_EQ(s.error_code(), want[i]) << i << ": " << s.error_message();
    if (s.ok()) {
      EXPECT_EQ(got, reference) << i;  // a clean push after a damaged one
    }
  }
  EXPECT_TRUE(WaitFor([&] { return Idle(); }));
  // corrupt (checksum mismatch) and drop_final (no checksums) are integrity failures.
  EXPECT_EQ(GetStats(*decode_->stub).integrity_failures(), 2);
  EXPECT_EQ(wire_.receives_ok, 4);
  EXPECT_EQ(wire_.receives_aborted, 3);  // every refused transfer freed its device state
  EXPECT_EQ(wire_.sends_ended_failed, 3);
  EXPECT_EQ(wire_.sends_ended_ok, 4);
}

// A bit damaged on the wire after the sender summed the message (the
// checksums the sender sends are right): the receiver's own sum must differ.
// Damaged pushes take a KDA message, then an MLA message, in turn.
TEST_F(DevicePushTest, DataDamagedInFlightIsCaughtByTheReceiversSum) {
  Start("corrupt", /*every=*/2);
  const auto prompt = Prompt(120, 8);  // chunked: several MLA messages
  const auto reference = Reference(prompt, 6);
  for (int i = 0; i < 5; ++i) {
    std::vector<int32_t> got;
    const grpc::Status s = Run(prompt, 6, &got);
    EXPECT_EQ(s.error_code(), i % 2 == 1 ? grpc::StatusCode::DATA_LOSS : grpc::StatusCode::OK)
        << i << ": " << s.error_message();
    if (s.ok()) EXPECT_EQ(got, reference) << i;
  }
  EXPECT_TRUE(WaitFor([&] { return Idle(); }));
  EXPECT_EQ(wire_.corrupted_kda, 1);
  EXPECT_EQ(wire_.corrupted_mla, 1);
  EXPECT_EQ(GetStats(*decode_->stub).integrity_failures(), 2);
  EXPECT_EQ(wire_.receives_aborted, 2);
  EXPECT_EQ(wire_.receives_ok, 3);
}

TEST_F(DevicePushTest, AStalledSendFailsThePushWithItsCode) {
  Start();
  transport_->send_options.stall = true;
  std::vector<int32_t> got;
  grpc::Status s = Run(Prompt(30, 1), 4, &got);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  EXPECT_TRUE(WaitFor([&] { return Idle(); }));
  EXPECT_EQ(wire_.receives_aborted, 1);
}

TEST_F(DevicePushTest, AGroupThatDoesNotContinueThePlanIsRefused) {
  Start();
  transport_->send_options.misannounce = true;
  std::vector<int32_t> got;
  // The decode worker's INVALID_ARGUMENT is this (prefill) worker's fault: INTERNAL.
  grpc::Status s = Run(Prompt(30, 4), 4, &got);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INTERNAL) << s.error_message();
  EXPECT_NE(s.error_message().find("does not continue the plan"), std::string::npos)
      << s.error_message();
  EXPECT_TRUE(WaitFor([&] { return Idle(); }));
  EXPECT_EQ(wire_.receives_aborted, 1);
  EXPECT_EQ(wire_.sends_ended_failed, 1);
  transport_->send_options.misannounce = false;  // the next push is clean
  ASSERT_TRUE(Run(Prompt(30, 4), 4, &got).ok());
  EXPECT_EQ(got, Reference(Prompt(30, 4), 4));
}

TEST_F(DevicePushTest, ALinkFailureMidTransferFailsThePushWithItsCode) {
  Start();
  transport_->send_options.fail_link = true;
  std::vector<int32_t> got;
  grpc::Status s = Run(Prompt(150, 6), 4, &got);  // chunked: several groups
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_TRUE(WaitFor([&] { return Idle(); }));
  EXPECT_EQ(wire_.receives_aborted, 1);
  EXPECT_EQ(wire_.sends_ended_failed, 1);
}

TEST_F(DevicePushTest, TheSenderStopsWaitingWhenTheDecodeWorkerEndsTheCall) {
  Start();
  // The decode worker fails the last group while the sender waits for its sends
  // to complete: the sender must notice the ended call at its next progress
  // write and report the decode worker's status, not wait for its deadline
  // (the fake's 3 s budget would say DEADLINE_EXCEEDED).
  transport_->refuse_last = true;
  std::vector<int32_t> got;
  grpc::Status s = Run(Prompt(40, 7), 4, &got);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("failed under the last group"), std::string::npos)
      << s.error_message();
  {
    // The refusal comes after the last group was written, so the sender is
    // in Complete: its progress write failed and ended the wait.
    std::lock_guard<std::mutex> l(wire_.mu);
    EXPECT_EQ(wire_.sends_stopped_by_peer, 1);
  }
  EXPECT_TRUE(WaitFor([&] { return Idle(); }));
  EXPECT_EQ(wire_.receives_aborted, 1);
  EXPECT_EQ(wire_.sends_ended_failed, 1);
}

TEST_F(DevicePushTest, APlanMessageCarryingGroupsIsRefused) {
  Start();
  // Groups are announced after the plan, never with it (the receives could not
  // have been prepared): INVALID_ARGUMENT, and the lease stays usable.
  const std::string lease = ReserveLease(*decode_->stub, 64);
  grpc::ClientContext ctx;
  v1::PushStateResponse resp;
  auto w = decode_->stub->PushState(&ctx, &resp);
  v1::StatePart part;
  part.set_lease_id(lease);
  part.mutable_device()->set_link_id(1);
  part.add_device_groups()->set_count(1);
  w->Write(part);
  w->WritesDone();
  const grpc::Status s = w->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_EQ(wire_.receives_aborted + wire_.receives_ok, 0);  // nothing was allocated
  EXPECT_TRUE(WaitFor([&] { return GetStats(*decode_->stub).transfers_in_flight() == 0; }));
  grpc::ClientContext rc;
  v1::ReleaseRequest rel;
  rel.set_lease_id(lease);
  v1::ReleaseResponse rr;
  EXPECT_TRUE(decode_->stub->Release(&rc, rel, &rr).ok());  // the lease was still held
  EXPECT_TRUE(WaitFor([&] { return Idle(); }));
}

TEST_F(DevicePushTest, ADecodeWorkerWithoutDeviceTransportRefusesAPlan) {
  Start("", 1, /*decode_transport=*/false);
  // Its OpenTransport answers "grpc", so the prefill falls back on its own...
  std::vector<int32_t> got;
  ASSERT_TRUE(Run(Prompt(40, 2), 5, &got).ok());
  EXPECT_EQ(got, Reference(Prompt(40, 2), 5));
  EXPECT_EQ(prefill_->Snapshot().device_fallbacks(), 1);
  EXPECT_EQ(prefill_->Snapshot().device_transfers(), 0);
  // ...and a device plan sent anyway is FAILED_PRECONDITION.
  const std::string lease = ReserveLease(*decode_->stub, 64);
  grpc::ClientContext ctx;
  v1::PushStateResponse resp;
  auto w = decode_->stub->PushState(&ctx, &resp);
  v1::StatePart part;
  part.set_lease_id(lease);
  part.mutable_device()->set_link_id(1);
  w->Write(part);
  w->WritesDone();
  EXPECT_EQ(w->Finish().error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // Groups or checksums on a push that is not a device transfer: INVALID_ARGUMENT.
  grpc::ClientContext ctx2;
  auto w2 = decode_->stub->PushState(&ctx2, &resp);
  v1::StatePart groups;
  groups.set_lease_id(lease);
  groups.add_device_groups()->set_count(1);
  w2->Write(groups);
  w2->WritesDone();
  EXPECT_EQ(w2->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace kl
