// Record-level tests: encode/parse round trips, that every bit of every record
// header is covered by a check, and the part bookkeeping.
#include "engine/state/bundle_format.h"

#include <cstring>
#include <random>

#include "engine/state/bundle_parts.h"
#include "engine/state/bundle_test_util.h"
#include "gtest/gtest.h"
#include "kernels/common/crc32c.h"

namespace kl {
namespace {

using testing_util::MakePartFrame;
using testing_util::Reseal;

BundleHeader SampleHeader() {
  BundleHeader h;
  h.bundle_id = 0x0123456789ABCDEFull;
  h.model_fingerprint = 0x1111222233334444ull;
  h.checkpoint_fingerprint = 0x5555666677778888ull;
  h.num_tokens = 37;
  h.first_token = 4095;
  h.hidden_size = 256;
  h.kda_num_heads = 4;
  h.kda_key_dim = 64;
  h.kda_value_dim = 64;
  h.conv_kernel_size = 4;
  h.mla_kv_lora_rank = 64;
  h.mla_rope_dim = 16;
  h.kda_state_dtype = DType::kF32;
  h.kda_state_layout = KdaStateLayout::kHVK;
  h.conv_dtype = DType::kBF16;
  h.conv_layout = ConvTailLayout::kChannelMajor;
  h.mla_dtype = DType::kBF16;
  h.layer_kinds = {kWireLayerKda, kWireLayerKda, kWireLayerKda, kWireLayerMla};
  h.request_id = "req-42";
  return h;
}

TEST(BundleFormat, HeaderRoundTrip) {
  const BundleHeader h = SampleHeader();
  const std::string frame = EncodeHeaderFrame(h);
  EXPECT_EQ(frame.size(), kHeaderRecordBytes + 4 + 6);
  ASSERT_EQ(FrameSizeFromPrefix(frame).value(), frame.size());
  const absl::StatusOr<ParsedFrame> p = ParseFrame(frame);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->type, RecordType::kHeader);
  const BundleHeader& g = p->header;
  EXPECT_EQ(g.bundle_id, h.bundle_id);
  EXPECT_EQ(g.model_fingerprint, h.model_fingerprint);
  EXPECT_EQ(g.checkpoint_fingerprint, h.checkpoint_fingerprint);
  EXPECT_EQ(g.num_tokens, 37);
  EXPECT_EQ(g.first_token, 4095);
  EXPECT_EQ(g.hidden_size, 256u);
  EXPECT_EQ(g.kda_num_heads, 4u);
  EXPECT_EQ(g.kda_key_dim, 64u);
  EXPECT_EQ(g.kda_value_dim, 64u);
  EXPECT_EQ(g.conv_kernel_size, 4u);
  EXPECT_EQ(g.mla_kv_lora_rank, 64u);
  EXPECT_EQ(g.mla_rope_dim, 16u);
  EXPECT_EQ(g.kda_state_layout, KdaStateLayout::kHVK);
  EXPECT_EQ(g.conv_dtype, DType::kBF16);
  EXPECT_EQ(g.conv_layout, ConvTailLayout::kChannelMajor);
  EXPECT_EQ(g.mla_dtype, DType::kBF16);
  EXPECT_EQ(g.layer_kinds, h.layer_kinds);
  EXPECT_EQ(g.request_id, "req-42");
}

TEST(BundleFormat, PartAndFinalRoundTrip) {
  const std::string payload = "0123456789abcdef";
  const std::string frame =
      MakePartFrame(7, PartKind::kConvV, DType::kBF16, 2, 1, 3, payload);
  const absl::StatusOr<ParsedFrame> p = ParseFrame(frame);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->part.kind, PartKind::kConvV);
  EXPECT_EQ(p->part.dtype, DType::kBF16);
  EXPECT_EQ(p->part.layer, 2u);
  EXPECT_EQ(p->part.row_begin, 1u);
  EXPECT_EQ(p->part.row_end, 3u);
  EXPECT_EQ(p->part.payload_bytes, payload.size());
  EXPECT_EQ(p->part.payload_crc, Crc32c(payload.data(), payload.size()));
  EXPECT_EQ(p->payload, payload);

  FinalRecord f{7, 12, 3456, 0xFEDCBA9876543210ull, 0xCAFEF00Du};
  const absl::StatusOr<ParsedFrame> q = ParseFrame(EncodeFinalFrame(f));
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->final.part_count, 12u);
  EXPECT_EQ(q->final.total_payload_bytes, 3456u);
  EXPECT_EQ(q->final.parts_digest, 0xFEDCBA9876543210ull);
  EXPECT_EQ(q->final.header_record_crc, 0xCAFEF00Du);
}

// Every single-bit flip anywhere in a header, part or final frame is refused.
TEST(BundleFormat, EveryBitFlipInEveryRecordIsDetected) {
  const std::vector<std::string> frames = {
      EncodeHeaderFrame(SampleHeader()),
      MakePartFrame(7, PartKind::kKdaState, DType::kF32, 0, 0, 1, std::string(64, 'x')),
      EncodeFinalFrame(FinalRecord{7, 12, 3456, 99, 0x1234})};
  for (const std::string& good : frames) {
    ASSERT_TRUE(ParseFrame(good).ok());
    for (size_t bit = 0; bit < good.size() * 8; ++bit) {
      std::string bad = good;
      bad[bit / 8] ^= static_cast<char>(1 << (bit % 8));
      EXPECT_FALSE(ParseFrame(bad).ok()) << "bit " << bit << " of a "
                                         << RecordTypeName(ParseFrame(good)->type) << " record";
    }
  }
}

TEST(BundleFormat, FramingErrorsAreDataLoss) {
  const std::string good = EncodeHeaderFrame(SampleHeader());
  EXPECT_EQ(ParseFrame(good.substr(0, 20)).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(ParseFrame(good.substr(0, good.size() - 1)).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(ParseFrame(good + "x").status().code(), absl::StatusCode::kDataLoss);
  std::string bad_magic = good;
  bad_magic[0] = 'X';
  EXPECT_EQ(ParseFrame(bad_magic).status().code(), absl::StatusCode::kDataLoss);
}

TEST(BundleFormat, UnknownVersionIsFailedPrecondition) {
  std::string f = EncodeHeaderFrame(SampleHeader());
  f[4] = 2;
  const absl::Status s = ParseFrame(Reseal(f)).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("version 2"), std::string::npos) << s;
}

TEST(BundleFormat, UnknownLayoutTagsAndDTypesAreRefused) {
  const std::string good = EncodeHeaderFrame(SampleHeader());
  // Offsets: KDA layout 93, conv layout 95, MLA layout 97, KDA dtype 92.
  for (size_t offset : {93, 95, 97}) {
    for (char tag : {0, 3, 7}) {
      std::string f = good;
      f[offset] = tag;
      const absl::Status s = ParseFrame(Reseal(f)).status();
      EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << offset << " " << s;
      EXPECT_NE(s.message().find("layout tag"), std::string::npos) << s;
    }
  }
  std::string f = good;
  f[92] = static_cast<char>(DType::kF16);
  EXPECT_EQ(ParseFrame(Reseal(f)).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(BundleFormat, WireShapes) {
  BundleHeader h = SampleHeader();
  EXPECT_EQ(WireShape(h, PartKind::kKdaState).rows, 4u);
  EXPECT_EQ(WireShape(h, PartKind::kKdaState).row_elems, 64u * 64u);
  EXPECT_EQ(WireShape(h, PartKind::kConvQ).rows, 256u);  // channel-major
  EXPECT_EQ(WireShape(h, PartKind::kConvQ).row_elems, 3u);
  h.conv_layout = ConvTailLayout::kTimeMajor;
  EXPECT_EQ(WireShape(h, PartKind::kConvK).rows, 3u);
  EXPECT_EQ(WireShape(h, PartKind::kConvK).row_elems, 256u);
  EXPECT_EQ(WireShape(h, PartKind::kMlaLatent).rows, 37u);
  EXPECT_EQ(WireShape(h, PartKind::kMlaLatent).row_elems, 80u);
}

TEST(BundleFormat, DigestTermDependsOnEveryField) {
  PartRecord base;
  base.kind = PartKind::kMlaLatent;
  base.layer = 3;
  base.row_begin = 8;
  base.row_end = 16;
  base.payload_bytes = 2560;
  base.payload_crc = 0xABCD;
  const uint64_t t = PartDigestTerm(base);
  PartRecord r = base;
  r.kind = PartKind::kKdaState;
  EXPECT_NE(PartDigestTerm(r), t);
  r = base; r.dtype = DType::kBF16;
  EXPECT_NE(PartDigestTerm(r), t);
  r = base; r.layer = 2;
  EXPECT_NE(PartDigestTerm(r), t);
  r = base; r.row_begin = 9;
  EXPECT_NE(PartDigestTerm(r), t);
  r = base; r.row_end = 17;
  EXPECT_NE(PartDigestTerm(r), t);
  r = base; r.payload_bytes = 2561;
  EXPECT_NE(PartDigestTerm(r), t);
  r = base; r.payload_crc = 0xABCE;
  EXPECT_NE(PartDigestTerm(r), t);
}

TEST(RowCoverage, ClaimsMergeAndRefuseOverlaps) {
  RowCoverage c(100);
  EXPECT_TRUE(c.Claim(10, 20));
  EXPECT_TRUE(c.Claim(30, 40));
  EXPECT_FALSE(c.Claim(15, 25));  // overlaps [10, 20)
  EXPECT_FALSE(c.Claim(0, 11));
  EXPECT_FALSE(c.Claim(39, 50));
  EXPECT_FALSE(c.Claim(10, 20));  // exact duplicate
  EXPECT_FALSE(c.Claim(0, 100));  // covers both
  EXPECT_TRUE(c.Overlaps(19, 21));
  EXPECT_FALSE(c.Overlaps(20, 30));
  EXPECT_TRUE(c.Claim(20, 30));   // fills the gap exactly
  EXPECT_EQ(c.covered(), 30u);
  EXPECT_EQ(c.DescribeGaps(5), "[0, 10), [40, 100)");
  EXPECT_TRUE(c.Claim(0, 10));
  EXPECT_TRUE(c.Claim(40, 100));
  EXPECT_TRUE(c.complete());
  EXPECT_EQ(c.DescribeGaps(5), "");
}

TEST(PartTable, SlotsFollowTheLayerMap) {
  PartTable t(SampleHeader());
  EXPECT_EQ(t.slots().size(), 3u * 4u + 1u);
  ASSERT_NE(t.Find(PartKind::kConvK, 2), nullptr);
  EXPECT_EQ(t.Find(PartKind::kConvK, 2)->ordinal, 2);
  ASSERT_NE(t.Find(PartKind::kMlaLatent, 3), nullptr);
  EXPECT_EQ(t.Find(PartKind::kMlaLatent, 3)->ordinal, 0);
  EXPECT_EQ(t.Find(PartKind::kMlaLatent, 0), nullptr);  // KDA layer
  EXPECT_EQ(t.Find(PartKind::kKdaState, 3), nullptr);   // MLA layer
  EXPECT_EQ(t.Find(PartKind::kKdaState, 4), nullptr);   // out of range
  EXPECT_FALSE(t.Complete());
  EXPECT_EQ(t.DescribeMissing(1),
            "KDA layer 0 (state and conv tails: nothing arrived); ... 4 items in all");
  ASSERT_TRUE(t.Find(PartKind::kConvQ, 1)->coverage.Claim(0, 1));
  EXPECT_NE(t.DescribeMissing(5).find("kda_state layer 1 (rows [0, 4) of 4 missing)"),
            std::string::npos)
      << t.DescribeMissing(5);
  // f32 states, bf16 tails and latents.
  EXPECT_EQ(t.ExpectedPayloadBytes(), 3u * (4 * 64 * 64 * 4 + 3 * 3 * 256 * 2) + 37u * 80 * 2);
}

}  // namespace
}  // namespace kl
