#include "engine/state/bundle_writer.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "engine/state/bundle_convert.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

static_assert(static_cast<uint8_t>(LayerKind::kKda) == kWireLayerKda &&
                  static_cast<uint8_t>(LayerKind::kMla) == kWireLayerMla,
              "wire layer kinds mirror kl::LayerKind");

uint64_t RandomBundleId() {
  static thread_local std::mt19937_64 rng([] {
    std::random_device rd;
    const uint64_t t = std::chrono::steady_clock::now().time_since_epoch().count();
    return (uint64_t{rd()} << 32) ^ rd() ^ t;
  }());
  uint64_t id = 0;
  while (id == 0) id = rng();
  return id;
}

absl::Status CheckWireDType(DType t, const char* what) {
  if (t == DType::kF32 || t == DType::kBF16) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "state bundle %s dtype %s is not supported (F32 or BF16)", what, DTypeName(t)));
}

absl::Status CheckDim(int64_t v, const char* name, bool allow_zero) {
  if ((v > 0 || (allow_zero && v == 0)) && v <= int64_t{UINT32_MAX}) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrFormat("state bundle: config field %s = %d is out of range", name, v));
}

absl::StatusOr<BundleHeader> MakeHeader(const ModelConfig& c, int64_t num_tokens,
                                        const BundleMeta& meta, const BundleOptions& o) {
  if (num_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle needs at least 1 consumed token, got %d (a zero-token state is the "
        "zero state; the receiver builds that itself)",
        num_tokens));
  }
  if (meta.request_id.size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle request id is %d bytes (max %d)", meta.request_id.size(),
        kMaxRequestIdBytes));
  }
  if (meta.first_token < -1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("state bundle first_token %d is negative", meta.first_token));
  }
  if (static_cast<int64_t>(c.layer_kinds.size()) != c.num_hidden_layers) {
    return absl::InvalidArgumentError("state bundle: config layer_kinds size != num_hidden_layers");
  }
  RETURN_IF_ERROR(CheckDim(c.hidden_size, "hidden_size", true));
  RETURN_IF_ERROR(CheckDim(c.kda_num_heads, "kda_num_heads", c.NumKdaLayers() == 0));
  RETURN_IF_ERROR(CheckDim(c.kda_head_dim, "kda_head_dim", c.NumKdaLayers() == 0));
  RETURN_IF_ERROR(CheckDim(c.short_conv_kernel_size, "short_conv_kernel_size", false));
  RETURN_IF_ERROR(CheckDim(c.kv_lora_rank, "kv_lora_rank", c.NumMlaLayers() == 0));
  RETURN_IF_ERROR(CheckDim(c.qk_rope_head_dim, "qk_rope_head_dim", true));
  RETURN_IF_ERROR(CheckWireDType(o.kda_state_dtype, "KDA state"));
  RETURN_IF_ERROR(CheckWireDType(o.conv_dtype, "conv tail"));
  RETURN_IF_ERROR(CheckWireDType(o.mla_dtype, "MLA latent"));
  if (o.max_part_payload_bytes < 0 || o.mla_rows_per_part < 0) {
    return absl::InvalidArgumentError("state bundle options: negative part size");
  }
  BundleHeader h;
  h.bundle_id = meta.bundle_id != 0 ? meta.bundle_id : RandomBundleId();
  h.model_fingerprint = StateFingerprint(c);
  h.checkpoint_fingerprint = meta.checkpoint_fingerprint;
  h.num_tokens = num_tokens;
  h.first_token = meta.first_token;
  h.hidden_size = static_cast<uint32_t>(c.hidden_size);
  h.kda_num_heads = static_cast<uint32_t>(c.kda_num_heads);
  h.kda_key_dim = static_cast<uint32_t>(c.kda_head_dim);
  h.kda_value_dim = static_cast<uint32_t>(c.kda_head_dim);  // K = V in Kimi-Linear
  h.conv_kernel_size = static_cast<uint32_t>(c.short_conv_kernel_size);
  h.mla_kv_lora_rank = static_cast<uint32_t>(c.kv_lora_rank);
  h.mla_rope_dim = static_cast<uint32_t>(c.qk_rope_head_dim);
  h.kda_state_dtype = o.kda_state_dtype;
  h.kda_state_layout = o.kda_state_layout;
  h.conv_dtype = o.conv_dtype;
  h.conv_layout = o.conv_layout;
  h.mla_dtype = o.mla_dtype;
  h.mla_layout = MlaLatentLayout::kLatentThenRope;
  for (LayerKind k : c.layer_kinds) h.layer_kinds.push_back(static_cast<uint8_t>(k));
  h.request_id = meta.request_id;
  return h;
}

}  // namespace

absl::StatusOr<std::unique_ptr<BundleWriter>> BundleWriter::Create(const ModelConfig& config,
                                                                   int64_t num_tokens,
                                                                   const BundleMeta& meta,
                                                                   const BundleOptions& options) {
  ASSIGN_OR_RETURN(BundleHeader header, MakeHeader(config, num_tokens, meta, options));
  return std::unique_ptr<BundleWriter>(new BundleWriter(std::move(header), options));
}

BundleWriter::BundleWriter(BundleHeader header, const BundleOptions& options)
    : header_(std::move(header)),
      options_(options),
      header_frame_(EncodeHeaderFrame(header_)),
      table_(header_) {}

BundleFrame BundleWriter::HeaderFrame() const {
  BundleFrame f;
  f.type = RecordType::kHeader;
  f.bytes = header_frame_;
  return f;
}

absl::StatusOr<BundleWriter::Job> BundleWriter::MakeJob(PartKind kind, int64_t layer,
                                                         int64_t row_begin,
                                                         absl::Span<const float> data) {
  absl::MutexLock lock(&mu_);
  PartSlot* slot = layer >= 0 && layer <= int64_t{UINT32_MAX}
                       ? table_.Find(kind, static_cast<uint32_t>(layer))
                       : nullptr;
  if (slot == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle: model layer %d of %d has no %s part", layer, header_.layer_kinds.size(),
        PartKindName(kind)));
  }
  const PartShape shape = slot->shape;
  if (shape.rows * shape.row_elems == 0 && data.empty() && row_begin == 0) {
    return Job{kind, static_cast<uint32_t>(layer), shape, 0, 0, data.data()};  // W == 1: empty
  }
  if (shape.row_elems == 0 || data.size() % shape.row_elems != 0 || row_begin < 0 ||
      static_cast<uint64_t>(row_begin) + data.size() / shape.row_elems > shape.rows) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle %s layer %d: %d values from row %d do not fit [%d rows x %d]",
        PartKindName(kind), layer, data.size(), row_begin, shape.rows, shape.row_elems));
  }
  const uint64_t begin = static_cast<uint64_t>(row_begin);
  return Job{kind, static_cast<uint32_t>(layer), shape, begin,
             begin + data.size() / shape.row_elems, data.data()};
}

absl::Status BundleWriter::Claim(absl::Span<const Job> jobs) {
  absl::MutexLock lock(&mu_);
  if (finished_) return absl::FailedPreconditionError("state bundle writer already finished");
  for (const Job& j : jobs) {
    if (j.row_begin == j.row_end) continue;
    if (table_.Find(j.kind, j.layer)->coverage.Overlaps(j.row_begin, j.row_end)) {
      return absl::AlreadyExistsError(absl::StrFormat(
          "state bundle %s layer %d: rows [%d, %d) were already added", PartKindName(j.kind),
          j.layer, j.row_begin, j.row_end));
    }
  }
  for (const Job& j : jobs) {
    if (j.row_begin < j.row_end) table_.Find(j.kind, j.layer)->coverage.Claim(j.row_begin, j.row_end);
  }
  ++in_flight_;
  return absl::OkStatus();
}

uint64_t BundleWriter::RowsPerPart(const Job& job) const {
  const uint64_t row_bytes = job.shape.row_elems * DTypeSize(HeaderDType(header_, job.kind));
  uint64_t rows = job.shape.rows;
  if (options_.max_part_payload_bytes > 0) {
    rows = std::max<uint64_t>(1, static_cast<uint64_t>(options_.max_part_payload_bytes) / row_bytes);
  }
  if (job.kind == PartKind::kMlaLatent && options_.mla_rows_per_part > 0) {
    rows = std::min<uint64_t>(rows, static_cast<uint64_t>(options_.mla_rows_per_part));
  }
  return std::max<uint64_t>(rows, 1);
}

BundleFrame BundleWriter::EncodePart(const Job& job, uint64_t row_begin, uint64_t row_end,
                                     PartRecord* record) const {
  const DType dtype = HeaderDType(header_, job.kind);
  const size_t n = (row_end - row_begin) * job.shape.row_elems;
  PartRecord rec;
  rec.bundle_id = header_.bundle_id;
  rec.kind = job.kind;
  rec.dtype = dtype;
  rec.layer = job.layer;
  rec.row_begin = row_begin;
  rec.row_end = row_end;
  rec.payload_bytes = n * DTypeSize(dtype);
  BundleFrame frame;
  frame.type = RecordType::kPart;
  frame.kind = job.kind;
  frame.layer = job.layer;
  frame.bytes.reserve(kPartRecordBytes + rec.payload_bytes);
  frame.bytes.append(kPartRecordBytes, '\0');
  const float* src = job.data + (row_begin - job.row_begin) * job.shape.row_elems;
  rec.payload_crc = ExportPayload(src, n, dtype, &frame.bytes, 0);
  WritePartRecordHeader(rec, frame.bytes.data());
  *record = rec;
  return frame;
}

std::vector<BundleFrame> BundleWriter::Emit(absl::Span<const Job> jobs) {
  std::vector<BundleFrame> frames;
  uint64_t bytes = 0, digest = 0;
  for (const Job& job : jobs) {
    const uint64_t step = RowsPerPart(job);
    for (uint64_t b = job.row_begin; b < job.row_end; b += step) {
      PartRecord rec;
      frames.push_back(EncodePart(job, b, std::min(job.row_end, b + step), &rec));
      bytes += rec.payload_bytes;
      digest += PartDigestTerm(rec);
    }
  }
  absl::MutexLock lock(&mu_);
  --in_flight_;
  part_count_ += frames.size();
  payload_bytes_ += bytes;
  digest_ += digest;
  return frames;
}

absl::StatusOr<std::vector<BundleFrame>> BundleWriter::AddRows(PartKind kind, int64_t layer,
                                                               int64_t row_begin,
                                                               absl::Span<const float> data) {
  ASSIGN_OR_RETURN(const Job job, MakeJob(kind, layer, row_begin, data));
  if (job.row_begin == job.row_end) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle %s layer %d: no rows given", PartKindName(kind), layer));
  }
  RETURN_IF_ERROR(Claim({job}));
  return Emit({job});
}

absl::StatusOr<std::vector<BundleFrame>> BundleWriter::AddKdaLayer(
    int64_t layer, absl::Span<const float> recurrent, absl::Span<const float> conv_q,
    absl::Span<const float> conv_k, absl::Span<const float> conv_v) {
  std::vector<Job> jobs;
  const std::pair<PartKind, absl::Span<const float>> tensors[] = {
      {PartKind::kKdaState, recurrent},
      {PartKind::kConvQ, conv_q},
      {PartKind::kConvK, conv_k},
      {PartKind::kConvV, conv_v}};
  for (const auto& [kind, data] : tensors) {
    ASSIGN_OR_RETURN(Job job, MakeJob(kind, layer, 0, data));
    if (job.row_end != job.shape.rows) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "state bundle KDA layer %d: %s has %d values, expected %d", layer, PartKindName(kind),
          data.size(), job.shape.rows * job.shape.row_elems));
    }
    jobs.push_back(job);
  }
  RETURN_IF_ERROR(Claim(jobs));
  return Emit(jobs);
}

absl::StatusOr<std::vector<BundleFrame>> BundleWriter::AddKdaLayer(int64_t layer,
                                                                   const KdaLayerState& s) {
  return AddKdaLayer(layer, s.recurrent, s.conv_q, s.conv_k, s.conv_v);
}

absl::StatusOr<std::vector<BundleFrame>> BundleWriter::AddMlaRows(int64_t layer,
                                                                  int64_t begin_row,
                                                                  absl::Span<const float> rows) {
  return AddRows(PartKind::kMlaLatent, layer, begin_row, rows);
}

absl::StatusOr<BundleFrame> BundleWriter::Finish() {
  absl::MutexLock lock(&mu_);
  if (finished_) return absl::FailedPreconditionError("state bundle writer already finished");
  if (in_flight_ > 0) {
    return absl::FailedPreconditionError(
        absl::StrFormat("state bundle writer: %d Add calls still running", in_flight_));
  }
  if (!table_.Complete()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "cannot finish state bundle for request '%s': missing %s", header_.request_id,
        table_.DescribeMissing(4)));
  }
  finished_ = true;
  FinalRecord rec;
  rec.bundle_id = header_.bundle_id;
  rec.part_count = part_count_;
  rec.total_payload_bytes = payload_bytes_;
  rec.parts_digest = digest_;
  rec.header_record_crc = StoredRecordCrc(header_frame_);
  BundleFrame f;
  f.type = RecordType::kFinal;
  f.bytes = EncodeFinalFrame(rec);
  return f;
}

}  // namespace kl
