// CUDA chunked prefill of the KDA layer (spec kimi_linear.md §4, C = 64) over a
// varlen batch, with per-sequence fp32 states in a slot pool. Same math and
// conventions as kda_decode.h (raw q / k / gate / beta logits in, fused L2 norm,
// q scale, gate, sigmoid); the CPU oracle is kl::cpu::KdaVarlen / KdaChunkPrefill.
//
// Two implementations behind one launcher:
//  - kExact: fp32 SIMT chunk algorithm, no tensor cores (TF32 off). Any K <= 128,
//    any V. The path for fp32 activations and the tight-tolerance tests.
//  - kTensorCore: bf16 tensor cores (mma.sync + wgmma, sm_90a: H100 / H200) with fp32
//    accumulation, state kept fp32 across chunks, K = V = 128 only; two kernels
//    (intra-chunk factors in parallel over all (chunk, head), then the sequential
//    state pass per (sequence, head, 64-column slice)) that communicate through
//    `workspace` (76 KB per (chunk, head): 4.9 GB for 128K tokens x 32 heads). For
//    batches of <= 4 sequences the two run as a pipeline over segments of chunks on
//    internal streams (forked from and joined back to `stream` by events), the
//    workspace then also holds the states carried between segments (4 MB per
//    sequence at H = 32).
//  kAuto picks kTensorCore for bf16 with K = V = 128 on a compute-capability 9.0
//  device (H100 / H200), else kExact.
//
// Decays: only exp(G_r - G_j) with r >= j (or products of such factors) are ever
// formed, so any gate magnitude (g = -1e3 per token) is finite (spec §4.2).
#ifndef KL_KERNELS_CUDA_KDA_CHUNK_H_
#define KL_KERNELS_CUDA_KDA_CHUNK_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/common/dtype.h"

namespace kl::cuda {

enum class KdaChunkAlgo : uint8_t { kAuto = 0, kExact = 1, kTensorCore = 2 };

struct KdaChunkParams {
  int64_t num_seqs = 0;    // N
  int64_t num_tokens = 0;  // packed tokens (== cu_seqlens[N]; must be known on the host)
  int64_t num_heads = 0;   // H
  int64_t head_k = 128;    // K
  int64_t head_v = 128;    // V
  int64_t num_slots = 0;   // slots in state_pool
  DType act = DType::kBF16;  // kF32 or kBF16
  KdaChunkAlgo algo = KdaChunkAlgo::kAuto;

  const void* q = nullptr;          // act [num_tokens][H][K]  raw
  const void* k = nullptr;          // act [num_tokens][H][K]  raw
  const void* v = nullptr;          // act [num_tokens][H][V]
  const void* f = nullptr;          // act [num_tokens][H*K]   raw gate logits
  const void* b = nullptr;          // act [num_tokens][H]     raw beta logits
  const float* a_log = nullptr;     // fp32 [H]
  const float* dt_bias = nullptr;   // fp32 [H*K]
  const int64_t* cu_seqlens = nullptr;  // int64 [N+1], device; cu[0] == 0, non-decreasing
  // int32 [N]: state slot per sequence; the slot's state is the initial state and
  // receives the final state. An empty sequence leaves its slot untouched. A slot
  // < 0 or >= num_slots means "no state": start from zeros, discard the final state.
  const int32_t* slots = nullptr;
  float* state_pool = nullptr;  // fp32 [num_slots][H] K x V states, pool layout (kda_state_layout.h)
  void* o = nullptr;            // act [num_tokens][H][V] out
  float scale = 0.0f;           // 0 means K^-1/2
  // Tensor-core path: for one long sequence the two kernels may run at the same time, the
  // second waiting on flags the first sets (the streamed mode, kda_chunk_internal.h). It
  // relies on the first keeping at least half the GPU's SMs; set false where the process
  // may get fewer SMs than the device reports (e.g. an MPS client with a thread limit).
  bool allow_concurrent = true;
};

// Bytes of device workspace the call needs (0 for kExact). Depends only on shapes.
size_t KdaChunkWorkspaceBytes(const KdaChunkParams& p);

// `workspace` must hold KdaChunkWorkspaceBytes(p) bytes (256-byte aligned) and not
// be used by anything else until the work on `stream` completes.
absl::Status KdaChunkPrefill(const KdaChunkParams& p, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

// Which algorithm kAuto resolves to for these shapes.
KdaChunkAlgo KdaChunkResolveAlgo(const KdaChunkParams& p);

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_KDA_CHUNK_H_
