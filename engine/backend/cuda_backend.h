// CudaBackend: the Kimi-Linear forward on one NVIDIA GPU (Hopper for the
// tensor-core paths; the fp32 paths run on any sm_90 build target).
//
// Memory:
//  - weights: matrices (both dims >= 2, inner dim >= 64) stay in the checkpoint's
//    dtype (bf16 → bf16 GEMMs with fp32 accumulation; fp32 → fp32 GEMMs, TF32
//    off), or become bf16 with `bf16_weights`; vectors, norms, conv filters,
//    A_log and dt_bias are fp32;
//  - activations: fp32, from a bump arena reset at every BeginForward (no
//    cudaMalloc on the hot path once the arena has grown to the peak);
//  - sequence states: device-resident. Each bound sequence owns one slot: its
//    row of every KDA layer's state pool ([slots][H][K][V] fp32) and conv-tail
//    pools ([slots][W-1][H*K] fp32 each for q, k, v), and its row of the latent
//    block table; MLA latents live in a paged pool per MLA layer
//    ([pages][page_rows][kv_lora + rope], fp32 or bf16) shared by all sequences.
//
// Every CUDA / cuBLAS error becomes a Status (the process never exits); an
// error inside a Forward leaves that batch's states undefined (Model contract).
// Not thread-safe: one Forward at a time (states may be released from any
// thread).
#ifndef KL_ENGINE_BACKEND_CUDA_BACKEND_H_
#define KL_ENGINE_BACKEND_CUDA_BACKEND_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/config/model_config.h"

namespace kl {

struct CudaResidency;

struct CudaBackendOptions {
  int device = 0;
  int64_t max_seqs = 64;             // state slots (concurrent sequences)
  int64_t page_rows = 64;            // latent rows per page
  int64_t latent_pages = 0;          // pages per MLA layer; 0: max_seqs x 4096 rows' worth
  DType latent_dtype = DType::kF32;  // kF32 (exact) or kBF16 (half the bytes)
  bool bf16_weights = false;         // store fp32 checkpoint matrices as bf16
  // Chunk prefill of KDA on bf16 tensor cores (K = V = 128 on sm_90); else the
  // exact fp32 chunk algorithm.
  bool kda_tensor_cores = false;
  // ... and for a long single sequence with its two kernels running at once (the streamed
  // mode; needs at least half the GPU's SMs for this process: off under MPS thread limits).
  bool kda_streamed_prefill = true;
  // MLA prefill attention on bf16 tensor cores (qk 192 / v 128 or 96 / 64);
  // else the exact fp32 kernel.
  bool mla_tensor_cores = false;
  // Sequences with at most this many new tokens use the recurrent KDA kernel.
  int64_t kda_recurrent_max_tokens = 8;
  int64_t arena_chunk_bytes = int64_t{256} << 20;
  // Decode steps (one new token per sequence) run from CUDA graphs: a shape
  // (batch size, context bucket, logit rows) runs eagerly the first time,
  // is captured the second time and replayed from then on.
  bool cuda_graphs = true;
  int64_t max_graphs = 128;  // cached graph executables (oldest dropped first)
};

struct CudaGraphStats {
  int64_t eager_forwards = 0;
  int64_t captures = 0;
  int64_t replays = 0;
};

class CudaBackend final : public Backend {
 public:
  // Fails (never exits) without a usable device or on bad options.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const ModelConfig& config,
                                                             const CudaBackendOptions& options);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string Name() const override { return "cuda"; }
  bool Supports(Op op) const override;
  // "NVIDIA H100 80GB HBM3 (sm_90, 79 GiB)".
  std::string DeviceDescription() const;

  // --- state residency
  absl::Status BindStates(const std::vector<SequenceState*>& states) override;
  LatentCapacity latent_capacity() const override;
  absl::Status KdaRefs(const std::vector<SequenceState*>& states, int64_t kda_index,
                       std::vector<KdaStateRef>* refs) override;
  absl::Status MlaRefs(const std::vector<SequenceState*>& states, int64_t mla_index,
                       const std::vector<SeqSlice>& seqs, int64_t row_elems,
                       std::vector<MlaCacheRef>* refs) override;
  absl::Status SyncStateToHost(SequenceState* s) override;
  absl::Status ReleaseState(SequenceState* s) override;
  absl::Status BeginForward(const ForwardShape& shape) override;
  absl::Status EndForward(const absl::Status& forward_status) override;
  CudaGraphStats graph_stats() const;

  int64_t free_slots() const;
  int64_t free_pages() const;
  int64_t weight_bytes() const override { return weight_bytes_; }
  DeviceStateAccess* device_state() override;
  absl::Status SyncLayerToHost(SequenceState* s, bool kda, int64_t index, int64_t row_begin,
                               int64_t row_end) override;

  // --- memory
  absl::StatusOr<Weight> UploadWeight(const HostTensor& t) override;
  absl::StatusOr<Buffer> Alloc(int64_t elems) override;
  absl::Status Upload(const float* host, int64_t elems, float* dst) override;
  absl::Status Download(const float* src, int64_t elems, float* host) override;

  // --- ops
  absl::Status Linear(const float* x, int64_t rows, const Weight& w, float* y) override;
  absl::Status LinearMulti(const float* x, int64_t rows, const std::vector<const Weight*>& ws,
                           const std::vector<float*>& ys) override;
  absl::Status RmsNorm(const float* x, int64_t rows, int64_t dim, int64_t stride, const Weight& w,
                       double eps, float* y) override;
  absl::Status Embedding(const int32_t* ids, int64_t n, const Weight& table, float* y) override;
  absl::Status GatherRows(const float* src, int64_t dim, const std::vector<int64_t>& rows,
                          float* dst) override;
  absl::Status Add(const float* x, int64_t n, float* y) override;
  absl::Status AddRmsNorm(const float* a, int64_t rows, int64_t dim, float* x, const Weight& w,
                          double eps, float* y) override;
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
  bool SamplesOnDevice() const override { return true; }
  absl::Status SampleTokens(const float* logits, int64_t rows, int64_t vocab,
                            absl::Span<const TokenSampling> params, int32_t* host_tokens) override;

  struct Impl;  // CUDA-side state (cuda_backend.cc)

 private:
  CudaBackend(const ModelConfig& config, const CudaBackendOptions& options);
  absl::Status Init();
  // Makes this backend's GPU the calling thread's current device (entry points
  // that may be a thread's first CUDA work call it).
  absl::Status UseDevice() const;
  // Device scratch from the arena (inside a Forward; freed at the end of the
  // enclosing ScratchScope) or a standalone allocation (freed at the next sync).
  absl::StatusOr<void*> Scratch(int64_t bytes);
  void ReleaseFrames(size_t first);
  // Frees, at scope exit, the arena scratch an op took (stream order makes the
  // memory safe to reuse by the next op's kernels).
  class ScratchScope {
   public:
    explicit ScratchScope(CudaBackend* be);
    ~ScratchScope();
    ScratchScope(const ScratchScope&) = delete;
    ScratchScope& operator=(const ScratchScope&) = delete;

   private:
    CudaBackend* be_;
    size_t first_;
    bool active_;
  };
  // Copies host bytes to fresh device scratch (stream-ordered; through pinned
  // staging inside a forward, so graph replays can refill it).
  absl::StatusOr<void*> Stage(const void* host, int64_t bytes);
  // Pinned host scratch of the current forward.
  absl::StatusOr<void*> HostScratch(int64_t bytes);
  bool Replaying() const;
  // A forward's device block table for `slots` (rows in batch order).
  absl::StatusOr<const int32_t*> StageBlockTable(const std::vector<int32_t>& slots);
  absl::Status EnsurePages(int32_t slot, int64_t rows);
  // A free slot, owned by the returned residency (RESOURCE_EXHAUSTED if none).
  absl::StatusOr<std::shared_ptr<CudaResidency>> TakeSlot();
  absl::StatusOr<int32_t> SlotOf(const SequenceState* s) const;
  // Enqueue copies to the host (the caller synchronises): KDA layer `kda_index`
  // of `slot` — its state as canonical [H][K][V] through `scratch` (device, one
  // layer's floats) and its conv tails — into `ks` (resized); rows [row_begin,
  // row_end) of MLA layer `mla_index` into `host` (fp32 rows; grown to row_end).
  absl::Status KdaLayerToHost(int64_t kda_index, int32_t slot, KdaLayerState* ks, void* scratch);
  absl::Status MlaRowsToHost(int64_t mla_index, int32_t slot, int64_t row_begin, int64_t row_end,
                             std::vector<float>* host);
  void FreeResidency(int32_t slot, const std::vector<int32_t>& pages);
  absl::StatusOr<const float*> F32Copy(const Weight& w);
  // y[rows][ldy] (first w.rows columns) = x[rows][ldx] (first w.cols) · wᵀ.
  absl::Status LinearLd(const float* x, int64_t ldx, int64_t rows, const Weight& w, float* y,
                        int64_t ldy);

  friend struct CudaResidency;
  friend class CudaDeviceState;

  ModelConfig config_;
  CudaBackendOptions options_;
  std::unique_ptr<Impl> impl_;
  int64_t weight_bytes_ = 0;
};

}  // namespace kl

#endif  // KL_ENGINE_BACKEND_CUDA_BACKEND_H_
