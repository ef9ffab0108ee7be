// Token sampling: greedy, temperature, top-k, top-p; seeded and reproducible.
// A Sampler belongs to one request; the same seed and logits give the same tokens
// on every machine (the RNG is SplitMix64, the arithmetic deterministic).
#ifndef KL_ENGINE_SAMPLING_SAMPLER_H_
#define KL_ENGINE_SAMPLING_SAMPLER_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/common/splitmix64.h"

namespace kl {

struct SamplingParams {
  double temperature = 1.0;   // 0 = greedy (argmax, ties to the lower id)
  int64_t top_k = 0;          // 0 = no top-k filter
  double top_p = 1.0;         // (0, 1]; 1 = no nucleus filter
  std::optional<uint64_t> seed;  // unset: a random seed is drawn (and reported)
  int64_t max_tokens = 256;   // tokens to generate, >= 1
  std::vector<int32_t> stop_token_ids;
  std::vector<std::string> stop_strings;
  bool ignore_eos = false;
};

// Limits a request may not exceed.
struct SamplingLimits {
  int64_t vocab_size = 0;
  int64_t max_tokens = 1 << 20;
  int64_t max_stop_strings = 16;
  int64_t max_stop_string_bytes = 256;
  int64_t max_stop_token_ids = 64;
};

// INVALID_ARGUMENT naming the field ("sampling.top_p must be in (0, 1], got 1.5").
absl::Status ValidateSamplingParams(const SamplingParams& p, const SamplingLimits& limits);

// One token's draw, for sampling done elsewhere (Backend::SampleTokens): the request's
// parameters, its seed, and which SplitMix64 draw of it (the generated-token index).
struct TokenSampling {
  double temperature = 0.0;  // 0: greedy
  double top_p = 1.0;
  int64_t top_k = 0;
  uint64_t seed = 0;
  uint64_t draw_index = 0;
};

class Sampler {
 public:
  // `params` must have passed ValidateSamplingParams.
  explicit Sampler(const SamplingParams& params);
  // Resumes a request's sampling at generated-token index `next_index`: the same
  // seed and index give the same draw on any worker (every stochastic Sample
  // consumes exactly one draw), so prefill, decode and migrations agree.
  Sampler(const SamplingParams& params, int64_t next_index);
  // The sampler that takes `draw`: its parameters and seed, resumed at its index.
  explicit Sampler(const TokenSampling& draw);
  uint64_t seed() const { return seed_; }
  // The draw this request takes for the token at generated index `index`.
  TokenSampling Draw(int64_t index) const {
    return TokenSampling{params_.temperature, params_.top_p, params_.top_k, seed_,
                         static_cast<uint64_t>(index)};
  }

  // Picks the next token from raw logits [vocab]. Advances the RNG only when
  // sampling is stochastic.
  int32_t Sample(const float* logits, int64_t vocab);
  // Accounts for a token sampled elsewhere (Backend::SampleTokens) with this request's
  // parameters: consumes the draw Sample would have, so later host samples stay aligned.
  void SkipDraw();
  bool stochastic() const { return !(params_.temperature == 0 || params_.top_k == 1); }

 private:
  double NextUniform();
  SamplingParams params_;
  uint64_t seed_;
  SplitMix64 rng_{0};
  std::vector<std::pair<float, int32_t>> scratch_;
};

// Index of the largest value (ties: the lowest index).
int32_t Argmax(const float* v, int64_t n);

}  // namespace kl

#endif  // KL_ENGINE_SAMPLING_SAMPLER_H_
