// PrefillService: kl.v1.Prefill on the callback API. Prefill validates the
// request, admits it to the PrefillEngine's bounded queue and completes when
// the decode worker has acknowledged the pushed state; Stats reports the queue,
// the running batch and the pushes in flight.
//
// Status codes of Prefill: INVALID_ARGUMENT (empty token_ids, id out of range,
// too long, negative sample_index, missing target address / lease, bad
// sampling); RESOURCE_EXHAUSTED (queue full); UNAVAILABLE (draining, or the
// decode worker unreachable); the push's NOT_FOUND / FAILED_PRECONDITION /
// DATA_LOSS / ALREADY_EXISTS (state_pusher.h); CANCELLED / DEADLINE_EXCEEDED.
//
// Threading: reactions only validate and enqueue; compute runs on the engine
// thread, pushes on per-request sender threads.
#ifndef KL_SERVICES_PREFILL_PREFILL_SERVICE_H_
#define KL_SERVICES_PREFILL_PREFILL_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>

#include "absl/time/time.h"
#include "engine/model/model.h"
#include "kernels/common/dtype.h"
#include "proto/worker.grpc.pb.h"
#include "services/prefill/prefill_engine.h"

namespace kl {

struct PrefillServiceOptions {
  int64_t max_batch_tokens = 8192;
  int64_t max_queue = 64;
  // Wire dtype of conv tails and MLA latents (KDA states always go as F32):
  // F32 keeps the hand-off exact, BF16 halves those bytes.
  DType bundle_dtype = DType::kF32;
  PrefillMetrics* metrics = nullptr;  // null: metrics off; must outlive the service
  ChannelSecurity push_security;      // state pushes to decode workers: cluster mTLS or plaintext
  // FAULT INJECTION (tests only; null = off): damages pushes (state_fault.h).
  std::shared_ptr<StateFaultInjector> fault_injector;
  // GPU builds: device links to decode workers (NCCL); null: gRPC only.
  DeviceTransport* transport = nullptr;
  // Host memory for prompt states kept for prompts that extend them
  // (prefix_cache.h); 0 = off.
  int64_t prefix_cache_bytes = 0;
};

class PrefillService final : public v1::Prefill::CallbackService {
 public:
  // `model` must outlive the service.
  PrefillService(Model* model, uint64_t checkpoint_fingerprint, PrefillServiceOptions options);
  ~PrefillService() override;

  // Refuses new Prefill calls (UNAVAILABLE); queued ones finish.
  void Drain();
  bool WaitIdle(absl::Duration timeout);
  v1::WorkerStats Snapshot() const;

  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx,
                                    const v1::PrefillRequest* request,
                                    v1::PrefillResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx,
                                  const v1::WorkerStatsRequest* request,
                                  v1::WorkerStats* response) override;

 private:
  Model* const model_;
  const uint64_t checkpoint_fingerprint_;
  DeviceTransport* const transport_;  // null: gRPC only
  std::unique_ptr<PrefillEngine> engine_;
};

}  // namespace kl

#endif  // KL_SERVICES_PREFILL_PREFILL_SERVICE_H_
