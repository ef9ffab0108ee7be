// CPU fp32 kernels of the Kimi Delta Attention (KDA) layer: gate, short conv,
// q/k normalisation, and the delta-rule recurrence in its chunkwise (prefill) and
// token-by-token (decode, oracle) forms. Math: the project spec kimi_linear.md
// §3-§5; test vectors: kda_test_vectors.md. Design notes and numbers: README.md.
//
// Conventions for every function below:
//  - All tensors are dense, row-major fp32, innermost index last in the shape
//    comments (`[T][H][K]` = token-major, then head, then channel).
//  - The recurrent state is fp32 [H][K][V] row-major (key index = row), the
//    canonical layout of the state bundle; KdaStateTranspose converts to and
//    from the V-first layout some other implementations use.
//  - Work is split over the process pool (kl::ParallelFor); calls may be made
//    from inside a ParallelFor (they then run serially on that thread). Calls on
//    disjoint outputs may run concurrently.
//  - Outputs must not alias inputs unless stated ("in place").
//  - Preconditions (sizes >= 0, chunk >= 1, ...) are checked with assert().
#ifndef KL_KERNELS_CPU_KDA_H_
#define KL_KERNELS_CPU_KDA_H_

#include <cstdint>

namespace kl::cpu {

// Forget gate (spec §3.3), per token t, head h, key channel d:
//   g[t][h*K+d] = -exp(a_log[h]) * softplus(f[t][h*K+d] + dt_bias[h*K+d]),
// softplus(y) = log(1 + e^y), switched to y for y > 20. Result is <= 0 and finite
// for finite inputs. Relative error vs exact math ~1e-6.
void KdaGate(const float* f,        // [T][H*K]
             const float* a_log,    // [H]
             const float* dt_bias,  // [H*K]
             int64_t T, int64_t H, int64_t K,
             float* g);             // [T][H*K] out

// Causal depthwise conv of width W + SiLU over T tokens of D channels (spec §3.2):
//   u_t[c] = sum_{j<W} w[c][j] * x_{t-W+1+j}[c]   (j = W-1 multiplies token t)
//   out_t[c] = u * sigmoid(u)
// Inputs before token 0 come from `tail`: the last W-1 pre-conv inputs, oldest
// first (zeros for a fresh sequence). On return `tail` holds the last W-1 inputs
// of [old tail; x] (T may be < W-1, even 0: then the tail shifts by T).
void ShortConvSilu(const float* x,  // [T][D]
                   const float* w,  // [D][W]
                   int64_t T, int64_t D, int64_t W,
                   float* tail,     // [W-1][D] in/out
                   float* out);     // [T][D] out

// Per row of length K, in place: x <- x / sqrt(sum x^2 + eps) * scale
// (eps added to the sum of squares, spec §3.5).
void L2NormScaleRows(float* x,  // [rows][K] in/out
                     int64_t rows, int64_t K, float scale, float eps = 1e-6f);

// beta[i] = sigmoid(b[i]). beta may alias b.
void Sigmoid(const float* b,  // [n]
             int64_t n,
             float* beta);    // [n] out

// Chunkwise KDA over one sequence, all heads (spec §4.1), chunk length `chunk`
// (>= 1; 64 in production; the last chunk may be partial).
//   q: already L2-normalised and multiplied by the scale; k: L2-normalised;
//   g: per-token log decays (<= 0, finite; any magnitude, e.g. -1e3, is safe:
//      decays between positions are formed as products of per-step decays
//      exp(g) in (0, 1], never as exp(G) * exp(-G));
//   state: initial state in, final state out (untouched when T == 0).
// Output o_t = S_t^T q_t with S_t the post-update state of token t.
void KdaChunkPrefill(const float* q,     // [T][H][K]
                     const float* k,     // [T][H][K]
                     const float* v,     // [T][H][V]
                     const float* g,     // [T][H][K]
                     const float* beta,  // [T][H]
                     int64_t T, int64_t H, int64_t K, int64_t V, int64_t chunk,
                     float* state,       // [H][K][V] in/out
                     float* o);          // [T][H][V] out

// Same contract as KdaChunkPrefill, computed token by token (spec §3.6 / §5):
// per token S <- diag(exp g) S; u = beta (v - S^T k); S <- S + k u^T; o = S^T q.
// Used for decode and as the fp32 oracle.
void KdaRecurrent(const float* q,     // [T][H][K]
                  const float* k,     // [T][H][K]
                  const float* v,     // [T][H][V]
                  const float* g,     // [T][H][K]
                  const float* beta,  // [T][H]
                  int64_t T, int64_t H, int64_t K, int64_t V,
                  float* state,       // [H][K][V] in/out
                  float* o);          // [T][H][V] out

// Varlen batch: N sequences packed along the token axis, sequence n owning rows
// [cu_seqlens[n], cu_seqlens[n+1]) (cu_seqlens[0] == 0, non-decreasing).
// states[n] is that sequence's [H][K][V] state, updated in place; an empty
// sequence leaves its state untouched (it may then even be null). A sequence
// with more than `recurrent_max_tokens` tokens uses the chunk algorithm, others
// the recurrence; either way the result equals running that sequence alone with
// the same function. Parallel over (sequence, head).
void KdaVarlen(const float* q,     // [total][H][K]
               const float* k,     // [total][H][K]
               const float* v,     // [total][H][V]
               const float* g,     // [total][H][K]
               const float* beta,  // [total][H]
               const int64_t* cu_seqlens,  // [N+1]
               int64_t N, int64_t H, int64_t K, int64_t V, int64_t chunk,
               int64_t recurrent_max_tokens,
               float* const* states,  // [N] pointers to [H][K][V]
               float* o);             // [total][H][V] out

// Per head, out[h] = in[h]^T: [H][A][B] -> [H][B][A]. With (A, B) = (K, V) this
// exports the canonical state to the V-first layout; with (V, K) it imports it
// back. Exact (a copy).
void KdaStateTranspose(const float* in,  // [H][A][B]
                       int64_t H, int64_t A, int64_t B,
                       float* out);      // [H][B][A] out

}  // namespace kl::cpu

#endif  // KL_KERNELS_CPU_KDA_H_
