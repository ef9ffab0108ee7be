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
  const int64_t bound_rows =
      sizes.max_message_bytes > 0 && sizes.latent_row_bytes > 0
          ? std::clamp<int64_t>(sizes.max_message_bytes / sizes.latent_row_bytes, 1, chunk)
          : chunk;
  for (int64_t begin = 0; begin < num_tokens; begin += chunk) {
    const int64_t end = std::min(num_tokens, begin + chunk);
    const bool last = end == num_tokens;
    for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
      if (config.IsKda(l)) {
        if (!last) continue;
        v1::DeviceMessage m;
        m.set_layer(static_cast<int32_t>(l));
        m.set_kda(true);
        m.set_bytes(sizes.kda_layer_bytes);
        plan.push_back(std::move(m));
        continue;
      }
      // As many pieces as the bound needs, of equal size (no small last piece).
      const int64_t pieces = (end - begin + bound_rows - 1) / bound_rows;
      const int64_t piece_rows = (end - begin + pieces - 1) / pieces;
      for (int64_t row = begin; row < end; row += piece_rows) {
        const int64_t row_end = std::min(end, row + piece_rows);
        v1::DeviceMessage m;
        m.set_layer(static_cast<int32_t>(l));
        m.set_row_begin(row);
        m.set_row_end(row_end);
        m.set_bytes((row_end - row) * sizes.latent_row_bytes);
        plan.push_back(std::move(m));
      }
    }
  }
  return plan;
}

absl::StatusOr<int64_t> LayerMessagesEnd(const std::vector<v1::DeviceMessage>& plan, int64_t next,
                                         int64_t layer, int64_t row_begin, int64_t row_end) {
  const int64_t n = static_cast<int64_t>(plan.size());
  int64_t row = row_begin;
  do {
    if (next >= n) {
      return absl::InternalError(absl::StrCat("layer ", layer, " past the plan's end"));
    }
    const v1::DeviceMessage& m = plan[next];
    if (m.layer() != layer ||
        (!m.kda() && (m.row_begin() != row || m.row_end() <= row || m.row_end() > row_end))) {
      return absl::InternalError(absl::StrCat("layer ", layer, " rows [", row_begin, ", ", row_end,
                                              ") do not match plan message ", next));
    }
    ++next;
    if (m.kda()) break;
    row = m.row_end();
  } while (row < row_end);
  return next;
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
      if (m.bytes() > kMaxMlaMessageBytes) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": MLA message of ", m.bytes(),
                                                       " bytes, at most ", kMaxMlaMessageBytes));
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

namespace {

template <typename Plan>
std::vector<int64_t> MlaBytesOf(const Plan& plan) {
  std::vector<int64_t> out;
  out.reserve(plan.size());
  for (const v1::DeviceMessage& m : plan) out.push_back(m.kda() ? 0 : m.bytes());
  return out;
}

}  // namespace

std::vector<int64_t> MlaBytes(const std::vector<v1::DeviceMessage>& plan) { return MlaBytesOf(plan); }

std::vector<int64_t> MlaBytes(const google::protobuf::RepeatedPtrField<v1::DeviceMessage>& plan) {
  return MlaBytesOf(plan);
}

int64_t StagingCapacity(const std::vector<int64_t>& mla_bytes) {
  int64_t largest = 0, total = 0;
  for (int64_t b : mla_bytes) {
    largest = std::max(largest, AlignStaging(b));
    total += AlignStaging(b);
  }
  return std::max({largest, std::min(total, kGroupStagingBytes), kStagingAlign});
}

int64_t GroupStagingBytes(const std::vector<int64_t>& mla_bytes, int64_t first, int64_t count) {
  int64_t total = 0;
  for (int64_t i = first; i < first + count && i < static_cast<int64_t>(mla_bytes.size()); ++i) {
    total += AlignStaging(mla_bytes[i]);
  }
  return total;
}

absl::Status ValidateGroup(const std::vector<int64_t>& mla_bytes, int64_t next,
                           const MessageGroup& g, int64_t capacity) {
  const int64_t n = static_cast<int64_t>(mla_bytes.size());
  if (g.first != next || g.count < 1 || g.count > kMaxGroupMessages || g.first + g.count > n) {
    return absl::InvalidArgumentError(absl::StrCat("device group [", g.first, ", +", g.count,
                                                   ") does not continue the plan at message ",
                                                   next, " of ", n));
  }
  const int64_t staging = GroupStagingBytes(mla_bytes, g.first, g.count);
  if (staging > capacity) {
    return absl::InvalidArgumentError(absl::StrCat("device group [", g.first, ", +", g.count,
                                                   ") needs ", staging, " staging bytes of ",
                                                   capacity));
  }
  return absl::OkStatus();
}

int64_t FaultTargetMessage(const std::vector<v1::DeviceMessage>& plan, bool mla) {
  for (bool want_mla : {mla, !mla}) {
    for (size_t i = 0; i < plan.size(); ++i) {
      if (plan[i].kda() != want_mla && plan[i].bytes() > 0) return static_cast<int64_t>(i);
    }
  }
  return -1;
}

}  // namespace kl
