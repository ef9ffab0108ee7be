// Invariants 4-7 of kda_test_vectors.md §6 on the fp32 kernels: varlen packing,
// causality through conv + recurrence, state layout round trip, closed forms
// (beta = 0, perfect recall / overwrite, linearity in v, very strong and weak decay).
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/parallel.h"
#include "kernels/cpu/kda.h"
#include "kernels/cpu/kda_reference.h"
#include "kernels/cpu/kda_test_runner.h"
#include "kernels/cpu/kda_test_vectors.h"
#include "kernels/cpu/test_util.h"

namespace kl::cpu {
namespace {

using testing::GateKind;
using testing::KdaInputsF32;
using testing::kRecurrentAlgo;
using testing::MaxAbs;
using testing::MaxAbsDiff;
using testing::RandomKdaInputs;
using testing::RunKernel;
using testing::SplitMix64;
using testing::ToF32;

// fp32 kernels vs exact closed forms / fp64 (kda_test_vectors.md §7).
constexpr double kF32Tol = 1e-5;
// Closed forms with exact, unit-scale inputs (recall, strong decay): a few ulp.
constexpr double kF32TightTol = 1e-6;
// A real difference (layout bug, missing state carry) is orders above kF32Tol.
constexpr double kMeaningfulDiff = 1e-2;

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// ---------------------------------------------------------------- invariant 4

struct Packed {
  std::vector<int64_t> cu;
  KdaInputsF32 in;                     // all sequences packed along T
  std::vector<std::vector<float>> s0;  // per-sequence initial states
};

Packed MakePacked(const std::vector<int64_t>& lengths, int64_t H, int64_t K, int64_t V) {
  Packed p;
  p.cu = {0};
  p.in = {0, H, K, V, {}, {}, {}, {}, {}, {}};
  for (size_t n = 0; n < lengths.size(); ++n) {
    const KdaInputsF32 seq = ToF32(RandomKdaInputs(40 + n, lengths[n], H, K, V, GateKind::kWeak));
    p.cu.push_back(p.cu.back() + lengths[n]);
    p.in.T += lengths[n];
    auto append = [](std::vector<float>* dst, const std::vector<float>& src) {
      dst->insert(dst->end(), src.begin(), src.end());
    };
    append(&p.in.q, seq.q);
    append(&p.in.k, seq.k);
    append(&p.in.v, seq.v);
    append(&p.in.g, seq.g);
    append(&p.in.beta, seq.beta);
    p.s0.push_back(seq.s0);
  }
  return p;
}

struct VarlenOut {
  std::vector<float> o;
  std::vector<std::vector<float>> states;
};

VarlenOut RunVarlen(const Packed& p, int64_t chunk, int64_t recurrent_max) {
  VarlenOut out{std::vector<float>(p.in.T * p.in.H * p.in.V), p.s0};
  std::vector<float*> ptrs;
  for (auto& s : out.states) ptrs.push_back(s.data());
  KdaVarlen(p.in.q.data(), p.in.k.data(), p.in.v.data(), p.in.g.data(), p.in.beta.data(),
            p.cu.data(), static_cast<int64_t>(ptrs.size()), p.in.H, p.in.K, p.in.V, chunk,
            recurrent_max, ptrs.data(), out.o.data());
  return out;
}

TEST(KdaVarlen, EqualsEachSequenceAloneAndIsolatesSequences) {
  const std::vector<int64_t> lengths = {5, 0, 1, 64, 130};
  constexpr int64_t H = 2, K = 12, V = 20, C = 16;
  const Packed p = MakePacked(lengths, H, K, V);
  // 0: all chunked; 4: the 1-token sequence recurrent; 64: only 130 chunked; all recurrent.
  for (int64_t recurrent_max : {0, 4, 64, 1000}) {
    SCOPED_TRACE(recurrent_max);
    const VarlenOut out = RunVarlen(p, C, recurrent_max);
    for (size_t n = 0; n < lengths.size(); ++n) {
      SCOPED_TRACE(n);
      const int64_t t0 = p.cu[n], t1 = p.cu[n + 1];
      // Alone: the same algorithm on that sequence only, from its own state.
      std::vector<float> s = p.s0[n], o(p.in.T * H * V);
      RunKernel(p.in, t0, t1, lengths[n] > recurrent_max ? C : kRecurrentAlgo, &s, &o);
      EXPECT_TRUE(BitEqual(out.states[n], s));
      EXPECT_TRUE(BitEqual(std::vector<float>(out.o.begin() + t0 * H * V, out.o.begin() + t1 * H * V),
                           std::vector<float>(o.begin() + t0 * H * V, o.begin() + t1 * H * V)));
      if (lengths[n] == 0) {
        // Empty sequence: state bit-identical to its initial value.
        EXPECT_TRUE(BitEqual(out.states[n], p.s0[n]));
      } else {
        // Non-empty: the state did change (the comparison above is not vacuous).
        EXPECT_FALSE(BitEqual(out.states[n], p.s0[n]));
      }
    }
  }
}

TEST(KdaVarlen, PerturbingOneSequenceChangesNoOther) {
  const std::vector<int64_t> lengths = {5, 0, 1, 64, 130};
  constexpr int64_t H = 2, K = 12, V = 20, C = 16, kRecurrentMax = 4;
  const Packed base = MakePacked(lengths, H, K, V);
  const VarlenOut ref = RunVarlen(base, C, kRecurrentMax);
  for (size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] == 0) continue;
    SCOPED_TRACE(i);
    Packed p = base;
    // Perturb every input of sequence i's first token and its initial state.
    const int64_t t = p.cu[i];
    for (int64_t j = 0; j < H * K; ++j) p.in.k[t * H * K + j] *= -1.0f;
    for (int64_t j = 0; j < H * V; ++j) p.in.v[t * H * V + j] += 1.0f;
    for (int64_t j = 0; j < H; ++j) p.in.beta[t * H + j] = 0.5f;
    p.s0[i][0] += 1.0f;
    const VarlenOut out = RunVarlen(p, C, kRecurrentMax);
    for (size_t n = 0; n < lengths.size(); ++n) {
      const auto o_n = [&](const VarlenOut& r) {
        return std::vector<float>(r.o.begin() + p.cu[n] * H * V, r.o.begin() + p.cu[n + 1] * H * V);
      };
      if (n == i) {
        EXPECT_FALSE(BitEqual(o_n(out), o_n(ref)));
        EXPECT_FALSE(BitEqual(out.states[n], ref.states[n]));
      } else {
        EXPECT_TRUE(BitEqual(o_n(out), o_n(ref))) << n;
        EXPECT_TRUE(BitEqual(out.states[n], ref.states[n])) << n;
      }
    }
  }
}

// Each (sequence, head) is computed by one thread with a fixed operation order,
// so results are bit-identical whatever the pool size.
TEST(KdaVarlen, BitIdenticalForAnyThreadCount) {
  const Packed p = MakePacked({5, 0, 1, 64, 130}, 3, 12, 20);
  SetNumThreads(1);
  const VarlenOut one = RunVarlen(p, 16, 4);
  SetNumThreads(5);
  const VarlenOut five = RunVarlen(p, 16, 4);
  SetNumThreads(0);
  EXPECT_TRUE(BitEqual(one.o, five.o));
  for (size_t n = 0; n < one.states.size(); ++n) EXPECT_TRUE(BitEqual(one.states[n], five.states[n]));
  EXPECT_GT(MaxAbs(one.o), 0.0);
}

TEST(KdaVarlen, EmptySequenceMayHaveNullState) {
  const Packed p = MakePacked({3, 0, 2}, 1, 8, 8);
  std::vector<std::vector<float>> states = p.s0;
  float* ptrs[] = {states[0].data(), nullptr, states[2].data()};
  std::vector<float> o(p.in.T * 8);
  KdaVarlen(p.in.q.data(), p.in.k.data(), p.in.v.data(), p.in.g.data(), p.in.beta.data(),
            p.cu.data(), 3, 1, 8, 8, 64, 0, ptrs, o.data());
  EXPECT_GT(MaxAbs(o), 0.0);
}

// ---------------------------------------------------------------- invariant 5

// The whole KDA token mixer from raw projections: conv + SiLU (q, k, v), L2
// norm, gate, beta, chunked recurrence. Returns o [T][H][V].
std::vector<float> Mixer(const std::vector<float>& xq, const std::vector<float>& xk,
                         const std::vector<float>& xv, const std::vector<float>& f,
                         const std::vector<float>& b, int64_t T, int64_t H, int64_t K,
                         int64_t chunk) {
  constexpr int64_t W = 4;
  const int64_t D = H * K;
  SplitMix64 rng(77);  // fixed weights
  const std::vector<float> wq = ToF32(rng.Normals(D * W, 0.5)), wk = ToF32(rng.Normals(D * W, 0.5)),
                           wv = ToF32(rng.Normals(D * W, 0.5)), a_log = ToF32(rng.Normals(H, 0.5)),
                           dt = ToF32(rng.Normals(D, 0.5));
  std::vector<float> q(T * D), k(T * D), v(T * D), g(T * D), beta(T * H);
  std::vector<float> tq((W - 1) * D, 0.f), tk = tq, tv = tq, state(H * K * K, 0.f), o(T * D);
  ShortConvSilu(xq.data(), wq.data(), T, D, W, tq.data(), q.data());
  ShortConvSilu(xk.data(), wk.data(), T, D, W, tk.data(), k.data());
  ShortConvSilu(xv.data(), wv.data(), T, D, W, tv.data(), v.data());
  L2NormScaleRows(q.data(), T * H, K, 1.0f / std::sqrt(static_cast<float>(K)));
  L2NormScaleRows(k.data(), T * H, K, 1.0f);
  KdaGate(f.data(), a_log.data(), dt.data(), T, H, K, g.data());
  Sigmoid(b.data(), T * H, beta.data());
  if (chunk == kRecurrentAlgo) {
    KdaRecurrent(q.data(), k.data(), v.data(), g.data(), beta.data(), T, H, K, K, state.data(), o.data());
  } else {
    KdaChunkPrefill(q.data(), k.data(), v.data(), g.data(), beta.data(), T, H, K, K, chunk,
                    state.data(), o.data());
  }
  return o;
}

TEST(KdaCausality, ChangingTokenTChangesNothingBeforeT) {
  constexpr int64_t T = 80, H = 2, K = 16, D = H * K, kChanged = 37;
  SplitMix64 rng(5);
  std::vector<float> xq = ToF32(rng.Normals(T * D)), xk = ToF32(rng.Normals(T * D)),
                     xv = ToF32(rng.Normals(T * D)), f = ToF32(rng.Normals(T * D)),
                     b = ToF32(rng.Normals(T * H));
  for (int64_t algo : {int64_t{16}, kRecurrentAlgo}) {
    SCOPED_TRACE(algo);
    const std::vector<float> o = Mixer(xq, xk, xv, f, b, T, H, K, algo);
    auto xq2 = xq, xk2 = xk, xv2 = xv, f2 = f, b2 = b;
    for (int64_t j = 0; j < D; ++j) {
      xq2[kChanged * D + j] += 0.5f;
      xk2[kChanged * D + j] -= 0.5f;
      xv2[kChanged * D + j] += 1.0f;
      f2[kChanged * D + j] += 1.0f;
    }
    b2[kChanged * H] += 1.0f;
    const std::vector<float> o2 = Mixer(xq2, xk2, xv2, f2, b2, T, H, K, algo);
    EXPECT_TRUE(BitEqual(std::vector<float>(o.begin(), o.begin() + kChanged * D),
                         std::vector<float>(o2.begin(), o2.begin() + kChanged * D)));
    EXPECT_GT(MaxAbsDiff(std::vector<float>(o.begin() + kChanged * D, o.begin() + (kChanged + 1) * D),
                         std::vector<float>(o2.begin() + kChanged * D, o2.begin() + (kChanged + 1) * D)),
              kMeaningfulDiff);
  }
}

// ---------------------------------------------------------------- invariant 6

TEST(KdaStateLayout, RoundTripIsExactAndTransposes) {
  constexpr int64_t H = 3, K = 5, V = 7;
  SplitMix64 rng(6);
  const std::vector<float> s = ToF32(rng.Normals(H * K * V));
  std::vector<float> vk(s.size()), back(s.size());
  KdaStateTranspose(s.data(), H, K, V, vk.data());   // [H][K][V] -> [H][V][K]
  KdaStateTranspose(vk.data(), H, V, K, back.data());  // and back
  EXPECT_TRUE(BitEqual(back, s));
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t j = 0; j < V; ++j) {
        ASSERT_EQ(vk[(h * V + j) * K + i], s[(h * K + i) * V + j]);
      }
    }
  }
}

// Importing a V-first state as if it were K-first must visibly break vector A's
// S0 != 0 case (S0 is not symmetric), so a layout mix-up cannot go unnoticed.
TEST(KdaStateLayout, TransposedImportFailsVectorA) {
  const testing::VectorA a;
  using VA = testing::VectorA;
  const auto p = testing::PrepareVectorA<double>(a);
  const std::vector<float> s0 = ToF32(a.nonzero_state.s0);
  std::vector<float> exported(s0.size());
  KdaStateTranspose(s0.data(), VA::kH, VA::kK, VA::kV, exported.data());  // V-first
  for (bool correct_import : {true, false}) {
    std::vector<float> state(s0.size());
    if (correct_import) {
      KdaStateTranspose(exported.data(), VA::kH, VA::kV, VA::kK, state.data());
    } else {
      state = exported;  // the bug: V-first bytes read as K-first
    }
    KdaInputsF32 in{VA::kT, VA::kH, VA::kK, VA::kV, ToF32(p.q), ToF32(p.k),
                    ToF32(p.v), ToF32(p.g), ToF32(p.beta), state};
    const testing::Result r = RunKernel(in, 64);
    if (correct_import) {
      EXPECT_LT(MaxAbsDiff(r.o, a.nonzero_state.o), kF32TightTol);
    } else {
      EXPECT_GT(MaxAbsDiff(r.o, a.nonzero_state.o), kMeaningfulDiff);
    }
  }
}

// ---------------------------------------------------------------- invariant 7

// beta = 0: S_T = diag(exp Gam_T) S0 with Gam accumulated over the whole
// sequence, o_t = (diag(exp Gam_t) S0)^T q_t.
TEST(KdaClosedForm, BetaZeroOnlyDecaysTheState) {
  constexpr int64_t T = 80, H = 2, K = 12, V = 9;
  testing::KdaInputs in = RandomKdaInputs(21, T, H, K, V, GateKind::kWeak);
  for (double& b : in.beta) b = 0;
  std::vector<double> gam(H * K, 0.0), o_exp(T * H * V), s_exp(H * K * V);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < K; ++d) gam[h * K + d] += in.g[(t * H + h) * K + d];
      for (int64_t c = 0; c < V; ++c) {
        double acc = 0;
        for (int64_t d = 0; d < K; ++d) {
          acc += std::exp(gam[h * K + d]) * in.s0[(h * K + d) * V + c] * in.q[(t * H + h) * K + d];
        }
        o_exp[(t * H + h) * V + c] = acc;
      }
    }
  }
  for (int64_t i = 0; i < H * K * V; ++i) s_exp[i] = std::exp(gam[i / V]) * in.s0[i];
  ASSERT_GT(MaxAbs(s_exp), kMeaningfulDiff);  // weak decay: S0 still visible after T tokens
  for (int64_t algo : {int64_t{64}, int64_t{16}, int64_t{7}, kRecurrentAlgo}) {
    SCOPED_TRACE(algo);
    const testing::Result r = RunKernel(ToF32(in), algo);
    EXPECT_LT(MaxAbsDiff(r.o, o_exp), kF32Tol);
    EXPECT_LT(MaxAbsDiff(r.s, s_exp), kF32Tol);
  }
}

// g = 0, beta = 1, standard-basis keys, S0 = 0: S^T k_i = v_i after writing all
// keys; writing key 2 again keeps only the new value. Probed by beta = 0 tokens
// with q = e_i (o = S^T e_i).
TEST(KdaClosedForm, PerfectRecallAndOverwrite) {
  constexpr int64_t K = 8, V = 5, kWrites = K + 1, T = kWrites + K;
  SplitMix64 rng(22);
  KdaInputsF32 in{T, 1, K, V, std::vector<float>(T * K, 0.f), std::vector<float>(T * K, 0.f),
                  ToF32(rng.Normals(T * V)), std::vector<float>(T * K, 0.f),
                  std::vector<float>(T, 1.f), std::vector<float>(K * V, 0.f)};
  for (int64_t t = 0; t < kWrites; ++t) {
    const int64_t key = t < K ? t : 2;  // token K rewrites key 2
    in.k[t * K + key] = 1;
    in.q[t * K + key] = 1;  // o_t reads back what was just written
  }
  for (int64_t i = 0; i < K; ++i) {
    const int64_t t = kWrites + i;
    in.beta[t] = 0;
    in.k[t * K] = 1;
    in.q[t * K + i] = 1;
  }
  for (int64_t algo : {int64_t{64}, int64_t{4}, int64_t{1}, kRecurrentAlgo}) {
    SCOPED_TRACE(algo);
    const testing::Result r = RunKernel(in, algo);
    for (int64_t t = 0; t < kWrites; ++t) {
      for (int64_t c = 0; c < V; ++c) EXPECT_NEAR(r.o[t * V + c], in.v[t * V + c], kF32TightTol);
    }
    for (int64_t i = 0; i < K; ++i) {
      const int64_t writer = i == 2 ? K : i;  // the last write of key i
      for (int64_t c = 0; c < V; ++c) {
        EXPECT_NEAR(r.o[(kWrites + i) * V + c], in.v[writer * V + c], kF32TightTol) << i;
        EXPECT_NEAR(r.s[i * V + c], in.v[writer * V + c], kF32TightTol) << i;
      }
    }
  }
}

TEST(KdaClosedForm, LinearInVWithZeroState) {
  constexpr float kScale = -2.5f;
  KdaInputsF32 in = ToF32(RandomKdaInputs(23, 90, 2, 16, 16, GateKind::kLogSigmoid));
  std::fill(in.s0.begin(), in.s0.end(), 0.0f);
  KdaInputsF32 scaled = in;
  for (float& x : scaled.v) x *= kScale;
  for (int64_t algo : {int64_t{64}, int64_t{16}, kRecurrentAlgo}) {
    SCOPED_TRACE(algo);
    testing::Result r = RunKernel(in, algo);
    const testing::Result rs = RunKernel(scaled, algo);
    for (float& x : r.o) x *= kScale;
    for (float& x : r.s) x *= kScale;
    EXPECT_LT(MaxAbsDiff(rs.o, r.o), kF32TightTol * std::fabs(kScale));
    EXPECT_LT(MaxAbsDiff(rs.s, r.s), kF32TightTol * std::fabs(kScale));
    EXPECT_GT(MaxAbs(r.o), 0.1);
  }
}

// g in [-1000, -30] per step: no NaN / Inf; the old state is gone after one step,
// so S_t = beta_t k_t v_t^T and o_t = beta_t (q_t . k_t) v_t; chunk == recurrent.
TEST(KdaClosedForm, VeryStrongDecayKeepsOnlyTheCurrentToken) {
  constexpr int64_t T = 140, H = 2, K = 16, V = 12;
  testing::KdaInputs in = RandomKdaInputs(24, T, H, K, V, GateKind::kStrong, /*s0_scale=*/100.0);
  for (int64_t i = 0; i < T * H * K; i += 7) in.g[i] = -1000.0;
  const KdaInputsF32 in32 = ToF32(in);
  std::vector<double> o_exp(T * H * V), s_exp(H * K * V);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const float* q = in32.q.data() + (t * H + h) * K;
      const float* k = in32.k.data() + (t * H + h) * K;
      const double b = in32.beta[t * H + h];
      double qk = 0;
      for (int64_t d = 0; d < K; ++d) qk += double(q[d]) * k[d];
      for (int64_t c = 0; c < V; ++c) {
        const double v = in32.v[(t * H + h) * V + c];
        o_exp[(t * H + h) * V + c] = b * qk * v;
        if (t == T - 1) {
          for (int64_t d = 0; d < K; ++d) s_exp[(h * K + d) * V + c] = b * k[d] * v;
        }
      }
    }
  }
  const testing::Result rec = RunKernel(in32, kRecurrentAlgo);
  EXPECT_TRUE(testing::AllFinite(rec.o) && testing::AllFinite(rec.s));
  EXPECT_LT(MaxAbsDiff(rec.o, o_exp), kF32TightTol);
  EXPECT_LT(MaxAbsDiff(rec.s, s_exp), kF32TightTol);
  for (int64_t C : {64, 16, 7, 1}) {
    SCOPED_TRACE(C);
    const testing::Result r = RunKernel(in32, C);
    EXPECT_TRUE(testing::AllFinite(r.o) && testing::AllFinite(r.s));
    EXPECT_LT(MaxAbsDiff(r.o, o_exp), kF32TightTol);
    EXPECT_LT(MaxAbsDiff(r.s, s_exp), kF32TightTol);
    EXPECT_LT(MaxAbsDiff(r.o, rec.o), kF32TightTol);
  }
}

// Per-channel mix of no decay, weak, strong and extreme decays (the flush and
// exp-underflow paths) in one head: chunk == recurrent == fp64.
TEST(KdaClosedForm, MixedExtremeDecaysMatchReference) {
  constexpr int64_t T = 150, H = 2, K = 16, V = 16;
  testing::KdaInputs in = RandomKdaInputs(25, T, H, K, V, GateKind::kLogSigmoid);
  const double kDecays[] = {0.0, -1e-3, -0.05, -3.0, -30.0, -41.0, -45.0, -85.0, -87.0, -1000.0};
  SplitMix64 rng(26);
  for (double& g : in.g) {
    if (rng.Uniform() < 0.5) g = kDecays[rng.Next() % 10];
  }
  const testing::ResultF64 ref = testing::RunReference(in, kRecurrentAlgo);
  for (int64_t algo : {int64_t{64}, int64_t{16}, kRecurrentAlgo}) {
    SCOPED_TRACE(algo);
    const testing::Result r = RunKernel(ToF32(in), algo);
    EXPECT_LT(MaxAbsDiff(r.o, ref.o), kF32Tol);
    EXPECT_LT(MaxAbsDiff(r.s, ref.s), kF32Tol);
  }
}

// Weak decay (g = log-sigmoid(z) / 16): the state carried across a split
// matters, and carrying it reproduces the one-shot result.
TEST(KdaClosedForm, WeakDecayStateCarry) {
  constexpr int64_t T = 256, H = 2, K = 16, V = 16, kSplit = 100, C = 64;
  const KdaInputsF32 in = ToF32(RandomKdaInputs(27, T, H, K, V, GateKind::kWeak));
  const testing::Result full = RunKernel(in, C);
  std::vector<float> s = in.s0, o(full.o.size());
  RunKernel(in, 0, kSplit, C, &s, &o);
  const std::vector<float> carried = s;
  RunKernel(in, kSplit, T, C, &s, &o);
  EXPECT_LT(MaxAbsDiff(o, full.o), kF32Tol);
  EXPECT_LT(MaxAbsDiff(s, full.s), kF32Tol);
  // Dropping the carried state (restarting from S0) is clearly visible.
  std::vector<float> s_bad = in.s0, o_bad(full.o.size());
  RunKernel(in, kSplit, T, C, &s_bad, &o_bad);
  EXPECT_GT(MaxAbsDiff(std::vector<float>(o_bad.begin() + kSplit * H * V, o_bad.end()),
                       std::vector<float>(full.o.begin() + kSplit * H * V, full.o.end())),
            kMeaningfulDiff);
  EXPECT_FALSE(BitEqual(carried, in.s0));
}

}  // namespace
}  // namespace kl::cpu
