// Benchmark of the MLA CUDA kernels with the copy ceiling measured in the same run:
//   mla_bench [--quick] [--decode-only] [--bf16-only] [--compare] [--only CTX BATCH]
//             [--splits S]
// Prints: device; D2D copy bandwidth (1 GiB, read + write counted); decode (absorbed,
// H = 32, latent 512 + rope 64, page 64, context {4K, 32K, 128K} x batch {1, 16, 64},
// bf16 and fp32 caches; shuffled pages; small caches rotate over several page sets so
// the timed reads come from DRAM, not L2) with the cache bytes read per second and the
// share of the copy bandwidth; prefill (exact fp32 path, B = 1, H = 32, qk 192, v 128,
// T in {4K, 16K}, causal) with TFLOP/s. Times are medians of CUDA-event timings after
// warm-up. --quick: fewer repetitions, no 128K decode, no 16K prefill. --decode-only:
// no prefill; --bf16-only: no fp32-cache decode; --compare: bf16 decode on both
// tensor-core kernels (wgmma, the default on sm_90, and mma.sync), rows side by side.
// --only CTX BATCH: only that bf16 decode shape; --splits S: S splits instead of auto.
// --profile CTX BATCH: only a few bf16 decode launches of that shape (for ncu; with
// --compare, of both kernels).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/common/splitmix64.h"
#include "kernels/cuda/bench_fill.h"
#include "kernels/cuda/bench_util.h"
#include "kernels/cuda/kda_test_util.h"
#include "kernels/cuda/mla.h"

namespace kl::cuda {
namespace {

using testing::DeviceBuffer;

using bench::Median;
using bench::MeasureCopy;
using bench::TimeMs;

// Filters for --profile: only these (dtype, ctx, batch) combos, few launches.
struct DecodeFilter {
  bool profile = false;
  int64_t ctx = 0, batch = 0;
  bool bf16_only = false, compare = false, decode_only = false, only = false;
  int64_t splits = 0;
};
DecodeFilter g_filter;

bool BenchDecode(cudaStream_t s, bool quick, double copy_tbs, std::vector<std::string>* rows) {
  const int64_t H = 32, latent = 512, rope = 64, D = latent + rope, page = 64;
  std::printf("\n== decode: absorbed MLA, H=%ld, latent %ld + rope %ld, page %ld, shuffled pages\n",
              static_cast<long>(H), static_cast<long>(latent), static_cast<long>(rope),
              static_cast<long>(page));
  std::printf("%5s %7s %6s %7s %6s %11s %10s %8s\n", "cache", "ctx", "batch", "splits", "kernel",
              "us/call", "GB/s", "% copy");
  for (DType dt : {DType::kBF16, DType::kF32}) {
    if (g_filter.bf16_only && dt != DType::kBF16) continue;
    for (int64_t ctx : {int64_t{4096}, int64_t{32768}, int64_t{131072}}) {
      if (quick && ctx > 32768) continue;
      for (int64_t B : {int64_t{1}, int64_t{16}, int64_t{64}}) {
        if ((g_filter.profile || g_filter.only) &&
            (dt != DType::kBF16 || ctx != g_filter.ctx || B != g_filter.batch)) {
          continue;
        }
        const int64_t esz = DTypeSize(dt);
        const int64_t pages_per_call = B * ((ctx + page - 1) / page);
        const int64_t page_bytes = page * D * esz;
        // Enough distinct pages that the rotation set is far larger than L2 (50 MB).
        const int64_t min_pages = (int64_t{1} << 30) / page_bytes;
        const int64_t num_pages = std::max(pages_per_call, min_pages);
        const int rot = static_cast<int>(std::clamp<int64_t>(num_pages / pages_per_call, 1, 16));
        size_t free_b = 0, total_b = 0;
        BENCH_CHECK(cudaMemGetInfo(&free_b, &total_b));
        const size_t need = static_cast<size_t>(num_pages * page_bytes) +
                            static_cast<size_t>(rot) * pages_per_call * 4 + (size_t{1} << 28);
        if (need > free_b) {
          std::printf("%5s %7ld %6ld  skipped: needs %.1f GB, %.1f GB free\n", DTypeName(dt).data(),
                      static_cast<long>(ctx), static_cast<long>(B), need / 1e9, free_b / 1e9);
          continue;
        }
        DeviceBuffer pool(num_pages * page_bytes), q(B * H * D * 4), out(B * H * latent * 4),
            lens(B * 4), tables(static_cast<size_t>(rot) * pages_per_call * 4);
        if (!pool.ok() || !tables.ok()) return false;
        BENCH_CHECK(FillUniform(pool.get(), num_pages * page * D, dt == DType::kBF16, -1, 1, 7, s));
        BENCH_CHECK(FillUniform(q.get(), B * H * D, false, -1, 1, 8, s));
        // Block tables: rotation r uses a shuffled slice of the pool's pages.
        std::vector<int32_t> perm(num_pages);
        std::iota(perm.begin(), perm.end(), 0);
        kl::SplitMix64 rng(99 + ctx + B);
        for (int64_t i = num_pages - 1; i > 0; --i) std::swap(perm[i], perm[rng.Next() % (i + 1)]);
        std::vector<int32_t> tab(static_cast<size_t>(rot) * pages_per_call);
        for (size_t i = 0; i < tab.size(); ++i) tab[i] = perm[i % num_pages];
        BENCH_CHECK(cudaMemcpy(tables.get(), tab.data(), tables.bytes(), cudaMemcpyHostToDevice));
        std::vector<int32_t> lh(B, static_cast<int32_t>(ctx));
        BENCH_CHECK(cudaMemcpy(lens.get(), lh.data(), lens.bytes(), cudaMemcpyHostToDevice));

        MlaDecodeParams p;
        p.num_seqs = B;
        p.num_heads = H;
        p.cache.pool = pool.get();
        p.cache.dtype = dt;
        p.cache.num_pages = num_pages;
        p.cache.page_size = page;
        p.cache.latent_dim = latent;
        p.cache.rope_dim = rope;
        p.cache.max_pages_per_seq = pages_per_call / B;
        p.q = q.as<float>();
        p.seq_lens = lens.as<int32_t>();
        p.out = out.as<float>();
        p.scale = 1.0f / std::sqrt(192.0f);
        p.max_seq_len_hint = ctx;
        p.num_splits = g_filter.splits;
        DeviceBuffer ws(MlaDecodeWorkspaceBytes(p));
        if (!ws.ok()) return false;
        std::vector<MlaDecodeParams::Kernel> kernels = {MlaDecodeParams::Kernel::kAuto};
        if (g_filter.compare && dt == DType::kBF16) kernels.push_back(MlaDecodeParams::Kernel::kMmaSync);
        for (MlaDecodeParams::Kernel kernel : kernels) {
          p.kernel = kernel;
          auto call = [&](int i) {
            p.cache.block_table = tables.as<int32_t>() + static_cast<int64_t>(i % rot) * pages_per_call;
            const absl::Status st = MlaDecodeAttention(p, ws.get(), ws.bytes(), s);
            if (!st.ok()) std::fprintf(stderr, "%s\n", st.ToString().c_str());
            return st.ok();
          };
          const int per_batch = g_filter.profile ? 1 : B * ctx <= 32768 * 16 ? 20 : 3;
          double ms = 0;
          if (!TimeMs(call, per_batch, g_filter.profile ? 2 : quick ? 5 : 11, g_filter.profile ? 1 : 3, s, &ms)) {
            return false;
          }
          const double bytes = static_cast<double>(B) * ctx * D * esz;
          const double gbs = bytes / (ms * 1e-3) / 1e9;
          const double pct = 100.0 * gbs / (copy_tbs * 1e3);
          const char* path = MlaDecodeKernelName(p);
          const long splits = static_cast<long>(MlaDecodeNumSplits(p));
          std::printf("%5s %7ld %6ld %7ld %6s %11.2f %10.1f %7.1f%%\n", DTypeName(dt).data(),
                      static_cast<long>(ctx), static_cast<long>(B), splits, path, ms * 1e3, gbs, pct);
          char buf[220];
          std::snprintf(buf, sizeof(buf),
                        "decode %-4s ctx=%-6ld B=%-3ld (%-5s, %3ld splits) | %9.2f us | %7.1f GB/s cache | %5.1f%% of copy",
                        DTypeName(dt).data(), static_cast<long>(ctx), static_cast<long>(B), path, splits,
                        ms * 1e3, gbs, pct);
          rows->push_back(buf);
        }
      }
    }
  }
  return true;
}

bool BenchPrefill(cudaStream_t s, bool quick, std::vector<std::string>* rows) {
  const int64_t H = 32, dq = 192, dv = 128;
  std::printf("\n== prefill: exact fp32 and bf16 tensor-core paths, B=1, H=%ld, qk %ld, v %ld, causal, no prefix\n",
              static_cast<long>(H), static_cast<long>(dq), static_cast<long>(dv));
  std::printf("%7s %10s %9s\n", "T", "ms", "TFLOP/s");
  for (int64_t T : {int64_t{4096}, int64_t{16384}}) {
    if (quick && T > 4096) continue;
    DeviceBuffer q(T * H * dq * 4), k(T * H * dq * 4), v(T * H * dv * 4), out(T * H * dv * 4), cu(16);
    if (!q.ok() || !k.ok() || !v.ok() || !out.ok()) return false;
    BENCH_CHECK(FillUniform(q.get(), T * H * dq, false, -1, 1, 11, s));
    BENCH_CHECK(FillUniform(k.get(), T * H * dq, false, -1, 1, 12, s));
    BENCH_CHECK(FillUniform(v.get(), T * H * dv, false, -1, 1, 13, s));
    const int64_t cu_h[2] = {0, T};
    BENCH_CHECK(cudaMemcpy(cu.get(), cu_h, sizeof(cu_h), cudaMemcpyHostToDevice));
    MlaPrefillParams p;
    p.num_seqs = 1;
    p.num_q = T;
    p.num_heads = H;
    p.qk_dim = dq;
    p.v_dim = dv;
    p.q = q.as<float>();
    p.k = k.as<float>();
    p.v = v.as<float>();
    p.q_cu_seqlens = p.kv_cu_seqlens = cu.as<int64_t>();
    p.out = out.as<float>();
    for (bool tc : {false, true}) {
      auto call = [&](int) {
        const absl::Status st = tc ? MlaPrefillAttentionBf16(p, s) : MlaPrefillAttention(p, s);
        if (!st.ok()) std::fprintf(stderr, "%s\n", st.ToString().c_str());
        return st.ok();
      };
      double ms = 0;
      if (!TimeMs(call, 1, quick ? 3 : (T <= 4096 || tc ? 9 : 3), 1, s, &ms)) return false;
      const double flops = 2.0 * H * (dq + dv) * (static_cast<double>(T) * (T + 1) / 2);
      const double tflops = flops / (ms * 1e-3) / 1e12;
      std::printf("%7ld %10.3f %9.2f %s\n", static_cast<long>(T), ms, tflops, tc ? "bf16 tc" : "fp32");
      char buf[200];
      std::snprintf(buf, sizeof(buf),
                    "prefill %s T=%-6ld H=32 qk192 v128 | %9.3f ms | %6.2f TFLOP/s (causal FLOPs)",
                    tc ? "bf16 tc" : "fp32   ", static_cast<long>(T), ms, tflops);
      rows->push_back(buf);
    }
  }
  return true;
}

bool Run(bool quick) {
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB, %zu MiB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, prop.totalGlobalMem >> 20);
  cudaStream_t s;
  BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  double copy_tbs = 0;
  std::vector<std::string> rows;
  if (!MeasureCopy(s, quick, &copy_tbs)) return false;
  if (!BenchDecode(s, quick, copy_tbs, &rows)) return false;
  if (g_filter.profile) return true;
  if (!g_filter.decode_only && !BenchPrefill(s, quick, &rows)) return false;
  std::printf("\n== summary (%s)\n", prop.name);
  std::printf("ceiling: copy %.3f TB/s (read + write)\n", copy_tbs);
  for (const std::string& r : rows) std::printf("%s\n", r.c_str());
  cudaStreamDestroy(s);
  return true;
}

}  // namespace
}  // namespace kl::cuda

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    quick |= std::strcmp(argv[i], "--quick") == 0;
    kl::cuda::g_filter.decode_only |= std::strcmp(argv[i], "--decode-only") == 0;
    kl::cuda::g_filter.bf16_only |= std::strcmp(argv[i], "--bf16-only") == 0;
    kl::cuda::g_filter.compare |= std::strcmp(argv[i], "--compare") == 0;
    if (std::strcmp(argv[i], "--splits") == 0 && i + 1 < argc) {
      kl::cuda::g_filter.splits = std::atoll(argv[++i]);
      continue;
    }
    // --profile / --only CTX BATCH: that bf16 decode shape only (--profile: a few launches, for ncu).
    if ((std::strcmp(argv[i], "--profile") == 0 || std::strcmp(argv[i], "--only") == 0) && i + 2 < argc) {
      (std::strcmp(argv[i], "--profile") == 0 ? kl::cuda::g_filter.profile : kl::cuda::g_filter.only) = true;
      kl::cuda::g_filter.ctx = std::atoll(argv[i + 1]);
      kl::cuda::g_filter.batch = std::atoll(argv[i + 2]);
      i += 2;
    }
  }
  if (!kl::cuda::testing::HasCudaDevice()) {
    std::printf("mla_bench: no CUDA device\n");
    return 0;
  }
  return kl::cuda::Run(quick) ? 0 : 1;
}
