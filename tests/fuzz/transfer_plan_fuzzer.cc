// Fuzz target: a device transfer's plan and group announcements as a decode
// worker receives them from a prefill peer (services/transport/transfer_plan:
// ValidateTransferPlan, MlaBytes, StagingCapacity, ValidateGroup) and the plans
// a prefill worker builds (BuildTransferPlan, LayerMessagesEnd), for a small
// model (FuzzBundleConfig: one KDA and one MLA layer).
// Input: a 7-byte header, then 2 bytes per announced group, then a serialized
// kl.v1.DeviceTransfer (the plan as it arrives on the PushState stream):
//   bytes 0-1  num_tokens of the received plan (little-endian, mod 512)
//   byte 2     chunk tokens of a built plan (1 + b % 64)
//   byte 3     the built plan's message bound: 0 none, else b * row / 7 + 1
//              bytes (below a row, between rows, many rows)
//   byte 4     tokens of the built plan (1 + b)
//   byte 5     announced groups G (b % 24); then G pairs (first - next as a
//              signed byte, count as a signed byte)
//   byte 6     latent row bytes: 16 << (b % 17), 16 B to 1 MiB (large rows
//              reach the receiver's message limit and the staging bounds)
// Invariants: a received plan is accepted exactly when an independent reading
// of the rules accepts it, a refusal is INVALID_ARGUMENT with a message; for an
// accepted plan the summary adds up, staging holds its largest message, every
// accepted group continues the plan and fits staging, and one message at a
// time is always accepted; every built plan is accepted and its layers'
// reports (in the prefill engine's order) cover it exactly.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "proto/worker.pb.h"
#include "services/transport/transfer_plan.h"
#include "tests/fuzz/fuzz_interface.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

kl::PlanSizes Sizes(const kl::ModelConfig& c, int64_t row_bytes) {
  kl::PlanSizes s;
  s.kda_layer_bytes = kl::KdaLayerBytes(c);
  s.latent_row_bytes = row_bytes;
  return s;
}

// Staging bytes of messages [first, first + count) computed here, not with the
// library's helper: each MLA message rounded up to 256 bytes.
int64_t OwnGroupStaging(const kl::v1::DeviceTransfer& t, int64_t first, int64_t count) {
  int64_t total = 0;
  for (int64_t i = first; i < first + count; ++i) {
    const auto& m = t.messages(static_cast<int>(i));
    if (!m.kda()) total += (m.bytes() + 255) / 256 * 256;
  }
  return total;
}

void CheckRefusal(const absl::Status& s) {
  KL_FUZZ_CHECK(absl::IsInvalidArgument(s), std::string(s.ToString()).c_str());
  KL_FUZZ_CHECK(!s.message().empty(), "refusal without a message");
}

// The rules of ValidateTransferPlan read independently: per layer, the KDA
// messages and the MLA row ranges in plan order.
bool ReferenceAccepts(const kl::v1::DeviceTransfer& t, const kl::ModelConfig& c, int64_t n,
                      const kl::PlanSizes& sizes) {
  std::map<int64_t, std::vector<const kl::v1::DeviceMessage*>> by_layer;
  for (const auto& m : t.messages()) {
    if (m.layer() < 0 || m.layer() >= c.num_hidden_layers) return false;
    if (m.kda() != c.IsKda(m.layer())) return false;
    by_layer[m.layer()].push_back(&m);
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const auto& ms = by_layer[l];
    if (c.IsKda(l)) {
      if (ms.size() != 1 || ms[0]->bytes() != sizes.kda_layer_bytes) return false;
      continue;
    }
    int64_t row = 0;
    for (const auto* m : ms) {
      if (m->row_begin() != row || m->row_end() <= row || m->row_end() > n) return false;
      if (m->bytes() != (m->row_end() - m->row_begin()) * sizes.latent_row_bytes) return false;
      if (m->bytes() > kl::kMaxMlaMessageBytes) return false;
      row = m->row_end();
    }
    if (row != n) return false;
  }
  return true;
}

void CheckReceived(const kl::v1::DeviceTransfer& t, int64_t n, const uint8_t* groups, int g,
                   const kl::ModelConfig& c, int64_t row_bytes) {
  const kl::PlanSizes sizes = Sizes(c, row_bytes);
  kl::PlanSummary summary;
  const absl::Status s = kl::ValidateTransferPlan(t.messages(), c, n, sizes, &summary);
  KL_FUZZ_CHECK(s.ok() == ReferenceAccepts(t, c, n, sizes), "acceptance differs from the rules");
  if (!s.ok()) {
    CheckRefusal(s);
    return;
  }
  int64_t total = 0, largest = 0;
  for (const auto& m : t.messages()) {
    total += m.bytes();
    if (!m.kda()) largest = std::max<int64_t>(largest, m.bytes());
  }
  KL_FUZZ_CHECK(summary.total_bytes == total, "summary total");
  KL_FUZZ_CHECK(summary.max_mla_bytes == largest, "summary largest MLA message");
  const std::vector<int64_t> mla = kl::MlaBytes(t.messages());
  const int64_t capacity = kl::StagingCapacity(mla);
  KL_FUZZ_CHECK(capacity >= kl::AlignStaging(largest) && capacity >= kl::kStagingAlign,
                "staging smaller than the largest message");
  KL_FUZZ_CHECK(capacity <= std::max(kl::AlignStaging(largest), kl::kGroupStagingBytes),
                "staging beyond the group bound");
  const int64_t messages = t.messages_size();
  int64_t next = 0;
  for (int i = 0; i < g; ++i) {
    const kl::MessageGroup group{next + static_cast<int8_t>(groups[2 * i]),
                                 static_cast<int8_t>(groups[2 * i + 1])};
    const absl::Status gs = kl::ValidateGroup(mla, next, group, capacity);
    if (!gs.ok()) {
      CheckRefusal(gs);
      continue;
    }
    KL_FUZZ_CHECK(group.first == next, "an accepted group does not continue the plan");
    KL_FUZZ_CHECK(group.count >= 1 && group.count <= kl::kMaxGroupMessages, "group size");
    KL_FUZZ_CHECK(group.first + group.count <= messages, "group beyond the plan");
    KL_FUZZ_CHECK(OwnGroupStaging(t, group.first, group.count) <= capacity,
                  "an accepted group overflows staging");
    next += group.count;
  }
  // A sender may always send the next message alone.
  if (next < messages) {
    KL_FUZZ_CHECK(kl::ValidateGroup(mla, next, {next, 1}, capacity).ok(), "one message refused");
  }
}

// A built plan: accepted, and covered exactly by the engine's layer reports
// (every layer of each chunk; KDA layers only in the last chunk).
void CheckBuilt(int64_t n, int64_t chunk, int64_t bound, const kl::ModelConfig& c,
                int64_t row_bytes) {
  kl::PlanSizes sizes = Sizes(c, row_bytes);
  sizes.max_message_bytes = bound;
  const std::vector<kl::v1::DeviceMessage> plan = kl::BuildTransferPlan(c, n, chunk, sizes);
  kl::v1::DeviceTransfer t;
  for (const auto& m : plan) *t.add_messages() = m;
  const absl::Status s = kl::ValidateTransferPlan(t.messages(), c, n, sizes, nullptr);
  KL_FUZZ_CHECK(s.ok(), std::string(s.ToString()).c_str());
  for (const auto& m : plan) {
    if (!m.kda() && bound > 0) {  // at most the bound, or one row if a row is more
      KL_FUZZ_CHECK(m.bytes() <= std::max(bound, row_bytes), "a message over the bound");
    }
  }
  int64_t next = 0;
  for (int64_t begin = 0; begin < n; begin += chunk) {
    const int64_t end = std::min(n, begin + chunk);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      if (c.IsKda(l) && end < n) continue;
      absl::StatusOr<int64_t> e = kl::LayerMessagesEnd(plan, next, l, begin, end);
      KL_FUZZ_CHECK(e.ok(), std::string(e.status().ToString()).c_str());
      KL_FUZZ_CHECK(*e > next, "a layer report covers no message");
      next = *e;
    }
  }
  KL_FUZZ_CHECK(next == static_cast<int64_t>(plan.size()), "reports leave messages uncovered");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);  // parse errors of mutated inputs are expected
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 7) return 0;
  const kl::ModelConfig c = kl::fuzz::FuzzBundleConfig();
  const int64_t n = (data[0] | (data[1] << 8)) % 512;
  const int64_t row_bytes = int64_t{16} << (data[6] % 17);
  const int64_t bound = data[3] == 0 ? 0 : data[3] * row_bytes / 7 + 1;
  CheckBuilt(1 + data[4], 1 + data[2] % 64, bound, c, row_bytes);
  const int g = data[5] % 24;
  const size_t off = 7 + 2 * static_cast<size_t>(g);
  if (size < off) return 0;
  kl::v1::DeviceTransfer t;
  if (!t.ParseFromArray(data + off, static_cast<int>(size - off))) return 0;
  CheckReceived(t, n, data + 7, g, c, row_bytes);
  return 0;
}
