// CUDA kernels of the routed MoE block (spec kimi_linear.md §7): top-k routing of
// router logits, and the routed experts  out[t] = Σ_j w[t][j] · E_{id[t][j]}(x[t])  with
// E_e(x) = W2_e (silu(W1_e x) ⊙ W3_e x). The CPU oracle is kl::MoeRoute and
// CpuBackend::Moe (engine/backend/cpu_backend.cc). Design: README.md ("MoE").
//
// Conventions (as kda_decode.h): every pointer is device memory; tensors are dense
// row-major, innermost index last in the shape comments; weights are in PyTorch
// [out][in] layout. Launches are asynchronous on `stream` and capturable into CUDA
// graphs: no host sync, no allocation, and no launch grid depends on the routing
// (grids are sized for the worst case; tiles without work exit). Inputs are
// validated before any launch (InvalidArgument); CUDA errors come back as Internal.
#ifndef KL_KERNELS_CUDA_MOE_H_
#define KL_KERNELS_CUDA_MOE_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/common/dtype.h"

namespace kl::cuda {

constexpr int64_t kMoeMaxExperts = 512;
constexpr int64_t kMoeMaxTopK = 16;

// Per token t (one CTA each up to kMoeRouteRankMaxTokens tokens, else one warp each),
// exactly as kl::MoeRoute (NaN scores included):
//   score[e] = sigmoid(logits[t][e]) (1 / (1 + expf(-x)));  sel[e] = score[e] + bias[e]
//   ids: k times the untaken e with the largest sel (ties: the lower id), in pick order
//   w_j = biased_weights ? sel[id_j] : score[id_j]
//   w_j <- float(w_j * norm * routed_scaling_factor) in double, with
//          norm = renormalize ? 1 / (Σ_j w_j + 1e-20) (sum in double, j ascending) : 1.
// expf on the device may differ from libm's by an ulp, so weights match the CPU to
// ~1e-7 relative and ids match except on (near-)ties of sel.
struct MoeRouteParams {
  int64_t num_tokens = 0;   // T
  int64_t num_experts = 0;  // E in [1, 512]
  int64_t top_k = 0;        // k in [1, min(16, E)]
  bool renormalize = true;
  double routed_scaling_factor = 1.0;
  bool biased_weights = false;  // HF-parity convention (weights from score + bias)

  const float* logits = nullptr;           // fp32 [T][E] router logits
  const float* correction_bias = nullptr;  // fp32 [E], or null for no bias
  int32_t* topk_ids = nullptr;             // int32 [T][k] out
  float* topk_weights = nullptr;           // fp32 [T][k] out
};

absl::Status MoeRoute(const MoeRouteParams& p, cudaStream_t stream);

// kExact: fp32 SIMT GEMMs (fp32 or bf16 weights, fp32 activations and
// intermediate); the reference path. kTensorCore*: bf16 weights only, mma.sync
// m16n8k16 with fp32 accumulation; activations and the SwiGLU intermediate are
// rounded to bf16. kTensorCoreSkinny is the decode path (weights streamed once per
// 16 routed rows of an expert, split over N and K across CTAs); kTensorCoreTiled the
// prefill path (128x128x32 tiles, 3-stage cp.async pipeline). kAuto: kExact for fp32
// weights, else Skinny when num_tokens <= kMoeSkinnyMaxTokens, else Tiled.
enum class MoeAlgo : uint8_t { kAuto = 0, kExact = 1, kTensorCoreSkinny = 2, kTensorCoreTiled = 3 };
constexpr int64_t kMoeSkinnyMaxTokens = 64;
// MoeRoute uses one CTA per token (rank counting) up to this many tokens.
constexpr int64_t kMoeRouteRankMaxTokens = 32;

// out[t][:] = Σ_j topk_weights[t][j] · E_{topk_ids[t][j]}(x[t]), the k terms added in
// ascending expert id (as the CPU backend), each term rounded to fp32 first. An id
// outside [0, E) contributes nothing (a padding slot). Results are bitwise
// reproducible run to run (no float atomics; the combine is a gather).
struct MoeExpertsParams {
  int64_t num_tokens = 0;   // T
  int64_t hidden = 0;       // D; multiple of 4 (kExact), of 128 (tensor-core paths)
  int64_t inter = 0;        // I; any >= 1 (kExact), multiple of 64 (tensor-core paths)
  int64_t num_experts = 0;  // E in [1, 512]
  int64_t top_k = 0;        // k in [1, 16]
  DType weight_dtype = DType::kBF16;  // kF32 or kBF16
  MoeAlgo algo = MoeAlgo::kAuto;

  const float* x = nullptr;             // fp32 [T][D] activations (16-byte aligned)
  const int32_t* topk_ids = nullptr;    // int32 [T][k] (e.g. from MoeRoute)
  const float* topk_weights = nullptr;  // fp32 [T][k]
  // Device arrays of E device pointers, one per expert (16-byte aligned each),
  // weight_dtype elements: w1[e] -> [I][D] gate, w3[e] -> [I][D] up, w2[e] -> [D][I] down.
  const void* const* w1 = nullptr;
  const void* const* w3 = nullptr;
  const void* const* w2 = nullptr;
  float* out = nullptr;  // fp32 [T][D] out: every element written (read first with accumulate)
  // out[t] += the routed sum instead of out[t] = (e.g. onto a shared expert's output;
  // the same rounding as a separate add).
  bool accumulate = false;
};

// Which algorithm kAuto resolves to.
MoeAlgo MoeResolveAlgo(const MoeExpertsParams& p);

// Bytes of device workspace MoeExperts needs; depends only on the shapes (T, D, I,
// E, k) and the resolved algorithm. Dominated by the per-slot down-projection
// outputs, fp32 [T*k][D], kept for the deterministic gather-combine (T = 4096 at the
// 48B shape: ~0.39 GB in all).
size_t MoeWorkspaceBytes(const MoeExpertsParams& p);

// `workspace` must hold MoeWorkspaceBytes(p) bytes (256-byte aligned) and not be
// used by anything else until the work on `stream` completes. Launches: sort
// (counts, prefix sums, permutation), bf16 copy of x (tensor-core paths), gate+up
// GEMM with SwiGLU, down GEMM scaled by the routing weight, combine. The shared
// expert can use the same call with E = 1, k = 1, ids 0 and weights 1.
absl::Status MoeExperts(const MoeExpertsParams& p, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream);

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_MOE_H_
