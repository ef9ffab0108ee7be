// Fuzz target: the StateBundle decoder (engine/state: ParseFrame,
// BundleAssembler, DeserializeBundle) for a small model (FuzzBundleConfig).
// Input: one control byte, then a blob of concatenated frames.
//   control bit 0: recompute each frame's record CRC, bit 1: each part's
//   payload CRC (else nearly every mutation dies at a CRC check and the
//   semantic checks behind it are never reached); bit 2: accept non-finite
//   values; bit 3: accept an all-zero KDA state; bit 4: feed the frames in
//   reverse order.
// A bundle that assembles must have the config's shapes, and re-encoding the
// decoded state must decode to exactly the same state.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "engine/state/bundle_assembler.h"
#include "engine/state/bundle_format.h"
#include "engine/state/state_bundle.h"
#include "kernels/common/crc32c.h"
#include "tests/fuzz/fuzz_interface.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

// Recomputes the CRCs the control byte asks for; leaves frames too short to
// carry them alone.
void FixCrcs(std::string* frame, bool record_crc, bool payload_crc) {
  if (frame->size() < kl::kRecordPrefixBytes) return;
  uint16_t header_bytes;
  std::memcpy(&header_bytes, frame->data() + 6, 2);
  if (header_bytes < kl::kRecordPrefixBytes || header_bytes > frame->size()) return;
  if (payload_crc && static_cast<uint8_t>((*frame)[5]) == static_cast<uint8_t>(kl::RecordType::kPart)) {
    const uint32_t crc = kl::Crc32c(frame->data() + header_bytes, frame->size() - header_bytes);
    std::memcpy(frame->data() + 12, &crc, 4);
  }
  if (record_crc) {
    const uint32_t crc =
        kl::Crc32c(frame->data() + 12, header_bytes - 12, kl::Crc32c(frame->data(), 8));
    std::memcpy(frame->data() + 8, &crc, 4);
  }
}

void CheckShapes(const kl::ModelConfig& config, const kl::SequenceState& s) {
  KL_FUZZ_CHECK(static_cast<int64_t>(s.kda.size()) == config.NumKdaLayers(), "KDA layer count");
  KL_FUZZ_CHECK(static_cast<int64_t>(s.mla.size()) == config.NumMlaLayers(), "MLA layer count");
  for (const auto& l : s.kda) {
    KL_FUZZ_CHECK(static_cast<int64_t>(l.recurrent.size()) == config.KdaStateElems(), "KDA state size");
    KL_FUZZ_CHECK(static_cast<int64_t>(l.conv_q.size()) == config.ConvTailElems(), "conv tail size");
    KL_FUZZ_CHECK(l.conv_k.size() == l.conv_q.size() && l.conv_v.size() == l.conv_q.size(),
                  "conv tail sizes differ");
  }
  for (const auto& m : s.mla) {
    KL_FUZZ_CHECK(static_cast<int64_t>(m.latent.size()) == s.num_tokens * config.MlaLatentDim(),
                  "MLA latent size");
  }
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t control = data[0];
  const std::string_view blob(reinterpret_cast<const char*>(data + 1), size - 1);
  const kl::ModelConfig config = kl::fuzz::FuzzBundleConfig();
  kl::AssemblerOptions options;
  options.reject_non_finite = (control & 4) == 0;
  options.reject_zero_kda_state = (control & 8) == 0;

  absl::StatusOr<std::vector<std::string_view>> split = kl::SplitFrames(blob);
  if (!split.ok()) {
    // The one-call decoder must refuse it the same way, without crashing.
    KL_FUZZ_CHECK(!kl::DeserializeBundle(blob, config, options).ok(), "unsplittable blob decoded");
    return 0;
  }
  std::vector<std::string> frames;
  for (std::string_view f : *split) {
    frames.emplace_back(f);
    FixCrcs(&frames.back(), (control & 1) != 0, (control & 2) != 0);
    (void)kl::ParseFrame(frames.back(), /*verify_payload=*/true);
    (void)kl::FrameSizeFromPrefix(std::string_view(frames.back()).substr(0, kl::kRecordPrefixBytes));
  }
  if (control & 16) std::reverse(frames.begin(), frames.end());

  kl::BundleAssembler assembler(config, options);
  for (const std::string& f : frames) {
    if (!assembler.Add(f).ok()) break;  // errors are sticky; the rest would be refused
    (void)assembler.progress();
  }
  absl::StatusOr<kl::SequenceState> state = assembler.Finish();
  if (!state.ok()) return 0;

  CheckShapes(config, *state);
  KL_FUZZ_CHECK(state->num_tokens >= 1 && state->num_tokens <= config.model_max_length,
                "token count out of range");
  // Re-encode exactly (F32, canonical layouts) and decode again: same bits.
  kl::BundleMeta meta;
  meta.request_id = "fuzz";
  absl::StatusOr<std::string> again = kl::SerializeBundle(config, *state, meta);
  KL_FUZZ_CHECK(again.ok(), std::string(again.status().ToString()).c_str());
  absl::StatusOr<kl::DecodedBundle> decoded = kl::DeserializeBundle(*again, config, options);
  KL_FUZZ_CHECK(decoded.ok(), std::string(decoded.status().ToString()).c_str());
  KL_FUZZ_CHECK(decoded->state.num_tokens == state->num_tokens, "token count changed");
  for (size_t i = 0; i < state->kda.size(); ++i) {
    KL_FUZZ_CHECK(SameBits(decoded->state.kda[i].recurrent, state->kda[i].recurrent) &&
                      SameBits(decoded->state.kda[i].conv_q, state->kda[i].conv_q) &&
                      SameBits(decoded->state.kda[i].conv_k, state->kda[i].conv_k) &&
                      SameBits(decoded->state.kda[i].conv_v, state->kda[i].conv_v),
                  "KDA state changed in a round trip");
  }
  for (size_t i = 0; i < state->mla.size(); ++i) {
    KL_FUZZ_CHECK(SameBits(decoded->state.mla[i].latent, state->mla[i].latent),
                  "MLA latents changed in a round trip");
  }
  return 0;
}
