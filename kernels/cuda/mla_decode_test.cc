// GPU tests of the MLA decode kernels (MlaDecodeAttention: wgmma, mma.sync and SIMT
// paths) against an fp64 host reference; part of mla_test (tolerances: mla_test.cc).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/mla_test_util.h"

namespace kl::cuda {
namespace {

using namespace mla_testing;  // NOLINT

// ----------------------------------------------------------------------------------
// Decode.
void RefDecode(const HostCache& c, const std::vector<float>& q, const std::vector<int32_t>& lens,
               int64_t H, double scale, std::vector<float>& out) {
  const int64_t D = c.row(), dl = c.latent, N = static_cast<int64_t>(lens.size());
  out.assign(N * H * dl, 0.0f);
  std::vector<double> s, acc(dl);
  std::vector<int64_t> rows;
  for (int64_t n = 0; n < N; ++n) {
    rows.clear();
    for (int64_t j = 0; j < lens[n]; ++j) {
      const int64_t p = c.Phys(n, j);
      if (p >= 0) rows.push_back(p);
    }
    if (rows.empty()) continue;  // padding: zeros
    for (int64_t h = 0; h < H; ++h) {
      const float* qr = &q[(n * H + h) * D];
      s.assign(rows.size(), 0.0);
      double mx = -INFINITY;
      for (size_t j = 0; j < rows.size(); ++j) {
        const float* r = &c.pool[rows[j] * D];
        double d = 0.0;
        for (int64_t e = 0; e < D; ++e) d += static_cast<double>(qr[e]) * r[e];
        s[j] = d * scale;
        mx = std::max(mx, s[j]);
      }
      double l = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (size_t j = 0; j < rows.size(); ++j) {
        const double p = std::exp(s[j] - mx);
        l += p;
        const float* r = &c.pool[rows[j] * D];
        for (int64_t e = 0; e < dl; ++e) acc[e] += p * r[e];
      }
      for (int64_t e = 0; e < dl; ++e) out[(n * H + h) * dl + e] = static_cast<float>(acc[e] / l);
    }
  }
}

struct DecodeCase {
  DType dtype;
  std::vector<int32_t> lens;
  int64_t H, latent, rope, page_size;
  double q_scale = 1.0;
  int expect_tc = -1;  // 1 / 0: the case must (not) take the tensor-core path; -1: either
  double tol = kFp32RelTol;
  bool graph = false;  // also replay the launch from a captured CUDA graph
  MlaDecodeParams::Kernel kernel = MlaDecodeParams::Kernel::kAuto;
  const char* expect_kernel = nullptr;  // on a compute capability 9.0 device: this kernel
  // Block-table entries (sequence, page index) replaced by `hole_id` (unmapped pages
  // inside a sequence: their rows are not attended to).
  std::vector<std::pair<int64_t, int64_t>> holes;
  int32_t hole_id = -1;
  // `out` this many floats past an allocation's (256-byte aligned) start: 1 gives a
  // 4-byte aligned output (allowed off the tensor-core paths).
  int64_t out_offset = 0;
};

bool DeviceIsSm90() {
  int dev = 0, major = 0, minor = 0;
  return cudaGetDevice(&dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
         cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
         major == 9 && minor == 0;
}

void RunDecode(const DecodeCase& dc, int64_t num_splits, uint64_t seed) {
  Rng rng(seed);
  const int64_t N = static_cast<int64_t>(dc.lens.size()), H = dc.H, D = dc.latent + dc.rope;
  std::vector<int64_t> lens64(dc.lens.begin(), dc.lens.end());
  HostCache h = MakeCache(rng, dc.dtype, dc.page_size, dc.latent, dc.rope, lens64);
  for (const auto& [seq, page] : dc.holes) h.table[seq * h.max_pages + page] = dc.hole_id;
  std::vector<float> q = Normals(rng, N * H * D, dc.q_scale);
  const double scale = 1.0 / std::sqrt(192.0);

  DeviceCache d(h);
  DeviceBuffer d_q = Upload(q), d_lens = Upload(dc.lens);
  DeviceBuffer out = Poisoned(N * H * dc.latent + dc.out_offset);
  MlaDecodeParams p;
  p.num_seqs = N;
  p.num_heads = H;
  p.cache = d.view;
  p.q = d_q.as<float>();
  p.seq_lens = d_lens.as<int32_t>();
  p.out = out.as<float>() + dc.out_offset;
  p.scale = static_cast<float>(scale);
  p.max_seq_len_hint = *std::max_element(dc.lens.begin(), dc.lens.end());
  p.num_splits = num_splits;
  p.kernel = dc.kernel;
  const bool tc = MlaDecodeUsesTensorCores(p);
  const char* kname = MlaDecodeKernelName(p);
  if (dc.expect_tc >= 0) {
    ASSERT_EQ(tc, dc.expect_tc == 1);
  }
  if (dc.expect_kernel != nullptr && DeviceIsSm90()) {
    ASSERT_STREQ(kname, dc.expect_kernel);
  }
  DeviceBuffer ws(MlaDecodeWorkspaceBytes(p));
  ASSERT_TRUE(ws.ok());
  if (ws.bytes() > 0) {
    ASSERT_EQ(cudaMemset(ws.get(), 0xff, ws.bytes()), cudaSuccess);
  }

  // The reference sees what the kernel multiplies: bf16-rounded q on the MMA path.
  std::vector<float> q_ref = q;
  if (tc) testing::RoundBf16InPlace(q_ref);
  std::vector<float> want;
  RefDecode(h, q_ref, dc.lens, H, scale, want);

  auto check = [&](const char* what) {
    const std::vector<float> all = Download<float>(out);
    const std::vector<float> got(all.begin() + dc.out_offset, all.end());
    ASSERT_TRUE(AllFinite(got)) << what << ": unwritten (NaN) or non-finite output";
    double worst = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const size_t off = n * H * dc.latent, cnt = H * dc.latent;
      if (dc.lens[n] <= 0) {
        for (size_t i = 0; i < cnt; ++i) ASSERT_EQ(got[off + i], 0.0f) << what << ": padding row " << n;
        continue;
      }
      const double err = RelErr(got.data() + off, want.data() + off, cnt);
      worst = std::max(worst, err);
      EXPECT_LE(err, dc.tol) << what << ": sequence " << n << " (len " << dc.lens[n]
                             << "), splits " << MlaDecodeNumSplits(p)
                             << ", kernel " << kname;
    }
    std::printf("decode %s H=%ld latent=%ld rope=%ld page=%ld splits=%ld %s: worst rel err %.2e (tol %.0e)\n",
                what, static_cast<long>(H), static_cast<long>(dc.latent), static_cast<long>(dc.rope),
                static_cast<long>(dc.page_size), static_cast<long>(MlaDecodeNumSplits(p)), kname,
                worst, dc.tol);
  };
  cudaStream_t s;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  const absl::Status st = MlaDecodeAttention(p, ws.get(), ws.bytes(), s);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  check("stream");
  if (dc.graph) {
    ASSERT_EQ(cudaMemset(out.get(), 0xff, out.bytes()), cudaSuccess);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    const absl::Status cs = MlaDecodeAttention(p, ws.get(), ws.bytes(), s);
    ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
    ASSERT_TRUE(cs.ok()) << cs;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    check("graph");
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  cudaStreamDestroy(s);
}

// Lengths: 1, < page, not a page multiple, exact page multiples, padding (0 and -1),
// short next to long.
const std::vector<int32_t> kMixedLens = {1, 17, 64, 100, 0, 1500, -1, 129};

TEST(MlaDecode, F32CacheSimt) {
  SKIP_WITHOUT_GPU();
  DecodeCase dc{DType::kF32, kMixedLens, 5, 64, 16, 16};
  dc.expect_tc = 0;
  for (int64_t splits : {0, 1, 3, 7}) RunDecode(dc, splits, 31 + splits);
}
TEST(MlaDecode, F32CacheModelDims) {
  SKIP_WITHOUT_GPU();
  DecodeCase dc{DType::kF32, {1, 777, 2050}, 32, 512, 64, 64};
  dc.expect_tc = 0;
  RunDecode(dc, 0, 32);
}
TEST(MlaDecode, Bf16TensorCoresModelDims) {
  SKIP_WITHOUT_GPU();
  DecodeCase dc{DType::kBF16, {1, 65, 1000, 3001, -1, 64, 0, 200}, 32, 512, 64, 64};
  dc.expect_tc = 1;
  dc.tol = kBf16RelTol;
  dc.graph = true;
  dc.expect_kernel = "wgmma";
  for (int64_t splits : {0, 1, 5}) RunDecode(dc, splits, 41 + splits);
  // The same on the mma.sync kernel (the path of the shapes wgmma does not take).
  dc.kernel = MlaDecodeParams::Kernel::kMmaSync;
  dc.expect_kernel = "mma";
  for (int64_t splits : {0, 1, 5}) RunDecode(dc, splits, 44 + splits);
}
// Edge cases of the wgmma kernel: one sequence, contexts shorter than a tile / not a
// multiple of it / one past it, TMA boxes of 8, 16 and 64 rows (page 8, 24, 16, 64, 128),
// unmapped pages inside a sequence (-1 and an id past the pool), heads 1 / 20 / 32,
// the other latent / rope shapes, forced and auto splits.
TEST(MlaDecode, Bf16WgmmaEdgeCases) {
  SKIP_WITHOUT_GPU();
  auto wg = [](std::vector<int32_t> lens, int64_t H, int64_t latent, int64_t rope, int64_t page) {
    DecodeCase dc{DType::kBF16, std::move(lens), H, latent, rope, page};
    dc.expect_tc = 1;
    dc.tol = kBf16RelTol;
    dc.expect_kernel = "wgmma";
    return dc;
  };
  uint64_t seed = 100;
  for (int32_t len : {1, 63, 64, 65, 4097}) {  // B = 1
    for (int64_t splits : {0, 1, 3}) RunDecode(wg({len}, 32, 512, 64, 64), splits, ++seed);
  }
  for (int64_t splits : {0, 1, 3}) RunDecode(wg(kMixedLens, 32, 512, 64, 16), splits, ++seed);
  RunDecode(wg({5, 200, 777, 0}, 20, 512, 64, 8), 0, ++seed);
  RunDecode(wg({5, 200, 777}, 20, 512, 64, 24), 2, ++seed);
  RunDecode(wg({1, 130, 1000}, 1, 512, 64, 128), 0, ++seed);
  DecodeCase holes = wg({1000, 300, 129}, 32, 512, 64, 64);
  holes.holes = {{0, 3}, {1, 0}, {2, 2}};  // mid-sequence, first page, the partial last page
  for (int64_t splits : {0, 1, 4}) RunDecode(holes, splits, ++seed);
  holes.hole_id = 1 << 30;  // outside the pool
  RunDecode(holes, 0, ++seed);
  for (int64_t latent : {64, 128, 256}) {
    for (int64_t rope : {0, 64}) RunDecode(wg(kMixedLens, 8, latent, rope, 16), 0, ++seed);
  }
}
TEST(MlaDecode, Bf16TensorCoresSmallShapes) {
  SKIP_WITHOUT_GPU();
  for (int64_t H : {1, 8, 16, 20}) {  // one and two 16-head tiles, padded heads
    for (int64_t latent : {64, 128, 256}) {
      DecodeCase dc{DType::kBF16, kMixedLens, H, latent, latent == 128 ? 0 : 16, 16};
      dc.expect_tc = 1;
      dc.tol = kBf16RelTol;
      RunDecode(dc, 0, 50 + H * 7 + latent);
    }
  }
}
TEST(MlaDecode, Bf16SimtFallback) {
  SKIP_WITHOUT_GPU();
  // H > 32 and a rope_dim that is not a multiple of 16: exact fp32 math on bf16 data.
  DecodeCase dc{DType::kBF16, kMixedLens, 40, 64, 8, 32};
  dc.expect_tc = 0;
  RunDecode(dc, 0, 61);
  RunDecode(dc, 2, 62);
}
// The combine kernel's less common shapes: a latent that is not a multiple of 4 and an
// output that is only 4-byte aligned (the scalar-column variant), and more splits than
// one batch of partial loads covers (S = 100 > 64, the last 29 splits empty).
TEST(MlaDecode, CombineOddShapes) {
  SKIP_WITHOUT_GPU();
  DecodeCase odd{DType::kF32, kMixedLens, 5, 30, 16, 16};
  odd.expect_tc = 0;
  for (int64_t splits : {0, 3}) RunDecode(odd, splits, 81 + splits);
  DecodeCase unaligned{DType::kF32, kMixedLens, 40, 64, 16, 16};
  unaligned.expect_tc = 0;
  unaligned.out_offset = 1;
  RunDecode(unaligned, 5, 85);
  DecodeCase many{DType::kBF16, {9000, 1, 300}, 32, 512, 64, 64};
  many.expect_tc = 1;
  many.tol = kBf16RelTol;
  RunDecode(many, 100, 86);
}
TEST(MlaDecode, LargeMagnitudeScores) {
  SKIP_WITHOUT_GPU();
  DecodeCase f32{DType::kF32, {300, 1, 90}, 4, 64, 16, 16, 20.0};
  f32.tol = kFp32LargeRelTol;
  RunDecode(f32, 0, 71);
  DecodeCase bf{DType::kBF16, {300, 1, 2000}, 32, 512, 64, 64, 20.0};
  bf.expect_tc = 1;
  bf.tol = kBf16RelTol;
  RunDecode(bf, 0, 72);
  bf.kernel = MlaDecodeParams::Kernel::kMmaSync;
  RunDecode(bf, 0, 73);
}

}  // namespace
}  // namespace kl::cuda
