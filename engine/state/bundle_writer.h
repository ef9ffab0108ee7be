// BundleWriter: the sending side of a StateBundle (FORMAT.md). A prefill worker
// creates one per request, sends HeaderFrame() first, then the frames that
// AddKdaLayer / AddMlaRows return as each layer (or token chunk) completes, and
// finally the frame of Finish(). Frames are opaque byte strings to transports.
//
// Copies: each part is serialised into one contiguous std::string (record header
// + payload, converted to the wire dtype while copying, CRC computed on the fly);
// move it into a proto `bytes` field or a socket write without another copy. The
// writer never keeps the caller's buffers after a call returns.
//
// Thread-safe: Add* may run concurrently (e.g. one thread per finished layer);
// serialisation and CRCs run outside the writer's lock.
#ifndef KL_ENGINE_STATE_BUNDLE_WRITER_H_
#define KL_ENGINE_STATE_BUNDLE_WRITER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "engine/config/model_config.h"
#include "engine/state/bundle_format.h"
#include "engine/state/bundle_parts.h"
#include "engine/state/sequence_state.h"

namespace kl {

// Per-request facts the header carries besides the model shape.
struct BundleMeta {
  std::string request_id;               // for logs on both sides; <= 256 bytes
  int64_t first_token = -1;             // sampled from the last prompt position; -1 = none
  uint64_t checkpoint_fingerprint = 0;  // identity of the weights; 0 = unknown
  uint64_t bundle_id = 0;               // 0: the writer draws a random nonzero id
};

// Wire choices of the sender. The receiver learns them from the header.
struct BundleOptions {
  // Payload dtypes: F32 or BF16. F32 state is what the decode kernels keep
  // (spec §3.6); BF16 state halves 2 MiB/layer but is lossy. BF16 tails and
  // latents are what the spec ships (§3.8, §6); F32 keeps the round trip exact.
  DType kda_state_dtype = DType::kF32;
  DType conv_dtype = DType::kF32;
  DType mla_dtype = DType::kF32;
  // Layout of the buffers the caller hands to AddKdaLayer; shipped as is and
  // tagged, the receiver converts. EncodeBundle (SequenceState) needs the defaults.
  KdaStateLayout kda_state_layout = KdaStateLayout::kHKV;
  ConvTailLayout conv_layout = ConvTailLayout::kTimeMajor;
  // Tensors are split along their leading rows so that no part's payload exceeds
  // this (a part holds at least one row); 0 = no limit. 2 MiB keeps each frame
  // under gRPC's default 4 MiB message limit (a 48B KDA state is exactly 2 MiB).
  int64_t max_part_payload_bytes = int64_t{2} << 20;
  // If > 0, at most this many MLA rows (tokens) per part.
  int64_t mla_rows_per_part = 0;
};

// One frame: `bytes` is the complete record; the other fields label it for
// transports' metrics (bytes by kind) without parsing.
struct BundleFrame {
  RecordType type = RecordType::kHeader;
  PartKind kind = PartKind::kKdaState;  // parts only
  int64_t layer = -1;                   // parts only
  std::string bytes;
};

class BundleWriter {
 public:
  // Validates the config's state dims, `num_tokens` (>= 1: a zero-token state is
  // the zero state, which a receiver builds itself), meta and options.
  static absl::StatusOr<std::unique_ptr<BundleWriter>> Create(const ModelConfig& config,
                                                              int64_t num_tokens,
                                                              const BundleMeta& meta,
                                                              const BundleOptions& options = {});

  BundleWriter(const BundleWriter&) = delete;
  BundleWriter& operator=(const BundleWriter&) = delete;

  const BundleHeader& header() const { return header_; }
  // The header record. Send it before any other frame of this bundle.
  BundleFrame HeaderFrame() const;

  // Parts of KDA layer `layer` (model layer index): the recurrent state
  // ([H][K][V] or [H][V][K] per options) and the conv tails ([W-1][KdaDim] or
  // [KdaDim][W-1]), all fp32. Returns its frames (state split by heads if it
  // exceeds max_part_payload_bytes). INVALID_ARGUMENT for a non-KDA layer or a
  // wrong size, ALREADY_EXISTS if the layer was added before.
  absl::StatusOr<std::vector<BundleFrame>> AddKdaLayer(int64_t layer,
                                                       absl::Span<const float> recurrent,
                                                       absl::Span<const float> conv_q,
                                                       absl::Span<const float> conv_k,
                                                       absl::Span<const float> conv_v);
  absl::StatusOr<std::vector<BundleFrame>> AddKdaLayer(int64_t layer, const KdaLayerState& state);

  // Latent rows [begin_row, begin_row + rows.size() / MlaLatentDim) of MLA layer
  // `layer`, fp32 [n][kv_lora_rank + rope]. Call as token chunks complete, in any
  // order; ALREADY_EXISTS if any of those rows was added before.
  absl::StatusOr<std::vector<BundleFrame>> AddMlaRows(int64_t layer, int64_t begin_row,
                                                      absl::Span<const float> rows);

  // The general form: rows [row_begin, ...) of one tensor in its wire layout
  // (e.g. a head range of a KDA state from a tensor-parallel shard).
  absl::StatusOr<std::vector<BundleFrame>> AddRows(PartKind kind, int64_t layer,
                                                   int64_t row_begin,
                                                   absl::Span<const float> data);

  // The final record. FAILED_PRECONDITION (naming what is missing) unless every
  // row of every part was added and no Add call is still running; once only.
  absl::StatusOr<BundleFrame> Finish();

 private:
  struct Job {
    PartKind kind;
    uint32_t layer;
    PartShape shape;
    uint64_t row_begin, row_end;
    const float* data;
  };

  BundleWriter(BundleHeader header, const BundleOptions& options);
  // Atomically checks and claims every job's rows (all or nothing).
  absl::Status Claim(absl::Span<const Job> jobs);
  // Serialises claimed jobs (no lock held), then records them.
  std::vector<BundleFrame> Emit(absl::Span<const Job> jobs);
  absl::StatusOr<Job> MakeJob(PartKind kind, int64_t layer, int64_t row_begin,
                              absl::Span<const float> data);
  BundleFrame EncodePart(const Job& job, uint64_t row_begin, uint64_t row_end,
                         PartRecord* record) const;
  uint64_t RowsPerPart(const Job& job) const;

  const BundleHeader header_;
  const BundleOptions options_;
  const std::string header_frame_;

  mutable absl::Mutex mu_;
  PartTable table_ ABSL_GUARDED_BY(mu_);
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t part_count_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t payload_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t digest_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kl

#endif  // KL_ENGINE_STATE_BUNDLE_WRITER_H_
