// StateBundle round trips through the writer and assembler: exactness, bf16
// rounding, chunking and splitting, arrival order, layout conversions,
// concurrency, and the 48B config's sizes.
#include "engine/state/state_bundle.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <thread>

#include "engine/state/bundle_test_util.h"
#include "gtest/gtest.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

using testing_util::RandomState;
using testing_util::TinyStateConfig;

constexpr int64_t kTokens = 37;

BundleMeta Meta() {
  BundleMeta m;
  m.request_id = "req-7";
  m.first_token = 1234;
  m.checkpoint_fingerprint = 0xC0FFEE;
  return m;
}

void ExpectStatesEqual(const SequenceState& a, const SequenceState& b) {
  ASSERT_EQ(a.num_tokens, b.num_tokens);
  ASSERT_EQ(a.kda.size(), b.kda.size());
  ASSERT_EQ(a.mla.size(), b.mla.size());
  for (size_t i = 0; i < a.kda.size(); ++i) {
    EXPECT_EQ(a.kda[i].recurrent, b.kda[i].recurrent) << "KDA #" << i;
    EXPECT_EQ(a.kda[i].conv_q, b.kda[i].conv_q) << "KDA #" << i;
    EXPECT_EQ(a.kda[i].conv_k, b.kda[i].conv_k) << "KDA #" << i;
    EXPECT_EQ(a.kda[i].conv_v, b.kda[i].conv_v) << "KDA #" << i;
  }
  for (size_t i = 0; i < a.mla.size(); ++i) EXPECT_EQ(a.mla[i].latent, b.mla[i].latent);
}

// Feeds frames (in the given order) and finishes.
absl::StatusOr<SequenceState> Assemble(const ModelConfig& config,
                                       const std::vector<BundleFrame>& frames,
                                       AssemblerOptions options = {}) {
  BundleAssembler assembler(config, options);
  for (const BundleFrame& f : frames) {
    const absl::Status s = assembler.Add(f.bytes);
    if (!s.ok()) return s;
  }
  return assembler.Finish();
}

TEST(StateBundle, F32RoundTripIsBitExact) {
  const ModelConfig config = TinyStateConfig();
  const SequenceState state = RandomState(config, kTokens, 1);
  const absl::StatusOr<std::string> blob = SerializeBundle(config, state, Meta());
  ASSERT_TRUE(blob.ok()) << blob.status();
  const absl::StatusOr<DecodedBundle> back = DeserializeBundle(*blob, config);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectStatesEqual(back->state, state);
  EXPECT_EQ(back->header.request_id, "req-7");
  EXPECT_EQ(back->header.first_token, 1234);
  EXPECT_EQ(back->header.checkpoint_fingerprint, 0xC0FFEEu);
  EXPECT_EQ(back->header.model_fingerprint, StateFingerprint(config));
  EXPECT_EQ(back->header.num_tokens, kTokens);
}

TEST(StateBundle, Bf16RoundTripRoundsEachValueOnce) {
  const ModelConfig config = TinyStateConfig();
  const SequenceState state = RandomState(config, kTokens, 2);
  BundleOptions opt;
  opt.kda_state_dtype = DType::kBF16;
  opt.conv_dtype = DType::kBF16;
  opt.mla_dtype = DType::kBF16;
  const absl::StatusOr<std::string> blob = SerializeBundle(config, state, Meta(), opt);
  ASSERT_TRUE(blob.ok()) << blob.status();
  const absl::StatusOr<DecodedBundle> back = DeserializeBundle(*blob, config);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->header.conv_dtype, DType::kBF16);
  constexpr float kBf16RelTol = 1.0f / 256;  // half an ulp of an 8-bit mantissa
  auto check = [&](const std::vector<float>& want, const std::vector<float>& got) {
    ASSERT_EQ(want.size(), got.size());
    size_t inexact = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i], Bf16ToF32(F32ToBf16(want[i]))) << i;
      ASSERT_LE(std::fabs(got[i] - want[i]), kBf16RelTol * std::fabs(want[i])) << i;
      inexact += got[i] != want[i];
    }
    EXPECT_GT(inexact, 0u);  // bf16 really was on the wire
  };
  for (size_t i = 0; i < state.kda.size(); ++i) {
    check(state.kda[i].recurrent, back->state.kda[i].recurrent);
    check(state.kda[i].conv_q, back->state.kda[i].conv_q);
    check(state.kda[i].conv_k, back->state.kda[i].conv_k);
    check(state.kda[i].conv_v, back->state.kda[i].conv_v);
  }
  check(state.mla[0].latent, back->state.mla[0].latent);
  // bf16 halves the payload of every part.
  const absl::StatusOr<std::string> f32 = SerializeBundle(config, state, Meta());
  ASSERT_TRUE(f32.ok());
  EXPECT_LT(blob->size(), f32->size() / 2 + 4096);
}

TEST(StateBundle, MlaChunksAndPartsInRandomOrderAreAccepted) {
  const ModelConfig config = TinyStateConfig();
  const SequenceState state = RandomState(config, kTokens, 3);
  BundleOptions opt;
  opt.mla_rows_per_part = 5;  // 37 tokens -> 8 chunks, the last of 2 rows
  absl::StatusOr<std::vector<BundleFrame>> frames = EncodeBundle(config, state, Meta(), opt);
  ASSERT_TRUE(frames.ok()) << frames.status();
  int mla_parts = 0;
  for (const BundleFrame& f : *frames) mla_parts += f.kind == PartKind::kMlaLatent && f.type == RecordType::kPart;
  EXPECT_EQ(mla_parts, 8);
  std::mt19937_64 rng(17);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<BundleFrame> shuffled = *frames;
    // Header first; parts and the final record in any order.
    std::shuffle(shuffled.begin() + 1, shuffled.end(), rng);
    const absl::StatusOr<SequenceState> got = Assemble(config, shuffled);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectStatesEqual(*got, state);
  }
}

TEST(StateBundle, WriterStreamsLayersAndUnevenMlaChunksOutOfOrder) {
  const ModelConfig config = TinyStateConfig();
  const SequenceState state = RandomState(config, kTokens, 4);
  absl::StatusOr<std::unique_ptr<BundleWriter>> writer =
      BundleWriter::Create(config, kTokens, Meta(), {});
  ASSERT_TRUE(writer.ok()) << writer.status();
  BundleWriter& w = **writer;
  std::vector<BundleFrame> frames = {w.HeaderFrame()};
  auto take = [&](absl::StatusOr<std::vector<BundleFrame>> fs) {
    ASSERT_TRUE(fs.ok()) << fs.status();
    for (BundleFrame& f : *fs) frames.push_back(std::move(f));
  };
  const int64_t dim = config.MlaLatentDim();
  const std::vector<float>& lat = state.mla[0].latent;
  auto rows = [&](int64_t b, int64_t e) {
    return absl::MakeConstSpan(lat.data() + b * dim, (e - b) * dim);
  };
  // Prefill emits MLA chunks as they complete, interleaved with KDA layers.
  take(w.AddMlaRows(3, 20, rows(20, 37)));
  take(w.AddKdaLayer(2, state.kda[2]));
  take(w.AddMlaRows(3, 0, rows(0, 9)));
  take(w.AddKdaLayer(0, state.kda[0]));
  // Not finished: layer 1 and rows [9, 20) are missing, and the error says so.
  const absl::StatusOr<BundleFrame> early = w.Finish();
  EXPECT_EQ(early.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(early.status().message().find("KDA layer 1 (state and conv tails: nothing arrived)"), std::string::npos) << early.status();
  EXPECT_NE(early.status().message().find("mla_latent layer 3 (rows [9, 20)"), std::string::npos)
      << early.status();
  // Overlapping or repeated adds are refused without changing anything.
  EXPECT_EQ(w.AddMlaRows(3, 8, rows(8, 12)).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(w.AddKdaLayer(0, state.kda[0]).status().code(), absl::StatusCode::kAlreadyExists);
  // Wrong layer kinds and sizes.
  EXPECT_EQ(w.AddKdaLayer(3, state.kda[1]).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddMlaRows(1, 9, rows(9, 20)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(w.AddMlaRows(3, 30, rows(9, 20)).status().code(), absl::StatusCode::kInvalidArgument);
  take(w.AddMlaRows(3, 9, rows(9, 20)));
  take(w.AddKdaLayer(1, state.kda[1]));
  absl::StatusOr<BundleFrame> fin = w.Finish();
  ASSERT_TRUE(fin.ok()) << fin.status();
  frames.push_back(*fin);
  EXPECT_EQ(w.Finish().status().code(), absl::StatusCode::kFailedPrecondition);  // once only
  const absl::StatusOr<SequenceState> got = Assemble(config, frames);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectStatesEqual(*got, state);
}

TEST(StateBundle, SmallPartLimitSplitsKdaStatesByHead) {
  const ModelConfig config = TinyStateConfig();
  const SequenceState state = RandomState(config, kTokens, 5);
  BundleOptions opt;
  opt.max_part_payload_bytes = 20000;  // one 16 KiB head per part, 3 rows of 1 KiB conv
  const absl::StatusOr<std::vector<BundleFrame>> frames = EncodeBundle(config, state, Meta(), opt);
  ASSERT_TRUE(frames.ok()) << frames.status();
  int state_parts = 0;
  for (const BundleFrame& f : *frames) {
    if (f.type != RecordType::kPart) continue;
    EXPECT_LE(f.bytes.size(), kPartRecordBytes + 20000);
    state_parts += f.kind == PartKind::kKdaState;
  }
  EXPECT_EQ(state_parts, 3 * 4);
  std::vector<BundleFrame> reversed(frames->begin() + 1, frames->end());
  std::reverse(reversed.begin(), reversed.end());
  reversed.insert(reversed.begin(), frames->front());
  const absl::StatusOr<SequenceState> got = Assemble(config, reversed);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectStatesEqual(*got, state);
}

// [H][K][V] -> [H][V][K] by hand, independent of the importer.
std::vector<float> ToVFirst(const std::vector<float>& s, int64_t heads, int64_t k, int64_t v) {
  std::vector<float> out(s.size());
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < v; ++j) out[(h * v + j) * k + i] = s[(h * k + i) * v + j];
  return out;
}
// [W-1][C] -> [C][W-1].
std::vector<float> ToChannelMajor(const std::vector<float>& t, int64_t steps, int64_t channels) {
  std::vector<float> out(t.size());
  for (int64_t s = 0; s < steps; ++s)
    for (int64_t c = 0; c < channels; ++c) out[c * steps + s] = t[s * channels + c];
  return out;
}

// A sender keeping V-first states and channel-major conv tails (vLLM / FlashKDA
// style) ships them as is; the receiver converts to the canonical layouts.
absl::StatusOr<std::vector<BundleFrame>> EncodeNonCanonical(const ModelConfig& config,
                                                            const SequenceState& state,
                                                            KdaStateLayout tag,
                                                            int64_t max_part_bytes,
                                                            DType state_dtype = DType::kF32) {
  BundleOptions opt;
  opt.kda_state_dtype = state_dtype;
  opt.kda_state_layout = tag;
  opt.conv_layout = ConvTailLayout::kChannelMajor;
  opt.max_part_payload_bytes = max_part_bytes;
  opt.conv_dtype = DType::kBF16;
  ASSIGN_OR_RETURN(std::unique_ptr<BundleWriter> w,
                   BundleWriter::Create(config, state.num_tokens, Meta(), opt));
  std::vector<BundleFrame> frames = {w->HeaderFrame()};
  const int64_t h = config.kda_num_heads, d = config.kda_head_dim, c = config.KdaDim();
  const int64_t steps = config.short_conv_kernel_size - 1;
  for (int64_t layer = 0; layer < 3; ++layer) {
    const KdaLayerState& l = state.kda[layer];
    ASSIGN_OR_RETURN(std::vector<BundleFrame> parts,
                     w->AddKdaLayer(layer, ToVFirst(l.recurrent, h, d, d),
                                    ToChannelMajor(l.conv_q, steps, c),
                                    ToChannelMajor(l.conv_k, steps, c),
                                    ToChannelMajor(l.conv_v, steps, c)));
    for (BundleFrame& f : parts) frames.push_back(std::move(f));
  }
  ASSIGN_OR_RETURN(std::vector<BundleFrame> mla, w->AddMlaRows(3, 0, state.mla[0].latent));
  for (BundleFrame& f : mla) frames.push_back(std::move(f));
  ASSIGN_OR_RETURN(BundleFrame fin, w->Finish());
  frames.push_back(std::move(fin));
  return frames;
}

TEST(StateBundle, VFirstStateAndChannelMajorTailsAreConverted) {
  const ModelConfig config = TinyStateConfig();
  const SequenceState state = RandomState(config, kTokens, 6);
  // f32 with whole tensors per part; bf16 with one head per part and conv parts
  // split inside the channels (100 channels of 3 bf16 steps).
  for (const DType dtype : {DType::kF32, DType::kBF16}) {
    const int64_t max_bytes = dtype == DType::kF32 ? 0 : 3 * 100 * 2;
    const absl::StatusOr<std::vector<BundleFrame>> frames =
        EncodeNonCanonical(config, state, KdaStateLayout::kHVK, max_bytes, dtype);
    ASSERT_TRUE(frames.ok()) << frames.status();
    const absl::StatusOr<SequenceState> got = Assemble(config, *frames);
    ASSERT_TRUE(got.ok()) << got.status();
    for (size_t i = 0; i < 3; ++i) {
      const std::vector<float>& want = state.kda[i].recurrent;
      for (size_t j = 0; j < want.size(); ++j) {
        ASSERT_EQ(got->kda[i].recurrent[j],
                  dtype == DType::kF32 ? want[j] : Bf16ToF32(F32ToBf16(want[j])))
            << i << " " << j;
      }
      for (size_t j = 0; j < state.kda[i].conv_v.size(); ++j) {
        ASSERT_EQ(got->kda[i].conv_v[j], Bf16ToF32(F32ToBf16(state.kda[i].conv_v[j]))) << j;
      }
    }
  }
  // Control: the same V-first bytes mislabelled [H][K][V] would be adopted
  // transposed — which is why the tag is on the wire.
  const absl::StatusOr<std::vector<BundleFrame>> mislabelled =
      EncodeNonCanonical(config, state, KdaStateLayout::kHKV, 0);
  ASSERT_TRUE(mislabelled.ok());
  const absl::StatusOr<SequenceState> wrong = Assemble(config, *mislabelled);
  ASSERT_TRUE(wrong.ok());
  EXPECT_NE(wrong->kda[0].recurrent, state.kda[0].recurrent);
}

TEST(StateBundle, ConcurrentAddsFromSeveralThreads) {
  const ModelConfig config = TinyStateConfig();
  const SequenceState state = RandomState(config, 300, 8);
  BundleOptions opt;
  opt.mla_rows_per_part = 7;
  opt.max_part_payload_bytes = 5000;
  const absl::StatusOr<std::vector<BundleFrame>> frames = EncodeBundle(config, state, Meta(), opt);
  ASSERT_TRUE(frames.ok()) << frames.status();
  BundleAssembler assembler(config);
  ASSERT_TRUE(assembler.Add(frames->front().bytes).ok());
  constexpr int kThreads = 4;
  std::vector<std::thread> threads;
  std::vector<absl::Status> results(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = 1 + t; i < frames->size(); i += kThreads) {
        const absl::Status s = assembler.Add((*frames)[i].bytes);
        if (!s.ok()) results[t] = s;
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (const absl::Status& s : results) EXPECT_TRUE(s.ok()) << s;
  absl::StatusOr<SequenceState> got = assembler.Finish();
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectStatesEqual(*got, state);
}

TEST(StateBundle, WriterAcceptsLayersFromSeveralThreads) {
  const ModelConfig config = TinyStateConfig();
  const SequenceState state = RandomState(config, 64, 10);
  auto writer = BundleWriter::Create(config, 64, Meta(), {});
  ASSERT_TRUE(writer.ok());
  BundleWriter& w = **writer;
  std::vector<std::vector<BundleFrame>> out(4);
  std::vector<absl::Status> errors(4);
  std::vector<std::thread> threads;
  const int64_t dim = config.MlaLatentDim();
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      // Threads 0-2 send KDA layer t and then MLA rows [16t, 16t + 16); thread 3 the last 16.
      absl::StatusOr<std::vector<BundleFrame>> kda =
          t < 3 ? w.AddKdaLayer(t, state.kda[t]) : std::vector<BundleFrame>{};
      absl::StatusOr<std::vector<BundleFrame>> mla = w.AddMlaRows(
          3, 16 * t, absl::MakeConstSpan(state.mla[0].latent.data() + 16 * t * dim, 16 * dim));
      if (!kda.ok()) errors[t] = kda.status();
      if (!mla.ok()) errors[t] = mla.status();
      if (kda.ok() && mla.ok()) {
        out[t] = std::move(*kda);
        for (BundleFrame& f : *mla) out[t].push_back(std::move(f));
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (const absl::Status& s : errors) ASSERT_TRUE(s.ok()) << s;
  std::vector<BundleFrame> frames = {w.HeaderFrame()};
  for (auto& v : out) {
    for (BundleFrame& f : v) frames.push_back(std::move(f));
  }
  absl::StatusOr<BundleFrame> fin = w.Finish();
  ASSERT_TRUE(fin.ok()) << fin.status();
  frames.push_back(*fin);
  const absl::StatusOr<SequenceState> got = Assemble(config, frames);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectStatesEqual(*got, state);
}

TEST(StateBundle, Kimi48BFixedPartHasTheSpecSize) {
  const ModelConfig config = Kimi48BConfig();
  SequenceState state = RandomState(config, 2, 9);
  BundleOptions opt;
  opt.conv_dtype = DType::kBF16;  // spec §3.8: f32 state + bf16 tails
  opt.mla_dtype = DType::kBF16;
  const absl::StatusOr<std::vector<BundleFrame>> frames = EncodeBundle(config, state, Meta(), opt);
  ASSERT_TRUE(frames.ok()) << frames.status();
  uint64_t kda_bytes = 0, mla_bytes = 0;
  size_t largest = 0;
  for (const BundleFrame& f : *frames) {
    if (f.type != RecordType::kPart) continue;
    const uint64_t payload = f.bytes.size() - kPartRecordBytes;
    (f.kind == PartKind::kMlaLatent ? mla_bytes : kda_bytes) += payload;
    largest = std::max(largest, f.bytes.size());
  }
  EXPECT_EQ(kda_bytes, 43417600u);            // 20 x 2,170,880 B (spec §3.8)
  EXPECT_EQ(mla_bytes, 2u * 8064u);           // 8,064 B per token over 7 layers (spec §8)
  EXPECT_LE(largest, (size_t{4} << 20));      // every frame fits gRPC's default 4 MiB
  const absl::StatusOr<SequenceState> got = Assemble(config, *frames);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->kda[19].recurrent, state.kda[19].recurrent);
}

}  // namespace
}  // namespace kl
