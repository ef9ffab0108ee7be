// BundleAssembler: the receiving side of a StateBundle (FORMAT.md). A decode
// worker creates one per incoming transfer, feeds it every frame as it arrives
// (Add), and adopts the state only from Finish(), which succeeds only for a
// complete, fully verified bundle: it never returns a partial or zeroed state.
//
// Each frame is checked the moment it arrives: framing, record and payload
// CRCs, model / checkpoint fingerprints and dims against this worker's config,
// part identity, dtype, size, row range and duplicates. Parts are converted
// (BF16 -> F32, V-first -> [H][K][V], channel-major -> time-major conv tails)
// straight into the final SequenceState, so no frame is retained.
//
// Errors are sticky: after the first failed Add the bundle is dead and every
// later call returns that status (a retry is a new bundle). The one exception
// is Finish() on a bundle that is merely not complete yet (FAILED_PRECONDITION
// without a final record): it may be called again after more frames.
//
// Status codes (FORMAT.md has the full table):
//   DATA_LOSS           corrupt frame, CRC mismatch, final record disagrees with
//                       what arrived, parts missing although the final arrived;
//   FAILED_PRECONDITION incompatible peer: format version, model fingerprint,
//                       checkpoint fingerprint, unknown layout tag / dtype;
//                       Finish() before everything arrived;
//   INVALID_ARGUMENT    malformed content: part for a layer of the other kind,
//                       size or row range wrong, token count, frame order,
//                       all-zero KDA state, non-finite values;
//   ALREADY_EXISTS      a part (or rows of one) or a header/final seen twice;
//   CANCELLED           after Abort().
//
// Thread-safe: Add may be called concurrently (e.g. parallel streams); CRC
// checks and conversion run outside the lock on disjoint, pre-claimed rows.
#ifndef KL_ENGINE_STATE_BUNDLE_ASSEMBLER_H_
#define KL_ENGINE_STATE_BUNDLE_ASSEMBLER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/config/model_config.h"
#include "engine/state/bundle_format.h"
#include "engine/state/bundle_parts.h"
#include "engine/state/sequence_state.h"

namespace kl {

struct AssemblerOptions {
  // Identity of this worker's weights. If nonzero, a bundle must carry exactly
  // this checkpoint fingerprint (an unknown one, 0, is refused too). 0: not checked.
  uint64_t expected_checkpoint_fingerprint = 0;
  // Largest token count accepted (bounds the memory a header can make us
  // allocate). 0: the config's model_max_length.
  int64_t max_tokens = 0;
  // Refuse a KDA layer whose recurrent state is exactly zero although the
  // bundle consumed >= 1 token: a sender that shipped an unwritten state (the
  // "fluent text from a zeroed state" failure) has valid checksums.
  bool reject_zero_kda_state = true;
  // Refuse parts holding Inf or NaN.
  bool reject_non_finite = true;
};

struct AssemblerProgress {
  bool has_header = false;
  bool has_final = false;
  uint64_t parts_received = 0;
  uint64_t payload_bytes_received = 0;
  uint64_t expected_payload_bytes = 0;  // from the header's dims and dtypes; 0 before it
};

class BundleAssembler {
 public:
  // `config` is this worker's model; bundles must match it.
  explicit BundleAssembler(ModelConfig config, AssemblerOptions options = {});
  // Same, importing into `recycled` (e.g. the buffers of a finished request,
  // kept in a pool) instead of allocating and zero-filling a new state: first
  // touch of fresh memory is the largest cost of an import. Used when its KDA
  // vectors have this config's sizes; MLA vectors are resized (no reallocation
  // within capacity). Old contents never leak: Finish() requires every element
  // to have been written.
  BundleAssembler(ModelConfig config, AssemblerOptions options, SequenceState recycled);
  // Aborts (frees everything, waits for running Add calls).
  ~BundleAssembler();

  BundleAssembler(const BundleAssembler&) = delete;
  BundleAssembler& operator=(const BundleAssembler&) = delete;

  // Checks and absorbs one frame. The header must come first; parts and the
  // final record may follow in any order. `frame` is not retained.
  absl::Status Add(std::string_view frame);

  // The assembled state (num_tokens from the header), once: requires the final
  // record and every row of every part exactly once, with all totals and the
  // digest agreeing. See the class comment for the status codes.
  absl::StatusOr<SequenceState> Finish();

  // Frees everything; later calls return CANCELLED (or the earlier error, if the
  // bundle had already failed). Idempotent; waits for Add calls in progress on
  // other threads to return.
  void Abort();

  // The verified header (request id, first token, ...) once accepted.
  std::optional<BundleHeader> header() const;
  AssemblerProgress progress() const;

 private:
  enum class Phase { kOpen, kFailed, kFinished, kAborted };

  absl::Status TerminalStatus() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Fail(absl::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees state_ and table_ unless an Add is still importing into them.
  void ReleaseIfIdle() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckHeader(const BundleHeader& h) const;
  absl::Status AcceptHeader(const ParsedFrame& f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status AcceptFinal(const ParsedFrame& f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<PartSlot*> ClaimPart(const PartRecord& part) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status AddPart(const ParsedFrame& f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Verify() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ModelConfig config_;
  const AssemblerOptions options_;
  const uint64_t fingerprint_;  // StateFingerprint(config_)

  mutable absl::Mutex mu_;
  Phase phase_ ABSL_GUARDED_BY(mu_) = Phase::kOpen;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  std::optional<BundleHeader> header_ ABSL_GUARDED_BY(mu_);
  uint32_t header_crc_ ABSL_GUARDED_BY(mu_) = 0;
  std::unique_ptr<PartTable> table_ ABSL_GUARDED_BY(mu_);
  // Written outside the lock by Add calls on rows they claimed; never resized
  // or freed while in_flight_ > 0.
  SequenceState state_;
  SequenceState recycled_;  // consumed by AcceptHeader
  std::optional<FinalRecord> final_ ABSL_GUARDED_BY(mu_);
  int64_t in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t parts_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t payload_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t digest_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kl

#endif  // KL_ENGINE_STATE_BUNDLE_ASSEMBLER_H_
