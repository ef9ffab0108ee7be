#include "services/transport/transfer_plan.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace kl {

int64_t KdaLayerBytes(const ModelConfig& config) {
  return (config.KdaStateElems() + 3 * config.ConvTailElems()) * int64_t{sizeof(float)};
}

std::vector<v1::DeviceMessage> BuildTransferPlan(const ModelConfig& config, int64_t num_tokens,
                                                 int64_t chunk_tokens, const PlanSizes& sizes) {
  std::vector<v1::DeviceMessage> plan;
  if (num_tokens <= 0) return plan;
  const int64_t chunk = chunk_tokens > 0 ? chunk_tokens : num_tokens;
  for (int64_t begin = 0; begin < num_tokens; begin += chunk) {
    const int64_t end = std::min(num_tokens, begin + chunk);
    const bool last = end == num_tokens;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      v1::DeviceMessage m;
      m.set_layer(static_cast<int32_t>(l));
      if (config.IsKda(l)) {
        if (!last) continue;
        m.set_kda(true);
        m.set_bytes(sizes.kda_layer_bytes);
      } else {
        m.set_row_begin(begin);
        m.set_row_end(end);
        m.set_bytes((end - begin) * sizes.latent_row_bytes);
      }
      plan.push_back(std::move(m));
    }
  }
  return plan;
}

absl::Status ValidateTransferPlan(const google::protobuf::RepeatedPtrField<v1::DeviceMessage>& plan,
                                  const ModelConfig& config, int64_t num_tokens,
                                  const PlanSizes& sizes, PlanSummary* summary) {
  const int64_t layers = config.num_hidden_layers;
  std::vector<int> kda_seen(layers, 0);
  std::vector<int64_t> mla_next(layers, 0);  // next expected row per MLA layer
  PlanSummary s;
  int64_t index = 0;
  for (const v1::DeviceMessage& m : plan) {
    const std::string where = absl::StrCat("device plan message ", index++);
    if (m.layer() < 0 || m.layer() >= layers) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": layer ", m.layer(), " of ", layers));
    }
    if (m.kda() != config.IsKda(m.layer())) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": layer ", m.layer(), " is not a ", m.kda() ? "KDA" : "MLA", " layer"));
    }
    if (m.kda()) {
      if (kda_seen[m.layer()]++ > 0) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": KDA layer ", m.layer(), " twice"));
      }
      if (m.bytes() != sizes.kda_layer_bytes) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": KDA layer of ", m.bytes(),
                                                       " bytes, expected ", sizes.kda_layer_bytes));
      }
    } else {
      if (m.row_begin() != mla_next[m.layer()] || m.row_end() <= m.row_begin() ||
          m.row_end() > num_tokens) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": MLA layer ", m.layer(), " rows [", m.row_begin(), ", ", m.row_end(),
            ") do not continue at row ", mla_next[m.layer()], " of ", num_tokens));
      }
      if (m.bytes() != (m.row_end() - m.row_begin()) * sizes.latent_row_bytes) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": MLA message of ", m.bytes(),
                                                       " bytes for ", m.row_end() - m.row_begin(),
                                                       " rows"));
      }
      mla_next[m.layer()] = m.row_end();
      s.max_mla_bytes = std::max<int64_t>(s.max_mla_bytes, m.bytes());
    }
    s.total_bytes += m.bytes();
  }
  for (int64_t l = 0; l < layers; ++l) {
    if (config.IsKda(l) && kda_seen[l] != 1) {
      return absl::InvalidArgumentError(absl::StrCat("device plan: KDA layer ", l, " missing"));
    }
    if (!config.IsKda(l) && mla_next[l] != num_tokens) {
      return absl::InvalidArgumentError(absl::StrCat("device plan: MLA layer ", l, " covers ",
                                                     mla_next[l], " of ", num_tokens, " rows"));
    }
  }
  if (summary != nullptr) *summary = s;
  return absl::OkStatus();
}

}  // namespace kl
