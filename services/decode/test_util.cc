#include "services/decode/test_util.h"

#include <chrono>
#include <filesystem>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tools/make_checkpoint/maker.h"

namespace kl {
namespace {

std::chrono::system_clock::time_point DeadlineIn(absl::Duration d) {
  return std::chrono::system_clock::now() +
         std::chrono::microseconds(absl::ToInt64Microseconds(d));
}

const std::string& TinyDir(uint64_t seed) {
  static std::mutex mu;
  static std::map<uint64_t, std::string>* made = new std::map<uint64_t, std::string>();
  std::lock_guard<std::mutex> l(mu);
  auto it = made->find(seed);
  if (it != made->end()) return it->second;
  const std::string dir = absl::StrCat(testing::TempDir(), "/tiny_", seed);
  if (!std::filesystem::exists(dir + "/config.json")) {
    MakerOptions o;
    o.seed = seed;
    const absl::Status s = MakeCheckpoint(TinyConfig(), dir, o);
    EXPECT_TRUE(s.ok()) << s;
  }
  return (*made)[seed] = dir;
}

}  // namespace

std::unique_ptr<LocalEngine> OpenTinyEngine(uint64_t seed, const CpuBackendOptions& cpu) {
  LocalEngineOptions o;
  o.model_dir = TinyDir(seed);
  o.cpu = cpu;
  auto e = LocalEngine::Open(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? *std::move(e) : nullptr;
}

DecodeWorker::~DecodeWorker() {
  if (server.server) server.server->Shutdown(DeadlineIn(absl::Seconds(2)));
  service.reset();
}

std::unique_ptr<DecodeWorker> StartDecodeWorker(uint64_t seed, DecodeServiceOptions options,
                                                const CpuBackendOptions& cpu) {
  auto w = std::make_unique<DecodeWorker>();
  w->engine = OpenTinyEngine(seed, cpu);
  if (!w->engine) return nullptr;
  w->service = std::make_unique<DecodeService>(&w->engine->model(),
                                               w->engine->checkpoint_fingerprint(), options);
  auto rs = StartServer(ServerOptions{}, {w->service.get()});
  EXPECT_TRUE(rs.ok()) << rs.status();
  if (!rs.ok()) return nullptr;
  w->server = *std::move(rs);
  w->address = absl::StrCat("127.0.0.1:", w->server.port);
  w->stub = v1::Decode::NewStub(
      grpc::CreateChannel(w->address, grpc::InsecureChannelCredentials()));
  return w;
}

bool WaitFor(const std::function<bool()>& cond, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!cond()) {
    if (absl::Now() > deadline) return cond();
    absl::SleepFor(absl::Milliseconds(10));
  }
  return true;
}

v1::WorkerStats GetStats(v1::Decode::Stub& stub) {
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineIn(absl::Seconds(10)));
  v1::WorkerStats s;
  const grpc::Status st = stub.Stats(&ctx, v1::WorkerStatsRequest(), &s);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return s;
}

std::string ReserveLease(v1::Decode::Stub& stub, int64_t max_total_tokens) {
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineIn(absl::Seconds(10)));
  v1::ReserveRequest req;
  req.set_request_id("test");
  req.set_max_total_tokens(max_total_tokens);
  v1::ReserveResponse resp;
  const grpc::Status st = stub.Reserve(&ctx, req, &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return st.ok() ? resp.lease_id() : std::string();
}

grpc::Status PushFrames(v1::Decode::Stub& stub, const std::string& lease_id,
                        const std::vector<std::string>& frames,
                        v1::PushStateResponse* response) {
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineIn(absl::Seconds(30)));
  v1::PushStateResponse local;
  auto writer = stub.PushState(&ctx, response ? response : &local);
  for (size_t i = 0; i < frames.size(); ++i) {
    v1::StatePart part;
    if (i == 0) part.set_lease_id(lease_id);
    part.set_frame(frames[i]);
    if (!writer->Write(part)) break;
  }
  writer->WritesDone();
  return writer->Finish();
}

DecodeOutcome RunDecode(v1::Decode::Stub& stub, const v1::DecodeRequest& request,
                        absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineIn(timeout));
  DecodeOutcome out;
  auto reader = stub.Decode(&ctx, request);
  v1::DecodeResponse msg;
  int64_t expect = request.next_index();
  while (reader->Read(&msg)) {
    if (msg.index() != expect) out.indices_contiguous = false;
    for (int32_t t : msg.token_ids()) out.tokens.push_back(t);
    expect = msg.index() + msg.token_ids_size();
    out.finished = msg.finished();
  }
  out.status = reader->Finish();
  return out;
}

v1::DecodeRequest MakeDecodeRequest(const std::string& lease_id, int32_t last_token,
                                    int64_t next_index, int64_t max_new_tokens,
                                    double temperature, uint64_t seed) {
  v1::DecodeRequest r;
  r.set_lease_id(lease_id);
  r.set_request_id("test");
  r.set_last_token(last_token);
  r.set_next_index(next_index);
  r.set_max_new_tokens(max_new_tokens);
  r.mutable_sampling()->set_temperature(temperature);
  r.mutable_sampling()->set_seed(seed);
  r.mutable_sampling()->set_ignore_eos(true);
  return r;
}

}  // namespace kl
