// Internals of the chunked KDA prefill shared by kda_chunk.cu (launcher, exact
// path), kda_chunk_tc.cu (tensor-core path) and the benchmark. Not a public API.
#ifndef KL_KERNELS_CUDA_KDA_CHUNK_INTERNAL_H_
#define KL_KERNELS_CUDA_KDA_CHUNK_INTERNAL_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/kda_chunk.h"

namespace kl::cuda::internal {

constexpr int kChunk = 64;  // C

// Tensor-core path: per (chunk, head) "item" the intra kernel writes (bf16 unless
// noted). The three 64 x 128 tiles and A are stored as 8 x 8 "core matrices" of 128
// contiguous bytes (the no-swizzle wgmma operand layout, also conflict-free for
// ldmatrix), so one bulk copy moves them and wgmma reads them in place:
//   W  [64 r][128 d] = T diag(beta) (K o Gamma)   K-major: core (r/8, d/8) at ((r/8)*16 + d/8)*128
//   QG [64 r][128 d] = Q o Gamma                  same layout (q normalised and scaled)
//   KH [64 j][128 d] = K o exp(G_last - G)        MN-major: core (d/8, j/8) at ((d/8)*8 + j/8)*128,
//                                                 each core row = one j, 8 consecutive d
//   A  [64 r][64 j]  = tril(Q K^T o decay)        K-major: core at ((r/8)*8 + j/8)*128
//   U  [2][64 r][72] = T diag(beta) V, two 64-column slices, row-major, padded rows
//   EG [128] fp32    = exp(G_last)                (per-channel decay of the chunk)
// with T = (I + L)^-1. Items are indexed chunk * H + head, chunks numbered over the
// whole varlen batch (chunk_offsets[n] = first chunk of sequence n).
constexpr size_t kItemW = 0;
constexpr size_t kItemQG = kItemW + 64 * 128 * 2;
constexpr size_t kItemKH = kItemQG + 64 * 128 * 2;
constexpr size_t kItemA = kItemKH + 64 * 128 * 2;
constexpr size_t kItemU = kItemA + 64 * 64 * 2;
constexpr size_t kItemUSlice = 64 * 72 * 2;
constexpr size_t kItemEG = kItemU + 2 * kItemUSlice;
constexpr size_t kItemBytes = kItemEG + 128 * 4;  // 76,288

// Upper bound of the number of chunks of a varlen batch (no device read needed).
inline int64_t MaxChunks(int64_t num_tokens, int64_t num_seqs) {
  return num_tokens / kChunk + num_seqs;
}
// Workspace: int32 chunk_offsets [N+1] (256-byte padded), then the items, then (small
// batches) the carried states fp32 [2][N][H][K][V], then the streamed mode's ready flags.
inline size_t TcOffsetsBytes(int64_t num_seqs) {
  return (static_cast<size_t>(num_seqs + 1) * 4 + 255) / 256 * 256;
}
// Batches of at most this many sequences may use the segmented intra / state pipeline
// (kda_chunk_tc.cu), which carries fp32 states between segments in the workspace.
constexpr int64_t kMaxOverlapSeqs = 4;
constexpr int64_t kKMaxTc = 128;  // K = V of the tensor-core path
inline size_t TcCarryBytes(int64_t num_seqs, int64_t num_heads) {  // 0 above kMaxOverlapSeqs
  return num_seqs <= kMaxOverlapSeqs ? static_cast<size_t>(2 * num_seqs * num_heads) * kKMaxTc * kKMaxTc * 4 : 0;
}
// Streamed mode (kda_chunk_tc.cu): int32 per-item ready flags [chunks][H] at the end.
inline size_t TcFlagsBytes(int64_t num_tokens, int64_t num_seqs, int64_t num_heads) {
  return static_cast<size_t>(MaxChunks(num_tokens, num_seqs) * num_heads) * 4;
}
inline size_t TcWorkspaceBytes(int64_t num_tokens, int64_t num_seqs, int64_t num_heads) {
  return TcOffsetsBytes(num_seqs) +
         static_cast<size_t>(MaxChunks(num_tokens, num_seqs)) * num_heads * kItemBytes +
         TcCarryBytes(num_seqs, num_heads) + TcFlagsBytes(num_tokens, num_seqs, num_heads);
}

// Launches the kernels of the tensor-core path (chunk offsets, intra, state) on
// `stream` (the segmented pipeline forks to internal streams and joins back).
// Preconditions checked by the caller: bf16, K = V = 128, sizes in range. If
// `after_intra` is non-null the pipeline is not used and the event is recorded
// between the intra and state kernels (benchmark phase timing).
cudaError_t LaunchChunkTc(const KdaChunkParams& p, void* workspace, cudaStream_t stream,
                          cudaEvent_t after_intra);

// State-pass implementation of the tensor-core path: warpgroup MMA (wgmma, default) or
// the mma.sync + ldmatrix kernel. Process-wide; for tests and the benchmark.
enum class TcStateImpl { kWgmma = 0, kMmaSync = 1 };
void SetTcStateImpl(TcStateImpl impl);

// Knobs of the tensor-core path (process-wide; tests and the benchmark change them).
struct TcTuning {
  // Streamed mode: the intra and state kernels run at once over all chunks, each state
  // CTA waiting for per-item ready flags (no segments, no carried states, items read
  // while still in L2; not while the caller's stream is captured into a graph). The
  // state CTAs run at the highest stream priority and the intra kernel at the lowest,
  // whatever the caller's priority, and spin while they wait. Used when the state CTAs,
  // each beside an intra CTA, take at most half of the SMs (N * H * V / 64 <= SMs / 2:
  // B = 1 at H = 32) and the state pass is the wgmma kernel. More state CTAs than SMs
  // would starve the intra kernel (pending CTAs of the high-priority state launch hold
  // back the intra kernel's: measured, it hangs); between half and all SMs it measured
  // slower than the segmented pipeline. Else, or if false: the segmented pipeline below.
  bool stream = true;
  // ... and only up to this many chunks in the batch (0: any). Past it the chains, which
  // share every step with intra CTAs, set the pace: at 128K tokens streamed vs segmented
  // measured 6.03-6.15 vs 6.20-6.34 ms on an H100 but 6.06-6.08 vs 5.82-5.86 ms on an
  // H200 (at 32K: 1.52-1.60 vs 1.64-1.70 and 1.56-1.57 vs 1.53-1.58 ms).
  int stream_max_chunks = 1024;
  int64_t intra_delay_ns = 0;  // tests: the streamed intra kernel starts this much later
  int seg_chunks = -1;  // chunks per segment of the intra / state pipeline (0: no pipeline,
                        // < 0: chunks / 16 clamped to [32, 128])
  int head_chunks = 0;  // size of the first segment (0: seg_chunks)
  int tail_chunks = 0;  // size of the last segment (0: what is left)
  int intra_streams = 4;  // intra segments round-robin over this many streams (1..4)
  int max_ahead = 3;    // segments the intra kernel may run ahead of the state pass (0: any)
  int stop_after = 7;   // experiment: intra kernel returns after phase 1..6 (7: whole kernel)
  bool skip_intra = false, skip_state = false;  // experiment: launch only one kernel
  // Experiment: state CTAs ask for enough shared memory that no intra CTA fits beside
  // them (each chain gets an SM to itself).
  bool state_alone = false;
};
void SetTcTuning(const TcTuning& t);
// Whether an intra CTA and a state CTA fit on one SM of the current device (registers
// and shared memory), which the streamed mode needs.
cudaError_t TcStreamedModeFits(bool* fits);
// Which pipeline the last LaunchChunkTc call of the process enqueued (for tests).
enum class TcPath { kSequential = 0, kSegmented = 1, kStreamed = 2 };
TcPath LastTcPath();
TcTuning GetTcTuning();

// Exact fp32 SIMT path (any K <= 128, any V).
cudaError_t LaunchChunkExact(const KdaChunkParams& p, cudaStream_t stream);

}  // namespace kl::cuda::internal

#endif  // KL_KERNELS_CUDA_KDA_CHUNK_INTERNAL_H_
