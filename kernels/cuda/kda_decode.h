// CUDA decode step of the KDA layer (spec kimi_linear.md §3, §5): the fused
// recurrent update of a batch of sequences whose fp32 states live in a slot pool,
// and the matching one-token short-conv update. The CPU oracle is
// //kernels/cpu:kda (KdaRecurrent, KdaGate, ShortConvSilu, L2NormScaleRows).
//
// Conventions: every pointer is device memory; tensors are dense row-major,
// innermost index last in the shape comments. "act" is the activation dtype
// (kF32 or kBF16) of q, k, v, f, b, o (and conv x / w / tails / out). Launches are
// asynchronous on `stream` and capturable into CUDA graphs (no host sync, no
// allocation). Inputs are validated before any launch (InvalidArgument); CUDA
// errors come back as Internal.
#ifndef KL_KERNELS_CUDA_KDA_DECODE_H_
#define KL_KERNELS_CUDA_KDA_DECODE_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/common/dtype.h"

namespace kl::cuda {

// One decode step: for each sequence n and each of its tokens t (in order), per head:
//   q, k <- L2-normalised (eps 1e-6 inside the sqrt of the sum), q *= scale
//   g    = -exp(a_log[h]) * softplus(f + dt_bias)      (softplus linear above 20)
//   beta = sigmoid(b)
//   S <- diag(exp g) S;  u = beta (v - S^T k);  S <- S + k u^T;  o = S^T q
// with S = state_pool[slots[n]][h] (pool layout, kda_state_layout.h), updated in place.
struct KdaDecodeParams {
  int64_t num_seqs = 0;    // N
  int64_t num_tokens = 0;  // total tokens; == N when cu_seqlens is null
  int64_t num_heads = 0;   // H
  int64_t head_k = 128;    // K in {64, 128}
  int64_t head_v = 128;    // V in {64, 128}
  int64_t num_slots = 0;   // slots in state_pool
  DType act = DType::kBF16;  // kF32 or kBF16

  const void* q = nullptr;      // act [num_tokens][H][K]  (raw, pre-norm)
  const void* k = nullptr;      // act [num_tokens][H][K]  (raw, pre-norm)
  const void* v = nullptr;      // act [num_tokens][H][V]
  const void* f = nullptr;      // act [num_tokens][H*K]   raw gate logits
  const void* b = nullptr;      // act [num_tokens][H]     raw beta logits
  const float* a_log = nullptr;    // fp32 [H]
  const float* dt_bias = nullptr;  // fp32 [H*K]
  // int64 [N+1] token offsets (cu_seqlens[0] == 0, non-decreasing), or null for
  // exactly one token per sequence. Meant for a few tokens per sequence (<= 8,
  // speculative decoding); longer runs should use the chunk prefill.
  const int64_t* cu_seqlens = nullptr;
  // int32 [N]: state slot of each sequence. A slot < 0 or >= num_slots marks a
  // padding row: its outputs are set to 0 and no state is read or written.
  const int32_t* slots = nullptr;
  // fp32 [num_slots][H] states of K x V in the pool layout (kda_state_layout.h: slices of
  // 32 value columns, each contiguous), updated in place.
  float* state_pool = nullptr;
  void* o = nullptr;            // act [num_tokens][H][V] out
  float scale = 0.0f;           // q scale; 0 means K^-1/2
};

absl::Status KdaRecurrentDecode(const KdaDecodeParams& p, cudaStream_t stream);

// One-token causal depthwise conv + SiLU per sequence (spec §3.2), tails in slots:
//   window = [tail_pool[slot][0..W-2]; x[n]],  out[n][c] = silu(sum_j w[c][j] window[j][c])
// then the tail shifts by one (oldest dropped, x[n] appended). fp32 math.
struct ShortConvDecodeParams {
  int64_t num_seqs = 0;   // N
  int64_t channels = 0;   // C (e.g. 3 * H * K for q, k, v together)
  int64_t width = 4;      // W in [1, 8]
  int64_t num_slots = 0;  // slots in tail_pool
  DType act = DType::kBF16;
  const void* x = nullptr;        // act [N][C] new pre-conv inputs
  const void* w = nullptr;        // act [C][W] (index W-1 multiplies the current token)
  const int32_t* slots = nullptr; // int32 [N]; < 0 or >= num_slots: padding (out = 0)
  void* tail_pool = nullptr;      // act [num_slots][W-1][C], oldest first, in place
  void* out = nullptr;            // act [N][C]
};

absl::Status ShortConvDecode(const ShortConvDecodeParams& p, cudaStream_t stream);

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_KDA_DECODE_H_
