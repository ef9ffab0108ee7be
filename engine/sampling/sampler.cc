#include "engine/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"

namespace kl {
absl::Status ValidateSamplingParams(const SamplingParams& p, const SamplingLimits& lim) {
  auto bad = [](auto&&... parts) { return absl::InvalidArgumentError(absl::StrCat(parts...)); };
  if (!std::isfinite(p.temperature) || p.temperature < 0 || p.temperature > 100) {
    return bad("sampling.temperature must be in [0, 100], got ", p.temperature);
  }
  if (p.top_k < 0) return bad("sampling.top_k must be >= 0, got ", p.top_k);
  if (!(p.top_p > 0 && p.top_p <= 1)) return bad("sampling.top_p must be in (0, 1], got ", p.top_p);
  if (p.max_tokens < 1 || p.max_tokens > lim.max_tokens) {
    return bad("max_tokens must be in [1, ", lim.max_tokens, "], got ", p.max_tokens);
  }
  if (static_cast<int64_t>(p.stop_token_ids.size()) > lim.max_stop_token_ids) {
    return bad("stop_token_ids has ", p.stop_token_ids.size(), " entries, at most ",
               lim.max_stop_token_ids, " allowed");
  }
  for (int32_t id : p.stop_token_ids) {
    if (id < 0 || id >= lim.vocab_size) {
      return bad("stop_token_ids: id ", id, " out of range [0, ", lim.vocab_size, ")");
    }
  }
  if (static_cast<int64_t>(p.stop_strings.size()) > lim.max_stop_strings) {
    return bad("stop_strings has ", p.stop_strings.size(), " entries, at most ",
               lim.max_stop_strings, " allowed");
  }
  for (const auto& s : p.stop_strings) {
    if (s.empty()) return bad("stop_strings: empty string");
    if (static_cast<int64_t>(s.size()) > lim.max_stop_string_bytes) {
      return bad("stop_strings: entry of ", s.size(), " bytes, at most ",
                 lim.max_stop_string_bytes, " allowed");
    }
  }
  return absl::OkStatus();
}

int32_t Argmax(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (v[i] > v[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

Sampler::Sampler(const SamplingParams& params) : params_(params) {
  seed_ = params.seed ? *params.seed : (static_cast<uint64_t>(std::random_device{}()) << 32) ^
                                           std::random_device{}();
  rng_ = SplitMix64(seed_);
}

Sampler::Sampler(const SamplingParams& params, int64_t next_index) : Sampler(params) {
  rng_.Skip(static_cast<uint64_t>(next_index));  // O(1): one draw per index
}

namespace {
SamplingParams ParamsOf(const TokenSampling& d) {
  SamplingParams p;
  p.temperature = d.temperature;
  p.top_p = d.top_p;
  p.top_k = d.top_k;
  p.seed = d.seed;
  return p;
}
}  // namespace

Sampler::Sampler(const TokenSampling& draw)
    : Sampler(ParamsOf(draw), static_cast<int64_t>(draw.draw_index)) {}

double Sampler::NextUniform() { return rng_.Uniform(); }

void Sampler::SkipDraw() {
  if (stochastic()) rng_.Skip(1);
}

int32_t Sampler::Sample(const float* logits, int64_t vocab) {
  if (!stochastic()) return Argmax(logits, vocab);
  // Candidates sorted by logit descending, ties by id: a total order, so the
  // result does not depend on the sort implementation.
  auto& c = scratch_;
  c.resize(vocab);
  for (int64_t i = 0; i < vocab; ++i) c[i] = {logits[i], static_cast<int32_t>(i)};
  auto cmp = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  int64_t keep = vocab;
  if (params_.top_k > 0 && params_.top_k < vocab) {
    keep = params_.top_k;
    std::partial_sort(c.begin(), c.begin() + keep, c.end(), cmp);
  } else {
    std::sort(c.begin(), c.end(), cmp);
  }
  // Softmax over the kept candidates at the given temperature (double sums). Without a
  // finite maximum (all -inf, or +inf) there is nothing to weigh: the first candidate
  // (the draw is still consumed: one per stochastic Sample, so resumed streams agree).
  if (!std::isfinite(c[0].first)) {
    NextUniform();
    return c[0].second;
  }
  const double inv_t = 1.0 / params_.temperature;
  const double mx = c[0].first;
  std::vector<double> p(keep);
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    p[i] = std::exp((c[i].first - mx) * inv_t);
    sum += p[i];
  }
  // Nucleus: the smallest prefix whose mass reaches top_p.
  if (params_.top_p < 1.0) {
    double cum = 0;
    int64_t n = 0;
    while (n < keep) {
      cum += p[n++] / sum;
      if (cum >= params_.top_p) break;
    }
    keep = n;
    sum = 0;
    for (int64_t i = 0; i < keep; ++i) sum += p[i];
  }
  const double u = NextUniform() * sum;
  double acc = 0;
  for (int64_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (u < acc) return c[i].second;
  }
  return c[keep - 1].second;
}

}  // namespace kl
