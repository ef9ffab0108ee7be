// Backend: the seam between the model code (engine/model) and the hardware.
// One method per model op; the model never knows which backend runs it.
// CpuBackend (cpu_backend.h) is the oracle every other backend is tested against.
//
// Memory contract: every float* passed to an op points into the backend's own
// memory space (host memory for the CPU backend, device memory for CUDA).
// Activations come from Alloc(); weights from UploadWeight(). Ops are
// synchronous from the caller's point of view (a CUDA backend may queue work on
// its stream, but a later op or Download() observes the results).
#ifndef KL_ENGINE_BACKEND_BACKEND_H_
#define KL_ENGINE_BACKEND_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/backend/device_state.h"
#include "engine/sampling/sampler.h"
#include "engine/state/sequence_state.h"
#include "kernels/common/dtype.h"
#include "kernels/common/splitmix64.h"

namespace kl {

enum class Op {
  kLinear, kRmsNorm, kEmbedding, kShortConvSilu, kKdaGate, kL2NormScale, kSigmoid,
  kKdaChunk, kKdaRecurrent, kGatedRmsNorm, kMlaAttention, kMoe, kSwiGlu,
};

// Host-side view of a parameter tensor to upload ([rows][cols] row-major; a
// vector is rows = 1).
struct HostTensor {
  DType dtype = DType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  // Synthetic weights (benchmarks of configs too large to generate on the host):
  // data is null and the backend fills the tensor itself with values uniform in
  // [mean - half_range, mean + half_range], a pure function of (seed, index).
  bool synthetic = false;
  float synth_mean = 0.0f;
  float synth_half_range = 0.0f;
  uint64_t synth_seed = 0;
};

// Element i of a synthetic tensor (the CPU and CUDA backends use this same
// function, so both hold identical synthetic weights).
// Same formula as kl::cuda::FillSynthetic.
inline float SyntheticValue(const HostTensor& t, uint64_t i) {
  const float u = static_cast<float>((SplitMix64At(t.synth_seed, i) >> 40) * 0x1.0p-24);
  return t.synth_mean + t.synth_half_range * (2.0f * u - 1.0f);
}

// A parameter in backend memory. Owned by the backend that made it; valid
// until that backend is destroyed. Linear weights are PyTorch [out][in].
struct Weight {
  DType dtype = DType::kF32;
  void* data = nullptr;
  int64_t rows = 0;  // out_features
  int64_t cols = 0;  // in_features
  bool empty() const { return data == nullptr; }
};

// A scratch buffer of fp32 in backend memory (RAII).
class Buffer {
 public:
  Buffer() = default;
  Buffer(float* data, int64_t elems, std::shared_ptr<void> owner)
      : data_(data), elems_(elems), owner_(std::move(owner)) {}
  float* data() const { return data_; }
  int64_t elems() const { return elems_; }

 private:
  float* data_ = nullptr;
  int64_t elems_ = 0;
  std::shared_ptr<void> owner_;
};

// KDA layer parameters as the ops need them (see spec §3).
struct KdaOpWeights {
  const Weight* conv_q;   // [KdaDim][W]
  const Weight* conv_k;
  const Weight* conv_v;
  const Weight* a_log;    // [1][H] fp32
  const Weight* dt_bias;  // [1][H*K] fp32
};

// One sequence's slice of a batch for the stateful ops.
struct SeqSlice {
  int64_t row_begin = 0;  // first row of this sequence in the packed batch
  int64_t rows = 0;       // new tokens of this sequence in the batch (may be 0)
  int64_t pos = 0;        // tokens already in the sequence's state before this batch
};

// Per-sequence pointers into a KDA layer's state (backend memory). Host-resident
// states (the CPU backend): slot = -1 and the pointers address this sequence's
// state. Slot-pool backends: the pointers are the layer's pool bases and `slot`
// the sequence's row in them.
struct KdaStateRef {
  float* recurrent = nullptr;  // H states of K x V fp32, in the backend's layout (CPU:
                               // [H][K][V]; CUDA: kernels/cuda/kda_state_layout.h)
  float* conv_q = nullptr;     // [W-1][KdaDim]
  float* conv_k = nullptr;
  float* conv_v = nullptr;
  int32_t slot = -1;
};

// Per-sequence latent cache of one MLA layer: rows [0, pos + rows) must fit;
// the op writes the new rows at [pos, pos + rows). Row = [c (kv_lora_rank) ; k_pe].
// Paged-cache backends: `rows` is the layer's page pool and `slot` the row of
// the sequence's block table.
struct MlaCacheRef {
  float* rows = nullptr;
  int32_t slot = -1;
};

struct MlaDims {
  int64_t heads, kv_lora_rank, qk_nope, qk_rope, v_head;
};

// MoE routing parameters (spec §7).
struct MoeParams {
  int64_t num_experts = 0;
  int64_t top_k = 0;
  bool renormalize = true;
  double routed_scaling_factor = 1.0;
  bool biased_weights = false;  // HF-parity convention (weights from p + bias)
  // y += the routed sum (e.g. onto the shared expert's output) instead of y = it;
  // rounded as a separate add of the routed sum would be.
  bool accumulate = false;
};

struct MoeOpWeights {
  const Weight* router;                    // [E][D]
  const Weight* correction_bias;           // [1][E] fp32
  const std::vector<Weight>* w1;           // E × [I][D] gate
  const std::vector<Weight>* w3;           // E × [I][D] up
  const std::vector<Weight>* w2;           // E × [D][I] down
};

// What a Forward will run, for backends that specialise on it (CUDA graphs).
struct ForwardShape {
  int64_t num_seqs = 0;
  int64_t num_tokens = 0;      // packed new tokens
  int64_t max_new_tokens = 0;  // largest per-sequence new-token count
  int64_t max_context = 0;     // largest pos + new tokens
  int64_t logits_rows = 0;     // rows that get logits
  bool device_sampling = false;  // the logits are sampled on the device (SampleTokens)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string Name() const = 0;
  virtual bool Supports(Op op) const = 0;

  // --- sequence state residency. The defaults (backend.cc) serve host-resident
  // states: the SequenceState's own vectors. A device backend overrides all five.
  //
  // Makes every state usable by this backend before a Forward: a device backend
  // adopts states it does not hold yet (allocates a slot, uploads the host
  // vectors) and fails with RESOURCE_EXHAUSTED when out of slots. A state held
  // by another backend is FAILED_PRECONDITION.
  virtual absl::Status BindStates(const std::vector<SequenceState*>& states);
  // Per-state references to KDA layer `kda_index` (states already bound).
  virtual absl::Status KdaRefs(const std::vector<SequenceState*>& states, int64_t kda_index,
                               std::vector<KdaStateRef>* refs);
  // Per-state references to MLA layer `mla_index`, with room for each state's
  // rows [0, seqs[i].pos + seqs[i].rows) (grows the cache; RESOURCE_EXHAUSTED
  // when the backend is out of cache memory).
  virtual absl::Status MlaRefs(const std::vector<SequenceState*>& states, int64_t mla_index,
                               const std::vector<SeqSlice>& seqs, int64_t row_elems,
                               std::vector<MlaCacheRef>* refs);
  // Copies a bound state's device copy into its host vectors (for a StateBundle
  // export); the device copy stays the state. No-op for host-resident states.
  virtual absl::Status SyncStateToHost(SequenceState* s) { return absl::OkStatus(); }
  // After layer `index` (the index-th KDA layer if `kda`, else the index-th MLA
  // layer) of the running Forward, copies that layer of a bound state into its
  // host vectors — the KDA state and conv tails, or the MLA rows [row_begin,
  // row_end) (the latent vector grows to row_end rows) — so a prefill worker can
  // ship the layer while later layers compute. No-op for host-resident states.
  virtual absl::Status SyncLayerToHost(SequenceState* s, bool kda, int64_t index,
                                       int64_t row_begin, int64_t row_end) {
    return absl::OkStatus();
  }
  // Bytes of weights this backend holds.
  virtual int64_t weight_bytes() const { return 0; }

  // Where a backend keeps MLA latent rows in a fixed pool (a GPU's pages):
  // how many rows all sequences can hold together, in what units a sequence
  // takes them, and the most one sequence can hold. rows == 0: no fixed pool
  // (host memory). A decode worker's leases reserve within it, so a sequence
  // it admitted never runs out of rows mid-stream.
  struct LatentCapacity {
    int64_t rows = 0;
    int64_t granularity = 1;
    int64_t max_rows_per_sequence = 0;  // 0: no limit of its own
  };
  virtual LatentCapacity latent_capacity() const { return {}; }
  // Device-to-device state transports (NCCL) reach device-resident states
  // through this; null for host-resident backends.
  virtual DeviceStateAccess* device_state() { return nullptr; }
  // Gives a bound state's memory back now and makes the host vectors the state
  // again (after SyncStateToHost, or on a failure). No-op for host states.
  virtual absl::Status ReleaseState(SequenceState* s) { return absl::OkStatus(); }

  // Brackets one Model::Forward (after BindStates). A device backend may reset
  // its activation arena at Begin, run the forward from a CUDA graph when the
  // shape repeats (decode steps), and at End wait for the queued work (End's
  // status carries any asynchronous failure). Inside the bracket, Download()
  // may complete only at EndForward, and buffers from Alloc() die with it.
  // EndForward gets the forward's own status: on failure the backend drops
  // whatever it was recording and only waits for the queued work.
  virtual absl::Status BeginForward(const ForwardShape& shape) { return absl::OkStatus(); }
  virtual absl::Status EndForward(const absl::Status& forward_status) { return absl::OkStatus(); }

  // --- memory
  virtual absl::StatusOr<Weight> UploadWeight(const HostTensor& t) = 0;
  virtual absl::StatusOr<Buffer> Alloc(int64_t elems) = 0;
  virtual absl::Status Upload(const float* host, int64_t elems, float* dst) = 0;
  virtual absl::Status Download(const float* src, int64_t elems, float* host) = 0;

  // --- dense ops (rows = tokens in the packed batch)
  // y[rows][w.rows] = x[rows][w.cols] · wᵀ
  virtual absl::Status Linear(const float* x, int64_t rows, const Weight& w, float* y) = 0;
  // y = w ⊙ x / sqrt(mean(x²) + eps) over the first `dim` values of each row;
  // x and y rows are `stride` apart (x may alias y; other columns are untouched).
  virtual absl::Status RmsNorm(const float* x, int64_t rows, int64_t dim, int64_t stride,
                               const Weight& w, double eps, float* y) = 0;
  virtual absl::Status Embedding(const int32_t* ids, int64_t n, const Weight& table, float* y) = 0;
  // ys[i] = Linear(x, ws[i]) for projections that read the same input (one
  // launch on a GPU for decode-sized batches). Default: one Linear each.
  virtual absl::Status LinearMulti(const float* x, int64_t rows,
                                   const std::vector<const Weight*>& ws,
                                   const std::vector<float*>& ys);
  // dst[j][0..dim) = src[rows[j]][0..dim) for a [*][dim] row-major src.
  virtual absl::Status GatherRows(const float* src, int64_t dim, const std::vector<int64_t>& rows,
                                  float* dst);
  // y += x (elementwise over n)
  virtual absl::Status Add(const float* x, int64_t n, float* y) = 0;
  // The residual step between sublayers: x += a, then y = RmsNorm(x) (rows of
  // `dim`, contiguous; y aliases neither x nor a). One launch on a GPU.
  // Default: Add, then RmsNorm.
  virtual absl::Status AddRmsNorm(const float* a, int64_t rows, int64_t dim, float* x,
                                  const Weight& w, double eps, float* y);
  // out[r][i] = silu(gate_up[r][i]) * gate_up[r][I + i] for a [rows][2I] input.
  virtual absl::Status SwiGlu(const float* gate, const float* up, int64_t rows, int64_t inter,
                              float* out) = 0;

  // --- KDA (spec §3): in-place on the packed [rows][H*K] projections.
  // Applies per-sequence causal conv + SiLU to q̃, k̃, ṽ with the carried tails,
  // the gate (f → g), β = sigmoid(b), L2 norm (+ scale K^-1/2 on q), then the
  // recurrence / chunk algorithm, writing o [rows][H*V].
  virtual absl::Status KdaMix(float* q, float* k, float* v, float* f, float* b,
                              const std::vector<SeqSlice>& seqs,
                              const std::vector<KdaStateRef>& states, const KdaOpWeights& w,
                              int64_t heads, int64_t head_dim, int64_t conv_width,
                              int64_t chunk, float* o) = 0;
  // Per head: o[h] = RMSNorm_dim(o[h]) ⊙ w ⊙ sigmoid(z[h]), rows × heads × dim.
  virtual absl::Status GatedRmsNorm(const float* o, const float* z, int64_t rows, int64_t heads,
                                    int64_t dim, const Weight& w, double eps, float* y) = 0;

  // --- MLA (spec §6). q [rows][H][nope+rope], latent [rows][kv_lora+rope] (new
  // rows, c already normalised). Writes the latents into each sequence's cache
  // and attends causally; out [rows][H][v_head].
  virtual absl::Status MlaAttention(const float* q, const float* latent,
                                    const std::vector<SeqSlice>& seqs,
                                    const std::vector<MlaCacheRef>& caches, const MlaDims& d,
                                    const Weight& kv_b, float* out) = 0;

  // --- MoE (spec §7): y[rows][D] = Σ_i w_i E_{idx_i}(x) (routed part only).
  virtual absl::Status Moe(const float* x, int64_t rows, int64_t dim, const MoeParams& p,
                           const MoeOpWeights& w, float* y) = 0;

  // Token sampling where the logits live, so that only token ids reach the host.
  // host_tokens[r] = the host Sampler's choice for logits[r][0, vocab) with params[r]
  // (kernels/cuda/sampling.h says how close: the same token but for draws within ~1e-7
  // of a boundary). Inside a Forward the ids land at EndForward. Backends without it
  // return false / Unimplemented and callers sample on the host.
  virtual bool SamplesOnDevice() const { return false; }
  virtual absl::Status SampleTokens(const float* logits, int64_t rows, int64_t vocab,
                                    absl::Span<const TokenSampling> params, int32_t* host_tokens) {
    return absl::UnimplementedError("SampleTokens: this backend samples on the host");
  }
};

}  // namespace kl

#endif  // KL_ENGINE_BACKEND_BACKEND_H_
