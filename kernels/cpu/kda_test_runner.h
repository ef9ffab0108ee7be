// Test helpers that run the fp32 kernels or the fp64 references over a token
// range [t0, t1) of a KdaInputs / KdaInputsF32, carrying the state in `s` and
// writing rows [t0, t1) of the full-length output `o`.
#ifndef KL_KERNELS_CPU_KDA_TEST_RUNNER_H_
#define KL_KERNELS_CPU_KDA_TEST_RUNNER_H_

#include <cstdint>
#include <vector>

#include "kernels/cpu/kda.h"
#include "kernels/cpu/kda_reference.h"
#include "kernels/cpu/kda_test_vectors.h"

namespace kl::cpu::testing {

// Selects the algorithm: chunk length C >= 1, or kRecurrentAlgo.
constexpr int64_t kRecurrentAlgo = 0;

struct Result {
  std::vector<float> o, s;  // [T][H][V], [H][K][V]
};
struct ResultF64 {
  std::vector<double> o, s;
};

inline void RunKernel(const KdaInputsF32& in, int64_t t0, int64_t t1, int64_t chunk,
                      std::vector<float>* s, std::vector<float>* o) {
  const int64_t H = in.H, K = in.K, V = in.V, n = t1 - t0;
  const float *q = in.q.data() + t0 * H * K, *k = in.k.data() + t0 * H * K,
              *v = in.v.data() + t0 * H * V, *g = in.g.data() + t0 * H * K,
              *beta = in.beta.data() + t0 * H;
  float* out = o->data() + t0 * H * V;
  if (chunk == kRecurrentAlgo) {
    KdaRecurrent(q, k, v, g, beta, n, H, K, V, s->data(), out);
  } else {
    KdaChunkPrefill(q, k, v, g, beta, n, H, K, V, chunk, s->data(), out);
  }
}

// Whole sequence from in.s0.
inline Result RunKernel(const KdaInputsF32& in, int64_t chunk) {
  Result r{std::vector<float>(in.T * in.H * in.V), in.s0};
  RunKernel(in, 0, in.T, chunk, &r.s, &r.o);
  return r;
}

// fp64 R1 (chunk == kRecurrentAlgo) or R2 over the whole sequence from in.s0.
inline ResultF64 RunReference(const KdaInputs& in, int64_t chunk) {
  ResultF64 r{std::vector<double>(in.T * in.H * in.V), in.s0};
  if (chunk == kRecurrentAlgo) {
    reference::Recurrent(in.q.data(), in.k.data(), in.v.data(), in.g.data(), in.beta.data(), in.T,
                         in.H, in.K, in.V, r.s.data(), r.o.data());
  } else {
    reference::Chunked(in.q.data(), in.k.data(), in.v.data(), in.g.data(), in.beta.data(), in.T,
                       in.H, in.K, in.V, chunk, r.s.data(), r.o.data());
  }
  return r;
}

}  // namespace kl::cpu::testing

#endif  // KL_KERNELS_CPU_KDA_TEST_RUNNER_H_
