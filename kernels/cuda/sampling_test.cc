// GPU token sampling (sampling.h) against the host Sampler (engine/sampling): the same
// token for the same logits, parameters, seed and draw index, over batches that mix
// greedy, temperature, top-k and top-p rows, ties, -inf and the model's vocabulary size.
// Tagged "gpu"; skips without a device (the validation test runs everywhere).
#include "kernels/cuda/sampling.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <set>
#include <vector>

#include "engine/sampling/sampler.h"
#include "gtest/gtest.h"
#include "kernels/common/splitmix64.h"
#include "kernels/cuda/kda_test_util.h"

namespace kl::cuda {
namespace {

using testing::DeviceBuffer;
using testing::Download;
using testing::Upload;

#define SKIP_WITHOUT_GPU() \
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device"


// Samples every row on the GPU (one launch) and on the host; returns the GPU tokens and
// expects them equal to the host's.
std::vector<int32_t> SampleBoth(const std::vector<float>& logits, int64_t vocab,
                                const std::vector<SampleRowParams>& params, const char* what) {
  const int64_t rows = static_cast<int64_t>(params.size());
  DeviceBuffer d_logits = Upload(logits), d_params = Upload(params);
  DeviceBuffer d_tokens(rows * sizeof(int32_t));
  EXPECT_TRUE(d_logits.ok() && d_params.ok() && d_tokens.ok());
  cudaMemset(d_tokens.get(), 0xff, d_tokens.bytes());
  const absl::Status s = SampleTokens(d_logits.as<float>(), rows, vocab, vocab,
                                      d_params.as<SampleRowParams>(), d_tokens.as<int32_t>(), nullptr);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<int32_t> got(rows);
  cudaMemcpy(got.data(), d_tokens.get(), rows * sizeof(int32_t), cudaMemcpyDeviceToHost);
  int mismatches = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const SampleRowParams& p = params[r];
    SamplingParams hp;
    hp.temperature = p.temperature;
    hp.top_k = p.top_k;
    hp.top_p = p.top_p;
    hp.seed = p.seed;
    Sampler host(hp, static_cast<int64_t>(p.draw_index));
    const int32_t want = host.Sample(logits.data() + r * vocab, vocab);
    if (got[r] != want && ++mismatches <= 5) {
      ADD_FAILURE() << what << " row " << r << ": GPU " << got[r] << ", host " << want
                    << " (T " << p.temperature << " top_k " << p.top_k << " top_p " << p.top_p
                    << " seed " << p.seed << " draw " << p.draw_index << ")";
    }
  }
  EXPECT_EQ(mismatches, 0) << what;
  return got;
}

std::vector<float> RandomLogits(uint64_t seed, int64_t n, double sigma, double quantum = 0) {
  SplitMix64 rng(seed);
  std::vector<float> v(n);
  for (float& x : v) {
    double z = rng.Normal() * sigma;
    if (quantum > 0) z = std::round(z / quantum) * quantum;  // many exact ties
    x = static_cast<float>(z);
  }
  return v;
}

// Rows cycling through a grid of parameters, each with its own seed and draw index.
std::vector<SampleRowParams> ParamGrid(int64_t rows, int64_t vocab, uint64_t seed) {
  const double temps[] = {0.0, 0.3, 1.0, 2.5};
  const int64_t top_ks[] = {0, 1, 3, 40, vocab + 5};
  const double top_ps[] = {1.0, 0.95, 0.5, 1e-9};
  SplitMix64 rng(seed);
  std::vector<SampleRowParams> ps(rows);
  for (int64_t r = 0; r < rows; ++r) {
    SampleRowParams& p = ps[r];
    p.temperature = temps[r % 4];
    p.top_k = top_ks[(r / 4) % 5];
    p.top_p = top_ps[(r / 20) % 4];
    p.seed = rng.Next();
    p.draw_index = rng.Next() % 100000;
  }
  return ps;
}

TEST(SampleTokensValidation, RejectsBadShapes) {
  SampleRowParams p;
  float x = 0;
  int32_t t = 0;
  EXPECT_EQ(SampleTokens(&x, -1, 4, 4, &p, &t, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SampleTokens(&x, 1, 0, 4, &p, &t, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SampleTokens(&x, 1, 8, 4, &p, &t, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SampleTokens(nullptr, 1, 4, 4, &p, &t, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(SampleTokens(nullptr, 0, 4, 4, nullptr, nullptr, nullptr).ok());  // nothing to do
}

TEST(SampleTokens, MatchesHostSamplerOverAParameterGrid) {
  SKIP_WITHOUT_GPU();
  for (int64_t vocab : {1, 7, 1000}) {
    const int64_t rows = 320;  // 4 temperatures x 5 top-k x 4 top-p, 4 times
    std::vector<float> logits;
    for (int64_t r = 0; r < rows; ++r) {
      const std::vector<float> row = RandomLogits(1000 + 7 * r + vocab, vocab, 1.0 + (r % 3));
      logits.insert(logits.end(), row.begin(), row.end());
    }
    SampleBoth(logits, vocab, ParamGrid(rows, vocab, 77 + vocab),
               vocab == 1 ? "vocab 1" : vocab == 7 ? "vocab 7" : "vocab 1000");
  }
}

TEST(SampleTokens, TiesBreakTowardsTheLowerIdLikeTheHost) {
  SKIP_WITHOUT_GPU();
  const int64_t vocab = 500, rows = 320;
  std::vector<float> logits;
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row = RandomLogits(5000 + r, vocab, 1.5, /*quantum=*/0.5);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  SampleBoth(logits, vocab, ParamGrid(rows, vocab, 91), "quantised logits (ties)");
}

TEST(SampleTokens, ModelVocabularyManyDraws) {
  SKIP_WITHOUT_GPU();
  const int64_t vocab = 163840, rows = 160;
  std::vector<float> logits;
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row = RandomLogits(9000 + r, vocab, 3.0);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  const std::vector<SampleRowParams> ps = ParamGrid(rows, vocab, 5);
  const std::vector<int32_t> a = SampleBoth(logits, vocab, ps, "vocab 163840");
  // The same inputs give the same tokens again (integer sums: no order dependence).
  const std::vector<int32_t> b = SampleBoth(logits, vocab, ps, "vocab 163840, again");
  EXPECT_EQ(a, b);
}

// Thousands of equal logits in one value bucket: more candidates than the kernel's
// shared-memory list, so the selection takes its full-row path; and a row of one value.
TEST(SampleTokens, MassiveTiesTakeTheFullRowPath) {
  SKIP_WITHOUT_GPU();
  const int64_t vocab = 163840, rows = 40;
  std::vector<float> logits;
  for (int64_t r = 0; r < rows - 1; ++r) {
    const std::vector<float> row = RandomLogits(7000 + r, vocab, 1.0, /*quantum=*/1.0);
    logits.insert(logits.end(), row.begin(), row.end());
  }
  logits.insert(logits.end(), vocab, 0.5f);  // all equal
  SampleBoth(logits, vocab, ParamGrid(rows, vocab, 33), "vocab 163840, 9 distinct values");
}

TEST(SampleTokens, NonFiniteLogits) {
  SKIP_WITHOUT_GPU();
  const int64_t vocab = 64;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> logits;
  std::vector<SampleRowParams> ps;
  auto add = [&](std::vector<float> row, double t) {
    logits.insert(logits.end(), row.begin(), row.end());
    SampleRowParams p;
    p.temperature = t;
    p.seed = 1234 + ps.size();
    ps.push_back(p);
  };
  // Only id 37 has a finite logit: every mode must pick it.
  std::vector<float> one(vocab, -inf);
  one[37] = 0.25f;
  add(one, 0.0);
  add(one, 1.0);
  // -inf entries are never drawn; the finite ones are, with the host's probabilities.
  std::vector<float> mixed = RandomLogits(3, vocab, 1.0);
  for (int64_t i = 0; i < vocab; i += 3) mixed[i] = -inf;
  for (int rep = 0; rep < 20; ++rep) add(mixed, 1.5);
  // All -inf: greedy's answer (the lowest id) in every mode, as on the host.
  add(std::vector<float>(vocab, -inf), 1.0);
  const std::vector<int32_t> got = SampleBoth(logits, vocab, ps, "non-finite logits");
  for (int rep = 0; rep < 20; ++rep) EXPECT_NE(got[2 + rep] % 3, 0);

  // NaN ranks below every number on the GPU (the host Sampler leaves NaN unspecified).
  std::vector<float> with_nan = RandomLogits(4, vocab, 1.0);
  with_nan[0] = nan;
  with_nan[5] = nan;
  DeviceBuffer d_logits = Upload(with_nan);
  std::vector<SampleRowParams> p2(1);
  p2[0].temperature = 0.0;
  DeviceBuffer d_params = Upload(p2), d_tok(sizeof(int32_t));
  ASSERT_TRUE(SampleTokens(d_logits.as<float>(), 1, vocab, vocab, d_params.as<SampleRowParams>(),
                           d_tok.as<int32_t>(), nullptr)
                  .ok());
  int32_t tok = -1;
  cudaMemcpy(&tok, d_tok.get(), sizeof(tok), cudaMemcpyDeviceToHost);
  std::vector<float> finite = with_nan;
  finite[0] = finite[5] = -inf;
  EXPECT_EQ(tok, Argmax(finite.data(), vocab));
}

// Temperatures so small that 1 / T overflows fp32 (valid requests: T in (0, 100]): the
// draw is among the tied maxima, as on the host.
TEST(SampleTokens, TinyTemperatureDrawsAmongTiedMaxima) {
  SKIP_WITHOUT_GPU();
  const int64_t vocab = 50, rows = 40;
  std::vector<float> logits;
  std::vector<SampleRowParams> ps(rows);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> row = RandomLogits(300 + r, vocab, 1.0);
    row[7] = row[30] = row[41] = 9.0f;  // three tied maxima
    logits.insert(logits.end(), row.begin(), row.end());
    ps[r].temperature = r % 2 == 0 ? 1e-300 : 1e-40;
    ps[r].seed = 77 + r;
    ps[r].draw_index = r;
  }
  const std::vector<int32_t> got = SampleBoth(logits, vocab, ps, "tiny temperatures");
  std::set<int32_t> seen(got.begin(), got.end());
  EXPECT_EQ(seen, (std::set<int32_t>{7, 30, 41}));
}

// Rows of a padded [rows][ld] buffer: only the first `vocab` columns count.
TEST(SampleTokens, LeadingDimension) {
  SKIP_WITHOUT_GPU();
  const int64_t vocab = 100, ld = 128, rows = 8;
  std::vector<float> padded(rows * ld, 1e30f), dense;
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<float> row = RandomLogits(60 + r, vocab, 2.0);
    std::copy(row.begin(), row.end(), padded.begin() + r * ld);
    dense.insert(dense.end(), row.begin(), row.end());
  }
  const std::vector<SampleRowParams> ps = ParamGrid(rows, vocab, 12);
  DeviceBuffer d_logits = Upload(padded), d_params = Upload(ps), d_tok(rows * sizeof(int32_t));
  ASSERT_TRUE(SampleTokens(d_logits.as<float>(), rows, vocab, ld, d_params.as<SampleRowParams>(),
                           d_tok.as<int32_t>(), nullptr)
                  .ok());
  std::vector<int32_t> got(rows);
  cudaMemcpy(got.data(), d_tok.get(), rows * sizeof(int32_t), cudaMemcpyDeviceToHost);
  const std::vector<int32_t> want = SampleBoth(dense, vocab, ps, "dense copy");
  EXPECT_EQ(got, want);
}

}  // namespace
}  // namespace kl::cuda
