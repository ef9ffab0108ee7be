// Benchmark of the CUDA KDA kernels with the two ceilings measured in the same run:
//   kda_bench [--quick] [--decode-only] | --profile | --exp | --stream-exp
// Prints: device; D2D copy bandwidth (1 GiB, read + write counted); cuBLAS bf16
// GEMM 8192^3; decode (N in {1, 4, 8, 16, 64, 256}, H = 32, K = V = 128, bf16 inputs,
// fp32 states rotating through a 2 GiB slot pool so every launch reads DRAM; N = 1
// also inside a CUDA graph); prefill (tensor-core path, B = 1, H = 32, T in {8K,
// 32K, 128K}) with the intra / state phase split. Times are medians of CUDA-event
// timings after warm-up. --quick: fewer repetitions, no 128K. --decode-only: no
// prefill. --profile: a few launches only, for ncu.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <unistd.h>

#include "kernels/cuda/bench_fill.h"
#include "kernels/cuda/bench_util.h"
#include "kernels/cuda/kda_chunk.h"
#include "kernels/cuda/kda_chunk_internal.h"
#include "kernels/cuda/kda_decode.h"
#include "kernels/cuda/kda_test_util.h"

namespace kl::cuda {
namespace {

using testing::DeviceBuffer;

using bench::Ceilings;
using bench::MeasureCeilings;
using bench::Median;
using bench::TimeMs;

struct Row {
  std::string text;
};

bool BenchDecode(cudaStream_t s, bool quick, const Ceilings& c, std::vector<Row>* rows) {
  const int64_t H = 32, K = 128, V = 128, P = 1024, Nmax = 256;
  const int64_t state_elems = H * K * V;
  DeviceBuffer pool(P * state_elems * 4), q(Nmax * H * K * 2), k(Nmax * H * K * 2),
      v(Nmax * H * V * 2), f(Nmax * H * K * 2), b(Nmax * H * 2), o(Nmax * H * V * 2),
      a_log(H * 4), dt_bias(H * K * 4);
  if (!pool.ok()) return false;
  BENCH_CHECK(FillUniform(pool.get(), P * state_elems, false, -0.3f, 0.3f, 10, s));
  BENCH_CHECK(FillUniform(q.get(), Nmax * H * K, true, -1, 1, 11, s));
  BENCH_CHECK(FillUniform(k.get(), Nmax * H * K, true, -1, 1, 12, s));
  BENCH_CHECK(FillUniform(v.get(), Nmax * H * V, true, -1, 1, 13, s));
  BENCH_CHECK(FillUniform(f.get(), Nmax * H * K, true, -3, 3, 14, s));
  BENCH_CHECK(FillUniform(b.get(), Nmax * H, true, -3, 3, 15, s));
  BENCH_CHECK(FillUniform(a_log.get(), H, false, 1, 16, 16, s, true));
  BENCH_CHECK(FillUniform(dt_bias.get(), H * K, false, -1, 1, 17, s));
  std::vector<int32_t> seq(P + Nmax);
  for (size_t i = 0; i < seq.size(); ++i) seq[i] = static_cast<int32_t>(i % P);
  DeviceBuffer slots(seq.size() * 4);
  BENCH_CHECK(cudaMemcpy(slots.get(), seq.data(), slots.bytes(), cudaMemcpyHostToDevice));

  KdaDecodeParams p;
  p.num_heads = H;
  p.num_slots = P;
  p.q = q.get();
  p.k = k.get();
  p.v = v.get();
  p.f = f.get();
  p.b = b.get();
  p.a_log = a_log.as<float>();
  p.dt_bias = dt_bias.as<float>();
  p.state_pool = pool.as<float>();
  p.o = o.get();
  std::printf("\n== decode: bf16 q/k/v/f/b, fp32 state in place (slot pool of %ld x 2 MiB), H=32, K=V=128\n",
              static_cast<long>(P));
  std::printf("%6s %12s %14s %10s %12s %12s\n", "N", "us/launch", "state GB/s", "% copy",
              "touch us", "% of touch");
  for (int64_t N : {1, 4, 8, 16, 64, 256}) {
    p.num_seqs = p.num_tokens = N;
    auto call = [&](int i) {
      p.slots = slots.as<int32_t>() + (static_cast<int64_t>(i) * N) % P;
      return KdaRecurrentDecode(p, s).ok();
    };
    double ms = 0;
    const int per_batch = N <= 16 ? 200 : 20;
    if (!TimeMs(call, per_batch, quick ? 5 : 11, 20, s, &ms)) return false;
    const double bytes = 2.0 * N * state_elems * 4;
    const double gbs = bytes / (ms * 1e-3) / 1e9;
    // The same slots read and written back with no math, in the same rotation:
    // the in-place ceiling of this many bytes (launch, ramp and tail included),
    // next to the 1 GiB copy rate the goal is stated against.
    double touch_ms = 0;
    auto touch = [&](int i) {
      const int32_t* sl = slots.as<int32_t>() + (static_cast<int64_t>(i) * N) % P;
      return TouchSlots(pool.as<float>(), sl, N, state_elems, 1.0f, s) == cudaSuccess;
    };
    if (!TimeMs(touch, per_batch, quick ? 5 : 11, 20, s, &touch_ms)) return false;
    std::printf("%6ld %12.2f %14.1f %9.1f%% %12.2f %11.1f%%\n", static_cast<long>(N), ms * 1e3,
                gbs, 100.0 * gbs / (c.copy_tbs * 1e3), touch_ms * 1e3, 100.0 * touch_ms / ms);
    char buf[320];
    std::snprintf(buf, sizeof(buf), "decode N=%-4ld (stream, back-to-back) | %8.2f us | %7.1f GB/s state | %5.1f%% of copy | %5.1f%% of in-place touch (%.2f us)",
                  static_cast<long>(N), ms * 1e3, gbs, 100.0 * gbs / (c.copy_tbs * 1e3),
                  100.0 * touch_ms / ms, touch_ms * 1e3);
    rows->push_back({buf});
    // The no-math ceilings of the same bytes in two other access patterns: the decode
    // kernel's own (the pool layout, kda_state_layout.h: a block's 32-column slice is 16 KB
    // contiguous) and that of the row-major [K][V] layout used before (a block reads 128 B
    // of every 512-B state row).
    if (N >= 16) {
      double pat_ms = 0, sm_ms = 0;
      auto touch_in = [&](bool contiguous) {
        return [&, contiguous](int i) {
          const int32_t* sl = slots.as<int32_t>() + (static_cast<int64_t>(i) * N) % P;
          return TouchDecodePattern(pool.as<float>(), sl, N, H, contiguous, s) == cudaSuccess;
        };
      };
      if (!TimeMs(touch_in(false), per_batch, quick ? 5 : 11, 20, s, &pat_ms)) return false;
      if (!TimeMs(touch_in(true), per_batch, quick ? 5 : 11, 20, s, &sm_ms)) return false;
      std::snprintf(buf, sizeof(buf),
                    "  no-math ceilings: pool layout, 16 KB contiguous per block %.2f us (%.1f%% of copy; "
                    "decode = %.1f%% of it) | row-major slices (old layout) %.2f us (%.1f%%)",
                    sm_ms * 1e3, 100.0 * bytes / (sm_ms * 1e-3) / 1e12 / c.copy_tbs, 100.0 * sm_ms / ms,
                    pat_ms * 1e3, 100.0 * bytes / (pat_ms * 1e-3) / 1e12 / c.copy_tbs);
      std::printf("%s\n", buf);
      rows->push_back({buf});
    }
  }
  // N = 1 inside a CUDA graph: 256 captured launches on distinct slots (512 MiB, > L2).
  {
    const int G = 256;
    p.num_seqs = p.num_tokens = 1;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    BENCH_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < G; ++i) {
      p.slots = slots.as<int32_t>() + i;
      BENCH_STATUS(KdaRecurrentDecode(p, s));
    }
    BENCH_CHECK(cudaStreamEndCapture(s, &graph));
    BENCH_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    double ms = 0;
    if (!TimeMs([&](int) { return cudaGraphLaunch(exec, s) == cudaSuccess; }, 1, quick ? 5 : 21, 3, s, &ms)) {
      return false;
    }
    const double us = ms * 1e3 / G;
    std::printf("N=1 inside a CUDA graph (%d launches, distinct slots): %.2f us per layer (32 heads)\n", G, us);
    char buf[200];
    std::snprintf(buf, sizeof(buf), "decode N=1    (CUDA graph)           | %8.2f us | %7.1f GB/s state | %5.1f%% of copy",
                  us, 2.0 * state_elems * 4 / (us * 1e-6) / 1e9,
                  100.0 * (2.0 * state_elems * 4 / (us * 1e-6) / 1e12) / c.copy_tbs);
    rows->push_back({buf});
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  return true;
}

// Random B = 1 (or varlen) prefill inputs for H = 32, K = V = 128 up to Tmax tokens,
// num_slots (>= 4) state slots, and a workspace sized for Tmax tokens and up to 4 sequences.
struct PrefillData {
  static constexpr int64_t H = 32, K = 128, V = 128;
  DeviceBuffer q, k, v, f, b, o, a_log, dt_bias, pool, slot, cu;
  KdaChunkParams p;
  DeviceBuffer ws;
  bool Init(int64_t Tmax, cudaStream_t s, int64_t num_slots = 4) {
    q = DeviceBuffer(Tmax * H * K * 2);
    k = DeviceBuffer(Tmax * H * K * 2);
    v = DeviceBuffer(Tmax * H * V * 2);
    f = DeviceBuffer(Tmax * H * K * 2);
    b = DeviceBuffer(Tmax * H * 2);
    o = DeviceBuffer(Tmax * H * V * 2);
    a_log = DeviceBuffer(H * 4);
    dt_bias = DeviceBuffer(H * K * 4);
    pool = DeviceBuffer(num_slots * H * K * V * 4);
    slot = DeviceBuffer(num_slots * 4);
    cu = DeviceBuffer(5 * 8);
    if (!q.ok() || !k.ok() || !v.ok() || !f.ok() || !o.ok()) return false;
    BENCH_CHECK(FillUniform(q.get(), Tmax * H * K, true, -1, 1, 21, s));
    BENCH_CHECK(FillUniform(k.get(), Tmax * H * K, true, -1, 1, 22, s));
    BENCH_CHECK(FillUniform(v.get(), Tmax * H * V, true, -1, 1, 23, s));
    BENCH_CHECK(FillUniform(f.get(), Tmax * H * K, true, -3, 3, 24, s));
    BENCH_CHECK(FillUniform(b.get(), Tmax * H, true, -3, 3, 25, s));
    BENCH_CHECK(FillUniform(a_log.get(), H, false, 1, 16, 26, s, true));
    BENCH_CHECK(FillUniform(dt_bias.get(), H * K, false, -1, 1, 27, s));
    BENCH_CHECK(FillUniform(pool.get(), num_slots * H * K * V, false, -0.3f, 0.3f, 28, s));
    std::vector<int32_t> sl(num_slots);
    for (int64_t i = 0; i < num_slots; ++i) sl[i] = static_cast<int32_t>(i);
    BENCH_CHECK(cudaMemcpy(slot.get(), sl.data(), slot.bytes(), cudaMemcpyHostToDevice));
    p.num_seqs = 4;
    p.num_heads = H;
    p.num_slots = num_slots;
    p.algo = KdaChunkAlgo::kTensorCore;
    p.q = q.get();
    p.k = k.get();
    p.v = v.get();
    p.f = f.get();
    p.b = b.get();
    p.a_log = a_log.as<float>();
    p.dt_bias = dt_bias.as<float>();
    p.cu_seqlens = cu.as<int64_t>();
    p.slots = slot.as<int32_t>();
    p.state_pool = pool.as<float>();
    p.o = o.get();
    p.num_tokens = Tmax;
    ws = DeviceBuffer(KdaChunkWorkspaceBytes(p));  // the largest of 1..4 sequences
    p.num_seqs = 1;
    return ws.ok();
  }
  // n equal sequences of T / n tokens each.
  bool SetShape(int64_t T, int n) {
    int64_t cu_h[5] = {};
    for (int i = 1; i <= n; ++i) cu_h[i] = T * i / n;
    p.num_tokens = T;
    p.num_seqs = n;
    return cudaMemcpy(cu.get(), cu_h, sizeof(int64_t) * (n + 1), cudaMemcpyHostToDevice) == cudaSuccess;
  }
};

bool BenchPrefill(cudaStream_t s, bool quick, const Ceilings& c, std::vector<Row>* rows) {
  const int64_t H = 32, K = 128, V = 128;
  const int64_t Tmax = quick ? 32768 : 131072;
  PrefillData d;
  if (!d.Init(Tmax, s)) return false;
  KdaChunkParams& p = d.p;
  DeviceBuffer& ws = d.ws;
  std::printf("\n== prefill: tensor-core path, bf16, B=1, H=32, K=V=128, C=64 (workspace %.2f GB at T=%ld)\n",
              ws.bytes() / 1e9, static_cast<long>(Tmax));
  std::printf("%8s %9s %11s %9s %9s %9s %10s %8s %10s %10s\n", "T", "ms", "seq. ms", "intra ms", "state ms",
              "Mtok/s", "TFLOP/s", "%GEMM", "TB/s(min)", "TB/s(all)");
  cudaEvent_t e0, e1, e2;
  BENCH_CHECK(cudaEventCreate(&e0));
  BENCH_CHECK(cudaEventCreate(&e1));
  BENCH_CHECK(cudaEventCreate(&e2));
  for (int64_t T : {int64_t{8192}, int64_t{32768}, int64_t{131072}}) {
    if (T > Tmax) continue;
    if (!d.SetShape(T, 1)) return false;
    const int reps = quick ? 3 : (T <= 8192 ? 21 : T <= 32768 ? 11 : 5);
    // Default: the streamed or the segmented intra / state pipeline (one total time).
    std::vector<double> tot, seq, intra, state;
    for (int r = 0; r < reps + 2; ++r) {
      BENCH_CHECK(cudaEventRecord(e0, s));
      BENCH_CHECK(internal::LaunchChunkTc(p, ws.get(), s, nullptr));
      BENCH_CHECK(cudaEventRecord(e2, s));
      BENCH_CHECK(cudaEventSynchronize(e2));
      if (r < 2) continue;  // warm-up
      float x = 0;
      BENCH_CHECK(cudaEventElapsedTime(&x, e0, e2));
      tot.push_back(x);
    }
    // Sequential (intra kernel, then state kernel), with the phase split.
    for (int r = 0; r < reps + 2; ++r) {
      BENCH_CHECK(cudaEventRecord(e0, s));
      BENCH_CHECK(internal::LaunchChunkTc(p, ws.get(), s, e1));
      BENCH_CHECK(cudaEventRecord(e2, s));
      BENCH_CHECK(cudaEventSynchronize(e2));
      if (r < 2) continue;
      float a = 0, bb = 0;
      BENCH_CHECK(cudaEventElapsedTime(&a, e0, e1));
      BENCH_CHECK(cudaEventElapsedTime(&bb, e1, e2));
      intra.push_back(a);
      state.push_back(bb);
      seq.push_back(a + bb);
    }
    const double ms = Median(tot), ms_seq = Median(seq), ms_i = Median(intra), ms_s = Median(state);
    const double n = 64, chunks = std::ceil(T / 64.0);
    const double flops = 2.0 * (2 * n * n * K + n * n * n / 6 + n * n * (K + V) + 3 * n * K * V + n * n * V) * chunks * H;
    const double min_bytes = T * H * (3.0 * 128 * 2 + 128 * 2 + 2 + 128 * 2) + 2.0 * H * K * V * 4;
    const double all_bytes = min_bytes + 2.0 * chunks * H * internal::kItemBytes;
    const double tflops = flops / (ms * 1e-3) / 1e12;
    const double tbs_min = min_bytes / (ms * 1e-3) / 1e12, tbs_all = all_bytes / (ms * 1e-3) / 1e12;
    std::printf("%8ld %9.3f %11.3f %9.3f %9.3f %9.2f %10.1f %7.1f%% %10.3f %10.3f\n", static_cast<long>(T), ms,
                ms_seq, ms_i, ms_s, T / (ms * 1e-3) / 1e6, tflops, 100.0 * tflops / c.gemm_tflops, tbs_min, tbs_all);
    char buf[320];
    std::snprintf(buf, sizeof(buf),
                  "prefill T=%-6ld | %8.3f ms pipelined (sequential %.3f = intra %.3f + state %.3f) | %6.2f Mtok/s | %5.1f TFLOP/s (%4.1f%% GEMM) | %5.3f TB/s min, %5.3f TB/s incl. workspace (%4.1f%% copy)",
                  static_cast<long>(T), ms, ms_seq, ms_i, ms_s, T / (ms * 1e-3) / 1e6, tflops,
                  100.0 * tflops / c.gemm_tflops, tbs_min, tbs_all, 100.0 * tbs_all / c.copy_tbs);
    rows->push_back({buf});
  }
  // Pipeline schedule sweep: segment length, first / last segment sizes.
  struct Sched {
    bool stream;
    int seg, head, tail;  // TcTuning::stream, seg_chunks, head_chunks, tail_chunks
  };
  for (int64_t T : {int64_t{8192}, int64_t{32768}, int64_t{131072}}) {
    if (T > Tmax) continue;
    if (!d.SetShape(T, 1)) return false;
    for (const Sched sc : {Sched{true, -1, 0, 0}, Sched{false, -1, 0, 0}, Sched{false, -1, 0, 8},
                           Sched{false, -1, 8, 8}, Sched{false, 16, 0, 8}, Sched{false, 64, 0, 0}}) {
      internal::TcTuning t;
      t.stream = sc.stream;
      t.stream_max_chunks = 0;
      t.seg_chunks = sc.seg;
      t.head_chunks = sc.head;
      t.tail_chunks = sc.tail;
      internal::SetTcTuning(t);
      std::vector<double> v;
      for (int r = 0; r < (quick ? 3 : T <= 32768 ? 9 : 5) + 1; ++r) {
        BENCH_CHECK(cudaEventRecord(e0, s));
        BENCH_CHECK(internal::LaunchChunkTc(p, ws.get(), s, nullptr));
        BENCH_CHECK(cudaEventRecord(e2, s));
        BENCH_CHECK(cudaEventSynchronize(e2));
        float x = 0;
        BENCH_CHECK(cudaEventElapsedTime(&x, e0, e2));
        if (r > 0) v.push_back(x);
      }
      if (sc.stream) {
        std::printf("pipelined T=%ld, streamed: %.3f ms\n", static_cast<long>(T), Median(v));
      } else {
        std::printf("pipelined T=%ld, segmented: seg %d (-1: adaptive) head %d tail %d: %.3f ms\n",
                    static_cast<long>(T), sc.seg, sc.head, sc.tail, Median(v));
      }
    }
    internal::SetTcTuning(internal::TcTuning{});
  }
  // State-pass implementation: wgmma (default) vs mma.sync, T = 32K.
  {
    const int64_t T = std::min<int64_t>(32768, Tmax);
    if (!d.SetShape(T, 1)) return false;
    for (auto impl : {internal::TcStateImpl::kWgmma, internal::TcStateImpl::kMmaSync}) {
      internal::SetTcStateImpl(impl);
      std::vector<double> state;
      for (int r = 0; r < (quick ? 3 : 7); ++r) {
        BENCH_CHECK(internal::LaunchChunkTc(p, ws.get(), s, e1));
        BENCH_CHECK(cudaEventRecord(e2, s));
        BENCH_CHECK(cudaEventSynchronize(e2));
        float bb = 0;
        BENCH_CHECK(cudaEventElapsedTime(&bb, e1, e2));
        if (r > 0) state.push_back(bb);
      }
      std::printf("state pass T=%ld, %s: %.3f ms\n", static_cast<long>(T),
                  impl == internal::TcStateImpl::kWgmma ? "wgmma" : "mma.sync", Median(state));
    }
    internal::SetTcStateImpl(internal::TcStateImpl::kWgmma);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaEventDestroy(e2);
  return true;
}

// --exp: experiments on the tensor-core prefill (phase costs, L2 prefetch, L2-hot state).
bool Exp() {
  cudaStream_t s;
  BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  PrefillData d;
  if (!d.Init(32768, s)) return false;
  KdaChunkParams& p = d.p;
  DeviceBuffer& ws = d.ws;
  DeviceBuffer flush(size_t{256} << 20);
  cudaEvent_t e0, e1, e2;
  BENCH_CHECK(cudaEventCreate(&e0));
  BENCH_CHECK(cudaEventCreate(&e1));
  BENCH_CHECK(cudaEventCreate(&e2));
  // Median (intra, state) ms over `reps` calls with tuning t; flush L2 before each if asked.
  auto run = [&](int64_t T, internal::TcTuning t, int reps, bool flush_l2, double* mi, double* ms) {
    if (!d.SetShape(T, 1)) return false;
    std::vector<double> vi, vs;
    for (int r = 0; r < reps + 1; ++r) {
      if (flush_l2 && cudaMemsetAsync(flush.get(), r, flush.bytes(), s) != cudaSuccess) return false;
      internal::SetTcTuning(t);
      if (cudaEventRecord(e0, s) != cudaSuccess) return false;
      if (internal::LaunchChunkTc(p, ws.get(), s, e1) != cudaSuccess) return false;
      if (cudaEventRecord(e2, s) != cudaSuccess || cudaEventSynchronize(e2) != cudaSuccess) return false;
      float x = 0, y = 0;
      cudaEventElapsedTime(&x, e0, e1);
      cudaEventElapsedTime(&y, e1, e2);
      if (r > 0) {
        vi.push_back(x);
        vs.push_back(y);
      }
    }
    internal::SetTcTuning(internal::TcTuning{});
    *mi = Median(vi);
    *ms = Median(vs);
    return true;
  };
  double mi = 0, ms = 0;
  // Pipelined total for a tuning (after_intra = null), median of `reps`.
  auto run_total = [&](int64_t T, internal::TcTuning t, int reps, double* tot) {
    if (!d.SetShape(T, 1)) return false;
    internal::SetTcTuning(t);
    std::vector<double> v;
    for (int r = 0; r < reps + 1; ++r) {
      if (cudaEventRecord(e0, s) != cudaSuccess) return false;
      if (internal::LaunchChunkTc(p, ws.get(), s, nullptr) != cudaSuccess) return false;
      if (cudaEventRecord(e2, s) != cudaSuccess || cudaEventSynchronize(e2) != cudaSuccess) return false;
      float x = 0;
      cudaEventElapsedTime(&x, e0, e2);
      if (r > 0) v.push_back(x);
    }
    internal::SetTcTuning(internal::TcTuning{});
    *tot = Median(v);
    return true;
  };
  for (int64_t T : {int64_t{8192}, int64_t{32768}}) {
    internal::TcTuning t;
    t.seg_chunks = 0;
    if (!run(T, t, 7, false, &mi, &ms)) return false;
    std::printf("exp T=%ld sequential: intra %.4f state %.4f total %.4f ms (state %.3f us/chunk)\n", (long)T, mi,
                ms, mi + ms, ms * 1e3 / (T / 64));
    for (int stop = 1; stop <= 6; ++stop) {
      t = internal::TcTuning{};
      t.seg_chunks = 0;
      t.stop_after = stop;
      t.skip_state = true;
      if (!run(T, t, 7, false, &mi, &ms)) return false;
      std::printf("exp T=%ld intra stop_after=%d: %.4f ms\n", (long)T, stop, mi);
    }
    t = internal::TcTuning{};
    t.seg_chunks = 0;
    t.skip_intra = true;
    if (!run(T, t, 5, true, &mi, &ms)) return false;
    std::printf("exp T=%ld state-only (L2 flushed): %.4f ms, %.3f us/chunk\n", (long)T, ms, ms * 1e3 / (T / 64));
    for (int seg : {16, 32, 64}) {
      for (int head : {0, 8}) {
        for (int tail : {0, 8}) {
          for (int streams : {2, 4}) {
            t = internal::TcTuning{};
            t.stream = false;
            t.seg_chunks = seg;
            t.head_chunks = head;
            t.tail_chunks = tail;
            t.intra_streams = streams;
            double tot = 0;
            if (!run_total(T, t, 7, &tot)) return false;
            std::printf("exp T=%ld pipelined seg=%d head=%d tail=%d streams=%d: %.4f ms\n", (long)T, seg, head, tail,
                        streams, tot);
          }
        }
      }
    }
    for (int seg : {32, 64}) {  // the state CTAs with an SM each (no intra CTA beside them)
      t = internal::TcTuning{};
      t.seg_chunks = seg;
      t.state_alone = true;
      double tot = 0;
      if (!run_total(T, t, 7, &tot)) return false;
      std::printf("exp T=%ld pipelined seg=%d, state CTAs alone on their SMs: %.4f ms\n", (long)T, seg, tot);
    }
    for (int seg : {16, 32, 64}) {
      t = internal::TcTuning{};
      t.seg_chunks = seg;
      t.skip_state = true;
      double tot = 0;
      if (!run_total(T, t, 7, &tot)) return false;
      std::printf("exp T=%ld pipelined intra launches only (seg %d): %.4f ms\n", (long)T, seg, tot);
    }
    // The state pass with an intra kernel running beside it (what the pipeline's state
    // CTAs see): the intra kernel alone on a low-priority stream, then at once the state
    // pass alone on a high-priority stream, over the items of the previous call (the
    // intra kernel rewrites the same items with the same bytes). The state pass's time
    // per chunk here against its time alone says how much sharing SMs slows the chains.
    {
      int least = 0, greatest = 0;
      BENCH_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
      cudaStream_t si, ss;
      BENCH_CHECK(cudaStreamCreateWithPriority(&si, cudaStreamNonBlocking, least));
      BENCH_CHECK(cudaStreamCreateWithPriority(&ss, cudaStreamNonBlocking, greatest));
      cudaEvent_t a0, a1, b0, b1;
      for (cudaEvent_t* e : {&a0, &a1, &b0, &b1}) BENCH_CHECK(cudaEventCreate(e));
      std::vector<double> vin, vst;
      for (int r = 0; r < 6; ++r) {
        internal::TcTuning ti;
        ti.seg_chunks = 0;
        ti.skip_state = true;
        internal::SetTcTuning(ti);
        BENCH_CHECK(cudaEventRecord(a0, si));
        BENCH_CHECK(internal::LaunchChunkTc(p, ws.get(), si, nullptr));
        BENCH_CHECK(cudaEventRecord(a1, si));
        internal::TcTuning ts;
        ts.seg_chunks = 0;
        ts.skip_intra = true;
        internal::SetTcTuning(ts);
        BENCH_CHECK(cudaEventRecord(b0, ss));
        BENCH_CHECK(internal::LaunchChunkTc(p, ws.get(), ss, nullptr));
        BENCH_CHECK(cudaEventRecord(b1, ss));
        BENCH_CHECK(cudaEventSynchronize(a1));
        BENCH_CHECK(cudaEventSynchronize(b1));
        float x = 0, y = 0;
        cudaEventElapsedTime(&x, a0, a1);
        cudaEventElapsedTime(&y, b0, b1);
        if (r > 0) {
          vin.push_back(x);
          vst.push_back(y);
        }
      }
      internal::SetTcTuning(internal::TcTuning{});
      std::printf("exp T=%ld state pass beside the intra kernel: state %.4f ms (%.3f us/chunk), intra %.4f ms\n",
                  (long)T, Median(vst), Median(vst) * 1e3 / (T / 64), Median(vin));
      for (cudaEvent_t e : {a0, a1, b0, b1}) cudaEventDestroy(e);
      cudaStreamDestroy(si);
      cudaStreamDestroy(ss);
    }
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaEventDestroy(e2);
  return true;
}

// --stream-exp: the streamed mode (intra and state kernels at once, per-item flags) against
// the segmented pipeline, alternated three times in one process: B = 1 at 8K / 32K / 128K
// and two sequences of 16K.
// Waits for `done` up to 10 s; past that, reads the streamed mode's ready flags on
// another stream (copies still run beside a stuck kernel) and reports.
bool WaitOrReport(cudaEvent_t done, const PrefillData& d, int round, const char* mode) {
  for (int i = 0; i < 10000; ++i) {
    const cudaError_t e = cudaEventQuery(done);
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady) {
      std::printf("error %s\n", cudaGetErrorString(e));
      return false;
    }
    usleep(1000);
  }
  const int64_t chunks = internal::MaxChunks(d.p.num_tokens, d.p.num_seqs), H = d.p.num_heads;
  const size_t flags_off = internal::TcWorkspaceBytes(d.p.num_tokens, d.p.num_seqs, H) -
                           internal::TcFlagsBytes(d.p.num_tokens, d.p.num_seqs, H);
  std::vector<int32_t> f(chunks * H);
  cudaStream_t side;
  cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking);
  cudaMemcpyAsync(f.data(), static_cast<unsigned char*>(d.ws.get()) + flags_off, f.size() * 4,
                  cudaMemcpyDeviceToHost, side);
  const cudaError_t e = cudaStreamSynchronize(side);
  int64_t set = 0, first_unset = -1;
  for (int64_t i = 0; i < chunks * H; ++i) {
    if (f[i] != 0) ++set;
    else if (first_unset < 0) first_unset = i;
  }
  std::printf("STUCK: T=%ld N=%ld mode %s round %d (copy: %s): %ld of %ld flags set, "
              "first unset %ld (chunk %ld head %ld)\n",
              static_cast<long>(d.p.num_tokens), static_cast<long>(d.p.num_seqs), mode, round, cudaGetErrorString(e),
              static_cast<long>(set), static_cast<long>(chunks * H), static_cast<long>(first_unset),
              static_cast<long>(first_unset / H), static_cast<long>(first_unset % H));
  std::fflush(stdout);
  std::_Exit(3);
}

bool StreamExp() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  cudaStream_t s;
  BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  PrefillData d;
  if (!d.Init(131072, s)) return false;
  cudaEvent_t e0, e1;
  BENCH_CHECK(cudaEventCreate(&e0));
  BENCH_CHECK(cudaEventCreate(&e1));
  struct Mode {
    const char* name;
    bool stream;
  };
  const Mode modes[] = {{"segmented", false}, {"streamed", true}};
  constexpr int kModes = sizeof(modes) / sizeof(modes[0]);
  struct Shape {
    int64_t T;
    int n;
  };
  for (const Shape sh : {Shape{8192, 1}, Shape{32768, 1}, Shape{131072, 1}, Shape{32768, 2}}) {
    if (!d.SetShape(sh.T, sh.n)) return false;
    const int reps = sh.T <= 32768 ? 9 : 5;
    std::vector<double> med[kModes];
    for (int round = 0; round < 3; ++round) {
      for (int m = 0; m < kModes; ++m) {
        internal::TcTuning t;
        t.stream = modes[m].stream;
        t.stream_max_chunks = 0;  // streamed at every length here
        internal::SetTcTuning(t);
        std::vector<double> v;
        for (int r = 0; r < reps + 1; ++r) {
          BENCH_CHECK(cudaEventRecord(e0, s));
          BENCH_CHECK(internal::LaunchChunkTc(d.p, d.ws.get(), s, nullptr));
          BENCH_CHECK(cudaEventRecord(e1, s));
          if (!WaitOrReport(e1, d, round, modes[m].name)) return false;
          float x = 0;
          BENCH_CHECK(cudaEventElapsedTime(&x, e0, e1));
          if (r > 0) v.push_back(x);
        }
        med[m].push_back(Median(v));
        std::printf("  T=%ld N=%d %s round %d: %.4f ms\n", static_cast<long>(sh.T), sh.n, modes[m].name, round,
                    med[m].back());
      }
    }
    internal::SetTcTuning(internal::TcTuning{});
    for (int m = 0; m < kModes; ++m) {
      std::printf("stream-exp T=%ld N=%d %-17s %.4f / %.4f / %.4f ms\n", static_cast<long>(sh.T), sh.n, modes[m].name,
                  med[m][0], med[m][1], med[m][2]);
    }
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaStreamDestroy(s);
  return true;
}

// --profile: two T = 8192 prefill calls and one N = 64 decode launch, for ncu.
bool Profile() {
  cudaStream_t s;
  BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const int64_t H = PrefillData::H, T = 8192;
  PrefillData pd;
  if (!pd.Init(T, s, 64) || !pd.SetShape(T, 1)) return false;
  internal::TcTuning t;
  t.stream = false;
  t.seg_chunks = 0;  // one intra and one state launch per call, one after the other (whole kernels for ncu)
  internal::SetTcTuning(t);
  for (int i = 0; i < 2; ++i) BENCH_STATUS(KdaChunkPrefill(pd.p, pd.ws.get(), pd.ws.bytes(), s));
  internal::SetTcTuning(internal::TcTuning{});
  KdaDecodeParams d;
  d.num_seqs = d.num_tokens = 64;
  d.num_heads = H;
  d.num_slots = 64;
  d.q = pd.q.get();
  d.k = pd.k.get();
  d.v = pd.v.get();
  d.f = pd.f.get();
  d.b = pd.b.get();
  d.a_log = pd.a_log.as<float>();
  d.dt_bias = pd.dt_bias.as<float>();
  d.slots = pd.slot.as<int32_t>();
  d.state_pool = pd.pool.as<float>();
  d.o = pd.o.get();
  BENCH_STATUS(KdaRecurrentDecode(d, s));
  BENCH_CHECK(cudaStreamSynchronize(s));
  std::printf("profile run done\n");
  return true;
}

bool Run(bool quick, bool decode_only) {
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB, %zu MiB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, prop.totalGlobalMem >> 20);
  cudaStream_t s;
  BENCH_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Ceilings c;
  std::vector<Row> rows;
  if (!MeasureCeilings(s, quick, &c)) return false;
  if (!BenchDecode(s, quick, c, &rows)) return false;
  if (!decode_only && !BenchPrefill(s, quick, c, &rows)) return false;
  std::printf("\n== summary (%s)\n", prop.name);
  std::printf("ceiling: copy %.3f TB/s, cuBLAS bf16 GEMM %.1f TFLOP/s\n", c.copy_tbs, c.gemm_tflops);
  for (const Row& r : rows) std::printf("%s\n", r.text.c_str());
  cudaStreamDestroy(s);
  return true;
}

}  // namespace
}  // namespace kl::cuda

int main(int argc, char** argv) {
  bool quick = false, profile = false, exp = false, stream_exp = false, decode_only = false;
  for (int i = 1; i < argc; ++i) {
    quick |= std::strcmp(argv[i], "--quick") == 0;
    profile |= std::strcmp(argv[i], "--profile") == 0;
    exp |= std::strcmp(argv[i], "--exp") == 0;
    stream_exp |= std::strcmp(argv[i], "--stream-exp") == 0;
    decode_only |= std::strcmp(argv[i], "--decode-only") == 0;
  }
  if (!kl::cuda::testing::HasCudaDevice()) {
    std::printf("kda_bench: no CUDA device\n");
    return 0;
  }
  if (profile) return kl::cuda::Profile() ? 0 : 1;
  if (exp) return kl::cuda::Exp() ? 0 : 1;
  if (stream_exp) return kl::cuda::StreamExp() ? 0 : 1;
  return kl::cuda::Run(quick, decode_only) ? 0 : 1;
}
