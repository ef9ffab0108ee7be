#include "engine/model/random_source.h"

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "kernels/common/parallel.h"

namespace kl {
namespace {

uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Counter-based: element i of a tensor is a pure function of (key, i), so the
// fill parallelises and does not depend on the thread count.
inline double Uniform(uint64_t key, uint64_t i) {
  return (Mix(key + 0x9E3779B97F4A7C15ull * (i + 1)) >> 11) * 0x1.0p-53;
}
inline float Normal(uint64_t key, uint64_t i) {
  const double u1 = Uniform(key, 2 * i), u2 = Uniform(key, 2 * i + 1);
  return static_cast<float>(std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(2 * M_PI * u2));
}

uint64_t HashName(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

}  // namespace

TensorSource RandomTensorSource(uint64_t seed) {
  auto buffer = std::make_shared<std::vector<float>>();
  return [seed, buffer](const std::string& name, int64_t rows,
                        int64_t cols) -> absl::StatusOr<HostTensor> {
    const int64_t n = rows * cols;
    buffer->resize(n);
    float* out = buffer->data();
    const uint64_t key = Mix(seed ^ HashName(name));
    const bool is_norm = absl::EndsWith(name, "norm.weight") || absl::EndsWith(name, "layernorm.weight");
    ParallelFor(n, 1 << 15, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        float v;
        if (is_norm) {
          v = 1.0f + 0.05f * Normal(key, i);
        } else if (absl::EndsWith(name, "A_log")) {
          v = static_cast<float>(std::log(1.0 + 15.0 * Uniform(key, i)));
        } else if (absl::EndsWith(name, "dt_bias")) {
          v = 0.5f * Normal(key, i);
        } else if (absl::EndsWith(name, "e_score_correction_bias")) {
          v = 0.01f * Normal(key, i);
        } else if (absl::EndsWith(name, "conv1d.weight")) {
          v = 0.5f * Normal(key, i);
        } else if (name == "model.embed_tokens.weight") {
          v = Normal(key, i);
        } else {
          v = Normal(key, i) / std::sqrt(static_cast<float>(cols));
        }
        out[i] = v;
      }
    });
    HostTensor t;
    t.dtype = DType::kF32;
    t.data = out;
    t.rows = rows;
    t.cols = cols;
    return t;
  };
}

TensorSource SyntheticTensorSource(uint64_t seed, bool bf16) {
  return [seed, bf16](const std::string& name, int64_t rows,
                      int64_t cols) -> absl::StatusOr<HostTensor> {
    float mean = 0.0f, stddev = 1.0f / std::sqrt(static_cast<float>(cols));
    if (absl::EndsWith(name, "norm.weight") || absl::EndsWith(name, "layernorm.weight")) {
      mean = 1.0f;
      stddev = 0.05f;
    } else if (absl::EndsWith(name, "A_log")) {
      mean = 1.5f;  // log(1 + 15 U) has mean ~1.5 on [0, 2.77]
      stddev = 0.7f;
    } else if (absl::EndsWith(name, "dt_bias")) {
      stddev = 0.5f;
    } else if (absl::EndsWith(name, "e_score_correction_bias")) {
      stddev = 0.01f;
    } else if (absl::EndsWith(name, "conv1d.weight")) {
      stddev = 0.5f;
    } else if (name == "model.embed_tokens.weight") {
      stddev = 1.0f;
    }
    HostTensor t;
    t.dtype = (bf16 && rows >= 2 && cols >= 64) ? DType::kBF16 : DType::kF32;
    t.rows = rows;
    t.cols = cols;
    t.synthetic = true;
    t.synth_mean = mean;
    t.synth_half_range = stddev * std::sqrt(3.0f);
    t.synth_seed = Mix(seed ^ HashName(name));
    return t;
  };
}

}  // namespace kl
