// StateBundle throughput on the Kimi-Linear-48B shape: BundleWriter encode and
// BundleAssembler verify + import (CRC-32C of every byte, dtype conversion,
// zero / non-finite scan), for the fixed KDA hand-off (20 layers) and for 4K
// tokens of MLA latents (7 layers). One thread. Two memory regimes:
//   steady: each frame is assembled and freed as soon as it is encoded (as
//     over a transport), malloc keeps freed memory (mallopt), and the assembler
//     imports into a recycled state (a decode worker's slot pool): the CPU cost
//     of the format itself, best of 6;
//   cold: first run in fresh process memory, all frames kept alive, a newly
//     allocated state: adds first-touch page faults on ~2x the bundle size
//     (this VM faults in fresh memory at ~2 GB/s).
// Run: bazel run -c opt //engine/state:bundle_bench
#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/state/state_bundle.h"
#include "kernels/common/crc32c.h"

namespace kl {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

SequenceState MakeState(const ModelConfig& c, int64_t tokens) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> d(-1, 1);
  SequenceState s = SequenceState::Zero(c);
  s.num_tokens = tokens;
  for (auto& l : s.kda) {
    for (auto* v : {&l.recurrent, &l.conv_q, &l.conv_k, &l.conv_v}) {
      for (float& x : *v) x = d(rng);
    }
  }
  for (auto& m : s.mla) {
    m.latent.resize(tokens * c.MlaLatentDim());
    for (float& x : m.latent) x = d(rng);
  }
  return s;
}

void Check(const absl::Status& s) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    std::abort();
  }
}

// Seconds spent per group, best of the repetitions.
struct Timing {
  double encode[2] = {1e30, 1e30};    // [0] KDA, [1] MLA
  double assemble[2] = {1e30, 1e30};
  double header = 1e30;               // assembler: header (allocates the state)
  uint64_t bytes[2] = {0, 0};         // frame bytes
};

// One bundle; frames go to the assembler as soon as each Add* returns (streaming)
// or after all were encoded (cold).
void RunOnce(const ModelConfig& c, const SequenceState& s, const BundleOptions& opt, bool streaming,
             SequenceState* recycled, Timing* best) {
  auto writer = BundleWriter::Create(c, s.num_tokens, BundleMeta{"bench", 1, 0, 0}, opt).value();
  BundleAssembler a = streaming ? BundleAssembler(c, {}, std::move(*recycled)) : BundleAssembler(c);
  auto th = Clock::now();
  Check(a.Add(writer->HeaderFrame().bytes));
  best->header = std::min(best->header, Seconds(th));
  double enc[2] = {0, 0}, asm_[2] = {0, 0};
  uint64_t bytes[2] = {0, 0};
  std::vector<BundleFrame> held[2];
  for (int64_t layer = 0, k = 0, m = 0; layer < c.num_hidden_layers; ++layer) {
    const int g = c.IsKda(layer) ? 0 : 1;
    auto t0 = Clock::now();
    std::vector<BundleFrame> frames = g == 0 ? writer->AddKdaLayer(layer, s.kda[k++]).value()
                                             : writer->AddMlaRows(layer, 0, s.mla[m++].latent).value();
    enc[g] += Seconds(t0);
    for (BundleFrame& f : frames) {
      bytes[g] += f.bytes.size();
      if (!streaming) {
        held[g].push_back(std::move(f));
        continue;
      }
      t0 = Clock::now();
      Check(a.Add(f.bytes));
      asm_[g] += Seconds(t0);
      f.bytes = std::string();  // sent: freed before the next frame is built
    }
  }
  for (int g = 0; g < 2; ++g) {
    auto t0 = Clock::now();
    for (const BundleFrame& f : held[g]) Check(a.Add(f.bytes));
    asm_[g] += Seconds(t0);
  }
  Check(a.Add(writer->Finish().value().bytes));
  absl::StatusOr<SequenceState> out = a.Finish();
  Check(out.status());
  if (streaming) *recycled = std::move(*out);
  for (int g = 0; g < 2; ++g) {
    best->encode[g] = std::min(best->encode[g], enc[g]);
    best->assemble[g] = std::min(best->assemble[g], asm_[g]);
    best->bytes[g] = bytes[g];
  }
}

void Report(const char* label, const Timing& t) {
  static const char* kGroup[2] = {"KDA fixed part (20 layers)", "MLA latents, 4K tokens"};
  std::printf("%s\n", label);
  for (int g = 0; g < 2; ++g) {
    const double b = t.bytes[g];
    std::printf("  %-27s %6.2f MiB: encode %6.2f ms %5.2f GB/s | assemble %6.2f ms %5.2f GB/s"
                " | both %5.2f GB/s\n",
                kGroup[g], b / 1048576, t.encode[g] * 1e3, b / t.encode[g] / 1e9,
                t.assemble[g] * 1e3, b / t.assemble[g] / 1e9,
                b / (t.encode[g] + t.assemble[g]) / 1e9);
  }
  std::printf("  assembler header record (allocates / fits the f32 state): %.2f ms\n",
              t.header * 1e3);
}

}  // namespace
}  // namespace kl

int main() {
  using namespace kl;
  const ModelConfig c = Kimi48BConfig();
  const SequenceState s = MakeState(c, 4096);
  std::printf("Kimi-Linear-48B shape; CRC-32C hardware path: %s\n",
              Crc32cHardwareAvailable() ? "yes" : "no");
  {
    std::string buf(size_t{43} << 20, 'x');
    double best = 1e30;
    for (int i = 0; i < 5; ++i) {
      auto t0 = Clock::now();
      volatile uint32_t crc = Crc32c(buf.data(), buf.size());
      (void)crc;
      best = std::min(best, Seconds(t0));
    }
    std::printf("reference: CRC-32C of 43 MiB in memory: %.2f GB/s\n", buf.size() / best / 1e9);
  }
  BundleOptions spec;  // spec §3.8 / §8: f32 state, bf16 tails, bf16 latents
  spec.conv_dtype = DType::kBF16;
  spec.mla_dtype = DType::kBF16;
  const struct {
    const char* name;
    BundleOptions opt;
  } variants[] = {{"f32 state + bf16 tails + bf16 latents (spec sizes)", spec},
                  {"all f32 (default options; exact)", BundleOptions{}}};
  for (bool steady : {false, true}) {
    if (steady) {  // what a server would set: no mmap per frame, no trimming
      mallopt(M_MMAP_THRESHOLD, 256 << 20);
      mallopt(M_TRIM_THRESHOLD, 1 << 30);
    }
    for (const auto& v : variants) {
      Timing t;
      SequenceState recycled;
      for (int rep = 0; rep < (steady ? 6 : 1); ++rep) {
        RunOnce(c, s, v.opt, /*streaming=*/steady, &recycled, &t);
      }
      Report((std::string(steady ? "[steady] " : "[cold] ") + v.name).c_str(), t);
    }
  }
  return 0;
}
