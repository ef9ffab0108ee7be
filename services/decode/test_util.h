// Test helpers for the worker services: the tiny model made in TEST_TMPDIR, an
// in-process decode worker on 127.0.0.1:0, and client-side shorthands.
#ifndef KL_SERVICES_DECODE_TEST_UTIL_H_
#define KL_SERVICES_DECODE_TEST_UTIL_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "engine/runtime/local_engine.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/server_util.h"
#include "services/decode/decode_service.h"

namespace kl {

// Seeds of the two tiny checkpoints the tests use (same config, other weights).
inline constexpr uint64_t kTinySeed = 20251030;
inline constexpr uint64_t kOtherSeed = 77;

// The tiny model for `seed`, made once per test process under TEST_TMPDIR, opened
// (on the CPU backend with `cpu`).
std::unique_ptr<LocalEngine> OpenTinyEngine(uint64_t seed, const CpuBackendOptions& cpu = {});

// A decode worker serving on 127.0.0.1:<free port>, with a client stub.
struct DecodeWorker {
  std::unique_ptr<LocalEngine> engine;
  std::unique_ptr<DecodeService> service;
  RunningServer server;
  std::string address;
  std::unique_ptr<v1::Decode::Stub> stub;
  ~DecodeWorker();
};
std::unique_ptr<DecodeWorker> StartDecodeWorker(uint64_t seed, DecodeServiceOptions options,
                                                const CpuBackendOptions& cpu = {});

// Polls `cond` every 10 ms until true or `timeout`; returns its last value.
bool WaitFor(const std::function<bool()>& cond, absl::Duration timeout = absl::Seconds(10));

v1::WorkerStats GetStats(v1::Decode::Stub& stub);

// Reserve on `stub`; empty string (and a test failure) on error.
std::string ReserveLease(v1::Decode::Stub& stub, int64_t max_total_tokens = 0);

// Pushes `frames` on one PushState stream for `lease_id` (first message carries it).
grpc::Status PushFrames(v1::Decode::Stub& stub, const std::string& lease_id,
                        const std::vector<std::string>& frames,
                        v1::PushStateResponse* response = nullptr);

// Everything a Decode stream returned.
struct DecodeOutcome {
  std::vector<int32_t> tokens;
  bool finished = false;        // the last message said finished
  bool indices_contiguous = true;
  grpc::Status status;
};
// Reads the whole stream (deadline `timeout`).
DecodeOutcome RunDecode(v1::Decode::Stub& stub, const v1::DecodeRequest& request,
                        absl::Duration timeout = absl::Seconds(60));

// A greedy (or seeded) Decode request.
v1::DecodeRequest MakeDecodeRequest(const std::string& lease_id, int32_t last_token,
                                    int64_t next_index, int64_t max_new_tokens,
                                    double temperature = 0, uint64_t seed = 0);

}  // namespace kl

#endif  // KL_SERVICES_DECODE_TEST_UTIL_H_
