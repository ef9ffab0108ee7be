// GPU token sampling (sampling.h): one 1024-thread block per row. One pass finds the
// row's maximum and range; each selection (top-k, nucleus, draw) is then two passes over
// the row (256 value buckets, then the crossing bucket's candidates into shared memory)
// and a radix descent over those candidates; a full-row radix descent when more than
// kListCap candidates share the bucket.
#include "kernels/cuda/sampling.h"

#include <atomic>
#include <cfloat>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "kernels/common/splitmix64.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/pdl.cuh"

namespace kl::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

// Larger logit -> larger value; +0 and -0 equal; NaN below everything (-inf included).
__device__ __forceinline__ uint32_t MonoBits(float x) {
  if (x != x) return 0u;
  if (x == 0.0f) x = 0.0f;
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
// The candidate order as one key: descending key = (logit descending, id ascending).
__device__ __forceinline__ uint64_t OrderKey(float x, int64_t i) {
  return (static_cast<uint64_t>(MonoBits(x)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
}
__device__ __forceinline__ int32_t TokenOf(uint64_t key) {
  return static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(key));
}

constexpr int kListCap = 4096;  // candidates kept in shared memory after 16 key bits

struct RowCtx {
  const float* x;
  int64_t vocab;
  float mx, inv_t;
  float scale;
  float vmin, vstep;  // value buckets: (x - vmin) * vstep in [0, 256)
  bool vec4;          // the row can be read as float4
};

// Fixed-point weight of logit x: round(exp((x - max) / T) * scale) with fp32 exp (the
// host Sampler's weights to ~1e-7); 0 for NaN and -inf.
__device__ __forceinline__ uint64_t Weight(const RowCtx& r, float x) {
  if (isnan(x) || isinf(x)) return 0;  // +inf only as the maximum, which is greedy
  return __float2ull_rn(expf((x - r.mx) * r.inv_t) * r.scale);
}

// Shared memory of a block (dynamic, ~97 KB): per-warp histograms (so that atomics
// contend only inside a warp), the compacted candidate list, reduction scratch.
struct Smem {
  unsigned long long hist[kWarps][256];
  float list_x[kListCap];
  int32_t list_i[kListCap];
  unsigned long long red[kWarps];
  unsigned long long red2[kWarps];
  float redf[kWarps];
  unsigned long long bcast[2];
  unsigned long long bcast_t;
  float bcastf;
  int list_n;
  int list_hits;
};

__device__ __forceinline__ unsigned long long WarpMax(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

__device__ __forceinline__ float WarpMinF(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// f(x, i) for every logit of the row, this thread's share (i = threadIdx.x + k * kThreads),
// with 8 loads in flight per thread: one block walks a whole row, so the loop is
// latency-bound without them.
template <class F>
__device__ __forceinline__ void ForRow(const RowCtx& r, F&& f) {
  constexpr int kUnroll = 8;
  if (r.vec4) {  // 16-byte aligned row, vocab % 4 == 0: float4 loads, 64 B in flight per thread
    constexpr int kUnroll4 = 4;
    const float4* x4 = reinterpret_cast<const float4*>(r.x);
    const int64_t n4 = r.vocab / 4;
    int64_t j = threadIdx.x;
    for (; j + (kUnroll4 - 1) * kThreads < n4; j += kUnroll4 * kThreads) {
      float4 v[kUnroll4];
#pragma unroll
      for (int u = 0; u < kUnroll4; ++u) v[u] = __ldg(x4 + j + u * kThreads);
#pragma unroll
      for (int u = 0; u < kUnroll4; ++u) {
        const int64_t i = 4 * (j + u * kThreads);
        f(v[u].x, i);
        f(v[u].y, i + 1);
        f(v[u].z, i + 2);
        f(v[u].w, i + 3);
      }
    }
    for (; j < n4; j += kThreads) {
      const float4 v = __ldg(x4 + j);
      f(v.x, 4 * j);
      f(v.y, 4 * j + 1);
      f(v.z, 4 * j + 2);
      f(v.w, 4 * j + 3);
    }
    return;
  }
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < r.vocab; i += kUnroll * kThreads) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(r.x + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) f(v[u], i + u * kThreads);
  }
  for (; i < r.vocab; i += kThreads) f(__ldg(r.x + i), i);
}

// (v, i) <- the warp's largest v, the lowest i among equal ones; i == INT64_MAX: none.
__device__ __forceinline__ void WarpArgMax(float& v, int64_t& i) {
  constexpr int64_t kNone = INT64_MAX;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t j = __shfl_xor_sync(0xffffffffu, i, o);
    if (j != kNone && (i == kNone || w > v || (w == v && j < i))) {
      v = w;
      i = j;
    }
  }
}

// One pass: the greedy pick (the largest logit, the lowest id among equal ones; NaN only
// when the row holds nothing else, then id 0), returned as its order key, and the smallest
// finite logit (the low end of the value buckets). Plain float compares per element:
// with one block per row this pass is instruction-bound.
__device__ uint64_t RowRange(const RowCtx& r, Smem& sm, float* min_finite) {
  constexpr int64_t kNone = INT64_MAX;
  float best = -INFINITY, lo = INFINITY;
  int64_t bi = kNone;
  ForRow(r, [&](float x, int64_t i) {  // i ascends within a thread
    if (x > best || (bi == kNone && x == x)) {
      best = x;
      bi = i;
    }
    if (isfinite(x)) lo = fminf(lo, x);
  });
  WarpArgMax(best, bi);
  lo = WarpMinF(lo);
  if ((threadIdx.x & 31) == 0) {
    sm.redf[threadIdx.x >> 5] = best;
    sm.red[threadIdx.x >> 5] = static_cast<unsigned long long>(bi);
    sm.red2[threadIdx.x >> 5] = __float_as_uint(lo);
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < kWarps ? sm.redf[threadIdx.x] : -INFINITY;
    int64_t i = threadIdx.x < kWarps ? static_cast<int64_t>(sm.red[threadIdx.x]) : kNone;
    float f = threadIdx.x < kWarps ? __uint_as_float(static_cast<uint32_t>(sm.red2[threadIdx.x]))
                                   : INFINITY;
    WarpArgMax(v, i);
    f = WarpMinF(f);
    if (threadIdx.x == 0) {
      const int64_t top = i == kNone ? 0 : i;  // an all-NaN row: id 0, like the host
      sm.bcast[0] = OrderKey(r.x[top], top);
      sm.bcastf = f;
    }
  }
  __syncthreads();
  const uint64_t k = sm.bcast[0];
  *min_finite = sm.bcastf;
  __syncthreads();
  return k;
}

// Target functors: the weight position t to find, from the total weight of keys >= lo.
struct ConstTarget {  // a fixed position (the k-th key: t = k - 1)
  uint64_t t;
  __device__ uint64_t operator()(uint64_t) const { return t; }
};
struct NucleusTarget {  // the last candidate of the shortest prefix reaching top_p
  double top_p;
  __device__ uint64_t operator()(uint64_t total) const {
    const double c = ceil(top_p * static_cast<double>(total));
    if (c <= 1.0) return 0;
    return c >= static_cast<double>(total) ? total - 1 : static_cast<uint64_t>(c) - 1;
  }
};
struct DrawTarget {  // the candidate whose cumulative weight first exceeds u * total
  double u;
  __device__ uint64_t operator()(uint64_t total) const {
    const uint64_t t = static_cast<uint64_t>(u * static_cast<double>(total));
    return t >= total ? total - 1 : t;
  }
};

// After every warp has filled its histogram row: sums the rows (fixed order), then finds,
// walking buckets from 255 down, the first bucket where above + cumulative > t (t =
// target(total of all buckets) when `from_total`, else t). Leaves in sm.bcast the bucket
// and the weight before it (above included); returns t.
template <class Target>
__device__ uint64_t ScanBuckets(Smem& sm, uint64_t above, uint64_t t, bool from_total,
                                Target target) {
  __syncthreads();
  if (threadIdx.x < 256) {
    unsigned long long v = 0;
#pragma unroll 8
    for (int w = 0; w < kWarps; ++w) v += sm.hist[w][threadIdx.x];
    sm.hist[0][threadIdx.x] = v;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < 32) {
    // Lane l owns buckets 255 - 8 l .. 248 - 8 l (descending): its sum, an exclusive
    // prefix over the lanes before it, then the first bucket where above + cum > t.
    unsigned long long h[8], lane_sum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      h[j] = sm.hist[0][255 - 8 * lane - j];
      lane_sum += h[j];
    }
    unsigned long long incl = lane_sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned long long v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (from_total) t = target(__shfl_sync(0xffffffffu, incl, 31));
    const unsigned long long excl = incl - lane_sum;
    const bool crosses = above + incl > t && above + excl <= t;
    const unsigned ballot = __ballot_sync(0xffffffffu, crosses);
    if (lane == (ballot != 0 ? __ffs(ballot) - 1 : 31)) {
      unsigned long long acc = above + excl;
      int j = 7;
#pragma unroll
      for (int q = 0; q < 7; ++q) {
        if (j == 7 && acc + h[q] > t) j = q;
        if (j == 7) acc += h[q];
      }
      sm.bcast[0] = static_cast<unsigned long long>(255 - 8 * lane - j);
      sm.bcast[1] = acc;
      sm.bcast_t = t;
    }
  }
  __syncthreads();
  return sm.bcast_t;
}

// Candidate (x, i) into the shared-memory list (counted even when the list is full).
__device__ __forceinline__ void AppendCandidate(Smem& sm, float x, int64_t i) {
  const int slot = atomicAdd(&sm.list_n, 1);
  if (slot < kListCap) {
    sm.list_x[slot] = x;
    sm.list_i[slot] = static_cast<int32_t>(i);
  }
}

__device__ __forceinline__ void ZeroHist(Smem& sm) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < 8; ++j) sm.hist[warp][lane + 32 * j] = 0;
}

// The order key of the first candidate, among those with key >= lo in descending key
// order, whose inclusive cumulative weight exceeds t = target(total weight) (weight 1
// each, or Weight() when kMass). A radix descent, 8 key bits per level. `list_only`: the candidates are the
// sm.list entries (all of them >= lo). Otherwise the row: level 2 also copies the
// candidates that share the first 16 bits into the list, and levels 3-7 read only those
// (unless there were more than kListCap). All sums are integers: exact, order-free.
template <bool kMass, class Target>
__device__ uint64_t RadixSelect(const RowCtx& r, uint64_t lo, Target target, bool list_only,
                                Smem& sm) {
  uint64_t prefix = 0, above = 0, t = 0;
  bool from_list = list_only;
  int n_list = list_only ? sm.list_n : 0;
  __syncthreads();  // everyone has read list_n
  if (!list_only && threadIdx.x == 0) sm.list_n = 0;
  unsigned long long* hist = sm.hist[threadIdx.x >> 5];
  int first_level = 0;
  if (list_only) {
    // The list's keys share their leading bytes (one value bucket): start below them.
    unsigned long long kmin = ~0ull, kmax = 0;
    for (int j = threadIdx.x; j < n_list; j += kThreads) {
      const unsigned long long k = OrderKey(sm.list_x[j], sm.list_i[j]);
      kmin = k < kmin ? k : kmin;
      kmax = k > kmax ? k : kmax;
    }
    kmax = WarpMax(kmax);
    kmin = ~WarpMax(~kmin);
    if ((threadIdx.x & 31) == 0) {
      sm.red[threadIdx.x >> 5] = kmax;
      sm.red2[threadIdx.x >> 5] = ~kmin;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      const unsigned long long a = WarpMax(threadIdx.x < kWarps ? sm.red[threadIdx.x] : 0);
      const unsigned long long b = ~WarpMax(threadIdx.x < kWarps ? sm.red2[threadIdx.x] : 0);
      if (threadIdx.x == 0) {
        sm.bcast[0] = a;
        sm.bcast[1] = b;
      }
    }
    __syncthreads();
    const uint64_t hi = sm.bcast[0], low = sm.bcast[1];
    __syncthreads();
    if (hi == low) return hi;  // one candidate
    first_level = __clzll(static_cast<long long>(hi ^ low)) / 8;
    prefix = first_level == 0 ? 0 : hi & (~0ull << (64 - 8 * first_level));
  }
  for (int level = first_level; level < 8; ++level) {
    const int shift = 56 - 8 * level;
    const uint64_t hi_mask = level == 0 ? 0ull : (~0ull << (shift + 8));
    if (list_only && level == 4) {
      // The logit is resolved (32 key bits). One candidate with it: that is the pick
      // (the id bytes matter only between equal logits).
      if (threadIdx.x == 0) sm.list_hits = 0;
      __syncthreads();
      for (int j = threadIdx.x; j < n_list; j += kThreads) {
        const uint64_t key = OrderKey(sm.list_x[j], sm.list_i[j]);
        if ((key & hi_mask) == prefix) {
          atomicAdd(&sm.list_hits, 1);
          sm.bcast[0] = key;  // any writer: read only when there is exactly one
        }
      }
      __syncthreads();
      const bool unique = sm.list_hits == 1;
      const uint64_t key = sm.bcast[0];
      __syncthreads();
      if (unique) return key;
    }
    ZeroHist(sm);
    __syncthreads();
    auto visit = [&](float x, int64_t i, bool keep) {
      const uint64_t key = OrderKey(x, i);
      if (key < lo || (key & hi_mask) != prefix) return;
      if (keep) AppendCandidate(sm, x, i);
      const unsigned long long w = kMass ? Weight(r, x) : 1ull;
      if (w != 0) atomicAdd(&hist[(key >> shift) & 255], w);
    };
    if (from_list) {
      for (int j = threadIdx.x; j < n_list; j += kThreads) visit(sm.list_x[j], sm.list_i[j], false);
    } else {
      const bool keep = level == 2;
      ForRow(r, [&](float x, int64_t i) { visit(x, i, keep); });
    }
    t = ScanBuckets(sm, above, t, level == first_level, target);
    prefix |= static_cast<uint64_t>(sm.bcast[0]) << shift;
    above = sm.bcast[1];
    if (level == 2 && !list_only) {
      n_list = sm.list_n;
      from_list = n_list <= kListCap;
    }
    __syncthreads();
  }
  return prefix;
}

// Value bucket of a logit: 256 equal steps over [min finite, max]; monotone in the logit,
// so a bucket is a contiguous run of the candidate order. -inf and NaN: bucket 0.
__device__ __forceinline__ int ValueBucket(const RowCtx& r, float x) {
  if (!(x >= r.vmin)) return 0;
  const int b = static_cast<int>((x - r.vmin) * r.vstep);
  return b > 255 ? 255 : b;
}

// RadixSelect's result in fewer passes over the row: the value buckets first (spread
// out, unlike the first key bytes: a row's logits share their sign and exponent bits),
// then the crossing bucket's candidates into the list and a radix descent over them.
// Falls back to RadixSelect when that bucket holds more than kListCap candidates.
template <bool kMass, class Target>
__device__ uint64_t Select(const RowCtx& r, uint64_t lo, Target target, Smem& sm) {
  unsigned long long* hist = sm.hist[threadIdx.x >> 5];
  ZeroHist(sm);
  if (threadIdx.x == 0) sm.list_n = 0;
  __syncthreads();
  ForRow(r, [&](float x, int64_t i) {
    if (OrderKey(x, i) < lo) return;
    const unsigned long long w = kMass ? Weight(r, x) : 1ull;
    if (w != 0) atomicAdd(&hist[ValueBucket(r, x)], w);
  });
  const uint64_t t = ScanBuckets(sm, 0, 0, true, target);
  const int bucket = static_cast<int>(sm.bcast[0]);
  const uint64_t before = sm.bcast[1];
  ForRow(r, [&](float x, int64_t i) {
    if (OrderKey(x, i) >= lo && ValueBucket(r, x) == bucket) AppendCandidate(sm, x, i);
  });
  __syncthreads();
  if (sm.list_n > kListCap) return RadixSelect<kMass>(r, lo, target, false, sm);
  return RadixSelect<kMass>(r, lo, ConstTarget{t - before}, true, sm);
}

__global__ void __launch_bounds__(kThreads) SampleKernel(const float* logits, int64_t vocab,
                                                         int64_t ld, const SampleRowParams* params,
                                                         int32_t* tokens, float scale) {
  PdlBegin();  // launched by LaunchPdl (pdl.cuh)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int64_t row = blockIdx.x;
  const SampleRowParams p = params[row];
  RowCtx r{logits + row * ld, vocab, 0.0f, 0.0f, scale, 0.0f, 0.0f, false};
  r.vec4 = vocab % 4 == 0 && reinterpret_cast<uintptr_t>(r.x) % 16 == 0;
  float vmin = 0.0f;
  const uint64_t top = RowRange(r, sm, &vmin);
  const bool greedy = !(p.temperature > 0.0 && p.temperature <= 1e30) || p.top_k == 1 ||
                      p.top_k < 0 || !(p.top_p > 0.0 && p.top_p <= 1.0);
  const float top_logit = r.x[TokenOf(top)];
  if (greedy || !isfinite(top_logit)) {  // greedy, or no finite maximum to weigh against
    if (threadIdx.x == 0) tokens[row] = TokenOf(top);
    return;
  }
  r.mx = top_logit;
  // 1 / T in fp32, at most FLT_MAX (a temperature under ~3e-39 would overflow it and turn
  // the maximum's (0 * inf) weight into NaN): the maximum always weighs exactly `scale`.
  r.inv_t = static_cast<float>(fmin(1.0 / p.temperature, static_cast<double>(FLT_MAX)));
  r.vmin = vmin;
  // 256 buckets over [vmin, max]; the max itself lands in 255 (or 256, clamped).
  r.vstep = top_logit > vmin ? 256.0f / (top_logit - vmin) : 0.0f;
  if (!isfinite(r.vstep)) r.vstep = 0.0f;
  // Top-k: the k-th key in order; the candidates are the keys >= it.
  uint64_t lo = 0;
  if (p.top_k > 0 && p.top_k < vocab) {
    lo = Select<false>(r, 0, ConstTarget{static_cast<uint64_t>(p.top_k - 1)}, sm);
  }
  // Nucleus: the shortest prefix whose mass reaches top_p of the candidates' mass.
  if (p.top_p < 1.0) lo = Select<true>(r, lo, NucleusTarget{p.top_p}, sm);
  // The draw: SplitMix64 output `draw_index` of `seed` as a 53-bit uniform in [0, 1).
  const double u = static_cast<double>(SplitMix64At(p.seed, p.draw_index) >> 11) * 0x1.0p-53;
  const uint64_t pick = Select<true>(r, lo, DrawTarget{u}, sm);
  if (threadIdx.x == 0) tokens[row] = TokenOf(pick);
}

}  // namespace

absl::Status SampleTokens(const float* logits, int64_t rows, int64_t vocab, int64_t ld,
                          const SampleRowParams* params, int32_t* tokens, cudaStream_t stream) {
  if (rows < 0 || rows > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("SampleTokens: rows out of range: ", rows));
  }
  if (rows == 0) return absl::OkStatus();
  if (vocab < 1 || vocab > INT32_MAX || ld < vocab) {
    return absl::InvalidArgumentError(
        absl::StrCat("SampleTokens: vocab ", vocab, " (1 .. 2^31 - 1) and ld ", ld, " (>= vocab)"));
  }
  if (logits == nullptr || params == nullptr || tokens == nullptr) {
    return absl::InvalidArgumentError("SampleTokens: null pointer");
  }
  // Weights are <= scale and at most `vocab` of them are summed: scale * vocab < 2^63.
  int log2v = 0;
  while ((int64_t{1} << log2v) < vocab) ++log2v;
  const float scale = std::ldexp(1.0f, 62 - log2v);
  // The shared-memory opt-in is per device: once for each device this process uses.
  static std::atomic<uint64_t> opted_in{0};
  int dev = 0;
  if (const cudaError_t e = cudaGetDevice(&dev); e != cudaSuccess) return CudaStatus(e, "SampleTokens");
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if ((opted_in.load(std::memory_order_acquire) & bit) == 0) {
    const cudaError_t e = cudaFuncSetAttribute(SampleKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(sizeof(Smem)));
    if (e != cudaSuccess) return CudaStatus(e, "SampleTokens shared memory");
    opted_in.fetch_or(bit, std::memory_order_acq_rel);
  }
  LaunchPdl(SampleKernel, static_cast<unsigned>(rows), kThreads, sizeof(Smem), stream, logits,
            vocab, ld, params, tokens, scale);
  return CudaStatus(cudaGetLastError(), "SampleTokens launch");
}

}  // namespace kl::cuda
