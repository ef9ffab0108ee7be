// kl: the command-line front end.
//   kl generate [--model DIR] --prompt TEXT [sampling flags]   stream a generation
// Without --model, the embedded tiny model is used (made on first use).
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/runtime/generator.h"
#include "engine/runtime/local_engine.h"
#include "tools/kl/embedded_model.h"

ABSL_FLAG(std::string, model, "", "model folder (HF layout); empty = the embedded tiny model");
ABSL_FLAG(std::string, cache_dir, "", "where the embedded model is made (default: ~/.cache/kimi-serve)");
ABSL_FLAG(std::string, prompt, "Once upon a time", "prompt text");
ABSL_FLAG(bool, chat, false, "wrap the prompt as one user message in Kimi's chat format");
ABSL_FLAG(int64_t, max_tokens, 64, "tokens to generate");
ABSL_FLAG(double, temperature, 0.0, "0 = greedy");
ABSL_FLAG(double, top_p, 1.0, "nucleus mass in (0, 1]");
ABSL_FLAG(int64_t, top_k, 0, "0 = off");
ABSL_FLAG(int64_t, seed, -1, "sampling seed; -1 = random");
ABSL_FLAG(std::vector<std::string>, stop, {}, "stop strings (comma separated)");
ABSL_FLAG(bool, ignore_eos, false, "keep generating after the end-of-turn token");
ABSL_FLAG(int32_t, threads, 0, "CPU threads; 0 = all cores");
ABSL_FLAG(bool, quiet, false, "print only the generated text");

namespace kl {
namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "kl: %s\n", s.ToString().c_str());
  return 1;
}

int RunGenerate() {
  std::string dir = absl::GetFlag(FLAGS_model);
  if (dir.empty()) {
    std::string cache = absl::GetFlag(FLAGS_cache_dir);
    if (cache.empty()) cache = DefaultCacheDir();
    auto made = EnsureEmbeddedModel(cache);
    if (!made.ok()) return Fail(made.status());
    dir = *made;
  }
  LocalEngineOptions opts;
  opts.model_dir = dir;
  opts.threads = absl::GetFlag(FLAGS_threads);
  auto engine = LocalEngine::Open(opts);
  if (!engine.ok()) return Fail(engine.status());
  const Tokenizer& tok = (*engine)->tokenizer();
  std::vector<int32_t> prompt;
  if (absl::GetFlag(FLAGS_chat)) {
    auto ids = tok.EncodeChat({{"user", absl::GetFlag(FLAGS_prompt)}}, true);
    if (!ids.ok()) return Fail(ids.status());
    prompt = *ids;
  } else {
    prompt = tok.Encode(absl::GetFlag(FLAGS_prompt), /*allow_special=*/false);
  }
  SamplingParams p;
  p.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  p.temperature = absl::GetFlag(FLAGS_temperature);
  p.top_p = absl::GetFlag(FLAGS_top_p);
  p.top_k = absl::GetFlag(FLAGS_top_k);
  if (absl::GetFlag(FLAGS_seed) >= 0) p.seed = static_cast<uint64_t>(absl::GetFlag(FLAGS_seed));
  p.stop_strings = absl::GetFlag(FLAGS_stop);
  p.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  const bool quiet = absl::GetFlag(FLAGS_quiet);
  if (!quiet) std::fprintf(stdout, "%s", absl::GetFlag(FLAGS_prompt).c_str());
  auto res = Generate((*engine)->model(), tok, prompt, p, [](const TokenEvent& ev) {
    std::fwrite(ev.text.data(), 1, ev.text.size(), stdout);
    std::fflush(stdout);
    return true;
  });
  std::fputc('\n', stdout);
  std::fflush(stdout);
  if (!res.ok()) return Fail(res.status());
  if (!quiet) {
    const double decode_s = res->total_seconds - res->ttft_seconds;
    const int64_t n = static_cast<int64_t>(res->tokens.size());
    std::fprintf(stderr,
                 "[%lld prompt tokens, %lld generated, finish=%s, seed=%llu, TTFT %.1f ms, "
                 "%.1f tokens/s decode]\n",
                 static_cast<long long>(res->prompt_tokens), static_cast<long long>(n),
                 FinishReasonName(res->finish), static_cast<unsigned long long>(res->seed),
                 res->ttft_seconds * 1e3, n > 1 ? (n - 1) / decode_s : 0.0);
  }
  return 0;
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kl <command> [flags]\n  generate   stream a generation from a model folder (in process)\n"
      "Run `kl --help` for the flags.");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  const std::string cmd = args.size() > 1 ? args[1] : "";
  if (cmd == "generate") return kl::RunGenerate();
  std::fprintf(stderr, "%s\n", absl::ProgramUsageMessage());
  return cmd.empty() ? 2 : 2;
}
