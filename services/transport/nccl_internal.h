// Internals of the NCCL DeviceTransport shared by its translation units: the
// state shared with background threads (Core), plan messages resolved to device
// spans (Piece), group placement in the link's staging buffer, and the factories
// of the sending and receiving halves. Not a public API (device_transport.h is).
#ifndef KL_SERVICES_TRANSPORT_NCCL_INTERNAL_H_
#define KL_SERVICES_TRANSPORT_NCCL_INTERNAL_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kernels/cuda/transfer.h"
#include "proto/worker.pb.h"
#include "services/transport/device_transport.h"
#include "services/transport/nccl_link.h"
#include "services/transport/transfer_plan.h"

namespace kl::nccl_internal {

constexpr int kMaxSpans = 4;  // a KDA layer: state + 3 conv tails

// How long a transfer of `bytes` may take before it is failed.
absl::Duration TransferBudget(const DeviceTransportOptions& o, int64_t bytes);

// What the link registries share with background threads (link init), so a
// thread that outlives a call never touches a destroyed transport.
struct Core {
  ModelConfig config;
  DeviceStateAccess* access;
  int device = 0;  // access->device(), read once (background threads use it)
  DeviceTransportOptions options;
  PlanSizes sizes;
  std::string host_id;
  std::string gpu_uuid;
  std::string layout;

  mutable std::mutex mu;
  std::map<uint64_t, std::shared_ptr<NcclLink>> accepted;                  // decode side
  std::map<std::string, std::vector<std::shared_ptr<NcclLink>>> outgoing;  // prefill side
  std::map<std::string, absl::Time> grpc_only_until;  // peers that answered "grpc"
  DeviceTransportStats stats;

  void Count(int64_t DeviceTransportStats::*field, int64_t n = 1) {
    std::lock_guard<std::mutex> l(mu);
    stats.*field += n;
  }
  void CountInit(bool ok, absl::Duration took) {
    std::lock_guard<std::mutex> l(mu);
    if (!ok) {
      ++stats.link_init_failures;
      return;
    }
    ++stats.link_inits;
    stats.link_init_seconds += absl::ToDoubleSeconds(took);
  }
  // Drops a dead link from the registries.
  void Forget(const std::shared_ptr<NcclLink>& link) {
    std::lock_guard<std::mutex> l(mu);
    if (accepted.erase(link->id()) > 0) ++stats.links_dropped;
    auto it = outgoing.find(link->peer());
    if (it != outgoing.end()) {
      auto& v = it->second;
      const size_t before = v.size();
      v.erase(std::remove(v.begin(), v.end(), link), v.end());
      if (v.size() != before) ++stats.links_dropped;
    }
  }
};

// The spans of a plan message's device memory on this side (KDA: the slot's
// state + tails; MLA: the link's staging buffer).
absl::Status KdaMessageSpans(Core& core, const SequenceState& s, int64_t layer, void** ptrs,
                             int64_t* bytes, int* n);

// Index of MLA layer `layer` among the model's MLA layers.
int64_t MlaIndex(const ModelConfig& c, int64_t layer);

// The latent pool of MLA layer `layer` addressed through the link's page list.
absl::StatusOr<cuda::PagedRows> Paged(Core& core, NcclLink& link, int64_t layer);

// Per-message checksums: the link's per-span sums (host copy) added up.
std::vector<uint64_t> FoldSums(const NcclLink& link, int64_t messages);

// One plan message resolved to device addresses on the calling thread, so the
// link's worker never touches the SequenceState.
struct Piece {
  int64_t index = 0;
  bool kda = false;
  void* ptrs[kMaxSpans] = {};
  int64_t bytes[kMaxSpans] = {};
  int n = 0;
  int64_t row_begin = 0, row_end = 0;  // MLA
  cuda::PagedRows paged;               // MLA (pages: the link's device list)
  cudaEvent_t after = nullptr;         // compute to wait for (sender)
};

// A group's spans on this side, in plan order, and the KDA spans' checksum
// jobs (output d_sums[index * kMaxSpans + span]; an MLA message's checksum,
// into d_sums[index * kMaxSpans], comes from PackRows / UnpackRows). MLA
// messages get consecutive aligned places from `base` in the link's staging
// buffer (their ptrs[0] is set here).
struct GroupSpans {
  std::vector<void*> ptrs;
  std::vector<int64_t> bytes;
  std::vector<cuda::ChecksumSpan> sums;
};

GroupSpans PlaceGroup(NcclLink& link, char* base, std::vector<Piece>& group);

// Plan message `index` resolved to this side's device spans for state `s`.
absl::StatusOr<Piece> Resolve(Core& core, NcclLink& link, const SequenceState& s,
                              const v1::DeviceMessage& m, int64_t index);

// The sending half of a transfer over `link` (nccl_send.cc).
std::unique_ptr<DeviceSend> NewNcclSend(std::shared_ptr<Core> core, std::shared_ptr<NcclLink> link,
                                        std::vector<v1::DeviceMessage> plan);
// The receiving half (nccl_receive.cc): `pieces` resolved and the state allocated.
std::unique_ptr<DeviceReceive> NewNcclReceive(std::shared_ptr<Core> core, std::shared_ptr<NcclLink> link,
                                              SequenceState state, std::vector<Piece> pieces,
                                              std::vector<int64_t> mla_bytes, int64_t staging_cap,
                                              int64_t bytes);

}  // namespace kl::nccl_internal

#endif  // KL_SERVICES_TRANSPORT_NCCL_INTERNAL_H_
