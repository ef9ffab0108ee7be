// Deterministic test inputs shared by the KDA tests (and usable by any other
// test that must reproduce kda_test_vectors.md): the SplitMix64 stream, uniform
// and Box-Muller normal draws exactly as §1 specifies, and comparison helpers.
#ifndef KL_KERNELS_CPU_TEST_UTIL_H_
#define KL_KERNELS_CPU_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/common/splitmix64.h"

namespace kl::cpu::testing {

// SplitMix64 (kda_test_vectors.md §1, kernels/common/splitmix64.h) with test
// conveniences. With seed 42 the first three Normal() draws are
// 0.8822489062222688, -0.4508498757188601, 0.1883526341159315.
class SplitMix64 : public kl::SplitMix64 {
 public:
  using kl::SplitMix64::SplitMix64;
  using kl::SplitMix64::Uniform;

  // Uniform in [lo, hi).
  double Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }

  // n normals times `scale`, in draw order.
  std::vector<double> Normals(int64_t n, double scale = 1.0) {
    std::vector<double> out(n);
    for (double& x : out) x = scale * Normal();
    return out;
  }
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
