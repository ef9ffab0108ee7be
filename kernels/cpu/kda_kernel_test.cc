// fp32 KdaChunkPrefill / KdaRecurrent against the spec vectors A and B, against
// the fp64 reference at production head size, and invariants 1-3 of
// kda_test_vectors.md (chunk == recurrent, split prefill, prefill then decode).
#include <cmath>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/kda.h"
#include "kernels/cpu/kda_reference.h"
#include "kernels/cpu/kda_test_runner.h"
#include "kernels/cpu/kda_test_vectors.h"
#include "kernels/cpu/test_util.h"

namespace kl::cpu {
namespace {

using testing::GateKind;
using testing::kRecurrentAlgo;
using testing::MaxAbs;
using testing::MaxAbsDiff;
using testing::RandomKdaInputs;
using testing::RunKernel;
using testing::ToF32;

// Vector A (unit-scale, T = 3) in fp32 vs the printed values.
constexpr double kVectorATol = 1e-6;
// fp32 CPU vs fp64, and fp32 chunk vs fp32 recurrent (kda_test_vectors.md §7).
constexpr double kF32Tol = 1e-5;
// Sums over the 780 outputs of a vector-B head (observed error <= 5e-7).
constexpr double kF32SumTol = 1e-5;

// Algorithms exercised: chunk lengths and the recurrence.
const int64_t kAlgos[] = {64, 16, 7, 2, 1, kRecurrentAlgo};

TEST(KdaKernels, VectorA) {
  const testing::VectorA a;
  using VA = testing::VectorA;
  // Prepare with the fp32 kernels themselves (gate, sigmoid, L2 norm).
  std::vector<float> q = ToF32(a.q_raw), k = ToF32(a.k_raw), g(a.f.size()), beta(a.b.size());
  L2NormScaleRows(q.data(), VA::kT * VA::kH, VA::kK, static_cast<float>(a.q_scale));
  L2NormScaleRows(k.data(), VA::kT * VA::kH, VA::kK, 1.0f);
  KdaGate(ToF32(a.f).data(), ToF32(a.a_log).data(), ToF32(a.dt_bias).data(), VA::kT, VA::kH,
          VA::kK, g.data());
  Sigmoid(ToF32(a.b).data(), VA::kT * VA::kH, beta.data());
  ASSERT_LT(MaxAbsDiff(g, a.g_expected), kVectorATol);
  const std::vector<float> v = ToF32(a.v);
  for (const VA::Case* c : {&a.zero_state, &a.nonzero_state}) {
    for (int64_t algo : kAlgos) {
      SCOPED_TRACE(::testing::Message() << "algo=" << algo << " s0[1]=" << c->s0[1]);
      testing::KdaInputsF32 in{VA::kT, VA::kH, VA::kK, VA::kV, q, k, v, g, beta, ToF32(c->s0)};
      const testing::Result r = RunKernel(in, algo);
      EXPECT_LT(MaxAbsDiff(r.o, c->o), kVectorATol);
      EXPECT_LT(MaxAbsDiff(r.s, c->s_final), kVectorATol);
    }
  }
}

TEST(KdaKernels, VectorB) {
  const testing::VectorB b = testing::MakeVectorB();
  using VB = testing::VectorB;
  const testing::KdaInputsF32 in{VB::kT,         VB::kH,         VB::kK,        VB::kV,
                                 ToF32(b.q),     ToF32(b.k),     ToF32(b.v),    ToF32(b.g),
                                 ToF32(b.beta),  ToF32(b.s0)};
  for (int64_t algo : kAlgos) {
    SCOPED_TRACE(algo);
    const testing::Result r = RunKernel(in, algo);
    for (int64_t h = 0; h < VB::kH; ++h) {
      SCOPED_TRACE(h);
      const auto& e = b.head[h];
      auto row = [&](int64_t t) {
        const float* p = r.o.data() + (t * VB::kH + h) * VB::kV;
        return std::vector<float>(p, p + VB::kV);
      };
      EXPECT_LT(MaxAbsDiff(row(0), e.o0), kF32Tol);
      EXPECT_LT(MaxAbsDiff(row(63), e.o63), kF32Tol);
      EXPECT_LT(MaxAbsDiff(row(129), e.o129), kF32Tol);
      double sum = 0, sum_abs = 0, sum_s = 0;
      for (int64_t t = 0; t < VB::kT; ++t) {
        for (float x : row(t)) {
          sum += x;
          sum_abs += std::fabs(x);
        }
      }
      const float* sh = r.s.data() + h * VB::kK * VB::kV;
      for (int64_t i = 0; i < VB::kK * VB::kV; ++i) sum_s += sh[i];
      EXPECT_NEAR(sum, e.sum_o, kF32SumTol);
      EXPECT_NEAR(sum_abs, e.sum_abs_o, kF32SumTol);
      EXPECT_LT(MaxAbsDiff(std::vector<float>(sh, sh + VB::kV), e.s_row0), kF32Tol);
      EXPECT_NEAR(sum_s, e.sum_s, kF32SumTol);
    }
  }
}

// Production head size (K = V = 128), realistic 48B gate, random S0, T = 300:
// both fp32 kernels within 1e-5 of the fp64 recurrence.
TEST(KdaKernels, RealisticGateMatchesF64ReferenceAtK128) {
  const testing::KdaInputs in = RandomKdaInputs(2024, 300, 4, 128, 128, GateKind::kRealistic);
  const testing::ResultF64 ref = testing::RunReference(in, kRecurrentAlgo);
  ASSERT_GT(MaxAbs(ref.o), 0.05);  // a meaningful signal, not all decayed away
  const testing::KdaInputsF32 in32 = ToF32(in);
  for (int64_t algo : {int64_t{64}, int64_t{16}, kRecurrentAlgo}) {
    SCOPED_TRACE(algo);
    const testing::Result r = RunKernel(in32, algo);
    EXPECT_LT(MaxAbsDiff(r.o, ref.o), kF32Tol);
    EXPECT_LT(MaxAbsDiff(r.s, ref.s), kF32Tol);
  }
}

// Invariant 1: chunk == recurrent for every chunk length and sequence length.
// K = 12, V = 20 exercise the padded lanes and all recurrent column-tile paths.
TEST(KdaKernels, ChunkEqualsRecurrent) {
  for (int64_t T : {1, 2, 3, 5, 63, 64, 65, 127, 128, 130, 200}) {
    const testing::KdaInputsF32 in =
        ToF32(RandomKdaInputs(300 + T, T, 2, 12, 20, GateKind::kLogSigmoid));
    const testing::Result rec = RunKernel(in, kRecurrentAlgo);
    for (int64_t C : {64, 16, 8, 7, 1}) {
      SCOPED_TRACE(::testing::Message() << "T=" << T << " C=" << C);
      const testing::Result chunk = RunKernel(in, C);
      EXPECT_LT(MaxAbsDiff(chunk.o, rec.o), kF32Tol);
      EXPECT_LT(MaxAbsDiff(chunk.s, rec.s), kF32Tol);
    }
  }
}

// Invariant 2: prefill split at p, state carried, == one-shot prefill.
// Weak decay, so a carry bug would show (the state lives for hundreds of tokens).
TEST(KdaKernels, SplitPrefillEqualsOneShot) {
  constexpr int64_t T = 200;
  const testing::KdaInputsF32 in = ToF32(RandomKdaInputs(11, T, 2, 16, 24, GateKind::kWeak));
  for (int64_t C : {16, 64}) {
    const testing::Result full = RunKernel(in, C);
    // p = 1, p < C, p on a chunk boundary (C, 2C), p inside a chunk, p = T - 1.
    for (int64_t p : {int64_t{1}, int64_t{5}, C, 2 * C, int64_t{37}, T - 1}) {
      SCOPED_TRACE(::testing::Message() << "C=" << C << " p=" << p);
      std::vector<float> s = in.s0, o(full.o.size());
      RunKernel(in, 0, p, C, &s, &o);
      RunKernel(in, p, T, C, &s, &o);
      EXPECT_LT(MaxAbsDiff(o, full.o), kF32Tol);
      EXPECT_LT(MaxAbsDiff(s, full.s), kF32Tol);
    }
  }
}

// Invariant 3 (the disaggregation contract): chunk prefill of T tokens, then
// decode one token at a time == chunk prefill over all T + n tokens.
TEST(KdaKernels, PrefillThenDecode) {
  constexpr int64_t T = 130, n = 20;
  const testing::KdaInputsF32 in =
      ToF32(RandomKdaInputs(12, T + n, 3, 32, 32, GateKind::kWeak));
  const testing::Result full = RunKernel(in, 64);
  std::vector<float> s = in.s0, o(full.o.size());
  RunKernel(in, 0, T, 64, &s, &o);
  for (int64_t t = T; t < T + n; ++t) RunKernel(in, t, t + 1, kRecurrentAlgo, &s, &o);
  EXPECT_LT(MaxAbsDiff(o, full.o), kF32Tol);
  EXPECT_LT(MaxAbsDiff(s, full.s), kF32Tol);
  // The decode rows are real outputs (not left at zero).
  EXPECT_GT(MaxAbs(std::vector<float>(o.begin() + T * 3 * 32, o.end())), 0.01);
}

TEST(KdaKernels, EmptyCallLeavesStateAndOutputUntouched) {
  const testing::KdaInputsF32 in = ToF32(RandomKdaInputs(13, 4, 2, 8, 8, GateKind::kWeak));
  for (int64_t algo : {int64_t{64}, kRecurrentAlgo}) {
    std::vector<float> s = in.s0, o(4, 7.0f);
    RunKernel(in, 0, 0, algo, &s, &o);
    EXPECT_EQ(0, std::memcmp(s.data(), in.s0.data(), s.size() * sizeof(float)));
    EXPECT_EQ(o, std::vector<float>(4, 7.0f));
  }
}

}  // namespace
}  // namespace kl::cpu
