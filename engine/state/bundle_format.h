// The StateBundle wire records (engine/state/FORMAT.md is the normative text):
// fixed little-endian record layouts, their CRC-32C checks and the part
// geometry. Knows no ModelConfig and no SequenceState, so a transport can frame,
// count and label records (PeekFrame) without the model layout.
//
// A bundle is a sequence of self-delimiting frames, one record each:
//   header  (exactly one, first): identity, fingerprints, dims, dtypes, layouts;
//   part    (any order):          rows [row_begin, row_end) of one tensor;
//   final   (exactly one, any time after the header): count, bytes, digest.
#ifndef KL_ENGINE_STATE_BUNDLE_FORMAT_H_
#define KL_ENGINE_STATE_BUNDLE_FORMAT_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/common/dtype.h"

namespace kl {

// Bytes "KLSB" read as a little-endian u32.
inline constexpr uint32_t kBundleMagic = 0x42534C4Bu;
// Version of every record layout below. A receiver accepts only versions it
// implements (FORMAT.md "Versioning"); v1 is the only one.
inline constexpr uint8_t kBundleFormatVersion = 1;

// Every record starts with a 32-byte prefix; record header sizes are fixed per type.
inline constexpr size_t kRecordPrefixBytes = 32;
inline constexpr size_t kHeaderRecordBytes = 104;
inline constexpr size_t kPartRecordBytes = 56;
inline constexpr size_t kFinalRecordBytes = 64;
// Longest request id a header may carry.
inline constexpr size_t kMaxRequestIdBytes = 256;

enum class RecordType : uint8_t { kHeader = 1, kPart = 2, kFinal = 3 };

// Which tensor a part carries. Its rows are the leading dimension of the tensor's
// wire layout (heads for a KDA state, time steps or channels for a conv tail,
// tokens for MLA latents).
enum class PartKind : uint8_t {
  kKdaState = 1,   // recurrent state S of one KDA layer
  kConvQ = 2,      // conv tail of q (pre-conv projections)
  kConvK = 3,      // conv tail of k
  kConvV = 4,      // conv tail of v
  kMlaLatent = 5,  // latent cache rows of one MLA layer
};

// Layout tags. Values are wire constants: never renumber, only append.
enum class KdaStateLayout : uint8_t {
  kHKV = 1,  // [H][K][V] row-major, S[h][d_k][d_v] (canonical; fla default, HF)
  kHVK = 2,  // [H][V][K] ("V-first": fla state_v_first, FlashKDA, recent vLLM)
};
enum class ConvTailLayout : uint8_t {
  kTimeMajor = 1,     // [W-1][C], oldest step first (canonical)
  kChannelMajor = 2,  // [C][W-1], oldest step first per channel (vLLM conv state)
};
enum class MlaLatentLayout : uint8_t {
  kLatentThenRope = 1,  // [T][kv_lora_rank + rope]: normalised c, then k_pe
};

// Layer kinds in the header's layer map (same values as kl::LayerKind).
inline constexpr uint8_t kWireLayerKda = 0;
inline constexpr uint8_t kWireLayerMla = 1;

std::string_view PartKindName(PartKind kind);  // "kda_state", "conv_q", ...
std::string_view RecordTypeName(RecordType type);
std::string_view KdaStateLayoutName(KdaStateLayout layout);
std::string_view ConvTailLayoutName(ConvTailLayout layout);

// The header record: everything a receiver checks before accepting any part.
struct BundleHeader {
  uint64_t bundle_id = 0;               // random per bundle; every record repeats it
  uint64_t model_fingerprint = 0;       // StateFingerprint(config) of the sender
  uint64_t checkpoint_fingerprint = 0;  // weights identity; 0 = unknown
  int64_t num_tokens = 0;               // tokens the state has consumed (>= 1)
  int64_t first_token = -1;             // token sampled after the last one; -1 = none
  uint32_t kda_num_heads = 0;           // H
  uint32_t kda_key_dim = 0;             // K
  uint32_t kda_value_dim = 0;           // V
  uint32_t conv_kernel_size = 0;        // W (tails hold W-1 steps)
  uint32_t mla_kv_lora_rank = 0;        // latent c width
  uint32_t mla_rope_dim = 0;            // k_pe width
  uint32_t hidden_size = 0;             // D: not a state dim, but StateFingerprint covers it
  DType kda_state_dtype = DType::kF32;
  KdaStateLayout kda_state_layout = KdaStateLayout::kHKV;
  DType conv_dtype = DType::kF32;
  ConvTailLayout conv_layout = ConvTailLayout::kTimeMajor;
  DType mla_dtype = DType::kF32;
  MlaLatentLayout mla_layout = MlaLatentLayout::kLatentThenRope;
  std::vector<uint8_t> layer_kinds;  // kWireLayerKda / kWireLayerMla per model layer
  std::string request_id;            // for logs; <= kMaxRequestIdBytes
};

// The record header of a part; `payload_bytes` bytes of tensor data follow it.
struct PartRecord {
  uint64_t bundle_id = 0;
  PartKind kind = PartKind::kKdaState;
  DType dtype = DType::kF32;
  uint32_t layer = 0;      // model layer index (0-based, all layers counted)
  uint64_t row_begin = 0;  // rows of the wire tensor's leading dimension
  uint64_t row_end = 0;
  uint64_t payload_bytes = 0;
  uint32_t payload_crc = 0;  // CRC-32C of the payload bytes
};

// The final record: the sender's account of what it sent.
struct FinalRecord {
  uint64_t bundle_id = 0;
  uint64_t part_count = 0;
  uint64_t total_payload_bytes = 0;  // sum of part payload bytes
  uint64_t parts_digest = 0;         // sum mod 2^64 of PartDigestTerm over parts
  uint32_t header_record_crc = 0;    // record CRC of the header it closes
};

// One parsed and verified frame. Which member is meaningful depends on `type`.
struct ParsedFrame {
  RecordType type = RecordType::kHeader;
  uint64_t bundle_id = 0;
  uint32_t record_crc = 0;  // the CRC stored in (and verified for) this record
  BundleHeader header;
  PartRecord part;
  std::string_view payload;  // part payload, a view into the parsed frame
  FinalRecord final;
};

// Size of the whole frame whose first kRecordPrefixBytes bytes are `prefix`
// (for byte-stream transports and blobs). Checks magic, version, type and the
// fixed header size, not the CRC (ParseFrame does). DATA_LOSS / FAILED_PRECONDITION.
absl::StatusOr<uint64_t> FrameSizeFromPrefix(std::string_view prefix);

// Parses one frame: exact size, magic, version (FAILED_PRECONDITION if unknown),
// record CRC, reserved bytes zero, enum values in range, and (if verify_payload)
// the payload CRC. Corruption -> DATA_LOSS naming the record (and part).
// Does not check the contents against a model: BundleAssembler does.
absl::StatusOr<ParsedFrame> ParseFrame(std::string_view frame, bool verify_payload = true);

// OK if `computed` (the CRC-32C of the part's payload) equals part.payload_crc,
// else DATA_LOSS naming the part. For callers that verify the payload
// themselves (ParseFrame with verify_payload = false).
absl::Status CheckPartPayloadCrc(const PartRecord& part, uint32_t computed);

// Encoders. The header and final frames are complete strings.
std::string EncodeHeaderFrame(const BundleHeader& header);
std::string EncodeFinalFrame(const FinalRecord& final);
// Writes a part's record header (prefix included, with both CRCs filled from
// `part`) into dst[0, kPartRecordBytes); the payload must follow it.
void WritePartRecordHeader(const PartRecord& part, char* dst);
// Record CRC of an encoded frame (the u32 at offset 8) — what FinalRecord binds.
uint32_t StoredRecordCrc(std::string_view frame);

// One part's contribution to FinalRecord::parts_digest: a 64-bit mix of its
// identity (kind, dtype, layer, rows), size and payload CRC. Summing makes the
// digest independent of arrival order, and O(1) to keep on both sides.
uint64_t PartDigestTerm(const PartRecord& part);

// Shape of one tensor in its wire layout: `rows` leading rows of `row_elems`
// elements. Zero rows for a conv tail when W == 1.
struct PartShape {
  uint64_t rows = 0;
  uint64_t row_elems = 0;
};
PartShape WireShape(const BundleHeader& header, PartKind kind);
// The dtype the header declares for a kind's parts.
DType HeaderDType(const BundleHeader& header, PartKind kind);

}  // namespace kl

#endif  // KL_ENGINE_STATE_BUNDLE_FORMAT_H_
