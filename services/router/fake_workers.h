// Test doubles of the cluster's workers: small gRPC servers on 127.0.0.1:0
// implementing kl.v1.Prefill and kl.v1.Decode with a deterministic "model"
// (FakeTokenAt), a real PushState from prefill to the decode target, and
// knobs to fail, hang, die mid-stream or report another model. Counters let
// tests see what the router did (Release calls, cancellations, indices).
//
// Thread-safety: knobs and counters are atomics or mutex-guarded; gRPC runs
// the handlers on its sync-server threads.
#ifndef KL_SERVICES_ROUTER_FAKE_WORKERS_H_
#define KL_SERVICES_ROUTER_FAKE_WORKERS_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/server_util.h"

namespace kl {

// The fake model: generated token `index` of a request seeded `seed` is a
// single-byte token 'a'..'z' (ids 97..122 in the synthetic vocabulary), the
// same on every fake worker, so a migrated stream must match an unbroken one.
int32_t FakeTokenAt(uint64_t seed, int64_t index);

class FakeWorkerServer;

class FakeDecode final : public v1::Decode::Service {
 public:
  // --- knobs
  std::atomic<int> reserve_exhausted{0};  // refuse this many Reserves (RESOURCE_EXHAUSTED)
  std::atomic<bool> reserve_out_of_range{false};  // refuse every Reserve with OUT_OF_RANGE
  std::atomic<int> token_delay_ms{0};     // before each streamed token
  // After this many tokens in one stream the worker "dies": health
  // NOT_SERVING and every RPC UNAVAILABLE from then on (-1: never). With
  // `kill_server`, it shuts its gRPC server down instead (a real death).
  std::atomic<int> die_after_tokens{-1};
  std::atomic<bool> kill_server{false};
  // Shared between fakes: deaths left (a test wants exactly one).
  std::shared_ptr<std::atomic<int>> death_budget = std::make_shared<std::atomic<int>>(1);
  std::string state_fingerprint;  // reported in Stats ("" = unknown)

  // --- what happened
  std::atomic<int> reserves{0}, releases{0}, pushes{0}, decodes{0};
  std::atomic<int> decode_cancelled{0};  // streams that saw the router cancel
  std::atomic<int> streamed{0};          // tokens written
  std::atomic<bool> dead{false};
  int64_t active_leases() const;
  std::vector<std::string> seen_request_ids() const;  // x-request-id of each call

  grpc::Status Reserve(grpc::ServerContext* ctx, const v1::ReserveRequest* request,
                       v1::ReserveResponse* response) override;
  grpc::Status Release(grpc::ServerContext* ctx, const v1::ReleaseRequest* request,
                       v1::ReleaseResponse* response) override;
  grpc::Status PushState(grpc::ServerContext* ctx, grpc::ServerReader<v1::StatePart>* reader,
                         v1::PushStateResponse* response) override;
  grpc::Status Decode(grpc::ServerContext* ctx, const v1::DecodeRequest* request,
                      grpc::ServerWriter<v1::DecodeResponse>* writer) override;
  grpc::Status Stats(grpc::ServerContext* ctx, const v1::WorkerStatsRequest* request,
                     v1::WorkerStats* response) override;

 private:
  friend class FakeWorkerServer;
  struct Lease {
    int64_t pushed_tokens = -1;  // -1 until PushState completed
  };
  grpc::Status Dead() const;
  void Die();
  void Record(const grpc::ServerContext& ctx);
  grpc::Status AwaitState(grpc::ServerContext* ctx, const std::string& lease_id);

  FakeWorkerServer* server_ = nullptr;
  mutable absl::Mutex mu_;
  std::map<std::string, Lease> leases_ ABSL_GUARDED_BY(mu_);
  int64_t next_lease_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t running_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> seen_ids_ ABSL_GUARDED_BY(mu_);
};

class FakePrefill final : public v1::Prefill::Service {
 public:
  // --- knobs
  std::atomic<int> fail_next{0};  // fail this many Prefills with fail_code
  grpc::StatusCode fail_code = grpc::StatusCode::UNAVAILABLE;
  std::atomic<bool> hang{false};  // block every Prefill until cancelled

  // --- what happened
  std::atomic<int> calls{0}, hang_cancelled{0};
  std::vector<int64_t> sample_indices() const;  // of the successful Prefills
  std::vector<std::string> seen_request_ids() const;

  grpc::Status Prefill(grpc::ServerContext* ctx, const v1::PrefillRequest* request,
                       v1::PrefillResponse* response) override;
  grpc::Status Stats(grpc::ServerContext* ctx, const v1::WorkerStatsRequest* request,
                     v1::WorkerStats* response) override;

 private:
  grpc::Status Push(grpc::ServerContext* ctx, const v1::PrefillRequest& request);
  std::atomic<bool> stopping_{false};
  friend class FakeWorkerServer;
  mutable absl::Mutex mu_;
  std::vector<int64_t> sample_indices_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> seen_ids_ ABSL_GUARDED_BY(mu_);
};

// One fake worker process: a gRPC server with health, on 127.0.0.1:0.
class FakeWorkerServer {
 public:
  static std::unique_ptr<FakeWorkerServer> StartDecode();
  static std::unique_ptr<FakeWorkerServer> StartPrefill();
  ~FakeWorkerServer();

  const std::string& address() const { return address_; }
  int port() const { return server_.port; }
  FakeDecode* decode() { return decode_.get(); }
  FakePrefill* prefill() { return prefill_.get(); }
  void SetServing(bool serving) { server_.SetServing(serving); }
  // Shuts the server down from another thread (in-flight calls are cancelled).
  void KillAsync();

 private:
  FakeWorkerServer() = default;
  std::unique_ptr<FakeDecode> decode_;
  std::unique_ptr<FakePrefill> prefill_;
  RunningServer server_;
  std::string address_;
  absl::Mutex kill_mu_;
  std::thread killer_;
};

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_FAKE_WORKERS_H_
