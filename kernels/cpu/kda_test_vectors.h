// Vectors A and B of kda_test_vectors.md (§2, §3): inputs, the documented
// preparation, and the expected values as printed there (12 decimals).
#ifndef KL_KERNELS_CPU_KDA_TEST_VECTORS_H_
#define KL_KERNELS_CPU_KDA_TEST_VECTORS_H_

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/cpu/kda_reference.h"
#include "kernels/cpu/test_util.h"

namespace kl::cpu::testing {

// Vector A: H = 1, K = V = 2, T = 3, full gate, raw q / k (normalised with eps
// 1e-6; q scale 1/sqrt(2)). Two initial states.
struct VectorA {
  static constexpr int64_t kT = 3, kH = 1, kK = 2, kV = 2;
  std::vector<double> q_raw = {1, 0, 0.6, 0.8, -1, 1};    // [T][H][K]
  std::vector<double> k_raw = {1, 1, 1, -1, 0, 2};        // [T][H][K]
  std::vector<double> v = {1, 2, -1, 0.5, 0.25, -0.75};   // [T][H][V]
  std::vector<double> a_log = {std::log(2.0)};            // [H]
  std::vector<double> dt_bias = {0.5, -1.0};              // [H*K]
  std::vector<double> f = {0, 0, 1, -2, -0.5, 3};         // [T][H*K]
  std::vector<double> b = {0, 2, -1};                     // [T][H]
  double q_scale = 1.0 / std::sqrt(2.0);

  std::vector<double> g_expected = {-1.948153968360, -0.626523375036, -3.402826555966,
                                    -0.097174703147, -1.386294361120, -4.253856022086};
  std::vector<double> beta_expected = {0.500000000000, 0.880797077978, 0.268941421370};
  // Normalised q before the 1/sqrt(2) scale, and normalised k.
  std::vector<double> q_norm_expected = {0.999999500000, 0, 0.599999700000,
                                         0.799999600000, -0.707106604410, 0.707106604410};
  std::vector<double> k_norm_expected = {0.707106604410, 0.707106604410, 0.707106604410,
                                         -0.707106604410, 0, 0.999999875000};

  struct Case {
    std::vector<double> s0, o, s_final;  // [H][K][V], [T][H][V], [H][K][V]
  };
  Case zero_state = {{0, 0, 0, 0},
                     {0.249999812500, 0.499999625000, 0.255302856912, 0.290406609480,
                      0.097180327581, -0.176445240756},
                     {-0.118736882496, 0.151787129371, 0.075623821256, -0.201103440363}};
  Case nonzero_state = {{0.5, -1.0, 2.0, 0.25},
                        {0.098840383506, 0.400788609437, 0.609895374960, 0.350186121635,
                         0.060573960440, -0.182556669910},
                        {-0.041422040239, 0.164705168868, 0.079725910929, -0.200408262230}};
};

// Vector A inputs prepared in Real with the reference functions.
template <class Real>
struct Prepared {
  std::vector<Real> q, k, v, g, beta;
};
template <class Real>
Prepared<Real> PrepareVectorA(const VectorA& a) {
  auto cast = [](const std::vector<double>& x) { return std::vector<Real>(x.begin(), x.end()); };
  Prepared<Real> p{cast(a.q_raw), cast(a.k_raw), cast(a.v), {}, {}};
  reference::L2NormScale<Real>(p.q.data(), VectorA::kT * VectorA::kH, VectorA::kK, Real(a.q_scale));
  reference::L2NormScale<Real>(p.k.data(), VectorA::kT * VectorA::kH, VectorA::kK, Real(1));
  p.g.resize(a.f.size());
  const auto f = cast(a.f), a_log = cast(a.a_log), dt = cast(a.dt_bias);
  reference::Gate<Real>(f.data(), a_log.data(), dt.data(), VectorA::kT, VectorA::kH, VectorA::kK,
                        p.g.data());
  for (double x : a.b) p.beta.push_back(reference::Sigmoid<Real>(Real(x)));
  return p;
}

// Vector B: seed 42, H = 2, K = 8, V = 6, T = 130; inputs drawn in the order
// q, k, v, z, b, S0 from one SplitMix64 stream; q, k normalised (q scaled by
// 8^-1/2), g = log-sigmoid(z), beta = sigmoid(b). All prepared in double.
struct VectorB {
  static constexpr int64_t kT = 130, kH = 2, kK = 8, kV = 6;
  std::vector<double> q, k, v, g, beta, s0;

  struct HeadExpected {
    std::vector<double> o0, o63, o129;  // o[t][h][:]
    double sum_o, sum_abs_o;
    std::vector<double> s_row0;  // S_final[h][0][:]
    double sum_s;
  };
  HeadExpected head[2] = {
      {{0.137044751438, 0.257435494555, -0.167340734196, -0.064156084885, 0.100509460774,
        -0.095656547037},
       {0.119779550228, -0.084491201666, 0.007622578429, -0.124472511870, 0.119420718459,
        -0.003740961211},
       {-0.010409896797, -0.063085489230, 0.107535880724, 0.024671348961, 0.006594383775,
        0.012700062558},
       -0.479784837362,
       42.487640489694,
       {-0.022475300231, -0.018415790699, 0.037354833447, 0.022754946961, 0.018230408100,
        0.007683020575},
       0.896736364444},
      {{0.178850269389, 0.118281638685, 0.133733546432, 0.062277033042, -0.171847549247,
        0.280642459510},
       {-0.156114271505, 0.374782462404, 0.322702782676, 0.117387213568, -0.042617528652,
        0.120339251058},
       {-0.057956665563, 0.066798526075, 0.033159830343, 0.000226140182, -0.019669064445,
        0.013816814051},
       1.360727183231,
       45.500334574619,
       {-0.030720754851, 0.401662767468, -0.103460253547, 0.306094213019, 0.234096881427,
        -0.003921208514},
       1.766808202752},
  };
};

inline VectorB MakeVectorB() {
  constexpr int64_t T = VectorB::kT, H = VectorB::kH, K = VectorB::kK, V = VectorB::kV;
  VectorB b;
  SplitMix64 rng(42);
  b.q = rng.Normals(T * H * K);
  b.k = rng.Normals(T * H * K);
  b.v = rng.Normals(T * H * V);
  const std::vector<double> z = rng.Normals(T * H * K);
  const std::vector<double> logits = rng.Normals(T * H);
  b.s0 = rng.Normals(H * K * V);
  reference::L2NormScale<double>(b.q.data(), T * H, K, 1.0 / std::sqrt(double(K)));
  reference::L2NormScale<double>(b.k.data(), T * H, K, 1.0);
  for (double x : z) b.g.push_back(reference::LogSigmoid(x));
  for (double x : logits) b.beta.push_back(reference::Sigmoid(x));
  return b;
}


// Which forget-gate regime RandomKdaInputs draws (kda_test_vectors.md §6.7).
enum class GateKind {
  kLogSigmoid,  // g = log-sigmoid(z), z ~ N(0, 1): moderate decay (vector B style)
  kWeak,        // g = log-sigmoid(z) / 16: long memory, for state-carry tests
  kRealistic,   // g = -exp(A_log) softplus(f + dt_bias), A_log = log U(1, 16),
                // dt_bias ~ 0.5 N(0, 1), f ~ N(0, 1) (the 48B model's gate, §4.4)
  kStrong,      // g ~ U(-1000, -30) per element
};

// Prepared (post-conv, post-norm) KDA inputs in fp64: q normalised and scaled by
// K^-1/2, k normalised, v ~ N(0, 1), beta = sigmoid(N(0, 1)), S0 ~ s0_scale N(0, 1).
struct KdaInputs {
  int64_t T = 0, H = 0, K = 0, V = 0;
  std::vector<double> q, k, v, g, beta, s0;  // [T][H][K] x3 (q, k, g), [T][H][V], [T][H], [H][K][V]
};

inline KdaInputs RandomKdaInputs(uint64_t seed, int64_t T, int64_t H, int64_t K, int64_t V,
                                 GateKind gate, double s0_scale = 1.0) {
  SplitMix64 rng(seed);
  KdaInputs in;
  in.T = T, in.H = H, in.K = K, in.V = V;
  in.q = rng.Normals(T * H * K);
  in.k = rng.Normals(T * H * K);
  in.v = rng.Normals(T * H * V);
  in.g.resize(T * H * K);
  if (gate == GateKind::kRealistic) {
    std::vector<double> a_log(H), dt_bias(H * K);
    for (double& x : a_log) x = std::log(rng.Uniform(1.0, 16.0));
    for (double& x : dt_bias) x = 0.5 * rng.Normal();
    const std::vector<double> f = rng.Normals(T * H * K);
    reference::Gate(f.data(), a_log.data(), dt_bias.data(), T, H, K, in.g.data());
  } else {
    for (double& x : in.g) {
      switch (gate) {
        case GateKind::kLogSigmoid: x = reference::LogSigmoid(rng.Normal()); break;
        case GateKind::kWeak: x = reference::LogSigmoid(rng.Normal()) / 16; break;
        default: x = rng.Uniform(-1000.0, -30.0); break;
      }
    }
  }
  for (int64_t i = 0; i < T * H; ++i) in.beta.push_back(reference::Sigmoid(rng.Normal()));
  in.s0 = rng.Normals(H * K * V, s0_scale);
  reference::L2NormScale<double>(in.q.data(), T * H, K, 1.0 / std::sqrt(double(K)));
  reference::L2NormScale<double>(in.k.data(), T * H, K, 1.0);
  return in;
}

// The same inputs in fp32 (what the kernels take).
struct KdaInputsF32 {
  int64_t T = 0, H = 0, K = 0, V = 0;
  std::vector<float> q, k, v, g, beta, s0;
};
inline KdaInputsF32 ToF32(const KdaInputs& in) {
  return {in.T, in.H, in.K, in.V, ToF32(in.q), ToF32(in.k), ToF32(in.v),
          ToF32(in.g), ToF32(in.beta), ToF32(in.s0)};
}

}  // namespace kl::cpu::testing

#endif  // KL_KERNELS_CPU_KDA_TEST_VECTORS_H_
