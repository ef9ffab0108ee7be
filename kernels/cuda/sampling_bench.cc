// Benchmark of GPU token sampling (sampling.h) against what a decode worker does without
// it: download the [rows][vocab] fp32 logits (pinned memory) and run the host Sampler
// on each row. Vocabulary 163,840 (Kimi Linear), rows 1 / 16 / 64, four modes:
//   sampling_bench [--quick]
// GPU times: median of CUDA-event timings of 30 launches (logits already on the device,
// as the LM head leaves them). Host times: median of 5 rounds, one thread, the same rows.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "engine/sampling/sampler.h"
#include "kernels/common/splitmix64.h"
#include "kernels/cuda/bench_util.h"
#include "kernels/cuda/sampling.h"

namespace kl::cuda {
namespace {

using bench::Median;

struct Mode {
  const char* name;
  double temperature, top_p;
  int64_t top_k;
};

bool Run(bool quick) {
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n", prop.name);
  const int64_t vocab = 163840, max_rows = 64;
  std::vector<float> logits(max_rows * vocab);
  SplitMix64 rng(42);
  for (float& x : logits) x = static_cast<float>(rng.Normal() * 3.0);
  float *d_logits = nullptr, *pinned = nullptr;
  SampleRowParams* d_params = nullptr;
  int32_t* d_tokens = nullptr;
  BENCH_CHECK(cudaMalloc(&d_logits, logits.size() * sizeof(float)));
  BENCH_CHECK(cudaMalloc(&d_params, max_rows * sizeof(SampleRowParams)));
  BENCH_CHECK(cudaMalloc(&d_tokens, max_rows * sizeof(int32_t)));
  BENCH_CHECK(cudaMallocHost(&pinned, logits.size() * sizeof(float)));
  BENCH_CHECK(cudaMemcpy(d_logits, logits.data(), logits.size() * sizeof(float),
                        cudaMemcpyHostToDevice));
  cudaStream_t s;
  BENCH_CHECK(cudaStreamCreate(&s));
  cudaEvent_t e0, e1;
  BENCH_CHECK(cudaEventCreate(&e0));
  BENCH_CHECK(cudaEventCreate(&e1));
  const Mode modes[] = {{"greedy", 0.0, 1.0, 0},
                        {"T=1", 1.0, 1.0, 0},
                        {"T=0.8 top_p=0.95", 0.8, 0.95, 0},
                        {"T=0.7 top_k=50", 0.7, 1.0, 50}};
  const int gpu_reps = quick ? 10 : 30, host_reps = quick ? 3 : 5;
  for (int64_t rows : {1, 16, 64}) {
    for (const Mode& m : modes) {
      std::vector<SampleRowParams> ps(rows);
      for (int64_t r = 0; r < rows; ++r) {
        ps[r].temperature = m.temperature;
        ps[r].top_p = m.top_p;
        ps[r].top_k = m.top_k;
        ps[r].seed = 1000 + r;
        ps[r].draw_index = 7;
      }
      BENCH_CHECK(cudaMemcpy(d_params, ps.data(), rows * sizeof(SampleRowParams),
                            cudaMemcpyHostToDevice));
      std::vector<double> gpu;
      for (int i = 0; i < gpu_reps + 3; ++i) {
        BENCH_CHECK(cudaEventRecord(e0, s));
        if (!SampleTokens(d_logits, rows, vocab, vocab, d_params, d_tokens, s).ok()) return false;
        BENCH_CHECK(cudaEventRecord(e1, s));
        BENCH_CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        BENCH_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (i >= 3) gpu.push_back(ms * 1e3);
      }
      std::vector<int32_t> gpu_tokens(rows);
      BENCH_CHECK(cudaMemcpy(gpu_tokens.data(), d_tokens, rows * sizeof(int32_t),
                            cudaMemcpyDeviceToHost));
      std::vector<double> dl, host;
      int agree = 0;
      for (int i = 0; i < host_reps; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        BENCH_CHECK(cudaMemcpyAsync(pinned, d_logits, rows * vocab * sizeof(float),
                                   cudaMemcpyDeviceToHost, s));
        BENCH_CHECK(cudaStreamSynchronize(s));
        const auto t1 = std::chrono::steady_clock::now();
        agree = 0;
        for (int64_t r = 0; r < rows; ++r) {
          SamplingParams hp;
          hp.temperature = m.temperature;
          hp.top_p = m.top_p;
          hp.top_k = m.top_k;
          hp.seed = ps[r].seed;
          Sampler sampler(hp, static_cast<int64_t>(ps[r].draw_index));
          agree += sampler.Sample(pinned + r * vocab, vocab) == gpu_tokens[r];
        }
        const auto t2 = std::chrono::steady_clock::now();
        dl.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        host.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
      }
      const double g = Median(gpu), d = Median(dl), h = Median(host);
      std::printf(
          "sampling rows=%-3ld %-17s | GPU %9.1f us | host: download %8.1f us + sample %9.1f us "
          "| host / GPU %7.1fx | tokens equal %d/%ld\n",
          static_cast<long>(rows), m.name, g, d, h, (d + h) / g, agree, static_cast<long>(rows));
    }
  }
  cudaFreeHost(pinned);
  cudaFree(d_logits);
  cudaFree(d_params);
  cudaFree(d_tokens);
  return true;
}

}  // namespace
}  // namespace kl::cuda

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) quick |= std::strcmp(argv[i], "--quick") == 0;
  return kl::cuda::Run(quick) ? 0 : 1;
}
