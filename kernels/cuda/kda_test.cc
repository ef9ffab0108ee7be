// GPU tests of the CUDA KDA kernels against the CPU fp32 oracle (//kernels/cpu:kda)
// on fresh random inputs. Tagged "gpu"; every test skips when no CUDA device is
// visible. Outputs are poisoned (NaN bytes) before each launch and must all be
// written; state slots not addressed by the batch must stay bit-identical.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/kda_chunk.h"
#include "kernels/cuda/kda_chunk_internal.h"
#include "kernels/cuda/kda_decode.h"
#include "kernels/cuda/kda_state_layout.h"
#include "kernels/cuda/kda_test_util.h"

namespace kl::cuda {
namespace {

using testing::DeviceBuffer;
using testing::Download;
using testing::Upload;
using testing::FromAct;
using testing::GateRegime;
using testing::LayerInputs;
using testing::MakeInputs;
using testing::RelErr;
using testing::ToAct;

// Named tolerances (kda_test_vectors.md §7).
constexpr double kFp32AbsTol = 1e-5;   // fp32 path, TF32 off, unit-scale data
constexpr double kBf16RelTol = 2e-2;   // bf16 path, relative L2 vs the oracle on rounded inputs
constexpr double kConvFp32AbsTol = 1e-6;

#define SKIP_WITHOUT_GPU() \
  if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device"


// A pool of canonical [slots][H][K][V] states, uploaded in the pool layout
// (kda_state_layout.h), and downloaded back into the canonical layout.
DeviceBuffer UploadPool(const std::vector<float>& canonical, int64_t K, int64_t V) {
  std::vector<float> pooled(canonical.size());
  KdaStateToPoolHost(canonical.data(), static_cast<int64_t>(canonical.size()) / (K * V), K, V,
                     pooled.data());
  return Upload(pooled);
}
std::vector<float> DownloadPool(const DeviceBuffer& d, int64_t K, int64_t V) {
  const std::vector<float> pooled = Download<float>(d);
  std::vector<float> canonical(pooled.size());
  KdaStateFromPoolHost(pooled.data(), static_cast<int64_t>(pooled.size()) / (K * V), K, V,
                       canonical.data());
  return canonical;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  return kl::cpu::testing::MaxAbsDiff(a, b);
}
bool AllFinite(const std::vector<float>& a) { return kl::cpu::testing::AllFinite(a); }

std::vector<float> RandomPool(uint64_t seed, int64_t slots, int64_t state_size) {
  kl::cpu::testing::SplitMix64 rng(seed);
  return kl::cpu::testing::ToF32(rng.Normals(slots * state_size, 0.3));
}

// Device-side copies of one layer's inputs in `act`.
struct DeviceInputs {
  DeviceBuffer q, k, v, f, b, a_log, dt_bias;
  DeviceInputs(const LayerInputs& in, DType act)
      : q(Upload(ToAct(in.q, act))), k(Upload(ToAct(in.k, act))), v(Upload(ToAct(in.v, act))),
        f(Upload(ToAct(in.f, act))), b(Upload(ToAct(in.b, act))), a_log(Upload(in.a_log)),
        dt_bias(Upload(in.dt_bias)) {}
};

struct Result {
  std::vector<float> o, pool;  // GPU
  std::vector<float> o_ref, pool_ref;  // oracle
  std::vector<float> pool0;  // initial pool
};

// Runs a decode batch (tokens per sequence from cu, one each when `varlen` false).
Result RunDecode(const LayerInputs& in0, DType act, const std::vector<int64_t>& cu,
                 const std::vector<int32_t>& slots, int64_t num_slots, bool varlen,
                 uint64_t pool_seed) {
  LayerInputs in = in0;
  if (act == DType::kBF16) testing::RoundActivations(in);
  const int64_t H = in.H, K = in.K, V = in.V, N = static_cast<int64_t>(slots.size());
  Result r;
  r.pool0 = RandomPool(pool_seed, num_slots, H * K * V);
  r.pool_ref = r.pool0;
  testing::OracleVarlen(in, cu, slots, num_slots, /*chunked=*/false, r.pool_ref, r.o_ref);

  DeviceInputs d(in, act);
  DeviceBuffer pool = UploadPool(r.pool0, K, V), d_slots = Upload(slots), d_cu = Upload(cu);
  DeviceBuffer o(in.tokens * H * V * DTypeSize(act));
  EXPECT_TRUE(o.ok() && pool.ok());
  cudaMemset(o.get(), 0xff, o.bytes());  // NaN poison
  KdaDecodeParams p;
  p.num_seqs = N;
  p.num_tokens = in.tokens;
  p.num_heads = H;
  p.head_k = K;
  p.head_v = V;
  p.num_slots = num_slots;
  p.act = act;
  p.q = d.q.get();
  p.k = d.k.get();
  p.v = d.v.get();
  p.f = d.f.get();
  p.b = d.b.get();
  p.a_log = d.a_log.as<float>();
  p.dt_bias = d.dt_bias.as<float>();
  p.cu_seqlens = varlen ? d_cu.as<int64_t>() : nullptr;
  p.slots = d_slots.as<int32_t>();
  p.state_pool = pool.as<float>();
  p.o = o.get();
  const absl::Status s = KdaRecurrentDecode(p, nullptr);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  r.o = FromAct(Download<uint8_t>(o), act);
  r.pool = DownloadPool(pool, K, V);
  return r;
}

Result RunPrefill(const LayerInputs& in0, DType act, KdaChunkAlgo algo,
                  const std::vector<int64_t>& cu, const std::vector<int32_t>& slots,
                  int64_t num_slots, uint64_t pool_seed, bool allow_concurrent = true) {
  LayerInputs in = in0;
  if (act == DType::kBF16) testing::RoundActivations(in);
  const int64_t H = in.H, K = in.K, V = in.V, N = static_cast<int64_t>(slots.size());
  Result r;
  r.pool0 = RandomPool(pool_seed, num_slots, H * K * V);
  r.pool_ref = r.pool0;
  testing::OracleVarlen(in, cu, slots, num_slots, /*chunked=*/true, r.pool_ref, r.o_ref);

  DeviceInputs d(in, act);
  DeviceBuffer pool = UploadPool(r.pool0, K, V), d_slots = Upload(slots), d_cu = Upload(cu);
  DeviceBuffer o(in.tokens * H * V * DTypeSize(act));
  cudaMemset(o.get(), 0xff, o.bytes());
  KdaChunkParams p;
  p.num_seqs = N;
  p.num_tokens = in.tokens;
  p.num_heads = H;
  p.head_k = K;
  p.head_v = V;
  p.num_slots = num_slots;
  p.act = act;
  p.algo = algo;
  p.q = d.q.get();
  p.k = d.k.get();
  p.v = d.v.get();
  p.f = d.f.get();
  p.b = d.b.get();
  p.a_log = d.a_log.as<float>();
  p.dt_bias = d.dt_bias.as<float>();
  p.cu_seqlens = d_cu.as<int64_t>();
  p.slots = d_slots.as<int32_t>();
  p.state_pool = pool.as<float>();
  p.o = o.get();
  p.allow_concurrent = allow_concurrent;
  const size_t ws_bytes = KdaChunkWorkspaceBytes(p);
  DeviceBuffer ws(ws_bytes);
  EXPECT_TRUE(ws.ok() && o.ok() && pool.ok());
  // Garbage in the workspace (nonzero ready flags and counts of the streamed mode among
  // it): nothing may depend on its contents before the call.
  cudaMemset(ws.get(), 0xa5, ws_bytes);
  const absl::Status s = KdaChunkPrefill(p, ws.get(), ws_bytes, nullptr);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  r.o = FromAct(Download<uint8_t>(o), act);
  r.pool = DownloadPool(pool, K, V);
  return r;
}

std::vector<int64_t> CuFromLengths(const std::vector<int64_t>& lens) {
  std::vector<int64_t> cu(lens.size() + 1, 0);
  std::partial_sum(lens.begin(), lens.end(), cu.begin() + 1);
  return cu;
}
std::vector<int64_t> OnePerSeq(int64_t n) {
  std::vector<int64_t> cu(n + 1);
  std::iota(cu.begin(), cu.end(), 0);
  return cu;
}

// Slots never addressed by a non-empty sequence must be bit-identical.
void ExpectUntouched(const Result& r, const std::vector<int32_t>& slots,
                     const std::vector<int64_t>& cu, int64_t num_slots, int64_t state_size) {
  std::vector<bool> touched(num_slots, false);
  for (size_t n = 0; n < slots.size(); ++n) {
    if (cu[n + 1] > cu[n] && slots[n] >= 0 && slots[n] < num_slots) touched[slots[n]] = true;
  }
  for (int64_t s = 0; s < num_slots; ++s) {
    if (touched[s]) continue;
    EXPECT_EQ(0, std::memcmp(r.pool.data() + s * state_size, r.pool0.data() + s * state_size,
                             state_size * sizeof(float)))
        << "slot " << s << " changed";
  }
}

void ExpectAbs(const Result& r, double tol, const char* what) {
  ASSERT_TRUE(AllFinite(r.o)) << what << ": unwritten (NaN) or non-finite output";
  ASSERT_TRUE(AllFinite(r.pool)) << what << ": non-finite state";
  const double eo = MaxAbsDiff(r.o, r.o_ref), es = MaxAbsDiff(r.pool, r.pool_ref);
  std::printf("  %-40s max|o-ref| %.3g  max|S-ref| %.3g  (|o|inf %.3g)\n", what, eo, es,
              kl::cpu::testing::MaxAbs(r.o_ref));
  EXPECT_LE(eo, tol) << what;
  EXPECT_LE(es, tol) << what;
}

void ExpectRel(const Result& r, double tol, const char* what) {
  ASSERT_TRUE(AllFinite(r.o)) << what << ": unwritten (NaN) or non-finite output";
  ASSERT_TRUE(AllFinite(r.pool)) << what << ": non-finite state";
  const double eo = RelErr(r.o, r.o_ref), es = RelErr(r.pool, r.pool_ref);
  std::printf("  %-40s rel(o) %.3g  rel(S) %.3g  max|o-ref| %.3g  max|S-ref| %.3g\n", what, eo, es,
              MaxAbsDiff(r.o, r.o_ref), MaxAbsDiff(r.pool, r.pool_ref));
  EXPECT_LE(eo, tol) << what;
  EXPECT_LE(es, tol) << what;
}

// ---- validation (no device needed: checked before any launch) ----
TEST(KdaCudaValidation, RejectsBadShapes) {
  KdaDecodeParams d;
  d.num_seqs = 1;
  d.num_tokens = 1;
  d.num_heads = 1;
  d.head_k = 96;
  EXPECT_EQ(KdaRecurrentDecode(d, nullptr).code(), absl::StatusCode::kInvalidArgument);
  d.num_seqs = 0;
  EXPECT_TRUE(KdaRecurrentDecode(d, nullptr).ok());  // nothing to do
  KdaChunkParams c;
  c.num_seqs = 1;
  c.num_tokens = 10;
  c.num_heads = 1;
  c.head_k = 64;
  c.head_v = 64;
  c.num_slots = 1;
  c.algo = KdaChunkAlgo::kTensorCore;
  int dummy;
  c.q = c.k = c.v = c.f = c.b = c.o = &dummy;
  c.a_log = c.dt_bias = reinterpret_cast<float*>(&dummy);
  c.cu_seqlens = reinterpret_cast<int64_t*>(&dummy);
  c.slots = &dummy;
  c.state_pool = reinterpret_cast<float*>(&dummy);
  EXPECT_EQ(KdaChunkPrefill(c, nullptr, 0, nullptr).code(), absl::StatusCode::kInvalidArgument);
  c.head_k = c.head_v = 128;
  c.act = DType::kBF16;
  EXPECT_GT(KdaChunkWorkspaceBytes(c), 0u);
  EXPECT_EQ(KdaChunkPrefill(c, nullptr, 0, nullptr).code(), absl::StatusCode::kInvalidArgument);
  c.algo = KdaChunkAlgo::kAuto;
  c.act = DType::kF32;
  EXPECT_EQ(KdaChunkResolveAlgo(c), KdaChunkAlgo::kExact);
  EXPECT_EQ(KdaChunkWorkspaceBytes(c), 0u);
}

// ---- the pool layout (kda_state_layout.h) ----
// The offset map is a bijection onto one head's K * V floats, slices of 32 columns are
// contiguous, and a width that is not a multiple of 32 keeps the canonical layout.
TEST(KdaStateLayout, OffsetsAreAPermutation) {
  for (auto [K, V] : std::vector<std::pair<int64_t, int64_t>>{{128, 128}, {64, 96}, {64, 48}}) {
    std::vector<int> hits(K * V, 0);
    for (int64_t d = 0; d < K; ++d) {
      for (int64_t v = 0; v < V; ++v) {
        const int64_t off = KdaStateOffset(d, v, K, V);
        ASSERT_GE(off, 0);
        ASSERT_LT(off, K * V);
        ++hits[off];
        if (V % 32 == 0) {
          EXPECT_EQ(off, (v / 32) * K * 32 + d * 32 + v % 32);
        } else {
          EXPECT_EQ(off, d * V + v);
        }
      }
    }
    for (int64_t i = 0; i < K * V; ++i) ASSERT_EQ(hits[i], 1) << "K=" << K << " V=" << V;
  }
}

// The device conversions equal the host ones, and each undoes the other.
TEST(KdaStateLayout, DeviceConversionsMatchHostAndRoundTrip) {
  SKIP_WITHOUT_GPU();
  for (auto [K, V] : std::vector<std::pair<int64_t, int64_t>>{{128, 128}, {64, 96}, {64, 48}}) {
    const int64_t heads = 5;
    const std::vector<float> canonical = RandomPool(31 + V, heads, K * V);
    std::vector<float> host_pool(canonical.size()), back(canonical.size());
    KdaStateToPoolHost(canonical.data(), heads, K, V, host_pool.data());
    KdaStateFromPoolHost(host_pool.data(), heads, K, V, back.data());
    ASSERT_EQ(back, canonical);
    if (V % 32 == 0) ASSERT_NE(host_pool, canonical);

    DeviceBuffer src = Upload(canonical), pool(canonical.size() * 4), out(canonical.size() * 4);
    ASSERT_TRUE(pool.ok() && out.ok());
    cudaMemset(pool.get(), 0xff, pool.bytes());
    cudaMemset(out.get(), 0xff, out.bytes());
    ASSERT_TRUE(KdaStateToPool(src.as<float>(), heads, K, V, pool.as<float>(), nullptr).ok());
    ASSERT_TRUE(KdaStateFromPool(pool.as<float>(), heads, K, V, out.as<float>(), nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(Download<float>(pool), host_pool) << "K=" << K << " V=" << V;
    EXPECT_EQ(Download<float>(out), canonical) << "K=" << K << " V=" << V;
  }
  EXPECT_EQ(KdaStateToPool(nullptr, 1, 128, 128, nullptr, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(KdaStateToPool(nullptr, 0, 128, 128, nullptr, nullptr).ok());
}

// ---- decode ----
TEST(KdaDecode, Fp32MatchesOracleAllHeadDims) {
  SKIP_WITHOUT_GPU();
  const std::vector<int32_t> slots = {11, 3, 7, 0, 14, 5, 9};  // non-contiguous, permuted
  const int64_t N = 7, H = 4, num_slots = 16;
  for (auto [K, V] : std::vector<std::pair<int64_t, int64_t>>{{128, 128}, {64, 64}, {128, 64}, {64, 128}}) {
    const LayerInputs in = MakeInputs(100 + K + V, N, H, K, V);
    const Result r = RunDecode(in, DType::kF32, OnePerSeq(N), slots, num_slots, false, 7);
    char what[64];
    std::snprintf(what, sizeof(what), "decode fp32 K=%ld V=%ld", static_cast<long>(K), static_cast<long>(V));
    ExpectAbs(r, kFp32AbsTol, what);
    ExpectUntouched(r, slots, OnePerSeq(N), num_slots, H * K * V);
  }
}

TEST(KdaDecode, Bf16MatchesOracle) {
  SKIP_WITHOUT_GPU();
  const int64_t N = 64, H = 32, K = 128, V = 128, num_slots = 80;
  std::vector<int32_t> slots(N);
  for (int64_t n = 0; n < N; ++n) slots[n] = static_cast<int32_t>((n * 37 + 5) % num_slots);
  const LayerInputs in = MakeInputs(200, N, H, K, V);
  const Result r = RunDecode(in, DType::kBF16, OnePerSeq(N), slots, num_slots, false, 8);
  ExpectRel(r, kBf16RelTol, "decode bf16 N=64 H=32");
  ExpectUntouched(r, slots, OnePerSeq(N), num_slots, H * K * V);
}

TEST(KdaDecode, MultiTokenVarlenAndEmptySequence) {
  SKIP_WITHOUT_GPU();
  const std::vector<int64_t> lens = {3, 0, 1, 8, 5};
  const std::vector<int32_t> slots = {4, 2, 0, 6, 1};
  const std::vector<int64_t> cu = CuFromLengths(lens);
  const int64_t H = 3, K = 128, V = 128, num_slots = 8;
  for (DType act : {DType::kF32, DType::kBF16}) {
    const LayerInputs in = MakeInputs(300, cu.back(), H, K, V);
    const Result r = RunDecode(in, act, cu, slots, num_slots, true, 9);
    if (act == DType::kF32) ExpectAbs(r, kFp32AbsTol, "decode fp32 varlen [3,0,1,8,5]");
    else ExpectRel(r, kBf16RelTol, "decode bf16 varlen [3,0,1,8,5]");
    ExpectUntouched(r, slots, cu, num_slots, H * K * V);  // slot 2 (empty sequence) too
  }
}

TEST(KdaDecode, StrongDecayStaysFinite) {
  SKIP_WITHOUT_GPU();
  const int64_t N = 6, H = 4, K = 128, V = 128, num_slots = 6;
  std::vector<int32_t> slots = {5, 4, 3, 2, 1, 0};
  const LayerInputs in = MakeInputs(400, N, H, K, V, GateRegime::kStrong);
  ExpectAbs(RunDecode(in, DType::kF32, OnePerSeq(N), slots, num_slots, false, 10), kFp32AbsTol,
            "decode fp32 strong decay");
  ExpectRel(RunDecode(in, DType::kBF16, OnePerSeq(N), slots, num_slots, false, 10), kBf16RelTol,
            "decode bf16 strong decay");
}

TEST(KdaDecode, PaddingSlotsWriteZerosAndTouchNothing) {
  SKIP_WITHOUT_GPU();
  const int64_t N = 4, H = 2, K = 64, V = 64, num_slots = 5;
  const std::vector<int32_t> slots = {3, -1, 1, 5};  // -1 and num_slots are padding
  const LayerInputs in = MakeInputs(500, N, H, K, V);
  const Result r = RunDecode(in, DType::kF32, OnePerSeq(N), slots, num_slots, false, 11);
  ASSERT_TRUE(AllFinite(r.o));
  for (int64_t n : {1, 3}) {
    for (int64_t i = 0; i < H * V; ++i) ASSERT_EQ(r.o[n * H * V + i], 0.0f) << "padding row " << n;
  }
  for (int64_t n : {0, 2}) {
    for (int64_t i = 0; i < H * V; ++i) {
      ASSERT_NEAR(r.o[n * H * V + i], r.o_ref[n * H * V + i], kFp32AbsTol);
    }
  }
  ExpectUntouched(r, slots, OnePerSeq(N), num_slots, H * K * V);
}

TEST(ShortConvDecode, MatchesOracleWithSlots) {
  SKIP_WITHOUT_GPU();
  const int64_t N = 5, C = 384, W = 4, num_slots = 7;
  const std::vector<int32_t> slots = {6, 0, -1, 3, 2};
  kl::cpu::testing::SplitMix64 rng(600);
  for (DType act : {DType::kF32, DType::kBF16}) {
    std::vector<float> x = kl::cpu::testing::ToF32(rng.Normals(N * C));
    std::vector<float> w = kl::cpu::testing::ToF32(rng.Normals(C * W, 0.5));
    std::vector<float> tails = kl::cpu::testing::ToF32(rng.Normals(num_slots * (W - 1) * C));
    if (act == DType::kBF16) {
      testing::RoundBf16InPlace(x);
      testing::RoundBf16InPlace(w);
      testing::RoundBf16InPlace(tails);
    }
    std::vector<float> tails_ref = tails, out_ref(N * C, 0.0f);
    for (int64_t n = 0; n < N; ++n) {
      if (slots[n] < 0) continue;
      kl::cpu::ShortConvSilu(x.data() + n * C, w.data(), 1, C, W,
                             tails_ref.data() + slots[n] * (W - 1) * C, out_ref.data() + n * C);
    }
    DeviceBuffer dx = Upload(ToAct(x, act)), dw = Upload(ToAct(w, act)),
                 dt = Upload(ToAct(tails, act)), ds = Upload(slots), dout(N * C * DTypeSize(act));
    cudaMemset(dout.get(), 0xff, dout.bytes());
    ShortConvDecodeParams p;
    p.num_seqs = N;
    p.channels = C;
    p.width = W;
    p.num_slots = num_slots;
    p.act = act;
    p.x = dx.get();
    p.w = dw.get();
    p.slots = ds.as<int32_t>();
    p.tail_pool = dt.get();
    p.out = dout.get();
    ASSERT_TRUE(ShortConvDecode(p, nullptr).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> out = FromAct(Download<uint8_t>(dout), act);
    const std::vector<float> tails_gpu = FromAct(Download<uint8_t>(dt), act);
    ASSERT_TRUE(AllFinite(out));
    EXPECT_EQ(tails_gpu, tails_ref);  // the shift is exact in either dtype
    if (act == DType::kF32) {
      EXPECT_LE(MaxAbsDiff(out, out_ref), kConvFp32AbsTol);
    } else {
      EXPECT_LE(RelErr(out, out_ref), 1e-2);
    }
  }
}

// ---- chunked prefill ----
TEST(KdaChunk, ExactFp32VarlenMatchesOracle) {
  SKIP_WITHOUT_GPU();
  const std::vector<int64_t> lens = {1, 64, 200, 0, 130, 37};
  const std::vector<int32_t> slots = {5, 0, 7, 3, -1, 2};  // -1: zero state, discarded
  const std::vector<int64_t> cu = CuFromLengths(lens);
  const int64_t num_slots = 9;
  for (auto [K, V] : std::vector<std::pair<int64_t, int64_t>>{{128, 128}, {64, 96}}) {
    const LayerInputs in = MakeInputs(700 + K, cu.back(), 3, K, V);
    const Result r = RunPrefill(in, DType::kF32, KdaChunkAlgo::kAuto, cu, slots, num_slots, 12);
    char what[64];
    std::snprintf(what, sizeof(what), "chunk exact fp32 K=%ld V=%ld", static_cast<long>(K), static_cast<long>(V));
    ExpectAbs(r, kFp32AbsTol, what);
    ExpectUntouched(r, slots, cu, num_slots, 3 * K * V);
  }
}

TEST(KdaChunk, TensorCoreBf16VarlenMatchesOracle) {
  SKIP_WITHOUT_GPU();
  const std::vector<int64_t> lens = {1, 63, 64, 65, 300, 0, 1000};
  const std::vector<int32_t> slots = {9, 1, 4, 6, 0, 2, 7};
  const std::vector<int64_t> cu = CuFromLengths(lens);
  const int64_t num_slots = 10, H = 4;
  const LayerInputs in = MakeInputs(800, cu.back(), H, 128, 128);
  const Result r = RunPrefill(in, DType::kBF16, KdaChunkAlgo::kTensorCore, cu, slots, num_slots, 13);
  ExpectRel(r, kBf16RelTol, "chunk tensor-core bf16 varlen");
  ExpectUntouched(r, slots, cu, num_slots, H * 128 * 128);
}

// The mma.sync + ldmatrix state kernel (fallback of the default wgmma one).
TEST(KdaChunk, TensorCoreMmaSyncStateMatchesOracle) {
  SKIP_WITHOUT_GPU();
  const std::vector<int64_t> lens = {1, 63, 64, 65, 300, 0, 1000};
  const std::vector<int32_t> slots = {9, 1, 4, 6, 0, 2, 7};
  const std::vector<int64_t> cu = CuFromLengths(lens);
  const int64_t num_slots = 10, H = 4;
  const LayerInputs in = MakeInputs(850, cu.back(), H, 128, 128);
  internal::SetTcStateImpl(internal::TcStateImpl::kMmaSync);
  const Result r = RunPrefill(in, DType::kBF16, KdaChunkAlgo::kTensorCore, cu, slots, num_slots, 13);
  internal::SetTcStateImpl(internal::TcStateImpl::kWgmma);
  ExpectRel(r, kBf16RelTol, "chunk tensor-core bf16 (mma.sync state)");
  ExpectUntouched(r, slots, cu, num_slots, H * 128 * 128);
}

// The segmented intra / state pipeline (<= 4 sequences): sequences and empty ones
// crossing segment boundaries, the state carried between segments, slot -1, both
// state implementations, several segment lengths and run-ahead limits.
TEST(KdaChunk, TensorCoreSegmentedPipelineVarlen) {
  SKIP_WITHOUT_GPU();
  const std::vector<int64_t> lens = {300, 0, 700, 1000};  // chunks 5, 0, 11, 16
  const std::vector<int32_t> slots = {2, 0, -1, 5};
  const std::vector<int64_t> cu = CuFromLengths(lens);
  const int64_t num_slots = 7, H = 4;
  const LayerInputs in = MakeInputs(870, cu.back(), H, 128, 128);
  const internal::TcTuning saved = internal::GetTcTuning();
  struct Case {
    int seg, ahead, streams, head, tail;
    internal::TcStateImpl impl;
  };
  for (const Case c : {Case{4, 3, 4, 0, 0, internal::TcStateImpl::kWgmma},
                       Case{5, 1, 1, 2, 3, internal::TcStateImpl::kWgmma},
                       Case{8, 0, 2, 0, 4, internal::TcStateImpl::kWgmma},
                       Case{16, 3, 4, 8, 0, internal::TcStateImpl::kWgmma},
                       Case{4, 2, 3, 1, 1, internal::TcStateImpl::kMmaSync}}) {
    internal::TcTuning t = saved;
    t.stream = false;
    t.seg_chunks = c.seg;
    t.max_ahead = c.ahead;
    t.intra_streams = c.streams;
    t.head_chunks = c.head;
    t.tail_chunks = c.tail;
    internal::SetTcTuning(t);
    internal::SetTcStateImpl(c.impl);
    const Result r = RunPrefill(in, DType::kBF16, KdaChunkAlgo::kTensorCore, cu, slots, num_slots, 19);
    char what[128];
    std::snprintf(what, sizeof(what), "chunk tensor-core segmented (seg %d head %d tail %d, ahead %d, %d streams, %s)",
                  c.seg, c.head, c.tail, c.ahead, c.streams,
                  c.impl == internal::TcStateImpl::kWgmma ? "wgmma" : "mma.sync");
    ExpectRel(r, kBf16RelTol, what);
    ExpectUntouched(r, slots, cu, num_slots, H * 128 * 128);
  }
  internal::SetTcTuning(saved);
  internal::SetTcStateImpl(internal::TcStateImpl::kWgmma);
}

// The streamed mode (intra and state kernels at once, per-item ready flags): varlen with
// an empty sequence and slot -1, one long sequence of 32 heads (64 state CTAs), and a
// batch with more state CTAs than a GPU has SMs (256: LaunchChunkTc must fall back to
// the segmented / sequential path, or it would hang). RunPrefill fills the workspace
// with nonzero bytes first, so stale flags would let the state pass read items before
// they are written. Each case runs five times: streamed twice, streamed with the intra
// kernel held back 300 us (the flag-waiting paths), with allow_concurrent false and with
// the tuning off: all five must agree bit for bit, and LastTcPath must say streamed
// exactly where it should.
TEST(KdaChunk, TensorCoreStreamedVarlen) {
  SKIP_WITHOUT_GPU();
  bool fits = false;
  ASSERT_EQ(internal::TcStreamedModeFits(&fits), cudaSuccess);
  EXPECT_TRUE(fits) << "an intra CTA and a state CTA no longer fit on one SM (registers or shared memory "
                       "grew): the streamed mode is off";
  int sms = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  const internal::TcTuning saved = internal::GetTcTuning();
  struct Case {
    std::vector<int64_t> lens;
    int64_t H;
  };
  const std::vector<Case> cases = {
      {{300, 0, 700, 1000}, 4},
      {{2000}, 32},
      {{129, 64, 1, 250, 700, 65, 900, 400}, 16},
  };
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    const Case& c = cases[ci];
    std::vector<int32_t> slots;
    for (size_t i = 0; i < c.lens.size(); ++i) slots.push_back(i == 2 ? -1 : static_cast<int32_t>(i));
    const std::vector<int64_t> cu = CuFromLengths(c.lens);
    const int64_t num_slots = static_cast<int64_t>(c.lens.size()) + 1;
    const LayerInputs in = MakeInputs(880 + static_cast<int>(ci), cu.back(), c.H, 128, 128);
    // Streamed when the state grid (N x H x 2 CTAs) is at most half the SMs.
    const bool expect_streamed = fits && 2 * static_cast<int64_t>(c.lens.size()) * c.H * 2 <= sms;
    std::vector<Result> results;
    // Calls 0-1 streamed if eligible; call 2 with the intra kernel held back 300 us (the
    // state CTAs start first and wait on flags, then catch up with the intra kernel);
    // call 3 with KdaChunkParams::allow_concurrent false; call 4 with the tuning off.
    for (int rep = 0; rep < 5; ++rep) {
      internal::TcTuning t = saved;
      t.stream = rep < 4;
      t.intra_delay_ns = rep == 2 ? 300000 : 0;
      internal::SetTcTuning(t);
      const bool allow = rep != 3;
      results.push_back(
          RunPrefill(in, DType::kBF16, KdaChunkAlgo::kTensorCore, cu, slots, num_slots, 23, allow));
      char what[128];
      std::snprintf(what, sizeof(what), "chunk tensor-core streamed (case %zu, call %d, stream %d, allow %d)", ci,
                    rep, t.stream ? 1 : 0, allow ? 1 : 0);
      ExpectRel(results.back(), kBf16RelTol, what);
      ExpectUntouched(results.back(), slots, cu, num_slots, c.H * 128 * 128);
      EXPECT_EQ(internal::LastTcPath() == internal::TcPath::kStreamed, t.stream && allow && expect_streamed)
          << what;
    }
    // The state pass sees the same items either way: the same bits.
    for (int rep = 1; rep < 5; ++rep) {
      EXPECT_EQ(results[0].o, results[rep].o) << "case " << ci << " call " << rep;
      EXPECT_EQ(results[0].pool, results[rep].pool) << "case " << ci << " call " << rep;
    }
  }
  internal::SetTcTuning(saved);
}

TEST(KdaChunk, TensorCoreBf16LongSequence) {
  SKIP_WITHOUT_GPU();
  const std::vector<int64_t> cu = {0, 4096};
  const std::vector<int32_t> slots = {1};
  const LayerInputs in = MakeInputs(900, 4096, 8, 128, 128);
  ExpectRel(RunPrefill(in, DType::kBF16, KdaChunkAlgo::kTensorCore, cu, slots, 2, 14), kBf16RelTol,
            "chunk tensor-core bf16 T=4096 H=8");
}

TEST(KdaChunk, ExactPathWithBf16Inputs) {
  SKIP_WITHOUT_GPU();
  const std::vector<int64_t> cu = CuFromLengths({70, 5, 129});
  const std::vector<int32_t> slots = {2, 0, 1};
  const LayerInputs in = MakeInputs(1000, cu.back(), 2, 128, 128);
  ExpectRel(RunPrefill(in, DType::kBF16, KdaChunkAlgo::kExact, cu, slots, 3, 15), kBf16RelTol,
            "chunk exact bf16 inputs");
}

TEST(KdaChunk, StrongDecayStaysFinite) {
  SKIP_WITHOUT_GPU();
  const std::vector<int64_t> cu = CuFromLengths({150, 64, 3});
  const std::vector<int32_t> slots = {0, 2, 1};
  const LayerInputs in = MakeInputs(1100, cu.back(), 2, 128, 128, GateRegime::kStrong);
  ExpectAbs(RunPrefill(in, DType::kF32, KdaChunkAlgo::kExact, cu, slots, 3, 16), kFp32AbsTol,
            "chunk exact fp32 strong decay");
  ExpectRel(RunPrefill(in, DType::kBF16, KdaChunkAlgo::kTensorCore, cu, slots, 3, 16), kBf16RelTol,
            "chunk tensor-core bf16 strong decay");
}

// Prefill (tensor core) then decode steps continue the same sequence.
TEST(KdaChunk, PrefillThenDecodeContinues) {
  SKIP_WITHOUT_GPU();
  const int64_t H = 4, K = 128, V = 128, T = 131, steps = 3;
  LayerInputs all = MakeInputs(1200, T + steps, H, K, V);
  testing::RoundActivations(all);
  // Oracle: the recurrence over all T + steps tokens.
  std::vector<float> pool_ref = RandomPool(17, 1, H * K * V), o_ref;
  const std::vector<float> pool0 = pool_ref;
  testing::OracleVarlen(all, {0, T + steps}, {0}, 1, false, pool_ref, o_ref);
  // GPU: prefill on the first T tokens, then `steps` one-token decodes.
  DeviceInputs d(all, DType::kBF16);
  DeviceBuffer pool = UploadPool(pool0, K, V), slot = Upload(std::vector<int32_t>{0});
  DeviceBuffer cu = Upload(std::vector<int64_t>{0, T});
  DeviceBuffer o((T + steps) * H * V * 2);
  cudaMemset(o.get(), 0xff, o.bytes());
  KdaChunkParams p;
  p.num_seqs = 1;
  p.num_tokens = T;
  p.num_heads = H;
  p.num_slots = 1;
  p.q = d.q.get();
  p.k = d.k.get();
  p.v = d.v.get();
  p.f = d.f.get();
  p.b = d.b.get();
  p.a_log = d.a_log.as<float>();
  p.dt_bias = d.dt_bias.as<float>();
  p.cu_seqlens = cu.as<int64_t>();
  p.slots = slot.as<int32_t>();
  p.state_pool = pool.as<float>();
  p.o = o.get();
  DeviceBuffer ws(KdaChunkWorkspaceBytes(p));
  ASSERT_TRUE(KdaChunkPrefill(p, ws.get(), ws.bytes(), nullptr).ok());
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = T + s;
    KdaDecodeParams dp;
    dp.num_seqs = 1;
    dp.num_tokens = 1;
    dp.num_heads = H;
    dp.num_slots = 1;
    dp.q = d.q.as<uint16_t>() + t * H * K;
    dp.k = d.k.as<uint16_t>() + t * H * K;
    dp.v = d.v.as<uint16_t>() + t * H * V;
    dp.f = d.f.as<uint16_t>() + t * H * K;
    dp.b = d.b.as<uint16_t>() + t * H;
    dp.a_log = d.a_log.as<float>();
    dp.dt_bias = d.dt_bias.as<float>();
    dp.slots = slot.as<int32_t>();
    dp.state_pool = pool.as<float>();
    dp.o = o.as<uint16_t>() + t * H * V;
    ASSERT_TRUE(KdaRecurrentDecode(dp, nullptr).ok());
  }
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> out = FromAct(Download<uint8_t>(o), DType::kBF16);
  ASSERT_TRUE(AllFinite(out));
  const std::vector<float> tail(out.begin() + T * H * V, out.end());
  const std::vector<float> tail_ref(o_ref.begin() + T * H * V, o_ref.end());
  const double rel = RelErr(tail, tail_ref), rel_s = RelErr(DownloadPool(pool, K, V), pool_ref);
  std::printf("  prefill(131)+3 decode steps: rel(o decode) %.3g  rel(S) %.3g\n", rel, rel_s);
  EXPECT_LE(rel, kBf16RelTol);
  EXPECT_LE(rel_s, kBf16RelTol);
}

}  // namespace
}  // namespace kl::cuda
