// CUDA kernels for the parts of the Kimi-Linear forward that are not attention
// or MoE: embedding, RMSNorm (plain and gated), residual add, SwiGLU, dtype
// conversion, row gathers, the varlen short conv with slot-pool tails, and the
// MLA operand packing. The CPU oracle is //engine/backend:cpu_backend.
//
// Conventions (as kda_decode.h): device pointers, dense row-major tensors,
// activations fp32, launches asynchronous on `stream`, capturable into CUDA
// graphs (no host sync, no allocation), shapes validated before any launch
// (InvalidArgument), CUDA errors as Internal.
#ifndef KL_KERNELS_CUDA_OPS_H_
#define KL_KERNELS_CUDA_OPS_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/common/dtype.h"

namespace kl::cuda {

// y[i][0..dim) = float(table[ids[i]][0..dim)); table dtype kF32 or kBF16. Ids are
// validated by the caller (host side); an id outside [0, vocab) writes zeros.
absl::Status EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType table_dtype,
                             int64_t vocab, int64_t dim, float* y, cudaStream_t stream);

// y = w ⊙ x / sqrt(mean(x²) + eps) over the first `dim` values of each of `rows`
// rows `stride` apart (x may alias y). w fp32 [dim].
absl::Status RmsNormRows(const float* x, int64_t rows, int64_t dim, int64_t stride, const float* w,
                         float eps, float* y, cudaStream_t stream);

// x += a, then y = w ⊙ x / sqrt(mean(x²) + eps) per row of `dim` (contiguous);
// the same arithmetic as AddInPlace then RmsNormRows, in one launch. y must not
// alias x or a.
absl::Status AddRmsNormRows(const float* a, float* x, int64_t rows, int64_t dim, const float* w,
                            float eps, float* y, cudaStream_t stream);

// Per (row, head): y = RMSNorm_dim(o) ⊙ w ⊙ sigmoid(z); o, z, y [rows][heads][dim].
absl::Status GatedRmsNormRows(const float* o, const float* z, int64_t rows, int64_t heads,
                              int64_t dim, const float* w, float eps, float* y,
                              cudaStream_t stream);

// dst[i] = mean + half_range * (2u - 1), u = (SplitMix64At(seed, i) >> 40) * 2^-24,
// stored as `dtype` (kF32 or kBF16): synthetic weights for benchmarks, identical
// to the host formula kl::SyntheticValue (engine/backend/backend.h).
absl::Status FillSynthetic(void* dst, DType dtype, int64_t n, float mean, float half_range,
                           uint64_t seed, cudaStream_t stream);

// y[i] += x[i], i < n.
absl::Status AddInPlace(const float* x, int64_t n, float* y, cudaStream_t stream);

// out[i] = silu(gate[i]) * up[i], i < n (out may alias gate or up).
absl::Status SwiGluElementwise(const float* gate, const float* up, int64_t n, float* out,
                               cudaStream_t stream);

// y[r][n] = Σ_k x[r][k] · w[n][k] for r < rows <= 8 (decode-sized batches), fp32
// activations against bf16 weights [N][K] with fp32 accumulation: one warp per
// output column streams its weight row once with 16-byte loads (a GEMV at
// memory speed, no separate activation conversion). Needs K % 8 == 0, ldx % 4 == 0
// and 16-byte aligned x and w; SkinnyGemvSupported says whether they hold.
bool SkinnyGemvSupported(const float* x, int64_t ldx, int64_t rows, const void* w, int64_t K);
absl::Status SkinnyGemvBf16(const float* x, int64_t ldx, int64_t rows, const void* w, int64_t N,
                            int64_t K, float* y, int64_t ldy, cudaStream_t stream);

// The same for up to 8 weight matrices (each [n][K]) that read the same x, in one
// launch: segment i writes y_i[r][0..n_i) with row stride ldy_i.
struct GemvSegment {
  const void* w;  // bf16 [n][K]
  int64_t n;
  float* y;
  int64_t ldy;
};
inline constexpr int kMaxGemvSegments = 8;
absl::Status SkinnyGemvMultiBf16(const float* x, int64_t ldx, int64_t rows,
                                 const GemvSegment* segs, int num_segs, int64_t K,
                                 cudaStream_t stream);

// Element-wise conversions.
absl::Status F32ToBf16(const float* x, int64_t n, void* y_bf16, cudaStream_t stream);
absl::Status Bf16ToF32(const void* x_bf16, int64_t n, float* y, cudaStream_t stream);

// dst[j][0..dim) = src[rows[j] * src_stride + (0..dim)], j < n; rows int64 (device).
absl::Status GatherRowsF32(const float* src, int64_t src_stride, int64_t dim, const int64_t* rows,
                           int64_t n, float* dst, cudaStream_t stream);

// Causal depthwise conv + SiLU over a varlen batch with carried tails (spec §3.2),
// then the tail update; fp32. For sequence s (tokens cu[s] .. cu[s+1]) with tail
// T = tail_pool[slots[s]] ([W-1][C], oldest first):
//   window(t) = last W values of [T; x[cu[s]..t]],  out[t][c] = silu(Σ_j w[c][j] window(t)[j][c])
// and afterwards T = last W-1 rows of [T; x[cu[s]..cu[s+1])]. A slot outside
// [0, num_slots) means "zero tail, discard the new one". Two kernels (conv, then
// tail update) so every token reads the tail before it changes; one with
// one_token_each. Valid slots must be distinct across the batch.
struct ShortConvVarlenParams {
  int64_t num_seqs = 0;    // N
  int64_t num_tokens = 0;  // packed rows (== cu[N])
  int64_t channels = 0;    // C
  int64_t width = 4;       // W in [1, 8]
  int64_t num_slots = 0;
  const float* x = nullptr;             // [num_tokens][C] pre-conv inputs
  const float* w = nullptr;             // [C][W] (index W-1 multiplies the current token)
  const int64_t* cu_seqlens = nullptr;  // [N+1] device
  const int32_t* slots = nullptr;       // [N] device
  float* tail_pool = nullptr;           // [num_slots][W-1][C], in place
  float* out = nullptr;                 // [num_tokens][C]
  // The caller guarantees one token per sequence (a decode step: num_tokens ==
  // num_seqs, cu_seqlens[s] == s; cu_seqlens is then not read): one fused launch
  // computes the outputs and shifts the tails, with the same arithmetic as the
  // general path.
  bool one_token_each = false;
};
absl::Status ShortConvVarlen(const ShortConvVarlenParams& p, cudaStream_t stream);
// The same for up to 3 convs of one shape (q, k and v of a KDA layer: same
// sequences, slots, channels and width), in two launches instead of six (one with
// one_token_each).
inline constexpr int kMaxConvGroup = 3;
absl::Status ShortConvVarlenMulti(const ShortConvVarlenParams* ps, int n, cudaStream_t stream);

// MLA decode operand: qcat[r][h] = [ · (lora, written by the absorption GEMM) ;
// q[r][h][nope..nope+rope) ]. Copies the q_pe part of q [rows][H][nope+rope] into qcat
// [rows][H][lora+rope].
absl::Status MlaCopyQPe(const float* q, int64_t rows, int64_t heads, int64_t nope, int64_t rope,
                        int64_t lora, float* qcat, cudaStream_t stream);

// MLA prefill operands from the expanded latents: kv [L][H][nope+v] (= c · kv_bᵀ)
// and the latent rows [L][lora+rope] give k [L][H][nope+rope] = [k_nope ; k_pe]
// (k_pe shared by all heads) and v [L][H][v].
absl::Status MlaBuildKv(const float* kv, const float* latent, int64_t rows, int64_t heads,
                        int64_t nope, int64_t v_dim, int64_t lora, int64_t rope, float* k, float* v,
                        cudaStream_t stream);

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_OPS_H_
