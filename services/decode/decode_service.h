// DecodeService: kl.v1.Decode on the callback API — Reserve/Release (leases),
// PushState (state in), Decode (tokens out, continuous batching), Stats — plus
// draining. Owns the LeaseManager, the DecodeEngine (one engine thread) and a
// reaper thread that expires leases.
//
// Threading: RPC reactions run on gRPC's callback threads and never block
// (they take short locks and hand work over); model compute runs only on the
// engine thread; the reaper wakes every min(ttl/4, 1 s).
//
// Shutdown order: Shutdown the grpc::Server first (it waits for calls to end;
// Drain + WaitIdle before that to let streams finish), then destroy the
// service.
#ifndef KL_SERVICES_DECODE_DECODE_SERVICE_H_
#define KL_SERVICES_DECODE_DECODE_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/model/model.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/metrics.h"
#include "services/decode/decode_engine.h"
#include "services/decode/state_pool.h"
#include "services/decode/decode_stream.h"
#include "services/decode/lease_manager.h"
#include "services/decode/push_stream.h"
#include "services/transport/device_transport.h"

namespace kl {

struct DecodeServiceOptions {
  int64_t slots = 16;
  absl::Duration lease_ttl = absl::Seconds(30);
  int64_t max_batch = 0;               // sequences per step; 0 = slots
  int64_t stream_buffer_tokens = 64;   // per stream, before its sequence pauses
  int64_t latent_rows_capacity = 0;    // 0 = unbounded
  int64_t latent_row_granularity = 1;  // LeaseManagerOptions
  int64_t max_rows_per_lease = 0;
  absl::Duration reap_interval = absl::ZeroDuration();  // 0 = min(ttl / 4, 1 s)
  LeaseManager::Clock clock;           // tests; default absl::Now
  DecodeMetrics* metrics = nullptr;    // null: metrics off; must outlive the service
  // GPU builds: receives states over device links (NCCL); null: gRPC only.
  // Must outlive the service.
  DeviceTransport* transport = nullptr;
};

class DecodeService final : public v1::Decode::CallbackService {
 public:
  // `model` must outlive the service; `checkpoint_fingerprint` identifies its
  // weights (bundles must carry it).
  DecodeService(Model* model, uint64_t checkpoint_fingerprint, DecodeServiceOptions options);
  ~DecodeService() override;

  // Refuses new reservations (UNAVAILABLE); leases and streams already granted
  // go on. Health is the caller's (RunningServer::SetServing(false)).
  void Drain();
  // Waits until no lease is held (every stream finished, every lease released
  // or expired), at most `timeout`. True if idle.
  bool WaitIdle(absl::Duration timeout);

  v1::WorkerStats Snapshot() const;
  LeaseManager& leases() { return *leases_; }
  const DecodeEngine& engine() const { return *engine_; }
  // Finished requests' states kept for reuse by the next PushState.
  int64_t pooled_states() const { return state_pool_->size(); }

  grpc::ServerUnaryReactor* Reserve(grpc::CallbackServerContext* ctx,
                                    const v1::ReserveRequest* request,
                                    v1::ReserveResponse* response) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* ctx,
                                    const v1::ReleaseRequest* request,
                                    v1::ReleaseResponse* response) override;
  grpc::ServerReadReactor<v1::StatePart>* PushState(grpc::CallbackServerContext* ctx,
                                                    v1::PushStateResponse* response) override;
  grpc::ServerWriteReactor<v1::DecodeResponse>* Decode(grpc::CallbackServerContext* ctx,
                                                       const v1::DecodeRequest* request) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx,
                                  const v1::WorkerStatsRequest* request,
                                  v1::WorkerStats* response) override;
  grpc::ServerUnaryReactor* OpenTransport(grpc::CallbackServerContext* ctx,
                                          const v1::OpenTransportRequest* request,
                                          v1::OpenTransportResponse* response) override;

 private:
  void ReapLoop();

  Model* const model_;
  const uint64_t checkpoint_fingerprint_;
  const DecodeServiceOptions options_;
  std::atomic<int64_t> integrity_failures_{0};
  std::atomic<int64_t> decodes_waiting_{0};  // streams waiting for their state
  std::unique_ptr<StatePool> state_pool_;  // outlives engine_ (declared first)
  std::unique_ptr<LeaseManager> leases_;
  std::unique_ptr<DecodeEngine> engine_;
  DecodeStreamDeps stream_deps_;
  PushStreamDeps push_deps_;

  absl::Mutex reap_mu_;
  bool stop_reaper_ ABSL_GUARDED_BY(reap_mu_) = false;
  std::thread reaper_;
};

// Slot, lease, latent-cache, queue and integrity families read from
// `service->Snapshot()` at scrape time.
void RegisterDecodeCallbacks(Metrics& metrics, const DecodeService* service);

}  // namespace kl

#endif  // KL_SERVICES_DECODE_DECODE_SERVICE_H_
