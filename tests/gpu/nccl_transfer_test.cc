// The NCCL state transfer end to end on two GPUs: kl-router, kl-prefill-cuda on
// GPU 0 and kl-decode-cuda on GPU 1 (tools/kl/local_cluster.h numbers GPU
// workers prefill first), the embedded tiny model, and the single-process GPU
// engine as the oracle. Skips without two GPUs.
#include <cuda_runtime.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "proto/worker.grpc.pb.h"
#include "tests/common/cluster_util.h"
#include "tests/common/tiny_oracle.h"
#include "tools/kl/client.h"
#include "tools/kl/local_cluster.h"

namespace kl {
namespace {

using Clock = std::chrono::steady_clock;

int GpuCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}
bool TwoGpus() { return GpuCount() >= 2; }

std::string TmpDir() {
  const char* t = std::getenv("TEST_TMPDIR");
  return t != nullptr ? t : "/tmp";
}
std::string ModelDir() { return TmpDir() + "/tiny_nccl"; }

// The single-process engine on GPU 0, same fast paths as the workers.
testing::TinyOracle& Oracle() {
  static auto* o = [] {
    BackendSpec spec;
    spec.name = "cuda";
    spec.device = 0;
    spec.fast = true;
    spec.max_seqs = 4;
    return new testing::TinyOracle(ModelDir(), /*seed=*/7, /*threads=*/0, spec);
  }();
  return *o;
}

using testing::DecodeStats;

std::string Prompt(int words, int seed) { return testing::WordPrompt(words, seed); }
v1::GenerateRequest Req(const std::string& prompt, int64_t max_tokens) {
  return testing::GreedyRequest(prompt, max_tokens);
}

bool DecodeIdle(LocalCluster& c, double seconds) {
  const auto until = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < until) {
    const v1::WorkerStats s = DecodeStats(c.decode_address(0));
    if (s.slots_used() == 0 && s.leases_active() == 0 && s.transfers_in_flight() == 0 &&
        s.running() == 0) {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

std::unique_ptr<LocalCluster> Start(std::vector<std::string> prefill_args,
                                    std::vector<std::string> decode_args = {}) {
  Oracle();  // makes the model folder
  LocalClusterOptions o;
  o.model_dir = ModelDir();
  o.prefill_workers = 1;
  o.decode_workers = 1;
  o.decode_slots = 8;
  o.worker_backend = "cuda";
  // Prompts over 48 tokens take the chunked path (MLA rows shipped per chunk).
  prefill_args.push_back("--max_batch_tokens=48");
  prefill_args.push_back("--nccl_sync_open");
  o.prefill_args = std::move(prefill_args);
  o.decode_args = std::move(decode_args);
  const char* out = std::getenv("TEST_UNDECLARED_OUTPUTS_DIR");
  o.log_dir = out != nullptr ? out : TmpDir();
  auto c = std::make_unique<LocalCluster>(o);
  const absl::Status s = c->Start();
  EXPECT_TRUE(s.ok()) << s;
  return c;
}

TEST(NcclTransfer, GreedyTokensEqualTheSingleProcessGpuEngine) {
  if (!TwoGpus()) GTEST_SKIP() << "needs two GPUs";
  auto c = Start({});
  GenerationClient client(c->router_address());
  const std::vector<std::string> prompts = {"Once upon a time", Prompt(20, 1), Prompt(150, 2),
                                            Prompt(400, 3)};
  int64_t done = 0;
  for (const std::string& p : prompts) {
    StreamResult r = client.Generate(Req(p, 24), 120);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle().Greedy(p, 24, true)) << p.size();
    ++done;
  }
  // Concurrent requests: several transfers to one decode worker at once.
  std::vector<StreamResult> results(6);
  std::vector<std::thread> threads;
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&, i] { results[i] = client.Generate(Req(Prompt(10 + 40 * i, i), 16), 120); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 6; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, Oracle().Greedy(Prompt(10 + 40 * i, i), 16, true)) << i;
    ++done;
  }
  const v1::WorkerStats s = DecodeStats(c->decode_address(0));
  EXPECT_GE(s.device_links(), 1);
  EXPECT_GE(s.device_link_inits(), 1);
  EXPECT_EQ(s.device_link_init_failures(), 0);
  EXPECT_GT(s.device_link_init_seconds(), 0);
  EXPECT_GE(s.device_messages(), s.device_transfers() * 2);  // KDA and MLA layers each
  EXPECT_GT(s.device_bytes(), 0);
  // Every sequential request went over NCCL; concurrent ones may exceed the
  // links (4 per peer) and go over gRPC.
  EXPECT_GE(s.device_transfers(), static_cast<int64_t>(prompts.size()));
  EXPECT_EQ(s.device_transfer_failures(), 0);
  EXPECT_EQ(s.integrity_failures(), 0);
  EXPECT_TRUE(DecodeIdle(*c, 10));
}

// Ship-at-end: the whole state is ready when the sends start, so it moves in
// one or a few groups (protocol 2) instead of one per layer.
TEST(NcclTransfer, ShipAtEndGivesTheSameTokens) {
  if (!TwoGpus()) GTEST_SKIP() << "needs two GPUs";
  auto c = Start({"--nccl_ship_at_end"});
  GenerationClient client(c->router_address());
  for (const std::string& p : {Prompt(20, 4), Prompt(150, 5), Prompt(400, 6)}) {
    StreamResult r = client.Generate(Req(p, 16), 120);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle().Greedy(p, 16, true)) << p.size();
  }
  const v1::WorkerStats s = DecodeStats(c->decode_address(0));
  EXPECT_EQ(s.device_transfers(), 3);
  EXPECT_EQ(s.device_transfer_failures(), 0);
  EXPECT_TRUE(DecodeIdle(*c, 10));
}

// --nccl_pipeline: a second stream per link, two staging halves. Layer by
// layer, a chunked prompt gives several groups, so both halves are used in
// turn (ship-at-end of the tiny model is one group); every second push is cut
// half way in the first two runs. Each side pipelines on its own: the last
// two runs have it on one side only.
TEST(NcclTransfer, PipelinedTransfersGiveTheSameTokens) {
  if (!TwoGpus()) GTEST_SKIP() << "needs two GPUs";
  struct Run {
    bool prefill, decode, ship_at_end, cut;
  };
  for (const Run& run : {Run{true, true, false, true}, Run{true, true, true, true},
                         Run{true, false, false, false}, Run{false, true, false, false}}) {
    const std::string what = absl::StrCat("prefill ", run.prefill, " decode ", run.decode,
                                          " ship_at_end ", run.ship_at_end);
    std::vector<std::string> prefill, decode;
    if (run.prefill) prefill.push_back("--nccl_pipeline");
    if (run.decode) decode.push_back("--nccl_pipeline");
    if (run.ship_at_end) prefill.push_back("--nccl_ship_at_end");
    if (run.cut) {
      prefill.push_back("--fault_inject_state=cut");
      prefill.push_back("--fault_inject_every=2");
    }
    auto c = Start(prefill, decode);
    GenerationClient client(c->router_address());
    for (int i = 0; i < 4; ++i) {
      const std::string p = Prompt(60 + 110 * i, i + 20);
      StreamResult r = client.Generate(Req(p, 12), 120);
      ASSERT_TRUE(r.status.ok()) << what << " " << i << ": " << r.status.error_message();
      EXPECT_EQ(r.tokens, Oracle().Greedy(p, 12, true)) << what << " " << i;
    }
    const v1::WorkerStats s = DecodeStats(c->decode_address(0));
    EXPECT_GE(s.device_transfers(), 4) << what;
    if (run.cut) {
      EXPECT_GE(s.device_transfer_failures(), 1) << what;  // the cut ones
    } else {
      EXPECT_EQ(s.device_transfer_failures(), 0) << what;
    }
    EXPECT_EQ(s.integrity_failures(), 0) << what;
    EXPECT_TRUE(DecodeIdle(*c, 10)) << what;
  }
}

// A small --nccl_message_mb splits each chunk's MLA rows into several plan
// messages (a few dozen rows each here): the engine reports a layer's rows
// once, the sender queues every piece of them, the receiver scatters each
// into its rows. Pipelined on both sides, layer by layer and ship-at-end.
TEST(NcclTransfer, SplitMessagesGiveTheSameTokens) {
  if (!TwoGpus()) GTEST_SKIP() << "needs two GPUs";
  // The same prompts with the default bound (a few dozen rows are far below
  // it): the plan messages the split runs must exceed.
  int64_t unsplit = 0;
  {
    auto c = Start({});
    GenerationClient client(c->router_address());
    for (int i = 0; i < 3; ++i) {
      StreamResult r = client.Generate(Req(Prompt(30 + 150 * i, i + 40), 12), 120);
      ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.error_message();
    }
    const v1::WorkerStats s = DecodeStats(c->decode_address(0));
    ASSERT_EQ(s.device_transfers(), 3);
    unsplit = s.device_messages();
  }
  for (bool ship_at_end : {false, true}) {
    std::vector<std::string> prefill = {"--nccl_message_mb=0.004", "--nccl_pipeline"};
    if (ship_at_end) prefill.push_back("--nccl_ship_at_end");
    auto c = Start(prefill, {"--nccl_pipeline"});
    GenerationClient client(c->router_address());
    for (int i = 0; i < 3; ++i) {
      const std::string p = Prompt(30 + 150 * i, i + 40);
      StreamResult r = client.Generate(Req(p, 12), 120);
      ASSERT_TRUE(r.status.ok()) << ship_at_end << " " << i << ": " << r.status.error_message();
      EXPECT_EQ(r.tokens, Oracle().Greedy(p, 12, true)) << ship_at_end << " " << i;
    }
    const v1::WorkerStats s = DecodeStats(c->decode_address(0));
    EXPECT_EQ(s.device_transfers(), 3) << ship_at_end;
    EXPECT_GT(s.device_messages(), unsplit) << ship_at_end;  // the rows went in pieces
    EXPECT_EQ(s.device_transfer_failures(), 0) << ship_at_end;
    EXPECT_EQ(s.integrity_failures(), 0) << ship_at_end;
    EXPECT_TRUE(DecodeIdle(*c, 10)) << ship_at_end;
  }
}

TEST(NcclTransfer, CutTransferIsRefusedAndRetried) {
  if (!TwoGpus()) GTEST_SKIP() << "needs two GPUs";
  // Every second push stops half way and aborts its link.
  auto c = Start({"--fault_inject_state=cut", "--fault_inject_every=2"});
  GenerationClient client(c->router_address());
  for (int i = 0; i < 4; ++i) {
    const std::string p = Prompt(30 + 50 * i, i);
    StreamResult r = client.Generate(Req(p, 12), 120);
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle().Greedy(p, 12, true)) << i;
  }
  const v1::WorkerStats s = DecodeStats(c->decode_address(0));
  EXPECT_GE(s.device_transfer_failures(), 1);  // the cut transfers were refused
  EXPECT_GE(s.device_transfers(), 4);          // and their retries went through
  EXPECT_TRUE(DecodeIdle(*c, 10));
}

// Every second push has one bit damaged on its way, after the sender summed
// it (the sender's checksums are right): a KDA message, then an MLA message,
// then a KDA message again. Each is caught by the receiver's own sum of that
// kind, refused and retried.
TEST(NcclTransfer, DataDamagedInFlightIsRefusedAndRetried) {
  if (!TwoGpus()) GTEST_SKIP() << "needs two GPUs";
  auto c = Start({"--fault_inject_state=corrupt", "--fault_inject_every=2"});
  GenerationClient client(c->router_address());
  for (int i = 0; i < 4; ++i) {
    const std::string p = Prompt(25 + 40 * i, i + 5);
    StreamResult r = client.Generate(Req(p, 12), 120);
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle().Greedy(p, 12, true)) << i;
  }
  // Pushes 2, 4 and 6 of the 7 (4 requests, 3 retries) were damaged.
  const v1::WorkerStats s = DecodeStats(c->decode_address(0));
  EXPECT_EQ(s.integrity_failures(), 3);
  EXPECT_EQ(s.device_transfer_failures(), 3);
  EXPECT_EQ(s.device_transfers(), 4);
  EXPECT_TRUE(DecodeIdle(*c, 10));
}

// --nccl_link_idle_s=1: the prefill side closes its link after 1 s without a
// transfer, the decode side after 2 s; the next request opens a new one.
TEST(NcclTransfer, IdleLinksAreClosedAndReopened) {
  if (!TwoGpus()) GTEST_SKIP() << "needs two GPUs";
  auto c = Start({"--nccl_link_idle_s=1"}, {"--nccl_link_idle_s=1"});
  GenerationClient client(c->router_address());
  auto generate = [&](int seed) {
    const std::string p = Prompt(40 + 30 * seed, seed + 60);
    StreamResult r = client.Generate(Req(p, 8), 120);
    ASSERT_TRUE(r.status.ok()) << seed << ": " << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle().Greedy(p, 8, true)) << seed;
  };
  generate(0);
  // Both ends' links up, then both closed for idling.
  auto links = [&] {
    int64_t up = 0, closed = 0;
    auto all = c->WorkerStatsAll();
    EXPECT_TRUE(all.ok()) << all.status();
    if (all.ok()) {
      for (const auto& [name, s] : *all) {
        up += s.device_links();
        closed += s.device_links_idle_closed();
      }
    }
    return std::make_pair(up, closed);
  };
  EXPECT_GE(links().first, 1);
  const auto until = Clock::now() + std::chrono::seconds(10);
  while (links().first > 0 && Clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const auto [up, closed] = links();
  EXPECT_EQ(up, 0);
  EXPECT_EQ(closed, 2);  // one link, closed on each side
  // A new link (opened synchronously: --nccl_sync_open).
  generate(1);
  const v1::WorkerStats s = DecodeStats(c->decode_address(0));
  EXPECT_EQ(s.device_transfers(), 2);
  EXPECT_EQ(s.device_link_inits(), 2);
  EXPECT_EQ(s.device_transfer_failures(), 0);
  EXPECT_TRUE(DecodeIdle(*c, 10));
}

TEST(NcclTransfer, WorkersOnOneGpuFallBackToGrpc) {
  if (GpuCount() < 1) GTEST_SKIP() << "needs a GPU";  // both workers use GPU 0
  // The decode worker joins the prefill worker on GPU 0: NCCL cannot link two
  // ranks on one GPU, so the rendezvous answers "grpc" and the state goes as a
  // bundle (the later flag wins over the cluster's --cuda_device=1).
  auto c = Start({}, {"--cuda_device=0"});
  GenerationClient client(c->router_address());
  for (int i = 0; i < 3; ++i) {
    const std::string p = Prompt(20 + 60 * i, i + 9);
    StreamResult r = client.Generate(Req(p, 12), 120);
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle().Greedy(p, 12, true)) << i;
  }
  const v1::WorkerStats s = DecodeStats(c->decode_address(0));
  EXPECT_EQ(s.device_transfers(), 0);
  EXPECT_EQ(s.device_links(), 0);
  EXPECT_EQ(s.device_transfer_failures(), 0);
  EXPECT_TRUE(DecodeIdle(*c, 10));
}

// Both workers on GPU 1: the state goes over gRPC and the decode worker's
// first CUDA work is adopting it from host memory, on its engine thread. That
// thread must use GPU 1 (it once staged through GPU 0 — an illegal address
// that broke the worker's context for good; seen in the colocated layout).
TEST(NcclTransfer, WorkersOnASecondGpuAdoptHostStates) {
  if (!TwoGpus()) GTEST_SKIP() << "needs two GPUs";
  auto c = Start({"--cuda_device=1"}, {"--cuda_device=1"});
  GenerationClient client(c->router_address());
  for (int i = 0; i < 3; ++i) {
    const std::string p = Prompt(20 + 60 * i, i + 21);
    StreamResult r = client.Generate(Req(p, 12), 120);
    ASSERT_TRUE(r.status.ok()) << i << ": " << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle().Greedy(p, 12, true)) << i;
    EXPECT_EQ(r.usage.migrations(), 0) << i;
  }
  const v1::WorkerStats s = DecodeStats(c->decode_address(0));
  EXPECT_EQ(s.device_transfers(), 0);
  EXPECT_EQ(s.requests_completed(), 3);
  EXPECT_TRUE(DecodeIdle(*c, 10));
}

// The prefix cache on GPU workers: with both on GPU 0 states go over gRPC, so
// the prefill worker keeps each prompt's state; every later turn of a
// conversation is adopted from that host copy (uploaded like an imported
// bundle) and only its new tokens are prefilled, batched or chunked. Tokens
// equal the single-process GPU engine's.
TEST(NcclTransfer, PrefixCacheHitsOnGpuWorkersGiveTheSameTokens) {
  if (GpuCount() < 1) GTEST_SKIP() << "needs a GPU";
  auto c = Start({}, {"--cuda_device=0"});
  GenerationClient client(c->router_address());
  auto ids = [](int n, int salt) {
    std::vector<int32_t> v;
    for (int i = 0; i < n; ++i) v.push_back(100 + (i * 31 + salt * 57) % 2900);
    return v;
  };
  std::vector<int32_t> prompt = ids(30, 1);
  int64_t previous = 0;
  // New tokens per turn: fits one forward (48), chunked, fits again.
  for (int turn = 0; turn < 4; ++turn) {
    v1::GenerateRequest req;
    for (int32_t t : prompt) req.mutable_token_ids()->add_ids(t);
    req.mutable_sampling()->set_temperature(0);
    req.mutable_sampling()->set_max_tokens(8);
    req.mutable_sampling()->set_ignore_eos(true);
    StreamResult r = client.Generate(req, 120);
    ASSERT_TRUE(r.status.ok()) << turn << ": " << r.status.error_message();
    EXPECT_EQ(r.tokens, Oracle().GreedyIds(prompt, 8, true)) << "turn " << turn;
    EXPECT_EQ(r.usage.cached_prompt_tokens(), previous) << "turn " << turn;
    // The state is kept once the prefill worker replied: wait for it.
    const auto until = Clock::now() + std::chrono::seconds(10);
    while (Clock::now() < until) {
      auto all = c->WorkerStatsAll();
      if (all.ok() && (*all)[0].second.prefix_cache_entries() == turn + 1) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    previous = static_cast<int64_t>(prompt.size());
    prompt.insert(prompt.end(), r.tokens.begin(), r.tokens.end());
    const std::vector<int32_t> message = ids(turn == 1 ? 120 : 20, 10 + turn);
    prompt.insert(prompt.end(), message.begin(), message.end());
  }
  auto all = c->WorkerStatsAll();
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ((*all)[0].second.prefix_cache_hits(), 3);
  EXPECT_EQ(DecodeStats(c->decode_address(0)).integrity_failures(), 0);
  EXPECT_TRUE(DecodeIdle(*c, 10));
}

}  // namespace
}  // namespace kl
