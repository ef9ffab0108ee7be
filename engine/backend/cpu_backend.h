// CpuBackend: fp32 compute on the host. The oracle for every other backend.
// GEMMs go through OpenBLAS (sgemm, its own threads); everything else through
// kernels/cpu on the process thread pool (kl::ParallelFor). bf16/f16 weights are
// widened to fp32 once at upload (2x the checkpoint's bytes in RAM; see
// docs/engine.md for why we chose that over widening per call).
#ifndef KL_ENGINE_BACKEND_CPU_BACKEND_H_
#define KL_ENGINE_BACKEND_CPU_BACKEND_H_

#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "engine/backend/backend.h"

namespace kl {

struct CpuBackendOptions {
  // Sequences with at most this many new tokens use the recurrent KDA kernel;
  // longer ones the chunk algorithm (HF's modeling_kimi.py switches at 64).
  int64_t kda_recurrent_max_tokens = 64;
  // MLA: new-token counts at or above this use the naive (materialised K/V)
  // prefill form; below it the absorbed (latent) form of decode.
  int64_t mla_naive_min_rows = 32;
  // Report SamplesOnDevice() and pick tokens inside the backend (SampleTokens, with the
  // host Sampler): the engines' device-sampling path, exercised without a GPU (tests).
  bool backend_sampling = false;
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(CpuBackendOptions options = {});
  std::string Name() const override { return "cpu"; }
  bool Supports(Op op) const override;

  absl::StatusOr<Weight> UploadWeight(const HostTensor& t) override;
  absl::StatusOr<Buffer> Alloc(int64_t elems) override;
  absl::Status Upload(const float* host, int64_t elems, float* dst) override;
  absl::Status Download(const float* src, int64_t elems, float* host) override;

  absl::Status Linear(const float* x, int64_t rows, const Weight& w, float* y) override;
  absl::Status RmsNorm(const float* x, int64_t rows, int64_t dim, int64_t stride, const Weight& w,
                       double eps, float* y) override;
  absl::Status Embedding(const int32_t* ids, int64_t n, const Weight& table, float* y) override;
  absl::Status Add(const float* x, int64_t n, float* y) override;
  absl::Status SwiGlu(const float* gate, const float* up, int64_t rows, int64_t inter,
                      float* out) override;
  absl::Status KdaMix(float* q, float* k, float* v, float* f, float* b,
                      const std::vector<SeqSlice>& seqs, const std::vector<KdaStateRef>& states,
                      const KdaOpWeights& w, int64_t heads, int64_t head_dim, int64_t conv_width,
                      int64_t chunk, float* o) override;
  absl::Status GatedRmsNorm(const float* o, const float* z, int64_t rows, int64_t heads,
                            int64_t dim, const Weight& w, double eps, float* y) override;
  absl::Status MlaAttention(const float* q, const float* latent, const std::vector<SeqSlice>& seqs,
                            const std::vector<MlaCacheRef>& caches, const MlaDims& d,
                            const Weight& kv_b, float* out) override;
  absl::Status Moe(const float* x, int64_t rows, int64_t dim, const MoeParams& p,
                   const MoeOpWeights& w, float* y) override;
  bool SamplesOnDevice() const override { return options_.backend_sampling; }
  absl::Status SampleTokens(const float* logits, int64_t rows, int64_t vocab,
                            absl::Span<const TokenSampling> params, int32_t* host_tokens) override;

  // Bytes held by uploaded weights.
  int64_t weight_bytes() const override;

  // Time and FLOPs spent in Linear() (all dense GEMMs incl. experts), for the
  // benchmark's "fraction of GEMM peak". Collected only when enabled.
  struct LinearStats {
    double seconds = 0;
    double flops = 0;
  };
  void EnableLinearStats(bool on) { linear_stats_on_ = on; }
  LinearStats linear_stats() const;
  void ResetLinearStats();

 private:
  absl::Status MlaOneSeqAbsorbed(const float* q, const SeqSlice& s, const float* cache,
                                 const MlaDims& d, const Weight& kv_b, float* out);
  absl::Status MlaOneSeqNaive(const float* q, const SeqSlice& s, const float* cache,
                              const MlaDims& d, const Weight& kv_b, float* out);

  CpuBackendOptions options_;
  mutable std::mutex mu_;
  std::deque<std::vector<float>> weights_;  // stable addresses
  int64_t weight_bytes_ = 0;
  bool linear_stats_on_ = false;
  LinearStats linear_stats_;  // guarded by mu_
};

// Top-k expert selection of spec §7 for one token: sigmoid scores, selection by
// score + bias, ties broken by the lower expert id; weights from the unbiased
// (or biased) scores, renormalised and scaled. Exposed for tests (vector D).
void MoeRoute(const float* logits, const float* bias, const MoeParams& p, int32_t* idx,
              float* weights);

}  // namespace kl

#endif  // KL_ENGINE_BACKEND_CPU_BACKEND_H_
