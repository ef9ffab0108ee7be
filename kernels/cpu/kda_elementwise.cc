// Per-token KDA pre-processing: forget gate, short conv + SiLU, q/k L2 norm, beta.
// All elementwise along a contiguous axis, vectorised through simd.h.
#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/common/parallel.h"
#include "kernels/cpu/kda.h"
#include "kernels/cpu/kda_internal.h"
#include "kernels/cpu/simd.h"

namespace kl::cpu {
namespace {

using simd::F32x8;
using simd::kLanes;
using simd::Load;
using simd::Splat;
using simd::Store;

// Elements per ParallelFor block below which splitting is not worth a wake-up.
constexpr int64_t kMinElementsPerBlock = 1 << 14;

int64_t MinRowsPerBlock(int64_t row_elements) {
  return std::max<int64_t>(1, kMinElementsPerBlock / std::max<int64_t>(1, row_elements));
}

// Channels per conv tile: the transposed weights of a tile are [W][kConvTile].
constexpr int64_t kConvTile = 64;

// Convolves channels [c0, c0 + nc) (nc <= kConvTile) over all T tokens and
// updates their tail. wt: [W][kConvTile] weights of these channels, transposed.
void ConvTile(const float* x, const float* wt, int64_t T, int64_t D, int64_t W, int64_t c0,
              int64_t nc, float* tail, float* out) {
  std::vector<const float*> rows(W);  // the W input rows of the current window
  for (int64_t t = 0; t < T; ++t) {
    // Row j of the window is token t - W + 1 + j: from x, or from the tail.
    for (int64_t j = 0; j < W; ++j) {
      const int64_t tau = t - (W - 1) + j;
      rows[j] = (tau >= 0 ? x + tau * D : tail + (W - 1 + tau) * D) + c0;
    }
    float* o = out + t * D + c0;
    int64_t c = 0;
    for (; c + kLanes <= nc; c += kLanes) {
      F32x8 u{};
      for (int64_t j = 0; j < W; ++j) u += Load<F32x8>(wt + j * kConvTile + c) * Load<F32x8>(rows[j] + c);
      Store<F32x8>(o + c, u * simd::Sigmoid(u));
    }
    for (; c < nc; ++c) {
      float u = 0.0f;
      for (int64_t j = 0; j < W; ++j) u += wt[j * kConvTile + c] * rows[j][c];
      o[c] = u * simd::Sigmoid(u);
    }
  }
  // New tail row i = element T + i of [old tail (W-1 rows); x (T rows)]. Reading
  // index T + i >= i, ascending i, never reads a row already overwritten.
  for (int64_t i = 0; i < W - 1; ++i) {
    const int64_t m = T + i;
    const float* from = (m < W - 1 ? tail + m * D : x + (m - (W - 1)) * D) + c0;
    float* to = tail + i * D + c0;
    if (from != to) std::memmove(to, from, nc * sizeof(float));
  }
}

}  // namespace

void KdaGate(const float* f, const float* a_log, const float* dt_bias, int64_t T, int64_t H,
             int64_t K, float* g) {
  assert(T >= 0 && H >= 0 && K >= 0);
  const int64_t HK = H * K;
  ParallelFor(T, MinRowsPerBlock(HK), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        const float neg_rate = -std::exp(a_log[h]);
        const float* fr = f + t * HK + h * K;
        const float* br = dt_bias + h * K;
        float* gr = g + t * HK + h * K;
        int64_t d = 0;
        for (; d + kLanes <= K; d += kLanes) {
          Store<F32x8>(gr + d, simd::Softplus(Load<F32x8>(fr + d) + Load<F32x8>(br + d)) * neg_rate);
        }
        for (; d < K; ++d) gr[d] = simd::Softplus(fr[d] + br[d]) * neg_rate;
      }
    }
  });
}

void ShortConvSilu(const float* x, const float* w, int64_t T, int64_t D, int64_t W, float* tail,
                   float* out) {
  assert(T >= 0 && D >= 0 && W >= 1);
  const int64_t min_channels = std::max<int64_t>(kConvTile, kMinElementsPerBlock / std::max<int64_t>(1, T * W));
  ParallelFor(D, min_channels, [&](int64_t b, int64_t e) {
    float* wt = internal::ThreadScratch(2, static_cast<size_t>(W * kConvTile));  // [W][kConvTile]
    for (int64_t c0 = b; c0 < e; c0 += kConvTile) {
      const int64_t nc = std::min(kConvTile, e - c0);
      for (int64_t c = 0; c < nc; ++c) {
        for (int64_t j = 0; j < W; ++j) wt[j * kConvTile + c] = w[(c0 + c) * W + j];
      }
      ConvTile(x, wt, T, D, W, c0, nc, tail, out);
    }
  });
}

void L2NormScaleRows(float* x, int64_t rows, int64_t K, float scale, float eps) {
  assert(rows >= 0 && K >= 0);
  ParallelFor(rows, MinRowsPerBlock(K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* xr = x + r * K;
      F32x8 acc{};
      int64_t d = 0;
      for (; d + kLanes <= K; d += kLanes) {
        const F32x8 v = Load<F32x8>(xr + d);
        acc += v * v;
      }
      float ss = simd::ReduceAdd(acc);
      for (; d < K; ++d) ss += xr[d] * xr[d];
      const float mul = scale / std::sqrt(ss + eps);
      d = 0;
      for (; d + kLanes <= K; d += kLanes) Store<F32x8>(xr + d, Load<F32x8>(xr + d) * mul);
      for (; d < K; ++d) xr[d] *= mul;
    }
  });
}

void Sigmoid(const float* b, int64_t n, float* beta) {
  assert(n >= 0);
  ParallelFor(n, kMinElementsPerBlock, [&](int64_t i0, int64_t i1) {
    simd::MapArray(b + i0, i1 - i0, beta + i0, [](auto x) { return simd::Sigmoid(x); });
  });
}

}  // namespace kl::cpu
