#include "engine/state/state_bundle.h"

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

absl::Status CheckStateShape(const ModelConfig& c, const SequenceState& s) {
  if (static_cast<int64_t>(s.kda.size()) != c.NumKdaLayers() ||
      static_cast<int64_t>(s.mla.size()) != c.NumMlaLayers()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state has %d KDA and %d MLA layers, the config %d and %d", s.kda.size(), s.mla.size(),
        c.NumKdaLayers(), c.NumMlaLayers()));
  }
  const size_t latent = static_cast<size_t>(s.num_tokens) * c.MlaLatentDim();
  for (size_t i = 0; i < s.mla.size(); ++i) {
    if (s.mla[i].latent.size() != latent) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "MLA layer #%d holds %d latent values, expected %d tokens x %d", i,
          s.mla[i].latent.size(), s.num_tokens, c.MlaLatentDim()));
    }
  }
  return absl::OkStatus();  // KDA sizes are checked by BundleWriter::AddKdaLayer
}

}  // namespace

absl::StatusOr<std::vector<BundleFrame>> EncodeBundle(const ModelConfig& config,
                                                      const SequenceState& state,
                                                      const BundleMeta& meta,
                                                      const BundleOptions& options) {
  if (options.kda_state_layout != KdaStateLayout::kHKV ||
      options.conv_layout != ConvTailLayout::kTimeMajor) {
    return absl::InvalidArgumentError(
        "EncodeBundle ships a SequenceState, whose layouts are [H][K][V] and [W-1][C]; use "
        "BundleWriter for buffers in other layouts");
  }
  RETURN_IF_ERROR(CheckStateShape(config, state));
  ASSIGN_OR_RETURN(std::unique_ptr<BundleWriter> writer,
                   BundleWriter::Create(config, state.num_tokens, meta, options));
  std::vector<BundleFrame> frames;
  frames.push_back(writer->HeaderFrame());
  int64_t kda = 0, mla = 0;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    std::vector<BundleFrame> parts;
    if (config.IsKda(layer)) {
      ASSIGN_OR_RETURN(parts, writer->AddKdaLayer(layer, state.kda[kda++]));
    } else {
      ASSIGN_OR_RETURN(parts, writer->AddMlaRows(layer, 0, state.mla[mla++].latent));
    }
    for (BundleFrame& f : parts) frames.push_back(std::move(f));
  }
  ASSIGN_OR_RETURN(BundleFrame final_frame, writer->Finish());
  frames.push_back(std::move(final_frame));
  return frames;
}

absl::StatusOr<std::string> SerializeBundle(const ModelConfig& config, const SequenceState& state,
                                            const BundleMeta& meta,
                                            const BundleOptions& options) {
  ASSIGN_OR_RETURN(const std::vector<BundleFrame> frames,
                   EncodeBundle(config, state, meta, options));
  size_t total = 0;
  for (const BundleFrame& f : frames) total += f.bytes.size();
  std::string blob;
  blob.reserve(total);
  for (const BundleFrame& f : frames) blob += f.bytes;
  return blob;
}

absl::StatusOr<std::vector<std::string_view>> SplitFrames(std::string_view blob) {
  std::vector<std::string_view> frames;
  size_t at = 0;
  while (at < blob.size()) {
    const std::string_view rest = blob.substr(at);
    absl::StatusOr<uint64_t> size = FrameSizeFromPrefix(rest);
    if (!size.ok()) {
      return absl::Status(size.status().code(),
                          absl::StrFormat("at blob offset %d: %s", at, size.status().message()));
    }
    if (*size > rest.size()) {
      return absl::DataLossError(absl::StrFormat(
          "state bundle blob truncated: the frame at offset %d needs %d bytes, %d remain", at,
          *size, rest.size()));
    }
    frames.push_back(rest.substr(0, *size));
    at += *size;
  }
  return frames;
}

absl::StatusOr<DecodedBundle> DeserializeBundle(std::string_view blob, const ModelConfig& config,
                                                const AssemblerOptions& options) {
  ASSIGN_OR_RETURN(const std::vector<std::string_view> frames, SplitFrames(blob));
  BundleAssembler assembler(config, options);
  for (std::string_view f : frames) RETURN_IF_ERROR(assembler.Add(f));
  DecodedBundle out;
  ASSIGN_OR_RETURN(out.state, assembler.Finish());
  out.header = *assembler.header();
  return out;
}

}  // namespace kl
