// GPU tests of the CUDA MoE kernels (moe.h) against host references: routing vs the
// CPU backend's kl::MoeRoute (ids exact, weights to ~1 ulp of expf), experts vs a
// float64 host evaluation of Σ_j w_j W2 (silu(W1 x) ⊙ W3 x). Tagged "gpu"; every test
// that launches skips when no CUDA device is visible. Outputs and workspace are
// poisoned (NaN bytes) before each launch; every output must be written.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/backend/cpu_backend.h"
#include "gtest/gtest.h"
#include "kernels/cuda/kda_test_util.h"
#include "kernels/cuda/moe.h"

namespace kl::cuda {
namespace {

using testing::DeviceBuffer;
using testing::Download;
using testing::Upload;
using testing::RelErr;
using testing::RoundBf16;

// Named tolerances (relative L2 vs the float64 reference).
constexpr double kExactRelTol = 1e-5;  // fp32 SIMT path
// bf16 paths vs a reference fed the same bf16-rounded x and SwiGLU intermediate
// (the documented precision of the path): what remains is fp32 accumulation order
// and the odd intermediate rounded the other way, expected ~1e-5; an indexing or
// fragment-layout error gives O(1).
constexpr double kBf16RelTol = 1e-2;
constexpr double kRouteWeightRelTol = 2e-6;  // device expf vs libm: ~1 ulp

#define SKIP_WITHOUT_GPU() \
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device"

void PoisonNaN(const DeviceBuffer& d) {
  if (d.bytes() > 0) cudaMemset(d.get(), 0xFF, d.bytes());  // 0xFFFFFFFF: a NaN
}

std::vector<float> Normals(kl::cpu::testing::SplitMix64& rng, int64_t n, double scale) {
  return kl::cpu::testing::ToF32(rng.Normals(n, scale));
}

// ---------------------------------------------------------------------------------- routing

struct RouteCase {
  int64_t E, k;
  bool renormalize, biased, with_bias;
  double scale;
  bool discrete;  // logits / bias from a few values: many exact ties
};

// MoeRoute on the device with the CPU's parameters; outputs poisoned (NaN) first.
bool RouteOnDevice(const std::vector<float>& logits, const std::vector<float>* bias, const MoeParams& mp,
                   int64_t T, std::vector<int32_t>* ids, std::vector<float>* w) {
  DeviceBuffer d_logits = Upload(logits), d_bias = bias != nullptr ? Upload(*bias) : DeviceBuffer(4);
  DeviceBuffer d_ids(T * mp.top_k * 4), d_w(T * mp.top_k * 4);
  PoisonNaN(d_ids);
  PoisonNaN(d_w);
  MoeRouteParams p;
  p.num_tokens = T;
  p.num_experts = mp.num_experts;
  p.top_k = mp.top_k;
  p.renormalize = mp.renormalize;
  p.routed_scaling_factor = mp.routed_scaling_factor;
  p.biased_weights = mp.biased_weights;
  p.logits = d_logits.as<float>();
  p.correction_bias = bias != nullptr ? d_bias.as<float>() : nullptr;
  p.topk_ids = d_ids.as<int32_t>();
  p.topk_weights = d_w.as<float>();
  const absl::Status s = MoeRoute(p, nullptr);
  if (!s.ok() || cudaDeviceSynchronize() != cudaSuccess) {
    ADD_FAILURE() << "MoeRoute: " << s;
    return false;
  }
  *ids = Download<int32_t>(d_ids);
  *w = Download<float>(d_w);
  return true;
}

// T <= kMoeRouteRankMaxTokens runs the rank kernel (one CTA per token), more tokens
// the warp kernel; every case runs both.
void CheckRoute(const RouteCase& c, uint64_t seed, int64_t T) {
  kl::cpu::testing::SplitMix64 rng(seed);
  std::vector<float> logits(T * c.E), bias(c.E);
  for (float& x : logits) {
    x = c.discrete ? static_cast<float>(static_cast<int>(rng.Uniform(0.0, 3.0)) - 1)
                   : static_cast<float>(rng.Normal() * 2.0);
  }
  for (float& x : bias) {
    x = c.discrete ? 0.25f * static_cast<float>(static_cast<int>(rng.Uniform(0.0, 2.0)))
                   : static_cast<float>(rng.Normal() * 0.1);
  }
  MoeParams mp;
  mp.num_experts = c.E;
  mp.top_k = c.k;
  mp.renormalize = c.renormalize;
  mp.routed_scaling_factor = c.scale;
  mp.biased_weights = c.biased;
  std::vector<int32_t> ids_ref(T * c.k);
  std::vector<float> w_ref(T * c.k);
  for (int64_t t = 0; t < T; ++t) {
    kl::MoeRoute(logits.data() + t * c.E, c.with_bias ? bias.data() : nullptr, mp,
                 ids_ref.data() + t * c.k, w_ref.data() + t * c.k);
  }
  std::vector<int32_t> ids;
  std::vector<float> w;
  ASSERT_TRUE(RouteOnDevice(logits, c.with_bias ? &bias : nullptr, mp, T, &ids, &w));
  // Ids must match exactly, except for tokens whose top k+1 selection scores hold a
  // near-tie (0 < gap < 1e-6: the device expf may round an ulp away from libm's);
  // exact ties (equal logits) must still match, by the lower-id rule.
  int64_t near_ties = 0;
  std::vector<bool> skip(T, false);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> sel(c.E);
    for (int64_t e = 0; e < c.E; ++e) {
      sel[e] = 1.0f / (1.0f + std::exp(-logits[t * c.E + e])) + (c.with_bias ? bias[e] : 0.0f);
    }
    std::sort(sel.begin(), sel.end(), std::greater<float>());
    bool near_tie = false;
    for (int64_t j = 0; j + 1 < std::min(c.E, c.k + 1); ++j) {
      const float gap = sel[j] - sel[j + 1];
      near_tie |= gap > 0.0f && gap < 1e-6f;
    }
    if (near_tie) {
      ++near_ties;
      skip[t] = true;
      continue;
    }
    for (int64_t j = 0; j < c.k; ++j) {
      ASSERT_EQ(ids[t * c.k + j], ids_ref[t * c.k + j])
          << "token " << t << " pick " << j << " E=" << c.E << " k=" << c.k << " T=" << T;
    }
  }
  EXPECT_LE(near_ties, std::max<int64_t>(1, T / 10)) << "too few tokens checked";
  for (size_t i = 0; i < w.size(); ++i) {
    if (skip[i / c.k]) continue;
    // A biased weight is sigmoid + bias: the ~1-ulp expf difference of a sigmoid (up
    // to 1) is absolute, and survives a bias that cancels most of it.
    const double abs_tol = c.biased ? 2.5e-7 * c.scale * (c.renormalize ? 4.0 : 1.0) : 1e-30;
    ASSERT_LE(std::fabs(w[i] - w_ref[i]), kRouteWeightRelTol * std::fabs(w_ref[i]) + abs_tol)
        << "slot " << i << " E=" << c.E << " k=" << c.k << " biased=" << c.biased
        << " renorm=" << c.renormalize << " T=" << T;
  }
}
void CheckRoute(const RouteCase& c, uint64_t seed) {
  for (int64_t T : {int64_t{5}, kMoeRouteRankMaxTokens, int64_t{77}}) CheckRoute(c, seed, T);
}

TEST(MoeRouteCuda, MatchesCpuBackend) {
  SKIP_WITHOUT_GPU();
  uint64_t seed = 100;
  for (const auto& ek : std::vector<std::pair<int64_t, int64_t>>{{256, 8}, {512, 16}, {8, 2}, {40, 3}, {1, 1}}) {
    for (bool biased : {false, true}) {
      for (bool renorm : {true, false}) {
        for (double scale : {1.0, 2.446}) {
          CheckRoute({ek.first, ek.second, renorm, biased, true, scale, false}, ++seed);
        }
      }
    }
    CheckRoute({ek.first, ek.second, true, false, false, 2.446, false}, ++seed);  // no bias
  }
}

TEST(MoeRouteCuda, TiesGoToTheLowerIdLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  uint64_t seed = 500;
  for (const auto& ek : std::vector<std::pair<int64_t, int64_t>>{{256, 8}, {512, 16}, {33, 5}}) {
    CheckRoute({ek.first, ek.second, true, false, true, 2.446, true}, ++seed);
    CheckRoute({ek.first, ek.second, false, true, false, 1.0, true}, ++seed);
  }
}

// NaN selection scores: the rank kernel hands such a token to the sequential scan, so
// both kernels pick exactly what the CPU picks (the scan's order is not total then).
TEST(MoeRouteCuda, NaNScoresPickLikeTheCpu) {
  SKIP_WITHOUT_GPU();
  const int64_t E = 64, k = 4;
  for (int64_t T : {int64_t{3}, int64_t{40}}) {
    kl::cpu::testing::SplitMix64 rng(T);
    std::vector<float> logits(T * E), bias(E, 0.0f);
    for (float& x : logits) x = static_cast<float>(rng.Normal());
    for (int64_t t = 0; t < T; ++t) {  // a NaN at a token-dependent place, some tokens clean
      if (t % 3 != 2) logits[t * E + (t * 7) % E] = std::nanf("");
      if (t % 3 == 0) logits[t * E + (t * 11 + 5) % E] = std::nanf("");
    }
    for (bool biased : {false, true}) {
      MoeParams mp;
      mp.num_experts = E;
      mp.top_k = k;
      mp.biased_weights = biased;
      std::vector<int32_t> ids_ref(T * k);
      std::vector<float> w_ref(T * k);
      for (int64_t t = 0; t < T; ++t) {
        kl::MoeRoute(logits.data() + t * E, bias.data(), mp, ids_ref.data() + t * k, w_ref.data() + t * k);
      }
      std::vector<int32_t> ids;
      std::vector<float> w;
      ASSERT_TRUE(RouteOnDevice(logits, &bias, mp, T, &ids, &w));
      for (int64_t i = 0; i < T * k; ++i) {
        ASSERT_EQ(ids[i], ids_ref[i]) << "T=" << T << " token " << i / k << " pick " << i % k;
        ASSERT_EQ(std::isnan(w[i]), std::isnan(w_ref[i])) << "T=" << T << " slot " << i;
        if (!std::isnan(w_ref[i])) {  // zero bias: no cancellation
          ASSERT_LE(std::fabs(w[i] - w_ref[i]), kRouteWeightRelTol * std::fabs(w_ref[i]) + 1e-30);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------- experts

struct ExpertWeights {
  int64_t E = 0, D = 0, I = 0;
  DType dtype = DType::kF32;
  std::vector<std::vector<float>> w1, w3, w2;  // host values (bf16-representable for kBF16)
  std::vector<DeviceBuffer> dev;               // one buffer per expert matrix
  DeviceBuffer p1, p3, p2;                     // device arrays of pointers
};

ExpertWeights MakeWeights(uint64_t seed, int64_t E, int64_t D, int64_t I, DType dtype) {
  kl::cpu::testing::SplitMix64 rng(seed);
  ExpertWeights w;
  w.E = E;
  w.D = D;
  w.I = I;
  w.dtype = dtype;
  std::vector<const void*> h1, h3, h2;
  auto make = [&](int64_t n, double scale, std::vector<const void*>& ptrs) {
    std::vector<float> m = Normals(rng, n, scale);
    if (dtype == DType::kBF16) testing::RoundBf16InPlace(m);
    w.dev.push_back(Upload(testing::ToAct(m, dtype)));
    ptrs.push_back(w.dev.back().get());
    return m;
  };
  for (int64_t e = 0; e < E; ++e) {
    w.w1.push_back(make(I * D, 1.0 / std::sqrt(double(D)), h1));
    w.w3.push_back(make(I * D, 1.0 / std::sqrt(double(D)), h3));
    w.w2.push_back(make(D * I, 1.0 / std::sqrt(double(I)), h2));
  }
  w.p1 = Upload(h1);
  w.p3 = Upload(h3);
  w.p2 = Upload(h2);
  return w;
}

// float64 reference; round_bf16: x and the SwiGLU intermediate rounded to bf16 first
// (the tensor-core paths' precision). Ids outside [0, E) contribute nothing.
std::vector<float> Reference(const ExpertWeights& w, const std::vector<float>& x, int64_t T,
                             int64_t k, const std::vector<int32_t>& ids,
                             const std::vector<float>& wts, bool round_bf16) {
  const int64_t D = w.D, I = w.I;
  std::vector<float> out(T * D);
  std::vector<double> xr(D), h(I), acc(D);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < D; ++d) xr[d] = round_bf16 ? RoundBf16(x[t * D + d]) : x[t * D + d];
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = ids[t * k + j];
      if (e < 0 || e >= w.E) continue;
      for (int64_t i = 0; i < I; ++i) {
        double g = 0, u = 0;
        const float* r1 = w.w1[e].data() + i * D;
        const float* r3 = w.w3[e].data() + i * D;
        for (int64_t d = 0; d < D; ++d) {
          g += xr[d] * r1[d];
          u += xr[d] * r3[d];
        }
        const double v = g / (1.0 + std::exp(-g)) * u;
        h[i] = round_bf16 ? RoundBf16(static_cast<float>(v)) : v;
      }
      for (int64_t d = 0; d < D; ++d) {
        const float* r2 = w.w2[e].data() + d * I;
        double s = 0;
        for (int64_t i = 0; i < I; ++i) s += h[i] * r2[i];
        acc[d] += wts[t * k + j] * s;
      }
    }
    for (int64_t d = 0; d < D; ++d) out[t * D + d] = static_cast<float>(acc[d]);
  }
  return out;
}

// Routing on the host (kl::MoeRoute on random logits, 48B conventions).
void HostRoute(uint64_t seed, int64_t T, int64_t E, int64_t k, std::vector<int32_t>* ids,
               std::vector<float>* wts) {
  kl::cpu::testing::SplitMix64 rng(seed);
  std::vector<float> logits = Normals(rng, T * E, 2.0), bias = Normals(rng, E, 0.1);
  MoeParams mp;
  mp.num_experts = E;
  mp.top_k = k;
  mp.routed_scaling_factor = 2.446;
  ids->resize(T * k);
  wts->resize(T * k);
  for (int64_t t = 0; t < T; ++t) {
    kl::MoeRoute(logits.data() + t * E, bias.data(), mp, ids->data() + t * k, wts->data() + t * k);
  }
}

struct RunResult {
  std::vector<float> out;
  bool ok = false;
};

// With `init`, out starts as *init and the call accumulates (MoeExpertsParams::accumulate).
RunResult RunExperts(const ExpertWeights& w, const std::vector<float>& x, int64_t T, int64_t k,
                     const std::vector<int32_t>& ids, const std::vector<float>& wts, MoeAlgo algo,
                     const std::vector<float>* init = nullptr) {
  RunResult r;
  DeviceBuffer d_x = Upload(x), d_ids = Upload(ids), d_w = Upload(wts),
               d_out = init != nullptr ? Upload(*init) : DeviceBuffer(T * w.D * 4);
  MoeExpertsParams p;
  p.num_tokens = T;
  p.hidden = w.D;
  p.inter = w.I;
  p.num_experts = w.E;
  p.top_k = k;
  p.weight_dtype = w.dtype;
  p.algo = algo;
  p.x = d_x.as<float>();
  p.topk_ids = d_ids.as<int32_t>();
  p.topk_weights = d_w.as<float>();
  p.w1 = static_cast<const void* const*>(w.p1.get());
  p.w3 = static_cast<const void* const*>(w.p3.get());
  p.w2 = static_cast<const void* const*>(w.p2.get());
  p.out = d_out.as<float>();
  DeviceBuffer ws(MoeWorkspaceBytes(p));
  if (!d_out.ok() || !ws.ok()) {
    ADD_FAILURE() << "cudaMalloc failed";
    return r;
  }
  p.accumulate = init != nullptr;
  if (init == nullptr) PoisonNaN(d_out);
  PoisonNaN(ws);
  const absl::Status s = MoeExperts(p, ws.get(), ws.bytes(), nullptr);
  if (!s.ok()) {
    ADD_FAILURE() << s;
    return r;
  }
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    ADD_FAILURE() << cudaGetErrorString(err);
    return r;
  }
  r.out = Download<float>(d_out);
  r.ok = true;
  return r;
}

const char* AlgoName(MoeAlgo a) {
  switch (a) {
    case MoeAlgo::kAuto: return "auto";
    case MoeAlgo::kExact: return "exact";
    case MoeAlgo::kTensorCoreSkinny: return "skinny";
    case MoeAlgo::kTensorCoreTiled: return "tiled";
  }
  return "?";
}

// Runs and compares one case; returns the output (for determinism checks).
std::vector<float> CheckExperts(const ExpertWeights& w, int64_t T, int64_t k,
                                const std::vector<int32_t>& ids, const std::vector<float>& wts,
                                MoeAlgo algo, uint64_t seed) {
  kl::cpu::testing::SplitMix64 rng(seed);
  const std::vector<float> x = Normals(rng, T * w.D, 1.0);
  const RunResult r = RunExperts(w, x, T, k, ids, wts, algo);
  if (!r.ok) return {};
  // kAuto picks a tensor-core path for bf16 weights of tensor-core shapes: the
  // reference and tolerance follow the path that actually runs.
  MoeExpertsParams probe;
  probe.num_tokens = T;
  probe.hidden = w.D;
  probe.inter = w.I;
  probe.num_experts = w.E;
  probe.top_k = k;
  probe.weight_dtype = w.dtype;
  probe.algo = algo;
  const MoeAlgo ran = MoeResolveAlgo(probe);
  const bool tc = ran == MoeAlgo::kTensorCoreSkinny || ran == MoeAlgo::kTensorCoreTiled;
  const std::vector<float> ref = Reference(w, x, T, k, ids, wts, tc);
  const double err = RelErr(r.out, ref);
  EXPECT_TRUE(kl::cpu::testing::AllFinite(r.out)) << "unwritten or non-finite output";
  EXPECT_LE(err, tc ? kBf16RelTol : kExactRelTol)
      << AlgoName(algo) << " E=" << w.E << " k=" << k << " D=" << w.D << " I=" << w.I
      << " T=" << T;
  std::printf("  experts %-6s E=%-3lld k=%-2lld D=%-4lld I=%-4lld T=%-5lld rel L2 %.2e\n",
              AlgoName(algo), static_cast<long long>(w.E), static_cast<long long>(k),
              static_cast<long long>(w.D), static_cast<long long>(w.I),
              static_cast<long long>(T), err);
  return r.out;
}

void CheckRouted(const ExpertWeights& w, int64_t T, int64_t k, MoeAlgo algo, uint64_t seed) {
  std::vector<int32_t> ids;
  std::vector<float> wts;
  HostRoute(seed, T, w.E, k, &ids, &wts);
  CheckExperts(w, T, k, ids, wts, algo, seed + 1);
}

TEST(MoeExpertsCuda, TinyExactFp32) {
  SKIP_WITHOUT_GPU();
  const ExpertWeights w = MakeWeights(1, 8, 128, 64, DType::kF32);
  for (int64_t T : {1, 3, 64, 1000}) CheckRouted(w, T, 2, MoeAlgo::kExact, 10 + T);
  // Odd shapes (partial N and K tiles of the exact path).
  const ExpertWeights odd = MakeWeights(2, 5, 132, 72, DType::kF32);
  for (int64_t T : {1, 37}) CheckRouted(odd, T, 3, MoeAlgo::kAuto, 20 + T);
}

TEST(MoeExpertsCuda, TinyBf16AllPaths) {
  SKIP_WITHOUT_GPU();
  const ExpertWeights w = MakeWeights(3, 8, 128, 64, DType::kBF16);
  for (int64_t T : {1, 3, 64, 1000}) {
    CheckRouted(w, T, 2, MoeAlgo::kExact, 30 + T);  // bf16 weights, fp32 activations: exact
    CheckRouted(w, T, 2, MoeAlgo::kTensorCoreSkinny, 40 + T);
    CheckRouted(w, T, 2, MoeAlgo::kTensorCoreTiled, 50 + T);
  }
}

TEST(MoeExpertsCuda, Shape48BReduced) {
  SKIP_WITHOUT_GPU();
  // E = 256, k = 8 as the 48B model; D, I reduced (2304, 1024 there) for test time.
  const ExpertWeights f32 = MakeWeights(4, 256, 256, 128, DType::kF32);
  for (int64_t T : {1, 64, 1000}) CheckRouted(f32, T, 8, MoeAlgo::kExact, 60 + T);
  const ExpertWeights b16 = MakeWeights(5, 256, 256, 128, DType::kBF16);
  for (int64_t T : {1, 3, 64}) CheckRouted(b16, T, 8, MoeAlgo::kAuto, 70 + T);  // skinny
  for (int64_t T : {64, 1000}) CheckRouted(b16, T, 8, MoeAlgo::kTensorCoreTiled, 80 + T);
  CheckRouted(b16, 1000, 8, MoeAlgo::kTensorCoreSkinny, 90);
}

TEST(MoeExpertsCuda, Full48BDimensions) {
  SKIP_WITHOUT_GPU();
  // D = 2304, I = 1024 as the 48B model (E = 16 here to bound host memory): every K
  // loop, N tile count and pipeline depth of the production shape.
  const ExpertWeights b16 = MakeWeights(15, 16, 2304, 1024, DType::kBF16);
  CheckRouted(b16, 5, 8, MoeAlgo::kExact, 400);  // bf16 weights, fp32 activations
  for (int64_t T : {1, 5}) CheckRouted(b16, T, 8, MoeAlgo::kTensorCoreSkinny, 410 + T);
  CheckRouted(b16, 40, 8, MoeAlgo::kTensorCoreTiled, 420);
}

TEST(MoeExpertsCuda, SkewedAndPaddedRouting) {
  SKIP_WITHOUT_GPU();
  const ExpertWeights f32 = MakeWeights(6, 8, 128, 64, DType::kF32);
  const ExpertWeights b16 = MakeWeights(7, 8, 128, 64, DType::kBF16);
  kl::cpu::testing::SplitMix64 rng(8);
  // Every token to the same two experts (one of them the last): 300 rows each, several
  // M tiles per expert on every path, six experts empty.
  {
    const int64_t T = 300, k = 2;
    std::vector<int32_t> ids(T * k);
    std::vector<float> wts(T * k);
    for (int64_t t = 0; t < T; ++t) {
      ids[t * k] = 7;
      ids[t * k + 1] = 2;
      wts[t * k] = static_cast<float>(rng.Uniform(0.1, 1.0));
      wts[t * k + 1] = static_cast<float>(rng.Uniform(0.1, 1.0));
    }
    for (MoeAlgo a : {MoeAlgo::kExact}) CheckExperts(f32, T, k, ids, wts, a, 200);
    for (MoeAlgo a : {MoeAlgo::kTensorCoreSkinny, MoeAlgo::kTensorCoreTiled}) {
      CheckExperts(b16, T, k, ids, wts, a, 201);
    }
  }
  // k = 1, all to expert 0; and padding ids (-1, E) that must contribute nothing.
  {
    const int64_t T = 150, k = 3;
    std::vector<int32_t> ids(T * k);
    std::vector<float> wts(T * k);
    for (int64_t t = 0; t < T; ++t) {
      ids[t * k] = 0;
      ids[t * k + 1] = (t % 3 == 0) ? -1 : static_cast<int32_t>(t % 8);
      ids[t * k + 2] = (t % 5 == 0) ? 8 : 5;
      if (ids[t * k + 1] == 0 || ids[t * k + 1] == 5) ids[t * k + 1] = 3;
      for (int64_t j = 0; j < k; ++j) wts[t * k + j] = static_cast<float>(rng.Uniform(0.1, 1.0));
    }
    CheckExperts(f32, T, k, ids, wts, MoeAlgo::kExact, 202);
    CheckExperts(b16, T, k, ids, wts, MoeAlgo::kTensorCoreSkinny, 203);
    CheckExperts(b16, T, k, ids, wts, MoeAlgo::kTensorCoreTiled, 204);
    std::vector<int32_t> one(T, 0);
    std::vector<float> w1(T, 1.0f);
    CheckExperts(b16, T, 1, one, w1, MoeAlgo::kTensorCoreTiled, 205);
  }
}

TEST(MoeExpertsCuda, BitwiseReproducible) {
  SKIP_WITHOUT_GPU();
  const ExpertWeights b16 = MakeWeights(9, 16, 128, 64, DType::kBF16);
  const ExpertWeights f32 = MakeWeights(10, 16, 128, 64, DType::kF32);
  std::vector<int32_t> ids;
  std::vector<float> wts;
  HostRoute(11, 700, 16, 4, &ids, &wts);
  for (MoeAlgo a : {MoeAlgo::kTensorCoreSkinny, MoeAlgo::kTensorCoreTiled}) {
    const auto o1 = CheckExperts(b16, 700, 4, ids, wts, a, 12);
    const auto o2 = CheckExperts(b16, 700, 4, ids, wts, a, 12);
    ASSERT_EQ(o1.size(), o2.size());
    EXPECT_EQ(std::memcmp(o1.data(), o2.data(), o1.size() * 4), 0) << AlgoName(a);
  }
  const auto e1 = CheckExperts(f32, 700, 4, ids, wts, MoeAlgo::kExact, 13);
  const auto e2 = CheckExperts(f32, 700, 4, ids, wts, MoeAlgo::kExact, 13);
  ASSERT_EQ(e1.size(), e2.size());
  EXPECT_EQ(std::memcmp(e1.data(), e2.data(), e1.size() * 4), 0);
}

// accumulate: out = init + (the routed sum), rounded as one fp32 add of the plain result.
TEST(MoeExpertsCuda, AccumulateAddsTheRoutedSumOnce) {
  SKIP_WITHOUT_GPU();
  const ExpertWeights b16 = MakeWeights(21, 16, 128, 64, DType::kBF16);
  for (int64_t T : {int64_t{1}, int64_t{3}, int64_t{200}}) {
    std::vector<int32_t> ids;
    std::vector<float> wts;
    HostRoute(22 + T, T, 16, 4, &ids, &wts);
    kl::cpu::testing::SplitMix64 rng(23 + T);
    const std::vector<float> x = Normals(rng, T * 128, 1.0), init = Normals(rng, T * 128, 1.0);
    for (MoeAlgo a : {MoeAlgo::kAuto, MoeAlgo::kExact}) {
      const RunResult plain = RunExperts(b16, x, T, 4, ids, wts, a);
      const RunResult acc = RunExperts(b16, x, T, 4, ids, wts, a, &init);
      ASSERT_TRUE(plain.ok && acc.ok);
      for (int64_t i = 0; i < T * 128; ++i) {
        ASSERT_EQ(acc.out[i], init[i] + plain.out[i]) << AlgoName(a) << " T=" << T << " element " << i;
      }
    }
  }
}

// End to end against the CPU backend's Moe (router GEMM on the host, then MoeRoute +
// MoeExperts exact path on the device): same routing conventions, same result.
TEST(MoeExpertsCuda, MatchesCpuBackendMoe) {
  SKIP_WITHOUT_GPU();
  const int64_t T = 64, E = 16, k = 4, D = 128, I = 64;
  ExpertWeights w = MakeWeights(16, E, D, I, DType::kF32);
  kl::cpu::testing::SplitMix64 rng(17);
  std::vector<float> router = Normals(rng, E * D, 1.0 / std::sqrt(double(D))),
                     bias = Normals(rng, E, 0.1), x = Normals(rng, T * D, 1.0);
  CpuBackend cpu;
  Weight wr{DType::kF32, router.data(), E, D}, wb{DType::kF32, bias.data(), 1, E};
  std::vector<Weight> w1, w3, w2;
  for (int64_t e = 0; e < E; ++e) {
    w1.push_back({DType::kF32, w.w1[e].data(), I, D});
    w3.push_back({DType::kF32, w.w3[e].data(), I, D});
    w2.push_back({DType::kF32, w.w2[e].data(), D, I});
  }
  const MoeOpWeights ow{&wr, &wb, &w1, &w3, &w2};
  std::vector<float> logits(T * E);
  ASSERT_TRUE(cpu.Linear(x.data(), T, wr, logits.data()).ok());
  for (bool biased : {false, true}) {
    MoeParams mp;
    mp.num_experts = E;
    mp.top_k = k;
    mp.renormalize = !biased;
    mp.routed_scaling_factor = 2.446;
    mp.biased_weights = biased;
    std::vector<float> y_cpu(T * D);
    ASSERT_TRUE(cpu.Moe(x.data(), T, D, mp, ow, y_cpu.data()).ok());

    DeviceBuffer d_logits = Upload(logits), d_bias = Upload(bias), d_x = Upload(x),
                 d_ids(T * k * 4), d_w(T * k * 4), d_out(T * D * 4);
    MoeRouteParams rp;
    rp.num_tokens = T;
    rp.num_experts = E;
    rp.top_k = k;
    rp.renormalize = mp.renormalize;
    rp.routed_scaling_factor = mp.routed_scaling_factor;
    rp.biased_weights = biased;
    rp.logits = d_logits.as<float>();
    rp.correction_bias = d_bias.as<float>();
    rp.topk_ids = d_ids.as<int32_t>();
    rp.topk_weights = d_w.as<float>();
    MoeExpertsParams p;
    p.num_tokens = T;
    p.hidden = D;
    p.inter = I;
    p.num_experts = E;
    p.top_k = k;
    p.weight_dtype = DType::kF32;
    p.x = d_x.as<float>();
    p.topk_ids = d_ids.as<int32_t>();
    p.topk_weights = d_w.as<float>();
    p.w1 = static_cast<const void* const*>(w.p1.get());
    p.w3 = static_cast<const void* const*>(w.p3.get());
    p.w2 = static_cast<const void* const*>(w.p2.get());
    p.out = d_out.as<float>();
    DeviceBuffer ws(MoeWorkspaceBytes(p));
    PoisonNaN(d_out);
    ASSERT_TRUE(MoeRoute(rp, nullptr).ok());
    ASSERT_TRUE(MoeExperts(p, ws.get(), ws.bytes(), nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const double err = RelErr(Download<float>(d_out), y_cpu);
    EXPECT_LE(err, kExactRelTol) << "biased=" << biased;
    std::printf("  experts vs CpuBackend::Moe biased=%d rel L2 %.2e\n", biased ? 1 : 0, err);
  }
}

// Route + experts captured once into a CUDA graph, replayed on new logits (so new
// routing): the grids must not depend on the counts.
TEST(MoeExpertsCuda, GraphReplayWithNewRouting) {
  SKIP_WITHOUT_GPU();
  const int64_t T = 16, E = 32, k = 4, D = 128, I = 64;
  const ExpertWeights w = MakeWeights(14, E, D, I, DType::kBF16);
  DeviceBuffer d_logits(T * E * 4), d_x(T * D * 4), d_ids(T * k * 4), d_w(T * k * 4),
      d_out(T * D * 4);
  MoeRouteParams rp;
  rp.num_tokens = T;
  rp.num_experts = E;
  rp.top_k = k;
  rp.routed_scaling_factor = 2.446;
  rp.logits = d_logits.as<float>();
  rp.topk_ids = d_ids.as<int32_t>();
  rp.topk_weights = d_w.as<float>();
  MoeExpertsParams p;
  p.num_tokens = T;
  p.hidden = D;
  p.inter = I;
  p.num_experts = E;
  p.top_k = k;
  p.weight_dtype = DType::kBF16;
  p.x = d_x.as<float>();
  p.topk_ids = d_ids.as<int32_t>();
  p.topk_weights = d_w.as<float>();
  p.w1 = static_cast<const void* const*>(w.p1.get());
  p.w3 = static_cast<const void* const*>(w.p3.get());
  p.w2 = static_cast<const void* const*>(w.p2.get());
  p.out = d_out.as<float>();
  DeviceBuffer ws(MoeWorkspaceBytes(p));
  cudaStream_t s;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  cudaGraph_t graph;
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  const absl::Status s1 = MoeRoute(rp, s);
  const absl::Status s2 = MoeExperts(p, ws.get(), ws.bytes(), s);
  ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
  ASSERT_TRUE(s1.ok()) << s1;
  ASSERT_TRUE(s2.ok()) << s2;
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (uint64_t round = 0; round < 3; ++round) {
    kl::cpu::testing::SplitMix64 rng(300 + round);
    const std::vector<float> logits = Normals(rng, T * E, 2.0), x = Normals(rng, T * D, 1.0);
    MoeParams mp;
    mp.num_experts = E;
    mp.top_k = k;
    mp.routed_scaling_factor = 2.446;
    std::vector<int32_t> ids(T * k);
    std::vector<float> wts(T * k);
    for (int64_t t = 0; t < T; ++t) {
      kl::MoeRoute(logits.data() + t * E, nullptr, mp, ids.data() + t * k, wts.data() + t * k);
    }
    ASSERT_EQ(cudaMemcpy(d_logits.get(), logits.data(), d_logits.bytes(), cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_x.get(), x.data(), d_x.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
    PoisonNaN(d_out);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    EXPECT_EQ(Download<int32_t>(d_ids), ids) << "round " << round;
    const std::vector<float> ref = Reference(w, x, T, k, ids, wts, true);
    EXPECT_LE(RelErr(Download<float>(d_out), ref), kBf16RelTol) << "round " << round;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
}

// Validation happens before any launch: no device needed.
TEST(MoeCudaValidation, RejectsBadArguments) {
  MoeRouteParams r;
  r.num_tokens = 4;
  r.num_experts = 513;
  r.top_k = 8;
  EXPECT_EQ(MoeRoute(r, nullptr).code(), absl::StatusCode::kInvalidArgument);
  r.num_experts = 8;
  r.top_k = 9;
  EXPECT_EQ(MoeRoute(r, nullptr).code(), absl::StatusCode::kInvalidArgument);
  r.top_k = 2;
  EXPECT_EQ(MoeRoute(r, nullptr).code(), absl::StatusCode::kInvalidArgument);  // null pointers
  r.num_tokens = 0;
  EXPECT_TRUE(MoeRoute(r, nullptr).ok());  // nothing to do

  int dummy[64];
  MoeExpertsParams p;
  p.num_tokens = 4;
  p.hidden = 256;
  p.inter = 128;
  p.num_experts = 8;
  p.top_k = 2;
  p.weight_dtype = DType::kF32;
  EXPECT_EQ(MoeResolveAlgo(p), MoeAlgo::kExact);
  p.weight_dtype = DType::kBF16;
  EXPECT_EQ(MoeResolveAlgo(p), MoeAlgo::kTensorCoreSkinny);
  p.num_tokens = kMoeSkinnyMaxTokens + 1;
  EXPECT_EQ(MoeResolveAlgo(p), MoeAlgo::kTensorCoreTiled);
  EXPECT_GT(MoeWorkspaceBytes(p), 0u);
  p.x = reinterpret_cast<const float*>(dummy);
  p.topk_ids = dummy;
  p.topk_weights = reinterpret_cast<const float*>(dummy);
  p.w1 = p.w3 = p.w2 = reinterpret_cast<const void* const*>(dummy);
  p.out = reinterpret_cast<float*>(dummy);
  EXPECT_EQ(MoeExperts(p, nullptr, 0, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.hidden = 192;  // not a multiple of 128: tensor-core paths refuse
  EXPECT_EQ(MoeExperts(p, nullptr, 1 << 30, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.hidden = 256;
  p.top_k = 17;
  EXPECT_EQ(MoeExperts(p, nullptr, 1 << 30, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.top_k = 2;
  p.weight_dtype = DType::kF16;
  EXPECT_EQ(MoeExperts(p, nullptr, 1 << 30, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.weight_dtype = DType::kF32;
  p.algo = MoeAlgo::kTensorCoreTiled;
  EXPECT_EQ(MoeExperts(p, nullptr, 1 << 30, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.algo = MoeAlgo::kExact;
  p.hidden = 130;  // not a multiple of 4
  EXPECT_EQ(MoeExperts(p, nullptr, 1 << 30, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.hidden = 256;
  p.out = nullptr;
  EXPECT_EQ(MoeExperts(p, nullptr, 1 << 30, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.num_tokens = 0;
  EXPECT_TRUE(MoeExperts(p, nullptr, 0, nullptr).ok());
}

}  // namespace
}  // namespace kl::cuda
