// CPU engine benchmark: prefill and decode tokens/s of a config with random
// weights, and the fraction of this machine's measured fp32 GEMM peak that the
// linear layers reach. Not a test; numbers go to docs/benchmarks.md.
//   bazel run -c opt //engine/bench:engine_bench -- --config=tiny,100m
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <cblas.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "engine/backend/cpu_backend.h"
#include "engine/model/model.h"
#include "engine/model/random_source.h"
#include "kernels/common/parallel.h"

ABSL_FLAG(std::string, config, "tiny,100m", "comma list of: tiny, 100m");
ABSL_FLAG(int64_t, prompt_tokens, 512, "prefill length");
ABSL_FLAG(int64_t, decode_tokens, 32, "decode steps after the prefill");
ABSL_FLAG(std::string, decode_batches, "1,8", "decode batch sizes");
ABSL_FLAG(int32_t, threads, 0, "0 = all cores");

namespace kl {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Peak of a large square sgemm (the ceiling the linear layers are measured against).
double MeasureSgemmPeakGflops() {
  const int n = 2048;
  std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n);
  for (int i = 0; i < n * n; ++i) a[i] = static_cast<float>((i * 7919) % 1000) / 1000.0f;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n,
                0.0f, c.data(), n);
    best = std::max(best, 2.0 * n * n * n / Since(t0) / 1e9);
  }
  return best;
}

void Bench(const std::string& name, const ModelConfig& c, double peak) {
  CpuBackend backend;
  auto model = Model::Create(c, RandomTensorSource(1), &backend).value();
  const int64_t T = absl::GetFlag(FLAGS_prompt_tokens);
  std::vector<int32_t> prompt(T);
  for (int64_t i = 0; i < T; ++i) prompt[i] = static_cast<int32_t>((i * 2654435761u) % c.vocab_size);
  // Warm-up, then a timed prefill with GEMM accounting.
  {
    SequenceState s = model->NewState();
    ForwardItem it{&s, absl::MakeConstSpan(prompt.data(), 64), false};
    ForwardOutput out;
    (void)model->Forward(absl::MakeSpan(&it, 1), &out);
  }
  SequenceState st = model->NewState();
  ForwardItem it{&st, prompt, false};
  ForwardOutput out;
  backend.EnableLinearStats(true);
  auto t0 = Clock::now();
  if (!model->Forward(absl::MakeSpan(&it, 1), &out).ok()) std::abort();
  const double prefill_s = Since(t0);
  const auto ls = backend.linear_stats();
  backend.EnableLinearStats(false);
  std::printf("%-5s prefill T=%lld: %.3f s, %.0f tokens/s; linear layers %.1f GFLOP/s = %.0f%% of "
              "sgemm peak (%.0f%% of prefill time in GEMMs)\n",
              name.c_str(), static_cast<long long>(T), prefill_s, T / prefill_s,
              ls.flops / ls.seconds / 1e9, 100.0 * ls.flops / ls.seconds / 1e9 / peak,
              100.0 * ls.seconds / prefill_s);
  for (const auto& bs : absl::StrSplit(absl::GetFlag(FLAGS_decode_batches), ',')) {
    const int64_t B = std::stoll(std::string(bs));
    std::vector<SequenceState> states(B, st);
    std::vector<int32_t> toks(B, 1);
    const int64_t steps = absl::GetFlag(FLAGS_decode_tokens);
    t0 = Clock::now();
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<ForwardItem> items;
      for (int64_t b = 0; b < B; ++b) items.push_back({&states[b], absl::MakeConstSpan(&toks[b], 1), false});
      if (!model->Forward(absl::MakeSpan(items), &out).ok()) std::abort();
    }
    const double dt = Since(t0);
    std::printf("%-5s decode batch %lld at context %lld: %.2f ms/step, %.1f tokens/s\n",
                name.c_str(), static_cast<long long>(B), static_cast<long long>(T),
                dt / steps * 1e3, B * steps / dt);
  }
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_threads) > 0) kl::SetNumThreads(absl::GetFlag(FLAGS_threads));
  const double peak = kl::MeasureSgemmPeakGflops();
  std::printf("threads %d, OpenBLAS %s, sgemm 2048^3 peak %.1f GFLOP/s\n", kl::NumThreads(),
              openblas_get_config(), peak);
  for (const auto& name : absl::StrSplit(absl::GetFlag(FLAGS_config), ',')) {
    if (name == "tiny") kl::Bench("tiny", kl::TinyConfig(), peak);
    if (name == "100m") kl::Bench("100m", kl::Small100MConfig(), peak);
  }
  return 0;
}
