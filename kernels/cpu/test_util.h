// Deterministic test inputs shared by the KDA tests (and usable by any other
// test that must reproduce kda_test_vectors.md): the SplitMix64 stream, uniform
// and Box-Muller normal draws exactly as §1 specifies, and comparison helpers.
#ifndef KL_KERNELS_CPU_TEST_UTIL_H_
#define KL_KERNELS_CPU_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace kl::cpu::testing {

// SplitMix64 (kda_test_vectors.md §1). With seed 42 the first three Normal()
// draws are 0.8822489062222688, -0.4508498757188601, 0.1883526341159315.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t Next() {
    state_ += 0x9E3779B97F4A7C15ull;
    uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  // Uniform in [0, 1) with 53 random bits.
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

  // Uniform in [lo, hi).
  double Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }

  // Standard normal from two consecutive uniforms (the sine branch is discarded).
  double Normal() {
    const double u1 = Uniform();
    const double u2 = Uniform();
    return std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(2.0 * M_PI * u2);
  }

  // n normals times `scale`, in draw order.
  std::vector<double> Normals(int64_t n, double scale = 1.0) {
    std::vector<double> out(n);
    for (double& x : out) x = scale * Normal();
    return out;
  }

 private:
  uint64_t state_;
};

inline std::vector<float> ToF32(const std::vector<double>& x) {
  return std::vector<float>(x.begin(), x.end());
}
inline std::vector<double> ToF64(const std::vector<float>& x) {
  return std::vector<double>(x.begin(), x.end());
}

// max_i |a[i] - b[i]| over the common length (inputs of different element types).
template <class A, class B>
double MaxAbsDiff(const std::vector<A>& a, const std::vector<B>& b) {
  double m = 0.0;
  const size_t n = std::min(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    if (!(d <= m)) m = d;  // propagates NaN as +inf-like "worst"
  }
  return m;
}

template <class A>
double MaxAbs(const std::vector<A>& a) {
  double m = 0.0;
  for (const A& x : a) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

template <class A>
bool AllFinite(const std::vector<A>& a) {
  for (const A& x : a) {
    if (!std::isfinite(static_cast<double>(x))) return false;
  }
  return true;
}

}  // namespace kl::cpu::testing

#endif  // KL_KERNELS_CPU_TEST_UTIL_H_
