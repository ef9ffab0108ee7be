// Per-(sequence, head) KDA kernels shared by KdaChunkPrefill, KdaRecurrent and
// KdaVarlen, plus per-thread scratch. Internal to //kernels/cpu.
#ifndef KL_KERNELS_CPU_KDA_INTERNAL_H_
#define KL_KERNELS_CPU_KDA_INTERNAL_H_

#include <cstddef>
#include <cstdint>

namespace kl::cpu::internal {

// Decay factors (per-step exp(g) and their products) below this are set to 0.
// Keeping every factor >= 1e-18 or exactly 0 means a product of two factors is
// >= 1e-36, a normal float, so the kernels never do slow denormal arithmetic.
// The error is < 1e-18 relative to |k||v|, far below fp32 resolution.
constexpr float kDecayFlush = 1e-18f;

// One head of one sequence inside the packed [T][H][*] tensors. Row t of q is
// q + t * qk_stride (K floats); likewise k, g; v and o use v_stride (V floats);
// beta[t * beta_stride] is the head's beta.
struct HeadSlice {
  const float* q;     // [T][.. K ..] fp32, L2-normalised and scaled
  const float* k;     // [T][.. K ..] fp32, L2-normalised
  const float* v;     // [T][.. V ..] fp32
  const float* g;     // [T][.. K ..] fp32 log decays (<= 0)
  const float* beta;  // [T][..] fp32
  float* o;           // [T][.. V ..] fp32 out
  float* state;       // [K][V] fp32 in/out (this head's slice of [H][K][V])
  int64_t T = 0, K = 0, V = 0;
  int64_t qk_stride = 0, v_stride = 0, beta_stride = 0;
};

// Slice for head h of tokens [t_begin, t_begin + T) of tensors packed as
// [*][H][K] / [*][H][V] / [*][H]; `state` is the sequence's [H][K][V] state.
HeadSlice MakeHeadSlice(const float* q, const float* k, const float* v, const float* g,
                        const float* beta, float* o, float* state, int64_t t_begin, int64_t T,
                        int64_t H, int64_t K, int64_t V, int64_t h);

// Token-by-token recurrence for one head (spec §3.6), state updated in place.
void RecurrentHead(const HeadSlice& s);

// Chunkwise algorithm for one head (spec §4.1), chunk length `chunk` >= 1.
void ChunkHead(const HeadSlice& s, int64_t chunk);

// A 64-byte aligned buffer of at least `n` floats owned by the calling thread,
// grow-only and reused across calls (contents unspecified). `slot` selects one
// of kScratchSlots independent buffers so nested users do not collide.
constexpr int kScratchSlots = 3;
float* ThreadScratch(int slot, size_t n);

}  // namespace kl::cpu::internal

#endif  // KL_KERNELS_CPU_KDA_INTERNAL_H_
