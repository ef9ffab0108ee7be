// CUDA kernels of the MLA layer of Kimi Linear (spec kimi_linear.md §6: NoPE, one
// latent row per token shared by all heads): the paged latent cache (write, gather),
// the causal varlen prefill attention in the naive (materialised k / v) form, and the
// absorbed decode attention over the paged cache (MQA, FlashMLA-style layout) with
// split-KV. Host (fp64) references: mla_test.cc.
//
// Conventions (as kda_decode.h): every pointer is device memory; tensors are dense
// row-major, innermost index last in the shape comments. Launches are asynchronous on
// `stream` and capturable into CUDA graphs (no host sync, no allocation, nothing read
// back from the device: lengths live on the device and only host-side upper bounds
// size the grids). Inputs are validated before any launch (InvalidArgument); CUDA
// errors come back as Internal.
//
// Latent cache row: [c (latent_dim, normalised kv latent) ; k_pe (rope_dim)], the
// 576 values per token of the 48B model (latent 512 + rope 64; 1152 B in bf16).
#ifndef KL_KERNELS_CUDA_MLA_H_
#define KL_KERNELS_CUDA_MLA_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/common/dtype.h"

namespace kl::cuda {

// The paged latent cache of one MLA layer and the block tables that address it.
// Token at position p (0-based) of sequence n lives in physical page
// block_table[n * max_pages_per_seq + p / page_size], row p % page_size.
// A block-table entry outside [0, num_pages) is treated as "no page": writes to it
// are dropped, gathers of it produce zero rows, decode ignores its rows (as if the
// tokens were not there). No kernel ever reads or writes outside the pool.
struct MlaPagedCache {
  void* pool = nullptr;           // dtype [num_pages][page_size][latent_dim + rope_dim]
  DType dtype = DType::kBF16;     // kF32 or kBF16
  int64_t num_pages = 0;          // physical pages in the pool (>= 1)
  int64_t page_size = 64;         // rows per page (>= 1)
  int64_t latent_dim = 512;       // kv_lora_rank (>= 1)
  int64_t rope_dim = 64;          // qk_rope_head_dim (>= 0)
  const int32_t* block_table = nullptr;  // int32 [num_seqs][max_pages_per_seq]
  int64_t max_pages_per_seq = 0;  // row stride of block_table (>= 1)

  int64_t row_dim() const { return latent_dim + rope_dim; }
};

// Writes the new latent rows of a varlen batch into the cache, converting to
// cache.dtype (round to nearest even for bf16). Sequence n's new tokens are rows
// [cu_seqlens[n], cu_seqlens[n+1]) of `rows` and go to positions
// start_pos[n], start_pos[n] + 1, ... Positions at or beyond
// max_pages_per_seq * page_size are dropped (the caller reserves pages first).
struct MlaCacheWriteParams {
  int64_t num_seqs = 0;     // N
  int64_t num_tokens = 0;   // packed new tokens (== cu_seqlens[N]; host-side value)
  MlaPagedCache cache;
  const float* rows = nullptr;          // fp32 [num_tokens][row_dim], already normalised
  const int64_t* cu_seqlens = nullptr;  // int64 [N+1]; cu[0] == 0, non-decreasing
  const int32_t* start_pos = nullptr;   // int32 [N]: tokens already cached per sequence
};

absl::Status MlaCacheWrite(const MlaCacheWriteParams& p, cudaStream_t stream);

// Copies cached rows [0, kv_cu_seqlens[n+1] - kv_cu_seqlens[n]) of each sequence n
// into a packed fp32 buffer (the prefix + new tokens of a prefill with a prefix),
// sequence n at rows [kv_cu_seqlens[n], kv_cu_seqlens[n+1]).
struct MlaCacheGatherParams {
  int64_t num_seqs = 0;    // N
  int64_t num_rows = 0;    // packed rows (== kv_cu_seqlens[N]; host-side value)
  MlaPagedCache cache;
  const int64_t* kv_cu_seqlens = nullptr;  // int64 [N+1]
  float* out = nullptr;                    // fp32 [num_rows][row_dim]
  // Position of each sequence's first packed row: packed row t of sequence n
  // is position first_row + t - kv_cu_seqlens[n] (a window of rows, e.g. one
  // prefill chunk's, without gathering the rows before it).
  int64_t first_row = 0;
};

absl::Status MlaCacheGather(const MlaCacheGatherParams& p, cudaStream_t stream);

// Causal varlen attention in the naive form (per-head k / v already materialised):
//   for sequence n with q_len = q_cu[n+1] - q_cu[n], kv_len = kv_cu[n+1] - kv_cu[n],
//   query row i sits at absolute position pos = kv_len - q_len + i and attends kv rows
//   j in [0, pos]:  out[i][h] = softmax_j(scale * q[i][h] . k[j][h]) v[j][h].
// Exact fp32 math (FFMA, libm expf, online softmax; no tensor cores / TF32). Empty
// sequences (q_len 0) are allowed; a query row with no visible key (kv_len < q_len,
// an invalid batch) gets zeros. Every output element is written.
struct MlaPrefillParams {
  int64_t num_seqs = 0;    // N
  int64_t num_q = 0;       // packed query rows (== q_cu_seqlens[N]; host-side value)
  int64_t num_heads = 0;   // H (<= 65535)
  int64_t qk_dim = 192;    // qk_nope + rope, in [1, 256]
  int64_t v_dim = 128;     // in [1, 256]
  const float* q = nullptr;  // fp32 [num_q][H][qk_dim]
  const float* k = nullptr;  // fp32 [num_kv][H][qk_dim]
  const float* v = nullptr;  // fp32 [num_kv][H][v_dim]
  const int64_t* q_cu_seqlens = nullptr;   // int64 [N+1]
  const int64_t* kv_cu_seqlens = nullptr;  // int64 [N+1]
  float* out = nullptr;      // fp32 [num_q][H][v_dim]
  float scale = 0.0f;        // 0 means qk_dim^-1/2
};

absl::Status MlaPrefillAttention(const MlaPrefillParams& p, cudaStream_t stream);

// The same attention on bf16 tensor cores (mma.sync, fp32 accumulation; q, k, v
// rounded to bf16 on load): for the head shapes of real configs only — qk 192 /
// v 128 (the 48B model) and qk 96 / v 64. ~1e-2 relative to the exact kernel.
bool MlaPrefillUsesTensorCores(const MlaPrefillParams& p);
absl::Status MlaPrefillAttentionBf16(const MlaPrefillParams& p, cudaStream_t stream);

// Absorbed-form decode, one new token per sequence (its latent row already written
// to the cache), MQA over the shared cache rows:
//   s_j[h] = scale * (q[n][h] . row_j)  over all latent_dim + rope_dim values,
//   out[n][h] = sum_j softmax_j(s)[h] * c_j   (c_j = first latent_dim values of row_j)
// for j in [0, seq_lens[n]). seq_lens[n] <= 0 marks a padding row: out = 0.
//
// Split-KV: each sequence's rows are cut into num_splits equal ranges (per sequence,
// from its device-side length, so balance and correctness never depend on a host
// guess); one CTA per (range, sequence) reads every row once for all heads; a second
// kernel merges the partial softmax states when num_splits > 1.
//
// Paths: a bf16 cache with latent_dim in {64, 128, 256, 512}, rope_dim % 16 == 0,
// H <= 32 and latent_dim + rope_dim <= 576 (H > 16) / 1152 (H <= 16) runs on tensor
// cores (bf16 operands: q and the softmax weights rounded to bf16, fp32 accumulation
// and softmax: ~1e-3 relative): the warp-specialised wgmma kernel (TMA ring, sm_90 only)
// when rope_dim is 0 or 64 and page_size % 8 == 0, otherwise the mma.sync kernel;
// everything else (fp32 cache: exact fp32 FFMA math) the SIMT kernel.
// MlaDecodeUsesTensorCores / MlaDecodeKernelName say which.
struct MlaDecodeParams {
  int64_t num_seqs = 0;    // N (<= 65535)
  int64_t num_heads = 0;   // H (<= 65535)
  MlaPagedCache cache;
  const float* q = nullptr;         // fp32 [N][H][latent_dim + rope_dim]: [W_UK^T q_nope ; q_pe]
  const int32_t* seq_lens = nullptr;  // int32 [N]: context length incl. the new token
  float* out = nullptr;             // fp32 [N][H][latent_dim] (latent-space output)
  float scale = 0.0f;               // 0 means (latent_dim + rope_dim)^-1/2; the model
                                    // uses (qk_nope + rope)^-1/2 = 192^-1/2: pass it
  // Host-side upper bound of max(seq_lens) (0: unknown). Only picks num_splits (no
  // split shorter than ~256 rows); any device-side length stays correct.
  int64_t max_seq_len_hint = 0;
  // Ranges per sequence; 0 = auto (enough CTAs to fill the device, <= kMlaMaxSplits).
  int64_t num_splits = 0;
  // kMmaSync keeps a wgmma-eligible launch on the mma.sync kernel (benchmarks, tests).
  enum class Kernel { kAuto, kMmaSync };
  Kernel kernel = Kernel::kAuto;
};

constexpr int64_t kMlaMaxSplits = 256;

// The num_splits the launch uses (auto: from N, max_seq_len_hint and the current
// device's SM count). MlaDecodeWorkspaceBytes and MlaDecodeAttention agree on it.
int64_t MlaDecodeNumSplits(const MlaDecodeParams& p);

// Bytes of device workspace the decode needs (0 when num_splits == 1): the partial
// outputs and softmax states of every (sequence, split, head). Depends on shapes only.
size_t MlaDecodeWorkspaceBytes(const MlaDecodeParams& p);

// True when a tensor-core kernel serves these shapes (see MlaDecodeParams).
bool MlaDecodeUsesTensorCores(const MlaDecodeParams& p);
// The kernel that serves p on the current device: "wgmma", "mma" or "simt".
const char* MlaDecodeKernelName(const MlaDecodeParams& p);

// `workspace` holds MlaDecodeWorkspaceBytes(p) bytes (16-byte aligned, may be null
// when 0) and is not used by anything else until the work on `stream` completes.
absl::Status MlaDecodeAttention(const MlaDecodeParams& p, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream);

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_MLA_H_
