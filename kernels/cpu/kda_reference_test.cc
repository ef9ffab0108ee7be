// The fp64 references against kda_test_vectors.md: generator, vectors A and B,
// and R2 (chunked) == R1 (recurrent) / split-prefill invariants at 1e-12.
#include "kernels/cpu/kda_reference.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/kda_test_vectors.h"
#include "kernels/cpu/test_util.h"

namespace kl::cpu {
namespace {

using testing::MaxAbsDiff;
using testing::SplitMix64;

// Expected values are printed with 12 decimals.
constexpr double kPrintedTol = 1e-9;
// fp64 R1 vs R2 (kda_test_vectors.md §7: <= 1e-12, observed <= 1e-15).
constexpr double kF64Tol = 1e-12;

TEST(SplitMix64, Seed42FirstNormals) {
  SplitMix64 rng(42);
  EXPECT_NEAR(rng.Normal(), 0.8822489062222688, 1e-15);
  EXPECT_NEAR(rng.Normal(), -0.4508498757188601, 1e-15);
  EXPECT_NEAR(rng.Normal(), 0.1883526341159315, 1e-15);
}

TEST(SplitMix64, UniformInUnitInterval) {
  SplitMix64 rng(7);
  double lo = 1, hi = 0;
  for (int i = 0; i < 10000; ++i) {
    const double u = rng.Uniform();
    lo = std::min(lo, u);
    hi = std::max(hi, u);
  }
  EXPECT_GE(lo, 0.0);
  EXPECT_LT(lo, 1e-3);
  EXPECT_LT(hi, 1.0);
  EXPECT_GT(hi, 1 - 1e-3);
}

TEST(ReferenceVectorA, Intermediates) {
  const testing::VectorA a;
  const auto p = testing::PrepareVectorA<double>(a);
  EXPECT_LT(MaxAbsDiff(p.g, a.g_expected), kPrintedTol);
  EXPECT_LT(MaxAbsDiff(p.beta, a.beta_expected), kPrintedTol);
  std::vector<double> q_unscaled = p.q;
  for (double& x : q_unscaled) x /= a.q_scale;
  EXPECT_LT(MaxAbsDiff(q_unscaled, a.q_norm_expected), kPrintedTol);
  EXPECT_LT(MaxAbsDiff(p.k, a.k_norm_expected), kPrintedTol);
}

TEST(ReferenceVectorA, RecurrentAndChunkedBothStates) {
  const testing::VectorA a;
  const auto p = testing::PrepareVectorA<double>(a);
  using VA = testing::VectorA;
  for (const VA::Case* c : {&a.zero_state, &a.nonzero_state}) {
    for (int64_t chunk : {0, 2, 1, 3}) {  // 0 = R1
      SCOPED_TRACE(chunk);
      std::vector<double> s = c->s0, o(VA::kT * VA::kH * VA::kV);
      if (chunk == 0) {
        reference::Recurrent(p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), VA::kT,
                             VA::kH, VA::kK, VA::kV, s.data(), o.data());
      } else {
        reference::Chunked(p.q.data(), p.k.data(), p.v.data(), p.g.data(), p.beta.data(), VA::kT,
                           VA::kH, VA::kK, VA::kV, chunk, s.data(), o.data());
      }
      EXPECT_LT(MaxAbsDiff(o, c->o), kPrintedTol);
      EXPECT_LT(MaxAbsDiff(s, c->s_final), kPrintedTol);
    }
  }
}

// Checks o / S_final of vector B against the printed values.
void ExpectVectorB(const testing::VectorB& b, const std::vector<double>& o,
                   const std::vector<double>& s, double tol, double sum_tol) {
  using VB = testing::VectorB;
  for (int64_t h = 0; h < VB::kH; ++h) {
    SCOPED_TRACE(h);
    const auto& e = b.head[h];
    auto row = [&](int64_t t) {
      const double* p = o.data() + (t * VB::kH + h) * VB::kV;
      return std::vector<double>(p, p + VB::kV);
    };
    EXPECT_LT(MaxAbsDiff(row(0), e.o0), tol);
    EXPECT_LT(MaxAbsDiff(row(63), e.o63), tol);
    EXPECT_LT(MaxAbsDiff(row(129), e.o129), tol);
    double sum = 0, sum_abs = 0, sum_s = 0;
    for (int64_t t = 0; t < VB::kT; ++t) {
      for (double x : row(t)) {
        sum += x;
        sum_abs += std::fabs(x);
      }
    }
    const double* sh = s.data() + h * VB::kK * VB::kV;
    for (int64_t i = 0; i < VB::kK * VB::kV; ++i) sum_s += sh[i];
    EXPECT_NEAR(sum, e.sum_o, sum_tol);
    EXPECT_NEAR(sum_abs, e.sum_abs_o, sum_tol);
    EXPECT_LT(MaxAbsDiff(std::vector<double>(sh, sh + VB::kV), e.s_row0), tol);
    EXPECT_NEAR(sum_s, e.sum_s, sum_tol);
  }
}

TEST(ReferenceVectorB, RecurrentAndChunked) {
  const testing::VectorB b = testing::MakeVectorB();
  using VB = testing::VectorB;
  for (int64_t chunk : {0, 64, 16, 7, 1}) {  // 0 = R1
    SCOPED_TRACE(chunk);
    std::vector<double> s = b.s0, o(VB::kT * VB::kH * VB::kV);
    if (chunk == 0) {
      reference::Recurrent(b.q.data(), b.k.data(), b.v.data(), b.g.data(), b.beta.data(), VB::kT,
                           VB::kH, VB::kK, VB::kV, s.data(), o.data());
    } else {
      reference::Chunked(b.q.data(), b.k.data(), b.v.data(), b.g.data(), b.beta.data(), VB::kT,
                         VB::kH, VB::kK, VB::kV, chunk, s.data(), o.data());
    }
    ExpectVectorB(b, o, s, kPrintedTol, kPrintedTol);
  }
}

// Random prepared inputs at tiny dims: normalised q (scaled) / k, gate with a
// mix of weak and strong decays, sigmoid beta, random S0.
struct Inputs {
  int64_t T, H, K, V;
  std::vector<double> q, k, v, g, beta, s0;
};
Inputs RandomInputs(uint64_t seed, int64_t T, int64_t H, int64_t K, int64_t V) {
  SplitMix64 rng(seed);
  Inputs in{T, H, K, V};
  in.q = rng.Normals(T * H * K);
  in.k = rng.Normals(T * H * K);
  in.v = rng.Normals(T * H * V);
  for (int64_t i = 0; i < T * H * K; ++i) in.g.push_back(reference::LogSigmoid(2.0 * rng.Normal()));
  for (int64_t i = 0; i < T * H; ++i) in.beta.push_back(reference::Sigmoid(rng.Normal()));
  in.s0 = rng.Normals(H * K * V);
  reference::L2NormScale<double>(in.q.data(), T * H, K, 1.0 / std::sqrt(double(K)));
  reference::L2NormScale<double>(in.k.data(), T * H, K, 1.0);
  return in;
}

void RunR1(const Inputs& in, int64_t t0, int64_t t1, std::vector<double>* s, std::vector<double>* o) {
  const int64_t n = t1 - t0, H = in.H, K = in.K, V = in.V;
  reference::Recurrent(in.q.data() + t0 * H * K, in.k.data() + t0 * H * K, in.v.data() + t0 * H * V,
                       in.g.data() + t0 * H * K, in.beta.data() + t0 * H, n, H, K, V, s->data(),
                       o->data() + t0 * H * V);
}
void RunR2(const Inputs& in, int64_t t0, int64_t t1, int64_t C, std::vector<double>* s,
           std::vector<double>* o) {
  const int64_t n = t1 - t0, H = in.H, K = in.K, V = in.V;
  reference::Chunked(in.q.data() + t0 * H * K, in.k.data() + t0 * H * K, in.v.data() + t0 * H * V,
                     in.g.data() + t0 * H * K, in.beta.data() + t0 * H, n, H, K, V, C, s->data(),
                     o->data() + t0 * H * V);
}

TEST(ReferenceInvariants, ChunkedEqualsRecurrent) {
  for (int64_t T : {1, 2, 3, 5, 63, 64, 65, 127, 128, 130, 200}) {
    const Inputs in = RandomInputs(100 + T, T, 2, 5, 4);
    std::vector<double> s1 = in.s0, o1(T * in.H * in.V);
    RunR1(in, 0, T, &s1, &o1);
    for (int64_t C : {64, 16, 8, 7, 1}) {
      SCOPED_TRACE(::testing::Message() << "T=" << T << " C=" << C);
      std::vector<double> s2 = in.s0, o2(o1.size());
      RunR2(in, 0, T, C, &s2, &o2);
      EXPECT_LT(MaxAbsDiff(o2, o1), kF64Tol);
      EXPECT_LT(MaxAbsDiff(s2, s1), kF64Tol);
    }
  }
}

TEST(ReferenceInvariants, SplitPrefillAndPrefillThenDecode) {
  constexpr int64_t T = 130, C = 16;
  const Inputs in = RandomInputs(5, T, 2, 5, 4);
  std::vector<double> s_full = in.s0, o_full(T * in.H * in.V);
  RunR2(in, 0, T, C, &s_full, &o_full);
  // p = 1, p < C, p on a chunk boundary, p inside a chunk, p = T - 1.
  for (int64_t p : {1, 5, 16, 64, 37, 129}) {
    SCOPED_TRACE(p);
    std::vector<double> s = in.s0, o(o_full.size());
    RunR2(in, 0, p, C, &s, &o);
    RunR2(in, p, T, C, &s, &o);
    EXPECT_LT(MaxAbsDiff(o, o_full), kF64Tol);
    EXPECT_LT(MaxAbsDiff(s, s_full), kF64Tol);
    // Prefill then decode: R2 over [0, p), then R1 token by token.
    std::vector<double> s3 = in.s0, o3(o_full.size());
    RunR2(in, 0, p, C, &s3, &o3);
    for (int64_t t = p; t < T; ++t) RunR1(in, t, t + 1, &s3, &o3);
    EXPECT_LT(MaxAbsDiff(o3, o_full), kF64Tol);
    EXPECT_LT(MaxAbsDiff(s3, s_full), kF64Tol);
  }
}

}  // namespace
}  // namespace kl::cpu
