// Byte-level encode / parse of StateBundle records. Offsets match FORMAT.md.
#include "engine/state/bundle_format.h"

#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "kernels/common/crc32c.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "wire format is little-endian");

// --- prefix offsets (all record types)
constexpr size_t kOffMagic = 0, kOffVersion = 4, kOffType = 5, kOffHeaderBytes = 6;
constexpr size_t kOffRecordCrc = 8, kOffPayloadCrc = 12, kOffBundleId = 16, kOffPayloadBytes = 24;
// --- header record body
constexpr size_t kOffModelFp = 32, kOffCheckpointFp = 40, kOffNumTokens = 48, kOffFirstToken = 56;
constexpr size_t kOffNumLayers = 64, kOffKdaHeads = 68, kOffKdaKeyDim = 72, kOffKdaValueDim = 76;
constexpr size_t kOffConvKernel = 80, kOffMlaRank = 84, kOffMlaRope = 88;
constexpr size_t kOffKdaDType = 92, kOffKdaLayout = 93, kOffConvDType = 94, kOffConvLayout = 95;
constexpr size_t kOffMlaDType = 96, kOffMlaLayout = 97, kOffRequestIdBytes = 98;
constexpr size_t kOffHiddenSize = 100;
// --- part record body
constexpr size_t kOffPartKind = 32, kOffPartDType = 33, kOffPartReserved = 34;  // u16 reserved
constexpr size_t kOffPartLayer = 36, kOffRowBegin = 40, kOffRowEnd = 48;
// --- final record body
constexpr size_t kOffPartCount = 32, kOffTotalBytes = 40, kOffDigest = 48;
constexpr size_t kOffHeaderCrc = 56, kOffFinalReserved = 60;  // u32 reserved

// Largest payload a record may declare (sanity bound against overflow).
constexpr uint64_t kMaxPayloadBytes = uint64_t{1} << 48;

template <typename T>
void Put(char* base, size_t off, T v) {
  std::memcpy(base + off, &v, sizeof(T));
}
template <typename T>
T Get(const char* base, size_t off) {
  T v;
  std::memcpy(&v, base + off, sizeof(T));
  return v;
}

// CRC-32C over the record header [0, H) with the record-CRC field [8, 12) skipped.
uint32_t ComputeRecordCrc(const char* p, size_t header_bytes) {
  return Crc32c(p + 12, header_bytes - 12, Crc32c(p, 8));
}

void PutPrefix(char* p, RecordType type, size_t header_bytes, uint64_t bundle_id,
               uint64_t payload_bytes, uint32_t payload_crc) {
  Put<uint32_t>(p, kOffMagic, kBundleMagic);
  Put<uint8_t>(p, kOffVersion, kBundleFormatVersion);
  Put<uint8_t>(p, kOffType, static_cast<uint8_t>(type));
  Put<uint16_t>(p, kOffHeaderBytes, static_cast<uint16_t>(header_bytes));
  Put<uint32_t>(p, kOffPayloadCrc, payload_crc);
  Put<uint64_t>(p, kOffBundleId, bundle_id);
  Put<uint64_t>(p, kOffPayloadBytes, payload_bytes);
}

void SealRecord(char* p, size_t header_bytes) {
  Put<uint32_t>(p, kOffRecordCrc, ComputeRecordCrc(p, header_bytes));
}

size_t RecordBytesFor(RecordType type) {
  switch (type) {
    case RecordType::kHeader: return kHeaderRecordBytes;
    case RecordType::kPart: return kPartRecordBytes;
    case RecordType::kFinal: return kFinalRecordBytes;
  }
  return 0;
}

bool IsPayloadDType(uint8_t v) {
  return v == static_cast<uint8_t>(DType::kF32) || v == static_cast<uint8_t>(DType::kBF16);
}

absl::Status CheckPayloadDType(uint8_t v, const char* what) {
  if (IsPayloadDType(v)) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "state bundle %s dtype code %d is not supported (format v1 carries F32 or BF16)", what, v));
}

absl::Status ParseHeaderBody(const char* p, std::string_view payload, BundleHeader* h) {
  h->model_fingerprint = Get<uint64_t>(p, kOffModelFp);
  h->checkpoint_fingerprint = Get<uint64_t>(p, kOffCheckpointFp);
  h->num_tokens = Get<int64_t>(p, kOffNumTokens);
  h->first_token = Get<int64_t>(p, kOffFirstToken);
  const uint32_t num_layers = Get<uint32_t>(p, kOffNumLayers);
  h->kda_num_heads = Get<uint32_t>(p, kOffKdaHeads);
  h->kda_key_dim = Get<uint32_t>(p, kOffKdaKeyDim);
  h->kda_value_dim = Get<uint32_t>(p, kOffKdaValueDim);
  h->conv_kernel_size = Get<uint32_t>(p, kOffConvKernel);
  h->mla_kv_lora_rank = Get<uint32_t>(p, kOffMlaRank);
  h->mla_rope_dim = Get<uint32_t>(p, kOffMlaRope);
  const uint16_t request_id_bytes = Get<uint16_t>(p, kOffRequestIdBytes);
  h->hidden_size = Get<uint32_t>(p, kOffHiddenSize);
  RETURN_IF_ERROR(CheckPayloadDType(Get<uint8_t>(p, kOffKdaDType), "KDA state"));
  RETURN_IF_ERROR(CheckPayloadDType(Get<uint8_t>(p, kOffConvDType), "conv tail"));
  RETURN_IF_ERROR(CheckPayloadDType(Get<uint8_t>(p, kOffMlaDType), "MLA latent"));
  h->kda_state_dtype = static_cast<DType>(Get<uint8_t>(p, kOffKdaDType));
  h->conv_dtype = static_cast<DType>(Get<uint8_t>(p, kOffConvDType));
  h->mla_dtype = static_cast<DType>(Get<uint8_t>(p, kOffMlaDType));
  const uint8_t kda_layout = Get<uint8_t>(p, kOffKdaLayout);
  const uint8_t conv_layout = Get<uint8_t>(p, kOffConvLayout);
  const uint8_t mla_layout = Get<uint8_t>(p, kOffMlaLayout);
  if (kda_layout != 1 && kda_layout != 2) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "state bundle KDA state layout tag %d is unknown to this worker (known: 1 = f32 "
        "[H][K][V], 2 = [H][V][K] V-first); refusing rather than guessing",
        kda_layout));
  }
  if (conv_layout != 1 && conv_layout != 2) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "state bundle conv tail layout tag %d is unknown to this worker (known: 1 = "
        "[W-1][C] time-major, 2 = [C][W-1] channel-major)",
        conv_layout));
  }
  if (mla_layout != 1) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "state bundle MLA latent layout tag %d is unknown to this worker (known: 1 = "
        "[T][c ; k_pe])",
        mla_layout));
  }
  h->kda_state_layout = static_cast<KdaStateLayout>(kda_layout);
  h->conv_layout = static_cast<ConvTailLayout>(conv_layout);
  h->mla_layout = static_cast<MlaLatentLayout>(mla_layout);
  if (request_id_bytes > kMaxRequestIdBytes ||
      payload.size() != uint64_t{num_layers} + request_id_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle header: payload of %d bytes does not hold %d layer kinds and a %d-byte "
        "request id (max %d)",
        payload.size(), num_layers, request_id_bytes, kMaxRequestIdBytes));
  }
  h->layer_kinds.assign(payload.begin(), payload.begin() + num_layers);
  for (uint32_t i = 0; i < num_layers; ++i) {
    if (h->layer_kinds[i] != kWireLayerKda && h->layer_kinds[i] != kWireLayerMla) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "state bundle header: layer %d has unknown kind %d", i, h->layer_kinds[i]));
    }
  }
  h->request_id.assign(payload.substr(num_layers));
  return absl::OkStatus();
}

absl::Status ParsePartBody(const char* p, uint64_t payload_bytes, PartRecord* r) {
  const uint8_t kind = Get<uint8_t>(p, kOffPartKind);
  if (kind < 1 || kind > 5) {
    return absl::InvalidArgumentError(
        absl::StrFormat("state bundle part: unknown part kind %d", kind));
  }
  RETURN_IF_ERROR(CheckPayloadDType(Get<uint8_t>(p, kOffPartDType), "part"));
  if (Get<uint16_t>(p, kOffPartReserved) != 0) {
    return absl::InvalidArgumentError("state bundle part: reserved bytes are not zero");
  }
  r->kind = static_cast<PartKind>(kind);
  r->dtype = static_cast<DType>(Get<uint8_t>(p, kOffPartDType));
  r->layer = Get<uint32_t>(p, kOffPartLayer);
  r->row_begin = Get<uint64_t>(p, kOffRowBegin);
  r->row_end = Get<uint64_t>(p, kOffRowEnd);
  r->payload_bytes = payload_bytes;
  if (r->row_begin >= r->row_end) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state bundle part %s layer %d: empty or inverted row range [%d, %d)",
        PartKindName(r->kind), r->layer, r->row_begin, r->row_end));
  }
  return absl::OkStatus();
}

absl::Status ParseFinalBody(const char* p, uint64_t payload_bytes, FinalRecord* f) {
  if (payload_bytes != 0 || Get<uint32_t>(p, kOffFinalReserved) != 0) {
    return absl::InvalidArgumentError(
        "state bundle final record: payload or reserved bytes are not empty");
  }
  f->part_count = Get<uint64_t>(p, kOffPartCount);
  f->total_payload_bytes = Get<uint64_t>(p, kOffTotalBytes);
  f->parts_digest = Get<uint64_t>(p, kOffDigest);
  f->header_record_crc = Get<uint32_t>(p, kOffHeaderCrc);
  return absl::OkStatus();
}

uint64_t Mix64(uint64_t x) {  // splitmix64 finaliser
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

std::string_view PartKindName(PartKind kind) {
  switch (kind) {
    case PartKind::kKdaState: return "kda_state";
    case PartKind::kConvQ: return "conv_q";
    case PartKind::kConvK: return "conv_k";
    case PartKind::kConvV: return "conv_v";
    case PartKind::kMlaLatent: return "mla_latent";
  }
  return "unknown_part";
}

std::string_view RecordTypeName(RecordType type) {
  switch (type) {
    case RecordType::kHeader: return "header";
    case RecordType::kPart: return "part";
    case RecordType::kFinal: return "final";
  }
  return "unknown";
}

std::string_view KdaStateLayoutName(KdaStateLayout layout) {
  return layout == KdaStateLayout::kHKV ? "[H][K][V]" : "[H][V][K]";
}

std::string_view ConvTailLayoutName(ConvTailLayout layout) {
  return layout == ConvTailLayout::kTimeMajor ? "[W-1][C]" : "[C][W-1]";
}

absl::StatusOr<uint64_t> FrameSizeFromPrefix(std::string_view prefix) {
  if (prefix.size() < kRecordPrefixBytes) {
    return absl::DataLossError(absl::StrFormat(
        "state bundle frame of %d bytes is shorter than the %d-byte record prefix",
        prefix.size(), kRecordPrefixBytes));
  }
  const char* p = prefix.data();
  const uint32_t magic = Get<uint32_t>(p, kOffMagic);
  if (magic != kBundleMagic) {
    return absl::DataLossError(
        absl::StrFormat("not a state bundle frame: magic 0x%08x, expected 0x%08x", magic,
                        kBundleMagic));
  }
  const uint8_t version = Get<uint8_t>(p, kOffVersion);
  if (version != kBundleFormatVersion) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "state bundle format version %d is not supported by this worker (it reads version %d)",
        version, kBundleFormatVersion));
  }
  const uint8_t type = Get<uint8_t>(p, kOffType);
  if (type < 1 || type > 3) {
    return absl::DataLossError(absl::StrFormat("state bundle frame: unknown record type %d", type));
  }
  const size_t want_header = RecordBytesFor(static_cast<RecordType>(type));
  const uint16_t header_bytes = Get<uint16_t>(p, kOffHeaderBytes);
  if (header_bytes != want_header) {
    return absl::DataLossError(absl::StrFormat(
        "state bundle %s record: header size %d, expected %d",
        RecordTypeName(static_cast<RecordType>(type)), header_bytes, want_header));
  }
  const uint64_t payload_bytes = Get<uint64_t>(p, kOffPayloadBytes);
  if (payload_bytes > kMaxPayloadBytes) {
    return absl::DataLossError(
        absl::StrFormat("state bundle frame: implausible payload size %d", payload_bytes));
  }
  return header_bytes + payload_bytes;
}

absl::StatusOr<ParsedFrame> ParseFrame(std::string_view frame, bool verify_payload) {
  ASSIGN_OR_RETURN(const uint64_t frame_bytes, FrameSizeFromPrefix(frame));
  if (frame.size() != frame_bytes) {
    return absl::DataLossError(absl::StrFormat(
        "state bundle frame has %d bytes but its record says %d (truncated or run together)",
        frame.size(), frame_bytes));
  }
  const char* p = frame.data();
  ParsedFrame out;
  out.type = static_cast<RecordType>(Get<uint8_t>(p, kOffType));
  const size_t header_bytes = Get<uint16_t>(p, kOffHeaderBytes);
  out.record_crc = Get<uint32_t>(p, kOffRecordCrc);
  const uint32_t computed = ComputeRecordCrc(p, header_bytes);
  if (computed != out.record_crc) {
    return absl::DataLossError(absl::StrFormat(
        "state bundle %s record is corrupt: record CRC 0x%08x, computed 0x%08x",
        RecordTypeName(out.type), out.record_crc, computed));
  }
  out.bundle_id = Get<uint64_t>(p, kOffBundleId);
  const std::string_view payload = frame.substr(header_bytes);
  const uint32_t payload_crc = Get<uint32_t>(p, kOffPayloadCrc);
  switch (out.type) {
    case RecordType::kHeader:
      RETURN_IF_ERROR(ParseHeaderBody(p, payload, &out.header));
      out.header.bundle_id = out.bundle_id;
      break;
    case RecordType::kPart:
      RETURN_IF_ERROR(ParsePartBody(p, payload.size(), &out.part));
      out.part.bundle_id = out.bundle_id;
      out.part.payload_crc = payload_crc;
      out.payload = payload;
      break;
    case RecordType::kFinal:
      RETURN_IF_ERROR(ParseFinalBody(p, payload.size(), &out.final));
      out.final.bundle_id = out.bundle_id;
      break;
  }
  if (out.type == RecordType::kPart) {
    if (verify_payload) {
      RETURN_IF_ERROR(CheckPartPayloadCrc(out.part, Crc32c(payload.data(), payload.size())));
    }
  } else {
    const uint32_t computed_payload = Crc32c(payload.data(), payload.size());
    if (computed_payload != payload_crc) {
      return absl::DataLossError(absl::StrFormat(
          "state bundle %s record: payload CRC mismatch (stored 0x%08x, computed 0x%08x)",
          RecordTypeName(out.type), payload_crc, computed_payload));
    }
  }
  return out;
}

absl::Status CheckPartPayloadCrc(const PartRecord& part, uint32_t computed) {
  if (computed == part.payload_crc) return absl::OkStatus();
  return absl::DataLossError(absl::StrFormat(
      "state bundle part %s layer %d rows [%d, %d): payload CRC mismatch (stored 0x%08x, "
      "computed 0x%08x over %d bytes)",
      PartKindName(part.kind), part.layer, part.row_begin, part.row_end, part.payload_crc,
      computed, part.payload_bytes));
}

std::string EncodeHeaderFrame(const BundleHeader& h) {
  std::string payload(h.layer_kinds.begin(), h.layer_kinds.end());
  payload += h.request_id;
  std::string f(kHeaderRecordBytes, '\0');
  char* p = f.data();
  PutPrefix(p, RecordType::kHeader, kHeaderRecordBytes, h.bundle_id, payload.size(),
            Crc32c(payload.data(), payload.size()));
  Put<uint64_t>(p, kOffModelFp, h.model_fingerprint);
  Put<uint64_t>(p, kOffCheckpointFp, h.checkpoint_fingerprint);
  Put<int64_t>(p, kOffNumTokens, h.num_tokens);
  Put<int64_t>(p, kOffFirstToken, h.first_token);
  Put<uint32_t>(p, kOffNumLayers, static_cast<uint32_t>(h.layer_kinds.size()));
  Put<uint32_t>(p, kOffKdaHeads, h.kda_num_heads);
  Put<uint32_t>(p, kOffKdaKeyDim, h.kda_key_dim);
  Put<uint32_t>(p, kOffKdaValueDim, h.kda_value_dim);
  Put<uint32_t>(p, kOffConvKernel, h.conv_kernel_size);
  Put<uint32_t>(p, kOffMlaRank, h.mla_kv_lora_rank);
  Put<uint32_t>(p, kOffMlaRope, h.mla_rope_dim);
  Put<uint8_t>(p, kOffKdaDType, static_cast<uint8_t>(h.kda_state_dtype));
  Put<uint8_t>(p, kOffKdaLayout, static_cast<uint8_t>(h.kda_state_layout));
  Put<uint8_t>(p, kOffConvDType, static_cast<uint8_t>(h.conv_dtype));
  Put<uint8_t>(p, kOffConvLayout, static_cast<uint8_t>(h.conv_layout));
  Put<uint8_t>(p, kOffMlaDType, static_cast<uint8_t>(h.mla_dtype));
  Put<uint8_t>(p, kOffMlaLayout, static_cast<uint8_t>(h.mla_layout));
  Put<uint16_t>(p, kOffRequestIdBytes, static_cast<uint16_t>(h.request_id.size()));
  Put<uint32_t>(p, kOffHiddenSize, h.hidden_size);
  SealRecord(p, kHeaderRecordBytes);
  f += payload;
  return f;
}

std::string EncodeFinalFrame(const FinalRecord& r) {
  std::string f(kFinalRecordBytes, '\0');
  char* p = f.data();
  PutPrefix(p, RecordType::kFinal, kFinalRecordBytes, r.bundle_id, 0, 0);
  Put<uint64_t>(p, kOffPartCount, r.part_count);
  Put<uint64_t>(p, kOffTotalBytes, r.total_payload_bytes);
  Put<uint64_t>(p, kOffDigest, r.parts_digest);
  Put<uint32_t>(p, kOffHeaderCrc, r.header_record_crc);
  SealRecord(p, kFinalRecordBytes);
  return f;
}

void WritePartRecordHeader(const PartRecord& r, char* p) {
  std::memset(p, 0, kPartRecordBytes);
  PutPrefix(p, RecordType::kPart, kPartRecordBytes, r.bundle_id, r.payload_bytes, r.payload_crc);
  Put<uint8_t>(p, kOffPartKind, static_cast<uint8_t>(r.kind));
  Put<uint8_t>(p, kOffPartDType, static_cast<uint8_t>(r.dtype));
  Put<uint32_t>(p, kOffPartLayer, r.layer);
  Put<uint64_t>(p, kOffRowBegin, r.row_begin);
  Put<uint64_t>(p, kOffRowEnd, r.row_end);
  SealRecord(p, kPartRecordBytes);
}

uint32_t StoredRecordCrc(std::string_view frame) {
  return frame.size() >= kRecordPrefixBytes ? Get<uint32_t>(frame.data(), kOffRecordCrc) : 0;
}

uint64_t PartDigestTerm(const PartRecord& r) {
  uint64_t h = Mix64(static_cast<uint64_t>(r.kind) | (static_cast<uint64_t>(r.dtype) << 8) |
                     (static_cast<uint64_t>(r.layer) << 32));
  h = Mix64(h ^ r.row_begin);
  h = Mix64(h ^ r.row_end);
  h = Mix64(h ^ r.payload_bytes);
  return Mix64(h ^ r.payload_crc);
}

PartShape WireShape(const BundleHeader& h, PartKind kind) {
  const uint64_t steps = h.conv_kernel_size > 0 ? h.conv_kernel_size - 1 : 0;
  switch (kind) {
    case PartKind::kKdaState:
      return {h.kda_num_heads, uint64_t{h.kda_key_dim} * h.kda_value_dim};
    case PartKind::kConvQ:
    case PartKind::kConvK:
    case PartKind::kConvV: {
      const uint64_t channels =
          uint64_t{h.kda_num_heads} * (kind == PartKind::kConvV ? h.kda_value_dim : h.kda_key_dim);
      if (h.conv_layout == ConvTailLayout::kTimeMajor || steps == 0) return {steps, channels};
      return {channels, steps};
    }
    case PartKind::kMlaLatent:
      return {static_cast<uint64_t>(h.num_tokens > 0 ? h.num_tokens : 0),
              uint64_t{h.mla_kv_lora_rank} + h.mla_rope_dim};
  }
  return {};
}

DType HeaderDType(const BundleHeader& h, PartKind kind) {
  switch (kind) {
    case PartKind::kKdaState: return h.kda_state_dtype;
    case PartKind::kMlaLatent: return h.mla_dtype;
    default: return h.conv_dtype;
  }
}

}  // namespace kl
