#include "services/transport/transfer_plan.h"

#include "gtest/gtest.h"

namespace kl {
namespace {

google::protobuf::RepeatedPtrField<v1::DeviceMessage> Field(const std::vector<v1::DeviceMessage>& v) {
  google::protobuf::RepeatedPtrField<v1::DeviceMessage> f;
  for (const auto& m : v) *f.Add() = m;
  return f;
}

PlanSizes Sizes(const ModelConfig& c) { return {KdaLayerBytes(c), 1152}; }

TEST(TransferPlan, OneChunkFollowsLayerOrder) {
  const ModelConfig c = TinyConfig();
  const auto plan = BuildTransferPlan(c, 100, 4096, Sizes(c));
  ASSERT_EQ(static_cast<int64_t>(plan.size()), c.num_hidden_layers);
  int64_t total = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    EXPECT_EQ(plan[l].layer(), l);
    EXPECT_EQ(plan[l].kda(), c.IsKda(l));
    if (!c.IsKda(l)) {
      EXPECT_EQ(plan[l].row_begin(), 0);
      EXPECT_EQ(plan[l].row_end(), 100);
      EXPECT_EQ(plan[l].bytes(), 100 * 1152);
    } else {
      EXPECT_EQ(plan[l].bytes(), KdaLayerBytes(c));
    }
    total += plan[l].bytes();
  }
  PlanSummary s;
  ASSERT_TRUE(ValidateTransferPlan(Field(plan), c, 100, Sizes(c), &s).ok());
  EXPECT_EQ(s.total_bytes, total);
  EXPECT_EQ(s.max_mla_bytes, 100 * 1152);
}

TEST(TransferPlan, ChunkedShipsMlaRowsPerChunkAndKdaOnceAtTheEnd) {
  const ModelConfig c = TinyConfig();
  const auto plan = BuildTransferPlan(c, 250, 100, Sizes(c));
  const int64_t kda = c.NumKdaLayers(), mla = c.NumMlaLayers();
  ASSERT_EQ(static_cast<int64_t>(plan.size()), 3 * mla + kda);
  // KDA messages only in the last chunk: after every MLA message of rows < 200.
  int64_t first_kda = -1, last_early_mla = -1;
  for (size_t i = 0; i < plan.size(); ++i) {
    if (plan[i].kda() && first_kda < 0) first_kda = static_cast<int64_t>(i);
    if (!plan[i].kda() && plan[i].row_begin() < 200) last_early_mla = static_cast<int64_t>(i);
  }
  EXPECT_GT(first_kda, last_early_mla);
  PlanSummary s;
  ASSERT_TRUE(ValidateTransferPlan(Field(plan), c, 250, Sizes(c), &s).ok());
  EXPECT_EQ(s.max_mla_bytes, 100 * 1152);
}

// A bound on the message size splits each chunk's MLA rows into consecutive
// messages of at most that many bytes; KDA layers stay whole.
TEST(TransferPlan, MessageBoundSplitsMlaRows) {
  const ModelConfig c = TinyConfig();
  PlanSizes sizes = Sizes(c);
  sizes.max_message_bytes = 40 * 1152 + 100;  // 40 rows a message
  const auto plan = BuildTransferPlan(c, 250, 100, sizes);
  // Chunks of 100, 100, 50 rows: 3 + 3 + 2 messages per MLA layer.
  const int64_t kda = c.NumKdaLayers(), mla = c.NumMlaLayers();
  ASSERT_EQ(static_cast<int64_t>(plan.size()), 8 * mla + kda);
  std::vector<int64_t> next(c.num_hidden_layers, 0);
  for (const auto& m : plan) {
    if (m.kda()) {
      EXPECT_EQ(m.bytes(), KdaLayerBytes(c));
      continue;
    }
    EXPECT_EQ(m.row_begin(), next[m.layer()]);
    EXPECT_LE(m.row_end() - m.row_begin(), 40);
    // A message never spans two chunks (the engine reports rows per chunk).
    EXPECT_EQ(m.row_begin() / 100, (m.row_end() - 1) / 100);
    EXPECT_EQ(m.bytes(), (m.row_end() - m.row_begin()) * 1152);
    next[m.layer()] = m.row_end();
  }
  PlanSummary s;
  ASSERT_TRUE(ValidateTransferPlan(Field(plan), c, 250, Sizes(c), &s).ok());
  EXPECT_EQ(s.max_mla_bytes, 34 * 1152);  // 100 rows as 34 + 34 + 32, 50 as 25 + 25
  // A bound under one row still moves a row per message.
  sizes.max_message_bytes = 1;
  const auto rows = BuildTransferPlan(c, 3, 4096, sizes);
  EXPECT_EQ(static_cast<int64_t>(rows.size()), 3 * mla + kda);
  EXPECT_TRUE(ValidateTransferPlan(Field(rows), c, 3, Sizes(c), nullptr).ok());
}

// What a finished layer covers: one KDA message, or the MLA pieces whose rows
// make up exactly the reported rows; anything else names the message.
TEST(TransferPlan, LayerMessagesEndCoversExactlyTheReportedRows) {
  const ModelConfig c = TinyConfig();
  PlanSizes sizes = Sizes(c);
  sizes.max_message_bytes = 40 * 1152;
  const auto plan = BuildTransferPlan(c, 100, 4096, sizes);  // MLA: [0,34) [34,68) [68,100)
  int64_t next = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    absl::StatusOr<int64_t> end = LayerMessagesEnd(plan, next, l, 0, 100);
    ASSERT_TRUE(end.ok()) << l << ": " << end.status();
    EXPECT_EQ(*end - next, c.IsKda(l) ? 1 : 3) << l;
    next = *end;
  }
  EXPECT_EQ(next, static_cast<int64_t>(plan.size()));
  int64_t mla = 0;
  while (plan[mla].kda()) ++mla;
  const int64_t layer = plan[mla].layer();
  EXPECT_EQ(LayerMessagesEnd(plan, mla, layer, 0, 68).value(), mla + 2);  // a prefix of pieces
  for (auto [b, e] : {std::pair<int64_t, int64_t>{0, 90}, {0, 30}, {10, 100}, {0, 101}}) {
    absl::StatusOr<int64_t> bad = LayerMessagesEnd(plan, mla, layer, b, e);
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInternal) << b << " " << e;
  }
  EXPECT_FALSE(LayerMessagesEnd(plan, mla, layer + 1, 0, 100).ok());  // another layer's
  EXPECT_FALSE(LayerMessagesEnd(plan, static_cast<int64_t>(plan.size()), layer, 0, 100).ok());
}

// The message `corrupt` damages: the first non-empty one of the kind asked
// for, else of the other kind, else none.
TEST(TransferPlan, FaultTargetIsTheFirstNonEmptyMessageOfAKind) {
  const ModelConfig c = TinyConfig();
  auto plan = BuildTransferPlan(c, 100, 4096, Sizes(c));
  int64_t first_mla = 0;
  while (plan[first_mla].kda()) ++first_mla;
  ASSERT_GT(first_mla, 0);
  EXPECT_EQ(FaultTargetMessage(plan, /*mla=*/false), 0);
  EXPECT_EQ(FaultTargetMessage(plan, /*mla=*/true), first_mla);
  std::vector<v1::DeviceMessage> kda_only;
  for (const auto& m : plan) {
    if (m.kda()) kda_only.push_back(m);
  }
  EXPECT_EQ(FaultTargetMessage(kda_only, /*mla=*/true), 0);  // no MLA message: a KDA one
  kda_only[0].set_bytes(0);
  EXPECT_EQ(FaultTargetMessage(kda_only, /*mla=*/false), 1);  // skips an empty message
  for (auto& m : kda_only) m.set_bytes(0);
  EXPECT_EQ(FaultTargetMessage(kda_only, /*mla=*/false), -1);
  EXPECT_EQ(FaultTargetMessage({}, /*mla=*/true), -1);
}

// A receiver stages one MLA message (two when pipelined): a plan with a
// message over kMaxMlaMessageBytes is refused, whatever the sender's bound.
TEST(TransferPlan, ValidationRefusesOversizedMessages) {
  const ModelConfig c = TinyConfig();
  const int64_t rows = kMaxMlaMessageBytes / 1152 + 1;
  const auto whole = BuildTransferPlan(c, rows, 0, Sizes(c));
  absl::Status s = ValidateTransferPlan(Field(whole), c, rows, Sizes(c), nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("at most"), std::string::npos) << s;
  PlanSizes bounded = Sizes(c);
  bounded.max_message_bytes = kDefaultMessageBytes;
  const auto split = BuildTransferPlan(c, rows, 0, bounded);
  PlanSummary sum;
  EXPECT_TRUE(ValidateTransferPlan(Field(split), c, rows, Sizes(c), &sum).ok());
  EXPECT_LE(sum.max_mla_bytes, kDefaultMessageBytes);
}

TEST(TransferPlan, ValidationRefusesEveryMalformedPlan) {
  const ModelConfig c = TinyConfig();
  const auto good = BuildTransferPlan(c, 64, 4096, Sizes(c));
  int64_t mla_at = -1, kda_at = -1;
  for (size_t i = 0; i < good.size(); ++i) (good[i].kda() ? kda_at : mla_at) = static_cast<int64_t>(i);
  ASSERT_GE(mla_at, 0);
  ASSERT_GE(kda_at, 0);
  auto expect_bad = [&](std::vector<v1::DeviceMessage> p, const char* what) {
    absl::Status s = ValidateTransferPlan(Field(p), c, 64, Sizes(c), nullptr);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << what << ": " << s;
  };
  {
    auto p = good;
    p.erase(p.begin() + kda_at);
    expect_bad(p, "missing KDA layer");
  }
  {
    auto p = good;
    p.push_back(good[kda_at]);
    expect_bad(p, "KDA layer twice");
  }
  {
    auto p = good;
    p[kda_at].set_bytes(p[kda_at].bytes() - 4);
    expect_bad(p, "KDA size");
  }
  {
    auto p = good;
    p[mla_at].set_row_end(63);
    p[mla_at].set_bytes(63 * 1152);
    expect_bad(p, "MLA rows short");
  }
  {
    auto p = good;
    p[mla_at].set_bytes(p[mla_at].bytes() + 1152);
    expect_bad(p, "MLA bytes");
  }
  {
    auto p = good;
    p[mla_at].set_kda(true);
    expect_bad(p, "kind");
  }
  {
    auto p = good;
    p[0].set_layer(static_cast<int32_t>(c.num_hidden_layers));
    expect_bad(p, "layer range");
  }
  {
    auto p = good;
    p.push_back(good[mla_at]);
    expect_bad(p, "MLA rows twice");
  }
  expect_bad({}, "empty");
}

TEST(TransferPlan, GroupsContinueThePlanAndFitStaging) {
  // KDA, MLA 1000 B, KDA, MLA 300 B, MLA 256 B (aligned: 1024, 512, 256).
  const std::vector<int64_t> mla = {0, 1000, 0, 300, 256};
  EXPECT_EQ(GroupStagingBytes(mla, 0, 5), 1024 + 512 + 256);
  EXPECT_EQ(GroupStagingBytes(mla, 1, 1), 1024);
  EXPECT_EQ(GroupStagingBytes(mla, 2, 1), 0);
  const int64_t cap = StagingCapacity(mla);
  EXPECT_EQ(cap, 1024 + 512 + 256);  // small plans group everything
  EXPECT_TRUE(ValidateGroup(mla, 0, {0, 5}, cap).ok());
  EXPECT_TRUE(ValidateGroup(mla, 2, {2, 3}, cap).ok());
  EXPECT_FALSE(ValidateGroup(mla, 2, {3, 1}, cap).ok());   // skips message 2
  EXPECT_FALSE(ValidateGroup(mla, 2, {1, 2}, cap).ok());   // repeats message 1
  EXPECT_FALSE(ValidateGroup(mla, 2, {2, 0}, cap).ok());   // empty
  EXPECT_FALSE(ValidateGroup(mla, 2, {2, 4}, cap).ok());   // past the plan
  EXPECT_FALSE(ValidateGroup(mla, 0, {0, 5}, 1024).ok());  // more staging than the link has
  EXPECT_TRUE(ValidateGroup(mla, 0, {0, 2}, 1024).ok());
  // Large plans: capacity is the largest message, or kGroupStagingBytes to group several.
  const std::vector<int64_t> big = {0, kGroupStagingBytes * 2, kGroupStagingBytes / 4, 0};
  EXPECT_EQ(StagingCapacity(big), kGroupStagingBytes * 2);
  const std::vector<int64_t> many(10, kGroupStagingBytes / 4);
  EXPECT_EQ(StagingCapacity(many), kGroupStagingBytes);
  EXPECT_EQ(StagingCapacity({0, 0}), kStagingAlign);
  std::vector<int64_t> kda(kMaxGroupMessages + 1, 0);
  EXPECT_FALSE(ValidateGroup(kda, 0, {0, kMaxGroupMessages + 1}, kStagingAlign).ok());
  EXPECT_TRUE(ValidateGroup(kda, 0, {0, kMaxGroupMessages}, kStagingAlign).ok());
  // From a plan.
  const ModelConfig c = TinyConfig();
  const auto plan = BuildTransferPlan(c, 100, 4096, Sizes(c));
  const std::vector<int64_t> from = MlaBytes(plan);
  ASSERT_EQ(from.size(), plan.size());
  for (size_t i = 0; i < plan.size(); ++i) EXPECT_EQ(from[i], plan[i].kda() ? 0 : plan[i].bytes());
  EXPECT_EQ(MlaBytes(Field(plan)), from);
}

}  // namespace
}  // namespace kl
