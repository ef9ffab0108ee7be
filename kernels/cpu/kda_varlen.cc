// Varlen KDA over a packed batch of sequences, and the state layout transpose.
#include <algorithm>
#include <atomic>
#include <cassert>
#include <vector>

#include "kernels/common/parallel.h"
#include "kernels/cpu/kda.h"
#include "kernels/cpu/kda_internal.h"

namespace kl::cpu {

void KdaVarlen(const float* q, const float* k, const float* v, const float* g,
               const float* beta, const int64_t* cu_seqlens, int64_t N, int64_t H, int64_t K,
               int64_t V, int64_t chunk, int64_t recurrent_max_tokens, float* const* states,
               float* o) {
  assert(N >= 0 && H >= 0 && K >= 1 && V >= 1 && chunk >= 1);
  assert(N == 0 || cu_seqlens[0] == 0);
  // Work items are the (sequence, head) pairs of the non-empty sequences, so an
  // empty sequence is never touched. Items are handed out longest sequence
  // first from a shared counter: a mixed batch (one long prefill + many decode
  // tokens) then balances across threads, which fixed contiguous blocks of the
  // item range would not (the long sequence's heads would share one block).
  std::vector<int64_t> seqs;
  seqs.reserve(N);
  for (int64_t n = 0; n < N; ++n) {
    assert(cu_seqlens[n + 1] >= cu_seqlens[n]);
    if (cu_seqlens[n + 1] > cu_seqlens[n]) seqs.push_back(n);
  }
  auto length = [&](int64_t n) { return cu_seqlens[n + 1] - cu_seqlens[n]; };
  std::stable_sort(seqs.begin(), seqs.end(),
                   [&](int64_t a, int64_t b) { return length(a) > length(b); });
  const int64_t items = static_cast<int64_t>(seqs.size()) * H;
  std::atomic<int64_t> next{0};
  ParallelFor(std::min<int64_t>(items, NumThreads()), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      const int64_t n = seqs[i / H], h = i % H;
      const int64_t t_begin = cu_seqlens[n], T = length(n);
      const internal::HeadSlice s =
          internal::MakeHeadSlice(q, k, v, g, beta, o, states[n], t_begin, T, H, K, V, h);
      if (T > recurrent_max_tokens) {
        internal::ChunkHead(s, chunk);
      } else {
        internal::RecurrentHead(s);
      }
    }
  });
}

void KdaStateTranspose(const float* in, int64_t H, int64_t A, int64_t B, float* out) {
  assert(in != out);
  ParallelFor(H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const float* src = in + h * A * B;  // [A][B]
      float* dst = out + h * A * B;       // [B][A]
      for (int64_t a = 0; a < A; ++a) {
        for (int64_t b = 0; b < B; ++b) dst[b * A + a] = src[a * B + b];
      }
    }
  });
}

}  // namespace kl::cpu
