// Host-side helpers for the CUDA KDA tests and benchmark: device buffers (RAII),
// bf16 rounding, random layer inputs (SplitMix64, kda_test_vectors.md §1 style)
// and the CPU-oracle run of a varlen batch (//kernels/cpu:kda).
#ifndef KL_KERNELS_CUDA_KDA_TEST_UTIL_H_
#define KL_KERNELS_CUDA_KDA_TEST_UTIL_H_

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/common/dtype.h"
#include "kernels/cpu/kda.h"
#include "kernels/cpu/test_util.h"

namespace kl::cuda::testing {

// Owns cudaMalloc'ed memory; empty on allocation failure (ok() false).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes > 0 && cudaMalloc(&ptr_, bytes) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (ptr_) cudaFree(ptr_);
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      o.ptr_ = nullptr;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  bool ok() const { return bytes_ == 0 || ptr_ != nullptr; }
  void* get() const { return ptr_; }
  template <class T> T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

inline bool HasCudaDevice() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// Device copy of a host vector (check ok() on the result), and the reverse. A failed
// copy aborts the test binary with the CUDA error (a test must not compare garbage).
inline void CheckCopy(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::abort();
  }
}
template <class T>
DeviceBuffer Upload(const std::vector<T>& h) {
  DeviceBuffer d(h.size() * sizeof(T));
  if (d.ok() && !h.empty()) {
    CheckCopy(cudaMemcpy(d.get(), h.data(), d.bytes(), cudaMemcpyHostToDevice), "Upload");
  }
  return d;
}
template <class T>
std::vector<T> Download(const DeviceBuffer& d) {
  std::vector<T> h(d.bytes() / sizeof(T));
  if (!h.empty()) {
    CheckCopy(cudaMemcpy(h.data(), d.get(), d.bytes(), cudaMemcpyDeviceToHost), "Download");
  }
  return h;
}

inline float RoundBf16(float x) { return Bf16ToF32(F32ToBf16(x)); }
inline void RoundBf16InPlace(std::vector<float>& x) {
  for (float& e : x) e = RoundBf16(e);
}

// Activation tensor in `act` dtype as raw bytes (fp32 copy or bf16 conversion).
inline std::vector<uint8_t> ToAct(const std::vector<float>& x, DType act) {
  std::vector<uint8_t> out(x.size() * DTypeSize(act));
  if (act == DType::kF32) {
    std::memcpy(out.data(), x.data(), out.size());
  } else {
    auto* p = reinterpret_cast<uint16_t*>(out.data());
    for (size_t i = 0; i < x.size(); ++i) p[i] = F32ToBf16(x[i]);
  }
  return out;
}
inline std::vector<float> FromAct(const std::vector<uint8_t>& b, DType act) {
  std::vector<float> out(b.size() / DTypeSize(act));
  if (act == DType::kF32) {
    std::memcpy(out.data(), b.data(), b.size());
  } else {
    const auto* p = reinterpret_cast<const uint16_t*>(b.data());
    for (size_t i = 0; i < out.size(); ++i) out[i] = Bf16ToF32(p[i]);
  }
  return out;
}

enum class GateRegime { kRealistic, kStrong };

// Raw (pre-norm, pre-gate, pre-sigmoid) inputs of one KDA layer for `tokens` tokens.
struct LayerInputs {
  int64_t tokens = 0, H = 0, K = 0, V = 0;
  std::vector<float> q, k, v, f, b, a_log, dt_bias;
};

// q, k, v, b ~ N(0, 1); A_log = log U(1, 16); dt_bias ~ 0.5 N(0, 1);
// f ~ N(0, 1) (realistic) or U(30, 62) (strong: g in about [-1000, -30]).
inline LayerInputs MakeInputs(uint64_t seed, int64_t tokens, int64_t H, int64_t K, int64_t V,
                              GateRegime gate = GateRegime::kRealistic) {
  kl::cpu::testing::SplitMix64 rng(seed);
  LayerInputs in;
  in.tokens = tokens;
  in.H = H;
  in.K = K;
  in.V = V;
  auto normals = [&](int64_t n, double s) { return kl::cpu::testing::ToF32(rng.Normals(n, s)); };
  in.q = normals(tokens * H * K, 1.0);
  in.k = normals(tokens * H * K, 1.0);
  in.v = normals(tokens * H * V, 1.0);
  if (gate == GateRegime::kStrong) {
    in.f.resize(tokens * H * K);
    for (float& x : in.f) x = static_cast<float>(rng.Uniform(30.0, 62.0));
  } else {
    in.f = normals(tokens * H * K, 1.0);
  }
  in.b = normals(tokens * H, 1.0);
  in.a_log.resize(H);
  for (float& x : in.a_log) x = static_cast<float>(std::log(rng.Uniform(1.0, 16.0)));
  in.dt_bias = normals(H * K, 0.5);
  return in;
}

// Rounds the activations (not a_log / dt_bias, which stay fp32) to bf16.
inline void RoundActivations(LayerInputs& in) {
  RoundBf16InPlace(in.q);
  RoundBf16InPlace(in.k);
  RoundBf16InPlace(in.v);
  RoundBf16InPlace(in.f);
  RoundBf16InPlace(in.b);
}

// CPU oracle over a varlen batch: sequence n owns tokens [cu[n], cu[n+1]) and the
// state pool[slots[n]] (slot < 0 or >= num_slots: a zero state, discarded).
// chunked: KdaVarlen with C = 64 for every non-empty sequence; else the recurrence.
inline void OracleVarlen(const LayerInputs& in, const std::vector<int64_t>& cu,
                         const std::vector<int32_t>& slots, int64_t num_slots, bool chunked,
                         std::vector<float>& pool, std::vector<float>& o) {
  const int64_t T = in.tokens, H = in.H, K = in.K, V = in.V, N = static_cast<int64_t>(slots.size());
  std::vector<float> qn = in.q, kn = in.k, g(T * H * K), beta(T * H);
  kl::cpu::L2NormScaleRows(qn.data(), T * H, K, 1.0f / std::sqrt(static_cast<float>(K)));
  kl::cpu::L2NormScaleRows(kn.data(), T * H, K, 1.0f);
  kl::cpu::KdaGate(in.f.data(), in.a_log.data(), in.dt_bias.data(), T, H, K, g.data());
  kl::cpu::Sigmoid(in.b.data(), T * H, beta.data());
  const int64_t state_size = H * K * V;
  std::vector<std::vector<float>> scratch(N);
  std::vector<float*> states(N);
  for (int64_t n = 0; n < N; ++n) {
    if (slots[n] >= 0 && slots[n] < num_slots) {
      states[n] = pool.data() + slots[n] * state_size;
    } else {
      scratch[n].assign(state_size, 0.0f);
      states[n] = scratch[n].data();
    }
  }
  o.assign(T * H * V, 0.0f);
  kl::cpu::KdaVarlen(qn.data(), kn.data(), in.v.data(), g.data(), beta.data(), cu.data(), N, H, K,
                     V, 64, chunked ? 0 : INT64_MAX, states.data(), o.data());
}

// ||a - b||_2 / ||b||_2 (NaN in a gives NaN).
inline double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num) / std::sqrt(den > 0 ? den : 1.0);
}

}  // namespace kl::cuda::testing

#endif  // KL_KERNELS_CUDA_KDA_TEST_UTIL_H_
