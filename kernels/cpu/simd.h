// Eight-lane fp32 vectors (GCC/Clang vector extensions, no ISA intrinsics) and the
// few transcendental functions the CPU KDA kernels need. Every function is a
// template over `float` and `F32x8`, and both instantiations perform the same
// operations in the same order, so a scalar tail computes bit-for-bit what a
// vector lane would (modulo FMA contraction, which the kernel copts enable).
//
// Internal to //kernels/cpu: not part of the kernels' public API.
#ifndef KL_KERNELS_CPU_SIMD_H_
#define KL_KERNELS_CPU_SIMD_H_

#include <cstdint>
#include <cstring>

namespace kl::cpu::simd {

typedef float F32x8 __attribute__((vector_size(32)));
typedef int32_t I32x8 __attribute__((vector_size(32)));
typedef float F32x4 __attribute__((vector_size(16)));
constexpr int64_t kLanes = 8;

inline int64_t RoundUpToLanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Lane type traits: the matching integer type and the lane count.
template <class V> struct Traits;
template <> struct Traits<float> {
  using Int = int32_t;
  static constexpr int64_t kWidth = 1;
};
template <> struct Traits<F32x8> {
  using Int = I32x8;
  static constexpr int64_t kWidth = 8;
};

// Unaligned load / store of Traits<V>::kWidth floats.
template <class V> inline V Load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V> inline void Store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }

template <class V> inline V Splat(float x) { return V{} + x; }

// Reinterprets the bits (same size, no conversion).
template <class To, class From> inline To BitCast(From x) {
  static_assert(sizeof(To) == sizeof(From), "size mismatch");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

inline float ReduceAdd(float v) { return v; }
inline float ReduceAdd(F32x8 v) {
  const F32x4 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3);
  const F32x4 hi = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const F32x4 s = lo + hi;
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// exp(x), relative error ~1.5 ulp (Cephes expf: Cody-Waite reduction, degree-5
// polynomial, exponent inserted by integer add). Contract on the range:
//   x < kExpMinArg (-86)  -> exactly 0 (true value < 5e-38; keeps results normal:
//                            no denormal arithmetic downstream),
//   x > kExpMaxArg (+88)  -> exp(88) ~ 1.65e38 (finite; never Inf),
//   NaN in -> unspecified (the kernels never pass NaN).
constexpr float kExpMinArg = -86.0f;
constexpr float kExpMaxArg = 88.0f;
template <class V> inline V Exp(V x) {
  using I = typename Traits<V>::Int;
  const V lo = Splat<V>(kExpMinArg);
  const V hi = Splat<V>(kExpMaxArg);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // n = round(x / ln2) by the 1.5*2^23 trick; t's low mantissa bits hold n.
  const V magic = Splat<V>(12582912.0f);
  const V t = xc * 1.44269504088896341f + magic;
  const V n = t - magic;
  V r = xc - n * 0.693359375f;    // ln2 split: hi part exact in 9 bits,
  r = r - n * -2.12194440e-4f;    // lo part (hi + lo = ln2 to ~1e-11).
  V p = Splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * (r * r) + r + 1.0f;
  const I ni = BitCast<I>(t) - BitCast<I>(magic);
  // ni * 2^23 (a multiply, not a shift: shifting a negative int is UB in C++17).
  const V res = BitCast<V>(BitCast<I>(y) + ni * 8388608);
  return x < lo ? V{} : res;
}

// log(1 + z) for z in [0, 1] via 2*atanh(s), s = z / (2 + z) in [0, 1/3]: no
// cancellation for tiny z; series truncated after s^15 (relative error < 2e-9
// before rounding). Outside [0, 1] the result is not accurate.
template <class V> inline V Log1pUnit(V z) {
  const V s = z / (z + 2.0f);
  const V s2 = s * s;
  V p = Splat<V>(1.0f / 15);
  p = p * s2 + (1.0f / 13);
  p = p * s2 + (1.0f / 11);
  p = p * s2 + (1.0f / 9);
  p = p * s2 + (1.0f / 7);
  p = p * s2 + (1.0f / 5);
  p = p * s2 + (1.0f / 3);
  p = p * s2 + 1.0f;
  return (s + s) * p;
}

// softplus(y) = log(1 + e^y), switched to the identity for y > 20 (the PyTorch
// / fla threshold the checkpoint was trained with). Computed as
// max(y, 0) + log1p(e^-|y|), which never overflows.
constexpr float kSoftplusThreshold = 20.0f;
template <class V> inline V Softplus(V y) {
  const V zero{};
  const V abs_y = y < zero ? -y : y;
  const V pos = y > zero ? y : zero;
  const V soft = pos + Log1pUnit(Exp(-abs_y));
  return y > kSoftplusThreshold ? y : soft;
}

// sigmoid(x) = 1 / (1 + e^-x); e^-x saturates at e^88, so x << 0 gives a tiny
// positive value, never NaN.
template <class V> inline V Sigmoid(V x) { return 1.0f / (Exp(-x) + 1.0f); }

// x where x >= threshold, else 0.
template <class V> inline V FlushBelow(V x, float threshold) {
  return x < Splat<V>(threshold) ? V{} : x;
}

// x where |x| >= threshold, else 0.
template <class V> inline V FlushAbsBelow(V x, float threshold) {
  using I = typename Traits<V>::Int;
  const V abs_x = BitCast<V>(BitCast<I>(x) & 0x7fffffff);
  return abs_x < Splat<V>(threshold) ? V{} : x;
}

// Applies `op` (V -> V) to n contiguous floats: vector body, scalar tail.
template <class Op> inline void MapArray(const float* in, int64_t n, float* out, Op op) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) Store<F32x8>(out + i, op(Load<F32x8>(in + i)));
  for (; i < n; ++i) out[i] = op(in[i]);
}

}  // namespace kl::cpu::simd

#endif  // KL_KERNELS_CPU_SIMD_H_
