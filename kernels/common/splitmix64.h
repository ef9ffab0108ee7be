// SplitMix64: the project's deterministic generator for test data and random
// checkpoints, synthetic tokenizers and seeded sampling (spec kda_test_vectors.md
// §1), so C++ and Python cross-checks can produce identical numbers. The one copy
// in the project; header-only, no dependencies.
#ifndef KL_KERNELS_COMMON_SPLITMIX64_H_
#define KL_KERNELS_COMMON_SPLITMIX64_H_

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KL_SPLITMIX_HD __host__ __device__
#else
#define KL_SPLITMIX_HD
#endif

namespace kl {

// Output i (0-based) of SplitMix64(seed), computed directly: the counter-based
// form for parallel fills (host threads or GPU threads) that must agree.
KL_SPLITMIX_HD inline uint64_t SplitMix64At(uint64_t seed, uint64_t i) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Not thread-safe (one instance per thread or per block). Because the state
// advances by a constant, Skip(n) jumps ahead n outputs in O(1): parallel
// generators can each start at their block's offset and still produce exactly the
// sequence a single generator would.
class SplitMix64 {
 public:
  static constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;

  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  // Next 64 random bits.
  uint64_t Next() {
    const uint64_t z = SplitMix64At(state_, 0);
    state_ += kGamma;
    return z;
  }

  // Advances as if Next() had been called n times.
  void Skip(uint64_t n) { state_ += n * kGamma; }

  // Uniform in [0, 1) with 53 random bits: (Next() >> 11) * 2^-53.
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

  // Standard normal by Box–Muller from two consecutive uniforms (consumes exactly
  // two outputs; the sine half is discarded): sqrt(-2 ln(1 - u1)) * cos(2 pi u2).
  double Normal() {
    const double u1 = Uniform();
    const double u2 = Uniform();
    return std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(2.0 * M_PI * u2);
  }

  uint64_t state() const { return state_; }

 private:
  uint64_t state_;
};

}  // namespace kl

#endif  // KL_KERNELS_COMMON_SPLITMIX64_H_
