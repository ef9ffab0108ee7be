// Benchmark of the CUDA MoE kernels (moe.h) at the Kimi-Linear-48B shape (E = 256
// experts, k = 8, D = 2304, I = 1024, bf16 weights, 3.6 GB of expert weights), with
// the two ceilings and a cuBLAS baseline measured in the same run:
//   moe_bench [--quick | --profile]
// Prints: device; D2D copy bandwidth (1 GiB, read + write counted); cuBLAS bf16 GEMM
// 8192^3; for T in {1, 16, 64} (decode, skinny path) and 4096 (prefill, tiled path):
// MoeRoute time, MoeExperts time (stream launches, and CUDA-graph replays for decode),
// achieved expert-weight bytes per second (each active expert's 14.2 MB read once) vs
// the copy ceiling, TFLOP/s (6 S D I per call, S = T k) vs the GEMM ceiling, and a
// cuBLAS loop (cublasGemmEx bf16, fp32 accumulate: gate, up, down per active expert,
// counts known on the host, no SwiGLU / combine) on the same routing. Routing sets
// rotate (8 for decode) so every call reads its weights from DRAM. Times are medians of
// CUDA-event timings after warm-up. --profile: two MoeExperts calls per T, no timing
// (for ncu / nsys).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "kernels/cuda/bench_fill.h"
#include "kernels/cuda/bench_util.h"
#include "kernels/cuda/kda_test_util.h"
#include "kernels/cuda/moe.h"

namespace kl::cuda {
namespace {

using testing::DeviceBuffer;

#define BENCH_CUBLAS(expr)                                                             \
  do {                                                                                 \
    const cublasStatus_t c_ = (expr);                                                  \
    if (c_ != CUBLAS_STATUS_SUCCESS) {                                                 \
      std::fprintf(stderr, "%s:%d %s: cuBLAS status %d\n", __FILE__, __LINE__, #expr, \
                   static_cast<int>(c_));                                              \
      return false;                                                                    \
    }                                                                                  \
  } while (0)

constexpr int64_t kE = 256, kK = 8, kD = 2304, kI = 1024;
constexpr double kExpertBytes = 3.0 * kD * kI * 2;  // bf16 W1 + W3 + W2

using bench::Ceilings;
using bench::MeasureCeilings;
using bench::Median;
using bench::TimeMs;

// One routing set: device logits / x / ids / weights and the host view of the routing.
struct RouteSet {
  DeviceBuffer logits, x, ids, wts;
  std::vector<int32_t> counts;  // per expert
  int64_t active = 0;           // experts with at least one row
};

bool BenchShape(cudaStream_t s, cublasHandle_t cb, bool quick, const Ceilings& c,
                const std::vector<const void*>& w1, const std::vector<const void*>& w3,
                const std::vector<const void*>& w2, const DeviceBuffer& p1,
                const DeviceBuffer& p3, const DeviceBuffer& p2, int64_t T,
                std::vector<std::string>* rows) {
  const bool decode = T <= kMoeSkinnyMaxTokens;
  const int R = decode ? 8 : 2;
  const int64_t S = T * kK;
  DeviceBuffer bias(kE * 4);
  BENCH_CHECK(FillUniform(bias.get(), kE, false, -0.05f, 0.05f, 90, s));
  std::vector<RouteSet> sets(R);
  MoeRouteParams rp;
  rp.num_tokens = T;
  rp.num_experts = kE;
  rp.top_k = kK;
  rp.routed_scaling_factor = 2.446;
  rp.correction_bias = bias.as<float>();
  double active_sum = 0;
  for (int r = 0; r < R; ++r) {
    RouteSet& rs = sets[r];
    rs.logits = DeviceBuffer(T * kE * 4);
    rs.x = DeviceBuffer(T * kD * 4);
    rs.ids = DeviceBuffer(S * 4);
    rs.wts = DeviceBuffer(S * 4);
    if (!rs.logits.ok() || !rs.x.ok() || !rs.ids.ok() || !rs.wts.ok()) return false;
    BENCH_CHECK(FillUniform(rs.logits.get(), T * kE, false, -4, 4, 100 + r * 7 + T, s));
    BENCH_CHECK(FillUniform(rs.x.get(), T * kD, false, -1, 1, 200 + r * 7 + T, s));
    rp.logits = rs.logits.as<float>();
    rp.topk_ids = rs.ids.as<int32_t>();
    rp.topk_weights = rs.wts.as<float>();
    BENCH_STATUS(MoeRoute(rp, s));
    std::vector<int32_t> ids(S);
    BENCH_CHECK(cudaStreamSynchronize(s));
    BENCH_CHECK(cudaMemcpy(ids.data(), rs.ids.get(), S * 4, cudaMemcpyDeviceToHost));
    rs.counts.assign(kE, 0);
    for (int32_t e : ids) rs.counts[e]++;
    for (int32_t n : rs.counts) rs.active += n > 0 ? 1 : 0;
    active_sum += static_cast<double>(rs.active);
  }
  const double active = active_sum / R;
  const double bytes = active * kExpertBytes;
  const double flops = 6.0 * S * kD * kI;

  // Routing alone.
  double route_ms = 0;
  if (!TimeMs([&](int i) {
        RouteSet& rs = sets[i % R];
        rp.logits = rs.logits.as<float>();
        rp.topk_ids = rs.ids.as<int32_t>();
        rp.topk_weights = rs.wts.as<float>();
        return MoeRoute(rp, s).ok();
      }, 20, quick ? 5 : 11, 5, s, &route_ms)) {
    return false;
  }

  // Ours.
  MoeExpertsParams p;
  p.num_tokens = T;
  p.hidden = kD;
  p.inter = kI;
  p.num_experts = kE;
  p.top_k = kK;
  p.weight_dtype = DType::kBF16;
  p.w1 = static_cast<const void* const*>(p1.get());
  p.w3 = static_cast<const void* const*>(p3.get());
  p.w2 = static_cast<const void* const*>(p2.get());
  DeviceBuffer out(T * kD * 4), ws(MoeWorkspaceBytes(p));
  if (!out.ok() || !ws.ok()) return false;
  p.out = out.as<float>();
  auto set_params = [&](int i) {
    RouteSet& rs = sets[i % R];
    p.x = rs.x.as<float>();
    p.topk_ids = rs.ids.as<int32_t>();
    p.topk_weights = rs.wts.as<float>();
  };
  const int per_batch = decode ? 16 : 2, batches = quick ? 5 : 11;
  double ms = 0;
  if (!TimeMs([&](int i) {
        set_params(i);
        return MoeExperts(p, ws.get(), ws.bytes(), s).ok();
      }, per_batch, batches, 4, s, &ms)) {
    return false;
  }
  double graph_ms = 0;
  if (decode) {
    std::vector<cudaGraphExec_t> execs(R);
    for (int r = 0; r < R; ++r) {
      set_params(r);
      cudaGraph_t g;
      BENCH_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      const absl::Status st = MoeExperts(p, ws.get(), ws.bytes(), s);
      BENCH_CHECK(cudaStreamEndCapture(s, &g));
      BENCH_STATUS(st);
      BENCH_CHECK(cudaGraphInstantiate(&execs[r], g, 0));
      cudaGraphDestroy(g);
    }
    if (!TimeMs([&](int i) { return cudaGraphLaunch(execs[i % R], s) == cudaSuccess; },
                per_batch, batches, 4, s, &graph_ms)) {
      return false;
    }
    for (auto& e : execs) cudaGraphExecDestroy(e);
  }

  // cuBLAS loop over the active experts (host-known counts), same routing sets.
  DeviceBuffer xs(S * kD * 2), h1(S * kI * 2), h3(S * kI * 2), y(S * kD * 4);
  if (!xs.ok() || !h1.ok() || !h3.ok() || !y.ok()) return false;
  BENCH_CHECK(FillUniform(xs.get(), S * kD, true, -1, 1, 300 + T, s));
  const float one = 1.0f, zero = 0.0f;
  auto cublas_call = [&](int i) {
    const RouteSet& rs = sets[i % R];
    int64_t off = 0;
    for (int64_t e = 0; e < kE; ++e) {
      const int m = rs.counts[e];
      if (m == 0) continue;
      const char* xe = static_cast<const char*>(xs.get()) + off * kD * 2;
      char* g = static_cast<char*>(h1.get()) + off * kI * 2;
      char* u = static_cast<char*>(h3.get()) + off * kI * 2;
      char* ye = static_cast<char*>(y.get()) + off * kD * 4;
      if (cublasGemmEx(cb, CUBLAS_OP_T, CUBLAS_OP_N, kI, m, kD, &one, w1[e], CUDA_R_16BF, kD, xe,
                       CUDA_R_16BF, kD, &zero, g, CUDA_R_16BF, kI, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS ||
          cublasGemmEx(cb, CUBLAS_OP_T, CUBLAS_OP_N, kI, m, kD, &one, w3[e], CUDA_R_16BF, kD, xe,
                       CUDA_R_16BF, kD, &zero, u, CUDA_R_16BF, kI, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS ||
          cublasGemmEx(cb, CUBLAS_OP_T, CUBLAS_OP_N, kD, m, kI, &one, w2[e], CUDA_R_16BF, kI, g,
                       CUDA_R_16BF, kI, &zero, ye, CUDA_R_32F, kD, CUBLAS_COMPUTE_32F,
                       CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
        return false;
      }
      off += m;
    }
    return true;
  };
  double cublas_ms = 0;
  if (!TimeMs(cublas_call, decode ? 4 : 1, batches, 2, s, &cublas_ms)) return false;

  const double best_ms = decode ? std::min(ms, graph_ms) : ms;
  char line[512];
  std::snprintf(line, sizeof(line),
                "%s T=%-5lld active experts %5.1f  route %7.1f us  moe %8.1f us%s  "
                "weights %5.2f TB/s (%3.0f%% of copy)  %6.1f TFLOP/s (%4.1f%% of GEMM)  "
                "cuBLAS loop %8.1f us (%4.2fx ours)",
                decode ? "decode " : "prefill", static_cast<long long>(T), active,
                route_ms * 1e3, ms * 1e3,
                decode ? (std::string(" graph ") + std::to_string(static_cast<int>(graph_ms * 1e3 + 0.5)) + " us").c_str() : "",
                bytes / (best_ms * 1e-3) / 1e12, 100.0 * bytes / (best_ms * 1e-3) / 1e12 / c.copy_tbs,
                flops / (best_ms * 1e-3) / 1e12, 100.0 * flops / (best_ms * 1e-3) / 1e12 / c.gemm_tflops,
                cublas_ms * 1e3, cublas_ms / best_ms);
  std::printf("%s\n", line);
  rows->push_back(line);
  return true;
}

// A few launches per shape for a profiler: T = 1, 64 (skinny) and 4096 (tiled).
bool Profile() {
  cudaStream_t s;
  BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const size_t mat = static_cast<size_t>(kD * kI);
  DeviceBuffer weights(3 * kE * mat * 2);
  if (!weights.ok()) return false;
  BENCH_CHECK(FillUniform(weights.get(), static_cast<int64_t>(3 * kE * mat), true, -0.03f, 0.03f,
                          7, s));
  std::vector<const void*> w1(kE), w3(kE), w2(kE);
  for (int64_t e = 0; e < kE; ++e) {
    const char* base = static_cast<const char*>(weights.get()) + 3 * e * mat * 2;
    w1[e] = base;
    w3[e] = base + mat * 2;
    w2[e] = base + 2 * mat * 2;
  }
  DeviceBuffer p1(kE * sizeof(void*)), p3(kE * sizeof(void*)), p2(kE * sizeof(void*));
  BENCH_CHECK(cudaMemcpy(p1.get(), w1.data(), p1.bytes(), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(p3.get(), w3.data(), p3.bytes(), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(p2.get(), w2.data(), p2.bytes(), cudaMemcpyHostToDevice));
  for (int64_t T : {1, 64, 4096}) {
    const int64_t S = T * kK;
    DeviceBuffer logits(T * kE * 4), x(T * kD * 4), ids(S * 4), wts(S * 4), out(T * kD * 4);
    BENCH_CHECK(FillUniform(logits.get(), T * kE, false, -4, 4, 11 + T, s));
    BENCH_CHECK(FillUniform(x.get(), T * kD, false, -1, 1, 12 + T, s));
    MoeRouteParams rp;
    rp.num_tokens = T;
    rp.num_experts = kE;
    rp.top_k = kK;
    rp.routed_scaling_factor = 2.446;
    rp.logits = logits.as<float>();
    rp.topk_ids = ids.as<int32_t>();
    rp.topk_weights = wts.as<float>();
    BENCH_STATUS(MoeRoute(rp, s));
    MoeExpertsParams p;
    p.num_tokens = T;
    p.hidden = kD;
    p.inter = kI;
    p.num_experts = kE;
    p.top_k = kK;
    p.weight_dtype = DType::kBF16;
    p.x = x.as<float>();
    p.topk_ids = ids.as<int32_t>();
    p.topk_weights = wts.as<float>();
    p.w1 = static_cast<const void* const*>(p1.get());
    p.w3 = static_cast<const void* const*>(p3.get());
    p.w2 = static_cast<const void* const*>(p2.get());
    p.out = out.as<float>();
    DeviceBuffer ws(MoeWorkspaceBytes(p));
    for (int i = 0; i < 2; ++i) BENCH_STATUS(MoeExperts(p, ws.get(), ws.bytes(), s));
    BENCH_CHECK(cudaStreamSynchronize(s));
  }
  cudaStreamDestroy(s);
  std::printf("profile run done\n");
  return true;
}

bool Run(bool quick) {
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB, %zu MiB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, prop.totalGlobalMem >> 20);
  cudaStream_t s;
  BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cublasHandle_t cb;
  BENCH_CUBLAS(cublasCreate(&cb));
  BENCH_CUBLAS(cublasSetStream(cb, s));
  Ceilings c;
  if (!MeasureCeilings(s, cb, quick, &c)) return false;

  // All expert weights in one allocation, U(-0.03, 0.03) (about N(0, 1/D) scale).
  const size_t mat = static_cast<size_t>(kD * kI);
  DeviceBuffer weights(3 * kE * mat * 2);
  if (!weights.ok()) return false;
  BENCH_CHECK(FillUniform(weights.get(), static_cast<int64_t>(3 * kE * mat), true, -0.03f, 0.03f,
                          7, s));
  std::vector<const void*> w1(kE), w3(kE), w2(kE);
  for (int64_t e = 0; e < kE; ++e) {
    const char* base = static_cast<const char*>(weights.get()) + 3 * e * mat * 2;
    w1[e] = base;
    w3[e] = base + mat * 2;
    w2[e] = base + 2 * mat * 2;
  }
  DeviceBuffer p1(kE * sizeof(void*)), p3(kE * sizeof(void*)), p2(kE * sizeof(void*));
  BENCH_CHECK(cudaMemcpy(p1.get(), w1.data(), p1.bytes(), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(p3.get(), w3.data(), p3.bytes(), cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(p2.get(), w2.data(), p2.bytes(), cudaMemcpyHostToDevice));

  std::vector<std::string> rows;
  for (int64_t T : {1, 16, 64, 4096}) {
    if (!BenchShape(s, cb, quick, c, w1, w3, w2, p1, p3, p2, T, &rows)) return false;
  }
  std::printf("\n== summary (%s)\n", prop.name);
  std::printf("ceiling: copy %.3f TB/s, cuBLAS bf16 GEMM %.1f TFLOP/s\n", c.copy_tbs,
              c.gemm_tflops);
  std::printf("MoE 48B shape: E=%lld k=%lld D=%lld I=%lld, bf16 weights (%.1f MB per expert)\n",
              static_cast<long long>(kE), static_cast<long long>(kK), static_cast<long long>(kD),
              static_cast<long long>(kI), kExpertBytes / 1e6);
  for (const std::string& r : rows) std::printf("%s\n", r.c_str());
  cublasDestroy(cb);
  cudaStreamDestroy(s);
  return true;
}

}  // namespace
}  // namespace kl::cuda

int main(int argc, char** argv) {
  bool quick = false, profile = false;
  for (int i = 1; i < argc; ++i) {
    quick |= std::strcmp(argv[i], "--quick") == 0;
    profile |= std::strcmp(argv[i], "--profile") == 0;
  }
  if (!kl::cuda::testing::HasCudaDevice()) {
    std::printf("moe_bench: no CUDA device\n");
    return 0;
  }
  if (profile) return kl::cuda::Profile() ? 0 : 1;
  return kl::cuda::Run(quick) ? 0 : 1;
}
