// DeviceStateAccess: what a device-to-device state transport (NCCL, see
// services/transport) needs from a backend that keeps sequence states in device
// memory. No CUDA types: streams are passed as void* (cudaStream_t).
//
// Layout of the bytes a transport moves (both ends must report the same
// layout_tag() or they do not talk over a device link):
//  - KDA layer: the recurrent state, H heads of K x V fp32 in the backend's pool
//    layout (the CUDA backend: kernels/cuda/kda_state_layout.h, named in the tag),
//    and the q, k, v conv tails [W-1][KdaDim] fp32, each one contiguous span of the
//    sequence's slot;
//  - MLA layer: latent rows live in pages of page_rows() rows of
//    latent_row_bytes() each (fp32 or bf16 per latent_dtype()); a sequence's
//    pages are listed by SlotPages() (the same for every MLA layer).
#ifndef KL_ENGINE_BACKEND_DEVICE_STATE_H_
#define KL_ENGINE_BACKEND_DEVICE_STATE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/state/sequence_state.h"

namespace kl {

struct DeviceSpan {
  void* ptr = nullptr;
  int64_t bytes = 0;
};

class DeviceStateAccess {
 public:
  virtual ~DeviceStateAccess() = default;
  // The device ordinal the states live on.
  virtual int device() const = 0;
  // "kda=f32,tail=f32,latent=bf16,page_rows=64,lat=576": both ends of a link
  // must agree exactly.
  virtual std::string layout_tag() const = 0;
  virtual int64_t page_rows() const = 0;
  virtual int64_t latent_row_bytes() const = 0;

  // KDA layer `kda_index` of a bound state: recurrent, conv_q, conv_k, conv_v
  // (empty tails omitted).
  virtual absl::Status KdaSpans(const SequenceState& s, int64_t kda_index,
                                std::vector<DeviceSpan>* spans) = 0;
  // Base of MLA layer `mla_index`'s page pool ([pages][page_rows][row bytes]).
  virtual absl::StatusOr<void*> LatentPool(int64_t mla_index) = 0;
  // The pages of a bound state, in row order (page i holds rows
  // [i * page_rows, (i + 1) * page_rows)).
  virtual absl::StatusOr<std::vector<int32_t>> SlotPages(const SequenceState& s) = 0;

  // Binds `s` to a fresh slot with pages for `num_tokens` rows per MLA layer
  // without writing anything (the transport fills it); s->num_tokens is set.
  // RESOURCE_EXHAUSTED when out of slots or pages. The memory goes back when
  // s->device is dropped (as for any bound state).
  virtual absl::Status AllocateState(SequenceState* s, int64_t num_tokens) = 0;
  // Records `event` (a cudaEvent_t of this device) on the backend's compute
  // stream, after everything queued so far: a transport's stream that waits
  // on it sees the state as of now. Never blocks the host. Not inside a CUDA
  // graph capture.
  virtual absl::Status RecordCompute(void* event) = 0;
};

}  // namespace kl

#endif  // KL_ENGINE_BACKEND_DEVICE_STATE_H_
