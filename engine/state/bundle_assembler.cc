#include "engine/state/bundle_assembler.h"

#include <new>

#include <utility>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/state/bundle_convert.h"
#include "kernels/common/crc32c.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

// Differences between the dims a header ships and this worker's config, as
// "field sender vs ours" strings.
std::vector<std::string> DiffDims(const BundleHeader& h, const ModelConfig& c) {
  std::vector<std::string> diffs;
  auto cmp = [&](const char* name, int64_t sender, int64_t ours) {
    if (sender != ours) diffs.push_back(absl::StrFormat("%s %d vs %d", name, sender, ours));
  };
  cmp("num_hidden_layers", h.layer_kinds.size(), c.num_hidden_layers);
  const size_t n = std::min<size_t>(h.layer_kinds.size(), c.layer_kinds.size());
  for (size_t i = 0; i < n; ++i) {
    if (h.layer_kinds[i] != static_cast<uint8_t>(c.layer_kinds[i])) {
      diffs.push_back(absl::StrFormat("layer %d is %s vs %s", i,
                                      h.layer_kinds[i] == kWireLayerKda ? "KDA" : "MLA",
                                      c.layer_kinds[i] == LayerKind::kKda ? "KDA" : "MLA"));
      break;  // the first differing layer says enough
    }
  }
  cmp("hidden_size", h.hidden_size, c.hidden_size);
  cmp("kda_num_heads", h.kda_num_heads, c.kda_num_heads);
  cmp("kda_head_dim (K)", h.kda_key_dim, c.kda_head_dim);
  cmp("kda value dim (V)", h.kda_value_dim, c.kda_head_dim);
  cmp("short_conv_kernel_size", h.conv_kernel_size, c.short_conv_kernel_size);
  cmp("kv_lora_rank", h.mla_kv_lora_rank, c.kv_lora_rank);
  cmp("qk_rope_head_dim", h.mla_rope_dim, c.qk_rope_head_dim);
  return diffs;
}

// Writes one part payload into its place in `state` (fp32 canonical) and
// computes the payload's CRC-32C into *crc — in the same pass where the layout
// is contiguous. The caller refuses the bundle if *crc != part.payload_crc, so
// unverified values written here never leave the assembler.
ImportStats ImportPart(const BundleHeader& h, const PartSlot& slot, const PartRecord& part,
                       std::string_view payload, SequenceState* state, uint32_t* crc) {
  const DType dtype = part.dtype;
  const size_t esize = DTypeSize(dtype);
  const size_t rows = part.row_end - part.row_begin;
  const char* src = payload.data();
  *crc = 0;
  if (slot.kind == PartKind::kMlaLatent) {
    float* dst = state->mla[slot.ordinal].latent.data() + part.row_begin * slot.shape.row_elems;
    return ImportContiguous(dtype, src, dst, rows * slot.shape.row_elems, crc);
  }
  KdaLayerState& layer = state->kda[slot.ordinal];
  const bool transposed = slot.kind == PartKind::kKdaState
                              ? h.kda_state_layout == KdaStateLayout::kHVK
                              : h.conv_layout == ConvTailLayout::kChannelMajor;
  if (transposed) *crc = Crc32c(payload.data(), payload.size());
  if (slot.kind == PartKind::kKdaState) {
    const size_t k = h.kda_key_dim, v = h.kda_value_dim;
    float* dst = layer.recurrent.data() + part.row_begin * k * v;
    if (!transposed) return ImportContiguous(dtype, src, dst, rows * k * v, crc);
    ImportStats stats;  // V-first: each head is [V][K] on the wire
    for (size_t i = 0; i < rows; ++i) {
      stats.Merge(ImportTransposed(dtype, src + i * v * k * esize, v, k, dst + i * k * v, v));
    }
    return stats;
  }
  std::vector<float>& tail = slot.kind == PartKind::kConvQ   ? layer.conv_q
                             : slot.kind == PartKind::kConvK ? layer.conv_k
                                                             : layer.conv_v;
  if (!transposed) {  // time-major: rows are time steps of C channels
    const size_t channels = slot.shape.row_elems;
    return ImportContiguous(dtype, src, tail.data() + part.row_begin * channels, rows * channels,
                            crc);
  }
  // Channel-major: rows are channels of W-1 steps; canonical is [W-1][C].
  const size_t channels = slot.shape.rows, steps = slot.shape.row_elems;
  return ImportTransposed(dtype, src, rows, steps, tail.data() + part.row_begin, channels);
}

// True if `s` has the KDA shapes and the MLA layer count of `c`.
bool FitsConfig(const SequenceState& s, const ModelConfig& c) {
  if (static_cast<int64_t>(s.kda.size()) != c.NumKdaLayers() ||
      static_cast<int64_t>(s.mla.size()) != c.NumMlaLayers()) {
    return false;
  }
  const size_t state = c.KdaStateElems(), tail = c.ConvTailElems();
  for (const KdaLayerState& l : s.kda) {
    if (l.recurrent.size() != state || l.conv_q.size() != tail || l.conv_k.size() != tail ||
        l.conv_v.size() != tail) {
      return false;
    }
  }
  return true;
}

}  // namespace

BundleAssembler::BundleAssembler(ModelConfig config, AssemblerOptions options)
    : config_(std::move(config)), options_(options), fingerprint_(StateFingerprint(config_)) {}

BundleAssembler::BundleAssembler(ModelConfig config, AssemblerOptions options,
                                 SequenceState recycled)
    : BundleAssembler(std::move(config), options) {
  recycled_ = std::move(recycled);
}

BundleAssembler::~BundleAssembler() { Abort(); }

absl::Status BundleAssembler::TerminalStatus() const {
  switch (phase_) {
    case Phase::kFailed: return error_;
    case Phase::kFinished:
      return absl::FailedPreconditionError("state bundle was already finished and handed out");
    case Phase::kAborted: return absl::CancelledError("state bundle assembly was aborted");
    case Phase::kOpen: break;
  }
  return absl::OkStatus();
}

absl::Status BundleAssembler::Fail(absl::Status status) {
  if (phase_ == Phase::kOpen) {
    phase_ = Phase::kFailed;
    error_ = status;
  }
  ReleaseIfIdle();
  return status;
}

void BundleAssembler::ReleaseIfIdle() {
  // Adds running on other threads write into state_ and read table_: the last
  // of them to return frees (see AddPart).
  if (in_flight_ > 0) return;
  state_ = SequenceState();
  table_.reset();
}

absl::Status BundleAssembler::CheckHeader(const BundleHeader& h) const {
  const std::vector<std::string> diffs = DiffDims(h, config_);
  if (h.model_fingerprint != fingerprint_) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "state bundle model fingerprint 0x%016x does not match this worker's 0x%016x "
        "(different config: %s)",
        h.model_fingerprint, fingerprint_,
        diffs.empty() ? "no difference in the dims the bundle ships" : absl::StrJoin(diffs, ", ")));
  }
  if (!diffs.empty()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "state bundle dims differ from this worker's config although the model fingerprints "
        "match (0x%016x): %s",
        fingerprint_, absl::StrJoin(diffs, ", ")));
  }
  const uint64_t want_ckpt = options_.expected_checkpoint_fingerprint;
  if (want_ckpt != 0 && h.checkpoint_fingerprint != want_ckpt) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "state bundle checkpoint fingerprint 0x%016x does not match this worker's 0x%016x (%s)",
        h.checkpoint_fingerprint, want_ckpt,
        h.checkpoint_fingerprint == 0 ? "the sender's weights are unknown"
                                      : "prefill and decode run different weights"));
  }
  const int64_t max_tokens =
      options_.max_tokens > 0 ? options_.max_tokens : config_.model_max_length;
  if (h.num_tokens < 1 || h.num_tokens > max_tokens) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle token count %d is outside [1, %d]", h.num_tokens, max_tokens));
  }
  if (h.first_token < -1 || (config_.vocab_size > 0 && h.first_token >= config_.vocab_size)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle first token %d is not a token id of this model (vocab %d)", h.first_token,
        config_.vocab_size));
  }
  return absl::OkStatus();
}

absl::Status BundleAssembler::AcceptHeader(const ParsedFrame& f) {
  if (header_.has_value()) {
    return Fail(absl::AlreadyExistsError(absl::StrFormat(
        "state bundle 0x%016x: a second header record arrived", header_->bundle_id)));
  }
  const absl::Status ok = CheckHeader(f.header);
  if (!ok.ok()) return Fail(ok);
  header_ = f.header;
  header_crc_ = f.record_crc;
  table_ = std::make_unique<PartTable>(*header_);
  // Allocate the whole state now: parts are written straight into it.
  // The header's token count is bounded above, but a bound of a 1M-token context
  // is still gigabytes: an allocation that fails is a refusal, not a crash.
  try {
    state_ = FitsConfig(recycled_, config_) ? std::move(recycled_) : SequenceState::Zero(config_);
    recycled_ = SequenceState();
    for (MlaLayerCache& m : state_.mla) {
      m.latent.resize(static_cast<size_t>(header_->num_tokens) * config_.MlaLatentDim());
    }
  } catch (const std::bad_alloc&) {
    state_ = SequenceState();
    return absl::ResourceExhaustedError(absl::StrFormat(
        "no memory for a state of %d tokens", header_->num_tokens));
  }
  return absl::OkStatus();
}

absl::StatusOr<PartSlot*> BundleAssembler::ClaimPart(const PartRecord& p) {
  if (!header_.has_value()) {
    return absl::InvalidArgumentError("state bundle part arrived before the header record");
  }
  const std::string name =
      absl::StrFormat("%s layer %d rows [%d, %d)", PartKindName(p.kind), p.layer, p.row_begin,
                      p.row_end);
  if (p.bundle_id != header_->bundle_id) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle part %s belongs to bundle 0x%016x, not 0x%016x", name, p.bundle_id,
        header_->bundle_id));
  }
  PartSlot* slot = table_->Find(p.kind, p.layer);
  if (slot == nullptr) {
    if (p.layer >= header_->layer_kinds.size()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "state bundle part %s: layer out of range (%d layers)", name,
          header_->layer_kinds.size()));
    }
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle part %s: layer %d is %s layer", name, p.layer,
        header_->layer_kinds[p.layer] == kWireLayerKda ? "a KDA" : "an MLA"));
  }
  if (p.dtype != slot->dtype) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle part %s has dtype %s but the header declares %s", name, DTypeName(p.dtype),
        DTypeName(slot->dtype)));
  }
  if (p.row_end > slot->shape.rows) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle part %s is out of range: the tensor has %d rows", name, slot->shape.rows));
  }
  const uint64_t want_bytes = (p.row_end - p.row_begin) * slot->shape.row_elems * DTypeSize(p.dtype);
  if (p.payload_bytes != want_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle part %s has %d payload bytes, expected %d (%d rows x %d %s values)", name,
        p.payload_bytes, want_bytes, p.row_end - p.row_begin, slot->shape.row_elems,
        DTypeName(p.dtype)));
  }
  if (!slot->coverage.Claim(p.row_begin, p.row_end)) {
    return absl::AlreadyExistsError(absl::StrFormat(
        "state bundle part %s duplicates rows that already arrived", name));
  }
  return slot;
}

absl::Status BundleAssembler::AddPart(const ParsedFrame& f) {
  absl::StatusOr<PartSlot*> claimed = ClaimPart(f.part);
  if (!claimed.ok()) return Fail(claimed.status());
  PartSlot* slot = *claimed;
  ++in_flight_;
  const BundleHeader* header = &*header_;  // immutable once set
  mu_.Unlock();
  uint32_t crc = 0;
  const ImportStats stats = ImportPart(*header, *slot, f.part, f.payload, &state_, &crc);
  mu_.Lock();
  --in_flight_;
  if (phase_ != Phase::kOpen) {  // aborted or failed by another thread meanwhile
    ReleaseIfIdle();
    return TerminalStatus();
  }
  const absl::Status crc_ok = CheckPartPayloadCrc(f.part, crc);
  if (!crc_ok.ok()) return Fail(crc_ok);
  if (options_.reject_non_finite && stats.any_nonfinite) {
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "state bundle part %s layer %d rows [%d, %d) holds Inf or NaN values",
        PartKindName(f.part.kind), f.part.layer, f.part.row_begin, f.part.row_end)));
  }
  slot->any_nonzero |= stats.any_nonzero;
  ++parts_;
  payload_bytes_ += f.part.payload_bytes;
  digest_ += PartDigestTerm(f.part);
  if (final_.has_value() && parts_ > final_->part_count) {
    return Fail(absl::DataLossError(absl::StrFormat(
        "state bundle: %d parts arrived but the final record counts %d", parts_,
        final_->part_count)));
  }
  return absl::OkStatus();
}

absl::Status BundleAssembler::AcceptFinal(const ParsedFrame& f) {
  if (!header_.has_value()) {
    return Fail(absl::InvalidArgumentError("state bundle final record arrived before the header"));
  }
  if (f.final.bundle_id != header_->bundle_id) {
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "state bundle final record belongs to bundle 0x%016x, not 0x%016x", f.final.bundle_id,
        header_->bundle_id)));
  }
  if (final_.has_value()) {
    return Fail(absl::AlreadyExistsError("state bundle: a second final record arrived"));
  }
  if (f.final.header_record_crc != header_crc_) {
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
        "state bundle final record closes a header with CRC 0x%08x, not this one (0x%08x)",
        f.final.header_record_crc, header_crc_)));
  }
  if (parts_ > f.final.part_count) {
    return Fail(absl::DataLossError(absl::StrFormat(
        "state bundle: %d parts arrived but the final record counts %d", parts_,
        f.final.part_count)));
  }
  final_ = f.final;
  return absl::OkStatus();
}

absl::Status BundleAssembler::Add(std::string_view frame) {
  {
    absl::MutexLock lock(&mu_);
    if (phase_ != Phase::kOpen) return TerminalStatus();
  }
  // Record CRCs are verified here, part payload CRCs while importing (AddPart);
  // both outside the lock.
  absl::StatusOr<ParsedFrame> parsed = ParseFrame(frame, /*verify_payload=*/false);
  absl::MutexLock lock(&mu_);
  if (phase_ != Phase::kOpen) return TerminalStatus();
  if (!parsed.ok()) return Fail(parsed.status());
  switch (parsed->type) {
    case RecordType::kHeader: return AcceptHeader(*parsed);
    case RecordType::kFinal: return AcceptFinal(*parsed);
    case RecordType::kPart: return AddPart(*parsed);
  }
  return Fail(absl::InternalError("state bundle: unhandled record type"));
}

absl::Status BundleAssembler::Verify() {
  const FinalRecord& fin = *final_;
  if (fin.part_count != parts_ || fin.total_payload_bytes != payload_bytes_) {
    return absl::DataLossError(absl::StrFormat(
        "state bundle: the final record counts %d parts / %d payload bytes, %d / %d arrived",
        fin.part_count, fin.total_payload_bytes, parts_, payload_bytes_));
  }
  if (fin.parts_digest != digest_) {
    return absl::DataLossError(absl::StrFormat(
        "state bundle: parts digest 0x%016x of the final record does not match the parts that "
        "arrived (0x%016x)",
        fin.parts_digest, digest_));
  }
  if (options_.reject_zero_kda_state) {
    for (const PartSlot& s : table_->slots()) {
      if (s.kind == PartKind::kKdaState && s.shape.rows > 0 && !s.any_nonzero) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "state bundle KDA layer %d recurrent state is all zeros after %d tokens: the sender "
            "shipped an unwritten state",
            s.layer, header_->num_tokens));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SequenceState> BundleAssembler::Finish() {
  absl::MutexLock lock(&mu_);
  if (phase_ != Phase::kOpen) return TerminalStatus();
  if (!header_.has_value()) {
    return absl::FailedPreconditionError("state bundle incomplete: no header record received");
  }
  if (in_flight_ > 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("state bundle incomplete: %d parts are still being added", in_flight_));
  }
  if (!table_->Complete()) {
    const std::string missing = table_->DescribeMissing(4);
    if (final_.has_value()) {
      return Fail(absl::DataLossError(absl::StrFormat(
          "state bundle '%s': the final record arrived but parts are missing: %s",
          header_->request_id, missing)));
    }
    return absl::FailedPreconditionError(absl::StrFormat(
        "state bundle '%s' incomplete (no final record yet): missing %s", header_->request_id,
        missing));
  }
  if (!final_.has_value()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "state bundle '%s': every part arrived but the final record has not",
        header_->request_id));
  }
  const absl::Status verified = Verify();
  if (!verified.ok()) return Fail(verified);
  phase_ = Phase::kFinished;
  state_.num_tokens = header_->num_tokens;
  table_.reset();
  return std::exchange(state_, SequenceState());
}

void BundleAssembler::Abort() {
  absl::MutexLock lock(&mu_);
  if (phase_ == Phase::kOpen) phase_ = Phase::kAborted;  // a failure stays the answer
  mu_.Await(absl::Condition(+[](int64_t* n) { return *n == 0; }, &in_flight_));
  ReleaseIfIdle();
}

std::optional<BundleHeader> BundleAssembler::header() const {
  absl::MutexLock lock(&mu_);
  return header_;
}

AssemblerProgress BundleAssembler::progress() const {
  absl::MutexLock lock(&mu_);
  AssemblerProgress p;
  p.has_header = header_.has_value();
  p.has_final = final_.has_value();
  p.parts_received = parts_;
  p.payload_bytes_received = payload_bytes_;
  if (table_ != nullptr) p.expected_payload_bytes = table_->ExpectedPayloadBytes();
  return p;
}

}  // namespace kl
