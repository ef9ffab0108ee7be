// What a receiver refuses, and with which status: corruption anywhere,
// truncation, duplicates, missing parts, mismatched peers, malformed parts, and
// senders that ship zeroed or non-finite states. None may yield an OK state.
#include "engine/state/bundle_assembler.h"

#include <cmath>
#include <functional>
#include <random>

#include "engine/state/bundle_test_util.h"
#include "engine/state/state_bundle.h"
#include "gtest/gtest.h"
#include "kernels/common/crc32c.h"

namespace kl {
namespace {

using absl::StatusCode;
using testing_util::MakePartFrame;
using testing_util::RandomState;
using testing_util::Reseal;
using testing_util::TinyStateConfig;

constexpr int64_t kTokens = 21;

class AssemblerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = TinyStateConfig();
    state_ = RandomState(config_, kTokens, 42);
    meta_.request_id = "req-assembler";
    meta_.first_token = 17;
    meta_.checkpoint_fingerprint = 0xABCDEF;
    options_.mla_rows_per_part = 8;  // MLA layer 3 in 3 parts: [0,8) [8,16) [16,21)
    options_.conv_dtype = DType::kBF16;
    auto frames = EncodeBundle(config_, state_, meta_, options_);
    ASSERT_TRUE(frames.ok()) << frames.status();
    for (BundleFrame& f : *frames) frames_.push_back(std::move(f.bytes));
    bundle_id_ = ParseFrame(frames_.front())->bundle_id;
  }

  // Feeds `frames` and finishes; the first error wins.
  absl::StatusOr<SequenceState> Run(const std::vector<std::string>& frames,
                                    AssemblerOptions options = {}) const {
    return Run(frames, config_, options);
  }
  static absl::StatusOr<SequenceState> Run(const std::vector<std::string>& frames,
                                           const ModelConfig& config, AssemblerOptions options) {
    BundleAssembler a(config, options);
    for (const std::string& f : frames) {
      const absl::Status s = a.Add(f);
      if (!s.ok()) return s;
    }
    return a.Finish();
  }
  // Index of the part frame of (kind, layer, row_begin).
  size_t FindPart(PartKind kind, uint32_t layer, uint64_t row_begin = 0) const {
    for (size_t i = 0; i < frames_.size(); ++i) {
      const auto p = ParseFrame(frames_[i]);
      if (p->type == RecordType::kPart && p->part.kind == kind && p->part.layer == layer &&
          p->part.row_begin == row_begin) {
        return i;
      }
    }
    ADD_FAILURE() << "no such part";
    return 0;
  }
  std::string Blob() const {
    std::string b;
    for (const std::string& f : frames_) b += f;
    return b;
  }
  // frames_ with the final record replaced by one carrying `edit`ed fields.
  std::vector<std::string> WithFinal(const std::function<void(FinalRecord*)>& edit) const {
    std::vector<std::string> frames = frames_;
    FinalRecord fin = ParseFrame(frames.back())->final;
    edit(&fin);
    frames.back() = EncodeFinalFrame(fin);
    return frames;
  }

  ModelConfig config_;
  SequenceState state_;
  BundleMeta meta_;
  BundleOptions options_;
  std::vector<std::string> frames_;  // header, parts in layer order, final
  uint64_t bundle_id_ = 0;
};

TEST_F(AssemblerTest, BaselineIsAccepted) {
  const absl::StatusOr<SequenceState> s = Run(frames_);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->mla[0].latent, state_.mla[0].latent);
  EXPECT_EQ(frames_.size(), 1u + 3 * 4 + 3 + 1);
}

// Flip one bit anywhere in the blob: never an OK state. Every byte outside the
// large payloads is tried (one random bit each), plus random payload bits.
TEST_F(AssemblerTest, AnySingleBitFlipInTheBlobIsRefused) {
  const std::string blob = Blob();
  std::vector<size_t> positions;
  size_t at = 0;
  for (const std::string& f : frames_) {
    const size_t header = f.size() > kPartRecordBytes && ParseFrame(f)->type == RecordType::kPart
                              ? kPartRecordBytes
                              : f.size();
    for (size_t i = 0; i < header; ++i) positions.push_back(at + i);
    at += f.size();
  }
  std::mt19937_64 rng(99);
  for (int i = 0; i < 600; ++i) positions.push_back(rng() % blob.size());
  for (size_t pos : positions) {
    std::string bad = blob;
    bad[pos] ^= static_cast<char>(1 << (rng() % 8));
    const absl::StatusOr<DecodedBundle> got = DeserializeBundle(bad, config_);
    ASSERT_FALSE(got.ok()) << "bit flip at byte " << pos << " was accepted";
    const StatusCode code = got.status().code();
    EXPECT_TRUE(code == StatusCode::kDataLoss || code == StatusCode::kFailedPrecondition ||
                code == StatusCode::kInvalidArgument)
        << pos << ": " << got.status();
  }
}

TEST_F(AssemblerTest, PayloadCorruptionIsDataLossNamingThePart) {
  const size_t i = FindPart(PartKind::kConvK, 1);
  std::vector<std::string> frames = frames_;
  frames[i][kPartRecordBytes + 100] ^= 0x10;
  const absl::Status s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("conv_k layer 1"), std::string::npos) << s;
}

TEST_F(AssemblerTest, TruncatedBundleIsRefused) {
  const std::string blob = Blob();
  // Cut at every frame boundary: a well-formed prefix of the bundle.
  size_t at = 0;
  for (size_t n = 0; n + 1 < frames_.size(); ++n) {
    at += frames_[n].size();
    const absl::Status s = DeserializeBundle(blob.substr(0, at), config_).status();
    EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << "cut after frame " << n << ": " << s;
  }
  // Cuts inside frames.
  std::mt19937_64 rng(5);
  for (int i = 0; i < 200; ++i) {
    const size_t cut = rng() % blob.size();
    const absl::Status s = DeserializeBundle(blob.substr(0, cut), config_).status();
    EXPECT_FALSE(s.ok()) << cut;
  }
  const absl::Status s = DeserializeBundle(blob.substr(0, blob.size() - 1), config_).status();
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("truncated"), std::string::npos) << s;
}

TEST_F(AssemblerTest, DuplicatedPartIsAlreadyExists) {
  std::vector<std::string> frames = frames_;
  const size_t i = FindPart(PartKind::kKdaState, 2);
  frames.insert(frames.begin() + i + 1, frames[i]);
  const absl::Status s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kAlreadyExists) << s;
  EXPECT_NE(s.message().find("kda_state layer 2"), std::string::npos) << s;
  // A second header or final record too.
  frames = frames_;
  frames.insert(frames.begin() + 1, frames_.front());
  EXPECT_EQ(Run(frames).status().code(), StatusCode::kAlreadyExists);
  frames = frames_;
  frames.push_back(frames_.back());
  EXPECT_EQ(Run(frames).status().code(), StatusCode::kAlreadyExists);
}

TEST_F(AssemblerTest, OverlappingMlaRowsAreRefused) {
  std::vector<std::string> frames(frames_.begin(), frames_.end() - 1);
  const std::string rows(4 * 80 * 4, '\x3f');  // 4 rows of f32 0.75-ish values
  frames.push_back(MakePartFrame(bundle_id_, PartKind::kMlaLatent, DType::kF32, 3, 6, 10, rows));
  const absl::Status s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kAlreadyExists) << s;
  EXPECT_NE(s.message().find("mla_latent layer 3 rows [6, 10)"), std::string::npos) << s;
}

TEST_F(AssemblerTest, MissingPartIsNamed) {
  std::vector<std::string> frames = frames_;
  frames.erase(frames.begin() + FindPart(PartKind::kConvV, 0));
  // The final record arrived, so the part was sent and lost.
  absl::Status s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("conv_v layer 0"), std::string::npos) << s;
  // Without the final record the transfer is just not complete.
  frames.pop_back();
  s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("conv_v layer 0"), std::string::npos) << s;
  // A missing MLA chunk names its rows.
  frames = frames_;
  frames.erase(frames.begin() + FindPart(PartKind::kMlaLatent, 3, 8));
  s = Run(frames).status();
  EXPECT_NE(s.message().find("mla_latent layer 3 (rows [8, 16)"), std::string::npos) << s;
  // Every part but no final record.
  frames = frames_;
  frames.pop_back();
  s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("final record"), std::string::npos) << s;
}

TEST_F(AssemblerTest, FinishBeforeCompletionCanBeRetried) {
  BundleAssembler a(config_);
  for (size_t i = 0; i < frames_.size() / 2; ++i) ASSERT_TRUE(a.Add(frames_[i]).ok());
  EXPECT_EQ(a.Finish().status().code(), StatusCode::kFailedPrecondition);
  EXPECT_FALSE(a.progress().has_final);
  for (size_t i = frames_.size() / 2; i < frames_.size(); ++i) ASSERT_TRUE(a.Add(frames_[i]).ok());
  const AssemblerProgress p = a.progress();
  EXPECT_EQ(p.payload_bytes_received, p.expected_payload_bytes);
  absl::StatusOr<SequenceState> s = a.Finish();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->num_tokens, kTokens);
  EXPECT_EQ(a.Finish().status().code(), StatusCode::kFailedPrecondition);  // handed out once
}

TEST_F(AssemblerTest, DifferentConfigIsFailedPreconditionWithTheDifference) {
  ModelConfig other = config_;
  other.kda_num_heads = 8;
  absl::Status s = Run(frames_, other, {}).status();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("state bundle model fingerprint 0x"), std::string::npos) << s;
  EXPECT_NE(s.message().find("kda_num_heads 4 vs 8"), std::string::npos) << s;
  other = config_;
  other.layer_kinds = {LayerKind::kKda, LayerKind::kKda, LayerKind::kMla, LayerKind::kKda};
  s = Run(frames_, other, {}).status();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("layer 2 is KDA vs MLA"), std::string::npos) << s;
  other = config_;
  other.hidden_size = 512;
  s = Run(frames_, other, {}).status();
  EXPECT_NE(s.message().find("hidden_size 256 vs 512"), std::string::npos) << s;
}

TEST_F(AssemblerTest, CheckpointFingerprintMustMatchWhenKnown) {
  AssemblerOptions o;
  o.expected_checkpoint_fingerprint = 0x123456;
  absl::Status s = Run(frames_, o).status();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("checkpoint fingerprint 0x0000000000abcdef"), std::string::npos) << s;
  o.expected_checkpoint_fingerprint = 0xABCDEF;
  EXPECT_TRUE(Run(frames_, o).ok());
  // A sender that does not know its weights is refused by a receiver that does.
  BundleMeta unknown = meta_;
  unknown.checkpoint_fingerprint = 0;
  const absl::StatusOr<std::string> blob = SerializeBundle(config_, state_, unknown);
  ASSERT_TRUE(blob.ok());
  s = DeserializeBundle(*blob, config_, o).status();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("unknown"), std::string::npos) << s;
  EXPECT_TRUE(DeserializeBundle(*blob, config_).ok());  // receiver does not check
}

TEST_F(AssemblerTest, UnknownKdaLayoutTagIsRefused) {
  std::vector<std::string> frames = frames_;
  frames[0][93] = 9;  // KDA state layout tag
  frames[0] = Reseal(frames[0]);
  const absl::Status s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("layout tag 9"), std::string::npos) << s;
}

TEST_F(AssemblerTest, PartSizeMismatchIsInvalidArgument) {
  std::vector<std::string> frames(frames_.begin(), frames_.begin() + 1);
  // Rows [0, 4) of a 4 x 64 x 64 state, but only 3 heads of payload.
  frames.push_back(MakePartFrame(bundle_id_, PartKind::kKdaState, DType::kF32, 0, 0, 4,
                                 std::string(3 * 64 * 64 * 4, '\x01')));
  absl::Status s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("payload bytes"), std::string::npos) << s;
  // A dtype other than the header's.
  frames.back() = MakePartFrame(bundle_id_, PartKind::kKdaState, DType::kBF16, 0, 0, 4,
                                std::string(4 * 64 * 64 * 2, '\x01'));
  s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("dtype"), std::string::npos) << s;
}

TEST_F(AssemblerTest, PartsForTheWrongLayerKindOrRangeAreInvalid) {
  std::vector<std::string> base(frames_.begin(), frames_.begin() + 1);
  struct Case {
    PartKind kind;
    uint32_t layer;
    uint64_t begin, end;
    size_t bytes;
    const char* message;
  } cases[] = {
      {PartKind::kMlaLatent, 0, 0, 1, 320, "layer 0 is a KDA layer"},
      {PartKind::kKdaState, 3, 0, 1, 16384, "layer 3 is an MLA layer"},
      {PartKind::kConvQ, 7, 0, 1, 512, "layer out of range"},
      // Found by //tests/fuzz:bundle_fuzzer: layer + 1 wrapped to 0 in the
      // u32 bounds check of PartTable::Find and read far outside the table.
      {PartKind::kConvQ, 0xFFFFFFFFu, 0, 1, 512, "layer out of range"},
      {PartKind::kMlaLatent, 3, 16, 22, 6 * 320, "out of range"},  // 21 tokens
      {PartKind::kConvQ, 0, 2, 4, 2 * 512, "out of range"},        // W-1 = 3 rows
  };
  for (const Case& c : cases) {
    std::vector<std::string> frames = base;
    frames.push_back(MakePartFrame(bundle_id_, c.kind, c.kind == PartKind::kKdaState ||
                                                           c.kind == PartKind::kMlaLatent
                                                       ? DType::kF32
                                                       : DType::kBF16,
                                   c.layer, c.begin, c.end, std::string(c.bytes, '\x01')));
    const absl::Status s = Run(frames).status();
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << c.message << ": " << s;
    EXPECT_NE(s.message().find(c.message), std::string::npos) << s;
  }
}

TEST_F(AssemblerTest, FramesOfAnotherBundleOrBeforeTheHeaderAreRefused) {
  std::vector<std::string> frames = frames_;
  BundleMeta other_meta = meta_;
  other_meta.bundle_id = bundle_id_ + 1;
  auto other = EncodeBundle(config_, state_, other_meta, options_);
  ASSERT_TRUE(other.ok());
  frames[3] = (*other)[3].bytes;  // same part, same content, other bundle
  absl::Status s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("belongs to bundle"), std::string::npos) << s;
  frames = frames_;
  frames.back() = other->back().bytes;  // final record of the other bundle
  EXPECT_EQ(Run(frames).status().code(), StatusCode::kInvalidArgument);
  frames = frames_;
  std::swap(frames[0], frames[1]);
  s = Run(frames).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("before the header"), std::string::npos) << s;
}

TEST_F(AssemblerTest, FinalRecordThatDisagreesIsDataLoss) {
  for (int delta : {+1, -1}) {
    const absl::Status s =
        Run(WithFinal([&](FinalRecord* f) { f->part_count += delta; })).status();
    EXPECT_EQ(s.code(), StatusCode::kDataLoss) << delta << ": " << s;
  }
  // Final first, then more parts than it counts: refused as soon as one too many arrives.
  std::vector<std::string> frames = WithFinal([](FinalRecord* f) { f->part_count = 2; });
  frames.insert(frames.begin() + 1, frames.back());
  frames.pop_back();
  BundleAssembler a(config_);
  ASSERT_TRUE(a.Add(frames[0]).ok());
  ASSERT_TRUE(a.Add(frames[1]).ok());
  ASSERT_TRUE(a.Add(frames[2]).ok());
  ASSERT_TRUE(a.Add(frames[3]).ok());
  EXPECT_EQ(a.Add(frames[4]).code(), StatusCode::kDataLoss);
  EXPECT_EQ(Run(WithFinal([](FinalRecord* f) { f->total_payload_bytes += 2; })).status().code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(Run(WithFinal([](FinalRecord* f) { f->parts_digest ^= 1; })).status().code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(Run(WithFinal([](FinalRecord* f) { f->header_record_crc ^= 1; })).status().code(),
            StatusCode::kInvalidArgument);
}

TEST_F(AssemblerTest, ZeroTokenBundlesAreRefused) {
  EXPECT_EQ(BundleWriter::Create(config_, 0, meta_).status().code(),
            StatusCode::kInvalidArgument);
  SequenceState empty = SequenceState::Zero(config_);
  EXPECT_EQ(SerializeBundle(config_, empty, meta_).status().code(),
            StatusCode::kInvalidArgument);
  // A hand-made header claiming 0 tokens.
  BundleHeader h = ParseFrame(frames_[0])->header;
  h.num_tokens = 0;
  const absl::Status s = Run({EncodeHeaderFrame(h)}).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  // Or more than the receiver accepts.
  AssemblerOptions o;
  o.max_tokens = kTokens - 1;
  EXPECT_EQ(Run(frames_, o).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(AssemblerTest, ZeroedKdaStateIsRefused) {
  SequenceState zeroed = state_;
  std::fill(zeroed.kda[1].recurrent.begin(), zeroed.kda[1].recurrent.end(), 0.0f);
  const absl::StatusOr<std::string> blob = SerializeBundle(config_, zeroed, meta_);
  ASSERT_TRUE(blob.ok());
  const absl::Status s = DeserializeBundle(*blob, config_).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("KDA layer 1 recurrent state is all zeros"), std::string::npos) << s;
  AssemblerOptions lax;
  lax.reject_zero_kda_state = false;
  EXPECT_TRUE(DeserializeBundle(*blob, config_, lax).ok());
}

TEST_F(AssemblerTest, NonFiniteValuesAreRefused) {
  SequenceState bad = state_;
  bad.mla[0].latent[123] = std::nanf("");
  const absl::StatusOr<std::string> blob = SerializeBundle(config_, bad, meta_);
  ASSERT_TRUE(blob.ok());
  absl::Status s = DeserializeBundle(*blob, config_).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("mla_latent layer 3"), std::string::npos) << s;
  bad = state_;
  bad.kda[0].conv_q[5] = INFINITY;
  s = DeserializeBundle(*SerializeBundle(config_, bad, meta_), config_).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
}

TEST_F(AssemblerTest, ErrorsAreStickyAndAbortCancels) {
  BundleAssembler a(config_);
  ASSERT_TRUE(a.Add(frames_[0]).ok());
  std::string bad = frames_[1];
  bad[kPartRecordBytes] ^= 1;
  const absl::Status first = a.Add(bad);
  EXPECT_EQ(first.code(), StatusCode::kDataLoss);
  EXPECT_EQ(a.Add(frames_[1]), first);  // the good copy no longer helps
  EXPECT_EQ(a.Finish().status(), first);

  BundleAssembler b(config_);
  for (size_t i = 0; i < 5; ++i) ASSERT_TRUE(b.Add(frames_[i]).ok());
  b.Abort();
  b.Abort();  // idempotent
  EXPECT_EQ(b.Add(frames_[5]).code(), StatusCode::kCancelled);
  EXPECT_EQ(b.Finish().status().code(), StatusCode::kCancelled);
}

}  // namespace
}  // namespace kl
