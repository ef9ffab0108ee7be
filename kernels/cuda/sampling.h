// Token sampling on the GPU: one token per row of a batch of logits, with the
// semantics of the host Sampler (engine/sampling/sampler.h) so that a decode worker
// downloads token ids instead of [rows][vocab] logits and sorts nothing on the host.
//
// Per row, candidates are ordered by (logit descending, id ascending). Greedy rows
// (temperature 0 or top_k 1) take the first. Other rows keep the first top_k (all when
// top_k is 0 or >= vocab), weigh them by p = exp((logit - max) / temperature), keep the
// shortest prefix whose mass reaches top_p of the total, and pick the candidate where
// the cumulative mass first exceeds u * (kept mass), u = SplitMix64 uniform number
// `draw_index` of `seed` (the host Sampler's draw for the same request and index).
//
// How: no sort. The order is a 64-bit key (monotone logit bits, then the inverted id),
// and every "first candidate whose cumulative count / mass passes t" is found with 256
// value buckets over the row, then a radix descent over the candidates of the crossing
// bucket (kernels/cuda/README.md, "Token sampling"). Masses are fixed-point integers (p =
// expf((logit - max) / T) <= 1, scaled by 2^(62 - ceil(log2 vocab))), so every sum is exact
// and does not depend on the order of the additions: the same logits give the same token
// on every run. Against the host Sampler (double exp, sums in sorted order) the token is
// the same unless the draw falls within ~1e-7 (relative: fp32 exp) of a boundary between
// two candidates' cumulative masses. A NaN logit ranks below every number (never chosen
// unless the row holds nothing else); -inf has weight 0.
#ifndef KL_KERNELS_CUDA_SAMPLING_H_
#define KL_KERNELS_CUDA_SAMPLING_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace kl::cuda {

struct SampleRowParams {
  double temperature = 1.0;  // 0: greedy. Otherwise (0, 100].
  double top_p = 1.0;        // (0, 1]; 1: no nucleus filter
  int64_t top_k = 0;         // 0: no top-k filter
  uint64_t seed = 0;
  uint64_t draw_index = 0;   // which SplitMix64 draw of `seed` (the generated-token index)
};

// tokens[r] = sample of logits[r * ld .. r * ld + vocab) with params[r], r < rows.
// logits, params and tokens are device memory; launches on `stream` (graph-capturable,
// no allocation). Shapes and pointers are checked here (InvalidArgument); parameter
// values are the caller's (validated requests), and a value out of range in a row
// makes that row greedy rather than fail the batch.
absl::Status SampleTokens(const float* logits, int64_t rows, int64_t vocab, int64_t ld,
                          const SampleRowParams* params, int32_t* tokens, cudaStream_t stream);

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_SAMPLING_H_
