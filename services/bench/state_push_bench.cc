// State push over gRPC on loopback: a client streams StateBundle frames on
// kl.v1.Decode/PushState to a server that verifies them with the same
// BundleAssembler the decode worker uses (checksums, sizes, fingerprints) and
// adopts the state. Shapes of the 48B model (spec §8): the fixed KDA part
// (41.4 MiB with bf16 tails) and 4K / 32K tokens of MLA latents.
//   bazel run -c opt //services/bench:state_push_bench
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <mutex>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "engine/state/bundle_assembler.h"
#include "engine/state/bundle_writer.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/server_util.h"

namespace kl {
namespace {

using Clock = std::chrono::steady_clock;

class PushOnlyDecode final : public kl::v1::Decode::Service {
 public:
  explicit PushOnlyDecode(ModelConfig c) : config_(std::move(c)) {}
  grpc::Status PushState(grpc::ServerContext*, grpc::ServerReader<kl::v1::StatePart>* reader,
                         kl::v1::PushStateResponse* resp) override {
    // Like a decode worker's slot pool: the previous bundle's state memory is
    // reused, so the measurement is not dominated by first-touch page faults.
    std::lock_guard<std::mutex> l(mu_);
    BundleAssembler as(config_, AssemblerOptions(), std::move(recycled_));
    kl::v1::StatePart part;
    int64_t frames = 0, bytes = 0;
    const bool verify = !std::getenv("KL_BENCH_NO_VERIFY");
    while (reader->Read(&part)) {
      if (!verify) {
        ++frames;
        bytes += static_cast<int64_t>(part.frame().size());
        continue;
      }
      if (auto s = as.Add(part.frame()); !s.ok()) {
        return grpc::Status(grpc::StatusCode::DATA_LOSS, std::string(s.message()));
      }
      ++frames;
      bytes += static_cast<int64_t>(part.frame().size());
    }
    if (!verify) {
      resp->set_frames(frames);
      resp->set_bytes(bytes);
      return grpc::Status::OK;
    }
    auto st = as.Finish();
    if (!st.ok()) return grpc::Status(grpc::StatusCode::DATA_LOSS, std::string(st.status().message()));
    recycled_ = std::move(*st);
    resp->set_frames(frames);
    resp->set_bytes(bytes);
    return grpc::Status::OK;
  }

 private:
  ModelConfig config_;
  std::mutex mu_;
  SequenceState recycled_;
};

// Random (non-zero) state for `tokens` tokens of config c.
SequenceState RandomState(const ModelConfig& c, int64_t tokens) {
  SequenceState s = SequenceState::Zero(c);
  std::mt19937 g(1);
  std::uniform_real_distribution<float> u(-1, 1);
  for (auto& l : s.kda) {
    for (auto* v : {&l.recurrent, &l.conv_q, &l.conv_k, &l.conv_v})
      for (auto& x : *v) x = u(g);
  }
  for (auto& m : s.mla) {
    m.latent.resize(tokens * c.MlaLatentDim());
    for (auto& x : m.latent) x = u(g);
  }
  s.num_tokens = tokens;
  return s;
}

std::vector<BundleFrame> Encode(const ModelConfig& c, const SequenceState& s, DType small) {
  BundleOptions o;
  o.conv_dtype = small;
  o.mla_dtype = small;
  o.mla_rows_per_part = 1024;
  auto w = BundleWriter::Create(c, s.num_tokens, BundleMeta{"bench", -1, 0, 0}, o).value();
  std::vector<BundleFrame> frames = {w->HeaderFrame()};
  int64_t k = 0, m = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto f = c.IsKda(l) ? w->AddKdaLayer(l, s.kda[k++]) : w->AddMlaRows(l, 0, s.mla[m++].latent);
    for (auto& x : f.value()) frames.push_back(std::move(x));
  }
  frames.push_back(w->Finish().value());
  return frames;
}

void Run(const char* name, const ModelConfig& c, int64_t tokens, DType small, int port) {
  const SequenceState s = RandomState(c, tokens);
  grpc::ChannelArguments args;
  if (std::getenv("KL_BENCH_TUNED")) {
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 32 << 20);
    args.SetInt(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, (16 << 20) - 1);
    args.SetInt(GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 8 << 20);
  }
  auto stub = kl::v1::Decode::NewStub(grpc::CreateCustomChannel(
      "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials(), args));
  double best_total = 1e9, best_wire = 1e9;
  int64_t bytes = 0;
  for (int rep = 0; rep < 6; ++rep) {
    const auto t0 = Clock::now();
    auto frames = Encode(c, s, small);
    const auto t1 = Clock::now();
    grpc::ClientContext ctx;
    kl::v1::PushStateResponse resp;
    auto writer = stub->PushState(&ctx, &resp);
    kl::v1::StatePart part;
    part.set_lease_id("bench");
    for (auto& f : frames) {
      part.set_frame(std::move(f.bytes));
      writer->Write(part);
      part.clear_lease_id();
    }
    writer->WritesDone();
    grpc::Status st = writer->Finish();
    const auto t2 = Clock::now();
    if (!st.ok()) {
      std::fprintf(stderr, "push failed: %s\n", st.error_message().c_str());
      std::exit(1);
    }
    bytes = resp.bytes();
    best_total = std::min(best_total, std::chrono::duration<double>(t2 - t0).count());
    best_wire = std::min(best_wire, std::chrono::duration<double>(t2 - t1).count());
  }
  std::printf("%-34s %8.1f MiB  push+verify %7.1f ms = %5.2f GB/s   encode+push+verify %7.1f ms = %5.2f GB/s\n",
              name, bytes / 1048576.0, best_wire * 1e3, bytes / best_wire / 1e9, best_total * 1e3,
              bytes / best_total / 1e9);
}

}  // namespace
}  // namespace kl

int main() {
  using namespace kl;
  const ModelConfig c = Kimi48BConfig();
  PushOnlyDecode svc(c);
  ServerOptions so;
  so.max_receive_message_bytes = 64 << 20;
  auto server = StartServer(so, {&svc}).value();
  std::printf("gRPC %s, loopback, best of 6, frames <= 2 MiB\n", grpc::Version().c_str());
  Run("48B KDA fixed part (bf16 tails)", c, 1, DType::kBF16, server.port);
  Run("48B KDA fixed part (f32 tails)", c, 1, DType::kF32, server.port);
  Run("48B 4K-token prompt (bf16 latents)", c, 4096, DType::kBF16, server.port);
  Run("48B 32K-token prompt (bf16 latents)", c, 32768, DType::kBF16, server.port);
  server.server->Shutdown();
  return 0;
}
