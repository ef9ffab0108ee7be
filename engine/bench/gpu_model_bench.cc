// Model-level GPU benchmark: prefill tokens/s and decode time per output token
// (batch 1 / 16 / 64) of a Kimi-Linear config with synthetic bf16 weights on the
// CUDA backend, against the bandwidth floor of what one decode step must read
// (weights touched + KDA states + MLA latents) at the copy bandwidth measured
// in the same run.
//
//   gpu_model_bench [--config=auto|48b|small|tiny] [--quick] [--decode_batches=1,4,16]
//                   [--sampling=device|host] [--temperature=T]
// "auto" runs the 48B shape with as many of its 27 layers as fit in the GPU
// (all of them on an H200; layers are dropped from the end, keeping the 3:1
// KDA:MLA pattern, on smaller GPUs) and says so in the output.
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/backend/cuda_backend.h"
#include "engine/config/model_config.h"
#include "engine/model/model.h"
#include "engine/model/random_source.h"
#include "engine/sampling/sampler.h"

ABSL_FLAG(std::string, config, "auto", "auto | 48b | small | tiny");
ABSL_FLAG(bool, quick, false, "fewer and shorter runs");
ABSL_FLAG(int64_t, decode_context, 4096, "tokens already in each sequence when decoding");
ABSL_FLAG(std::string, sampling, "device",
          "how a decode step picks its tokens, timed with the step as a worker does: device "
          "(SampleTokens after the LM head, token ids downloaded) | host (logits downloaded, "
          "the host Sampler on every row)");
ABSL_FLAG(double, temperature, 0.0, "sampling temperature of every row (0: greedy)");
ABSL_FLAG(std::string, decode_batches, "",
          "comma-separated decode batch sizes (default 1,16,64; --quick 1,16)");
ABSL_FLAG(int64_t, profile_decode_batch, 0,
          "only run decode steps of this batch size, eagerly (no CUDA graphs), the last one "
          "between cudaProfilerStart/Stop: for `ncu --profile-from-start off` per-kernel times");

namespace kl {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// D2D copy of 1 GiB, read + write bytes counted (the decode floor's unit).
double CopyTBs() {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) return 0;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
  float best = 1e30f;
  for (int i = 0; i < 10; ++i) {
    cudaEventRecord(e0);
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    best = std::min(best, ms);
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (best * 1e-3) / 1e12;
}

ModelConfig Truncate(ModelConfig c, int64_t layers) {
  c.num_hidden_layers = layers;
  c.layer_kinds.resize(layers);
  return c;
}

int64_t WeightBytes(const ModelConfig& c) { return ParameterCount(c) * 2; }

struct Floor {
  double weight_bytes = 0, state_bytes = 0, latent_bytes = 0;
  double total() const { return weight_bytes + state_bytes + latent_bytes; }
};

// Bytes one decode step of `batch` sequences at `context` tokens must move.
Floor DecodeFloor(const ModelConfig& c, int64_t batch, int64_t context, int64_t latent_elem) {
  Floor f;
  const double D = c.hidden_size;
  const double expert = 3.0 * D * c.moe_intermediate_size * 2;
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) moe_layers += c.IsMoe(l) ? 1 : 0;
  const double routed_all = double(c.num_experts) * expert * moe_layers;
  // Everything but the routed experts and the embedding table is read once per step.
  double dense = double(WeightBytes(c)) - routed_all - double(c.vocab_size) * D * 2;
  // Expected distinct experts per layer when batch tokens pick top_k of E uniformly.
  const double p = double(c.num_experts_per_token) / c.num_experts;
  const double distinct = c.num_experts * (1.0 - std::pow(1.0 - p, double(batch)));
  f.weight_bytes = dense + distinct * expert * moe_layers + batch * D * 2;
  // KDA: fp32 state read + written; MLA: every cached latent row read.
  f.state_bytes = 2.0 * batch * c.NumKdaLayers() * c.KdaStateElems() * 4;
  f.latent_bytes = double(batch) * c.NumMlaLayers() * context * c.MlaLatentDim() * latent_elem;
  return f;
}

int Run() {
  int dev_count = 0;
  if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0) {
    std::printf("no CUDA device\n");
    return 1;
  }
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  const bool quick = absl::GetFlag(FLAGS_quick);
  const std::string which = absl::GetFlag(FLAGS_config);
  ModelConfig c;
  std::string note;
  if (which == "tiny") {
    c = TinyConfig();
  } else if (which == "small") {
    c = Small100MConfig();
  } else {
    c = Kimi48BConfig();
    if (which == "auto") {
      // Leave ~30% of free memory for states, latents and activations.
      int64_t layers = c.num_hidden_layers;
      while (layers > 4 && WeightBytes(Truncate(c, layers)) > 0.7 * free_b) layers -= 4;
      if (layers < c.num_hidden_layers) {
        note = absl::StrCat(" (first ", layers, " of 27 layers: the full model's ",
                            WeightBytes(c) >> 30, " GiB of bf16 weights do not fit)");
        c = Truncate(c, layers);
      }
    }
  }
  const double copy_tbs = CopyTBs();
  const int64_t context = absl::GetFlag(FLAGS_decode_context);
  const std::string sampling = absl::GetFlag(FLAGS_sampling);
  if (sampling != "device" && sampling != "host") {
    std::printf("--sampling: device or host, not '%s'\n", sampling.c_str());
    return 2;
  }
  const bool device_sampling = sampling == "device";
  const double temperature = absl::GetFlag(FLAGS_temperature);
  if (!(temperature >= 0 && temperature <= 100)) {
    std::printf("--temperature: in [0, 100]\n");
    return 2;
  }
  std::vector<int64_t> batches = quick ? std::vector<int64_t>{1, 16}
                                       : std::vector<int64_t>{1, 16, 64};
  if (const std::string list = absl::GetFlag(FLAGS_decode_batches); !list.empty()) {
    batches.clear();
    for (absl::string_view b : absl::StrSplit(list, ',')) {
      int64_t v = 0;
      if (!absl::SimpleAtoi(b, &v) || v < 1) {
        std::printf("--decode_batches: not a batch size: '%s'\n", std::string(b).c_str());
        return 1;
      }
      batches.push_back(v);
    }
  }
  const std::vector<int64_t> prompts = quick ? std::vector<int64_t>{4096}
                                             : std::vector<int64_t>{4096, 16384};
  int64_t steps = quick ? 8 : 32;
  const int64_t profile_batch = absl::GetFlag(FLAGS_profile_decode_batch);
  const int64_t max_batch = profile_batch > 0 ? profile_batch
                                              : *std::max_element(batches.begin(), batches.end());

  CudaBackendOptions o;
  o.max_seqs = max_batch + 1;
  o.page_rows = 64;
  const int64_t pages_per_seq = (context + steps + 8 + 63) / 64;
  o.latent_pages = max_batch * pages_per_seq + (prompts.back() + 63) / 64 + 16;
  o.latent_dtype = DType::kBF16;
  o.bf16_weights = true;
  o.kda_tensor_cores = true;
  o.mla_tensor_cores = true;
  if (profile_batch > 0) {
    o.cuda_graphs = false;  // one launch per kernel, so the profiler sees each
    steps = 3;
  }
  auto be = CudaBackend::Create(c, o);
  if (!be.ok()) {
    std::printf("backend: %s\n", be.status().ToString().c_str());
    return 1;
  }
  std::printf("device: %s\n", (*be)->DeviceDescription().c_str());
  std::printf("config: %s%s, %.2f B parameters\n", which.c_str(), note.c_str(),
              ParameterCount(c) / 1e9);
  std::printf("copy bandwidth (D2D 1 GiB, read + write): %.3f TB/s\n", copy_tbs);
  const auto t0 = Clock::now();
  auto model = Model::Create(c, SyntheticTensorSource(1), be->get());
  if (!model.ok()) {
    std::printf("model: %s\n", model.status().ToString().c_str());
    return 1;
  }
  std::printf("weights: %.1f GiB on the GPU, loaded in %.1f s\n",
              (*be)->weight_bytes() / double(1 << 30), Seconds(t0, Clock::now()));
  Model& m = **model;
  std::mt19937_64 rng(3);
  auto tokens = [&](int64_t n) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(rng() % (c.vocab_size - 256));
    return t;
  };
  std::vector<std::string> summary;

  // ---- prefill (one sequence, chunk-free: the whole prompt in one forward)
  if (profile_batch == 0) {
    SequenceState warm = m.NewState();
    auto wt = tokens(512);
    ForwardItem wi{&warm, wt};
    ForwardOutput wo;
    if (auto st = m.Forward(absl::MakeSpan(&wi, 1), &wo); !st.ok()) {
      std::printf("prefill warm-up: %s\n", st.ToString().c_str());
      return 1;
    }
  }
  const double active = ParameterCount(c) -
                        double(c.num_experts - c.num_experts_per_token) * 3.0 * c.hidden_size *
                            c.moe_intermediate_size * (c.num_hidden_layers - c.first_k_dense_replace) -
                        double(c.vocab_size) * c.hidden_size;
  for (int64_t len : prompts) {
    if (profile_batch > 0) break;
    SequenceState s = m.NewState();
    auto t = tokens(len);
    ForwardItem it{&s, t};
    ForwardOutput out;
    const auto a = Clock::now();
    absl::Status st = m.Forward(absl::MakeSpan(&it, 1), &out);
    const double sec = Seconds(a, Clock::now());
    if (!st.ok()) {
      std::printf("prefill %ld: %s\n", static_cast<long>(len), st.ToString().c_str());
      continue;
    }
    const double tflops = 2.0 * active * len / sec / 1e12;
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "prefill T=%-6ld | %9.1f ms | %9.0f tok/s | %6.1f TFLOP/s in linear layers",
                  static_cast<long>(len), sec * 1e3, len / sec, tflops);
    std::printf("%s\n", buf);
    summary.push_back(buf);
  }

  // ---- decode: `batch` sequences at `context` tokens each (zero states, zero
  // latents: the values do not change the work), `steps` timed steps.
  const std::vector<int64_t> decode_batches =
      profile_batch > 0 ? std::vector<int64_t>{profile_batch} : batches;
  for (int64_t batch : decode_batches) {
    std::vector<SequenceState> seqs(batch);
    for (auto& s : seqs) {
      s = m.NewState();
      s.num_tokens = context;
      for (auto& l : s.mla) l.latent.assign(context * c.MlaLatentDim(), 0.0f);
    }
    std::vector<std::vector<int32_t>> next(batch);
    for (auto& n : next) n = tokens(1);
    std::vector<double> times;
    bool failed = false;
    SamplingParams sp;
    sp.temperature = temperature;
    std::vector<Sampler> samplers;
    for (int64_t i = 0; i < batch; ++i) {
      sp.seed = 1000 + i;
      samplers.emplace_back(sp, 0);
    }
    for (int64_t step = 0; step < steps + 3 && !failed; ++step) {
      std::vector<ForwardItem> items;
      std::vector<TokenSampling> ts(batch);
      for (int64_t i = 0; i < batch; ++i) {
        items.push_back({&seqs[i], next[i]});
        ts[i] = samplers[i].Draw(step);
        if (device_sampling) items.back().sample = &ts[i];
      }
      ForwardOutput out;
      const bool profiled = profile_batch > 0 && step == steps + 2;
      if (profiled) cudaProfilerStart();
      const auto a = Clock::now();
      absl::Status st = m.Forward(absl::MakeSpan(items), &out);
      // The step a worker runs: the forward, then every row's token (host: the Sampler on
      // the downloaded logits, one thread, as the decode engine does).
      std::vector<int32_t> picked(batch);
      if (st.ok()) {
        for (int64_t i = 0; i < batch; ++i) {
          picked[i] = device_sampling ? out.tokens[i]
                                      : samplers[i].Sample(out.logits[i].data(), c.vocab_size);
        }
      }
      const double sec = Seconds(a, Clock::now());
      if (profiled) cudaProfilerStop();
      if (!st.ok()) {
        std::printf("decode batch %ld: %s\n", static_cast<long>(batch), st.ToString().c_str());
        failed = true;
        break;
      }
      if (step >= 3) times.push_back(sec);  // after eager, capture, first replay
      for (int64_t i = 0; i < batch; ++i) next[i] = {picked[i]};
    }
    if (failed || times.empty()) continue;
    std::sort(times.begin(), times.end());
    const double med = times[times.size() / 2];
    const Floor f = DecodeFloor(c, batch, context + steps / 2, 2);
    const double floor_s = f.total() / (copy_tbs * 1e12);
    char buf[320];
    std::snprintf(buf, sizeof(buf),
                  "decode B=%-3ld ctx=%-6ld | %7.3f ms/step (median of %zu) | %8.0f tok/s | floor "
                  "%6.3f ms (weights %.2f GB, states %.2f GB, latents %.2f GB) | %5.1f%% of floor"
                  " | sampling %s T=%g",
                  static_cast<long>(batch), static_cast<long>(context), med * 1e3, times.size(),
                  batch / med, floor_s * 1e3, f.weight_bytes / 1e9, f.state_bytes / 1e9,
                  f.latent_bytes / 1e9, 100.0 * floor_s / med, device_sampling ? "device" : "host",
                  temperature);
    std::printf("%s\n", buf);
    summary.push_back(buf);
  }
  const CudaGraphStats gs = (*be)->graph_stats();
  std::printf("graphs: %ld captures, %ld replays, %ld eager forwards\n",
              static_cast<long>(gs.captures), static_cast<long>(gs.replays),
              static_cast<long>(gs.eager_forwards));
  std::printf("== summary\n");
  for (const auto& l : summary) std::printf("%s\n", l.c_str());
  return 0;
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kl::Run();
}
