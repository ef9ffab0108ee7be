// handoff_tool: the disaggregation contract across real processes (invariant 12
// of kda_test_vectors.md). One process prefills and writes a StateBundle, another
// imports it and decodes; `single` does both in one process without a bundle.
//   handoff_tool prefill --model DIR --tokens 1,2,3 --out BUNDLE
//   handoff_tool decode  --model DIR --bundle BUNDLE --steps N --logits OUT
//   handoff_tool single  --model DIR --tokens 1,2,3 --steps N --logits OUT
// Decoding is greedy; OUT receives the fp32 logits of every step (raw bytes).
// Exit code 0 on success; on error the status is printed to stderr, exit 1.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "engine/runtime/local_engine.h"
#include "engine/sampling/sampler.h"
#include "engine/state/state_bundle.h"
#include "kernels/common/status_macros.h"

ABSL_FLAG(std::string, model, "", "model folder");
ABSL_FLAG(std::string, tokens, "", "comma-separated prompt token ids");
ABSL_FLAG(std::string, out, "", "bundle file to write (prefill)");
ABSL_FLAG(std::string, bundle, "", "bundle file to read (decode)");
ABSL_FLAG(int64_t, steps, 8, "decode steps");
ABSL_FLAG(std::string, logits, "", "file for the decode logits");

namespace kl {
namespace {

absl::StatusOr<std::vector<int32_t>> ParseTokens(const std::string& s) {
  std::vector<int32_t> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int32_t v;
    if (!absl::SimpleAtoi(p, &v)) return absl::InvalidArgumentError("bad --tokens");
    out.push_back(v);
  }
  return out;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

absl::Status WriteFile(const std::string& path, const void* data, size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
  return f ? absl::OkStatus() : absl::InternalError("cannot write " + path);
}

// Feeds `first` then greedily decodes `steps` tokens, appending each step's logits.
absl::Status DecodeGreedy(Model& m, SequenceState* st, int32_t first, int64_t steps,
                          std::vector<float>* logits) {
  int32_t tok = first;
  ForwardOutput out;
  for (int64_t s = 0; s < steps; ++s) {
    ForwardItem it{st, absl::MakeConstSpan(&tok, 1), false};
    RETURN_IF_ERROR(m.Forward(absl::MakeSpan(&it, 1), &out));
    logits->insert(logits->end(), out.logits[0].begin(), out.logits[0].end());
    tok = Argmax(out.logits[0].data(), m.config().vocab_size);
  }
  return absl::OkStatus();
}

absl::StatusOr<int32_t> Prefill(Model& m, SequenceState* st, const std::vector<int32_t>& toks) {
  ForwardItem it{st, toks, false};
  ForwardOutput out;
  RETURN_IF_ERROR(m.Forward(absl::MakeSpan(&it, 1), &out));
  return Argmax(out.logits[0].data(), m.config().vocab_size);
}

absl::Status Run(const std::string& mode) {
  LocalEngineOptions o;
  o.model_dir = absl::GetFlag(FLAGS_model);
  ASSIGN_OR_RETURN(auto engine, LocalEngine::Open(o));
  Model& m = engine->model();
  std::vector<float> logits;
  if (mode == "prefill" || mode == "single") {
    ASSIGN_OR_RETURN(auto toks, ParseTokens(absl::GetFlag(FLAGS_tokens)));
    SequenceState st = m.NewState();
    ASSIGN_OR_RETURN(int32_t first, Prefill(m, &st, toks));
    if (mode == "single") {
      RETURN_IF_ERROR(DecodeGreedy(m, &st, first, absl::GetFlag(FLAGS_steps), &logits));
      return WriteFile(absl::GetFlag(FLAGS_logits), logits.data(), logits.size() * 4);
    }
    BundleMeta meta;
    meta.request_id = "handoff";
    meta.first_token = first;
    meta.checkpoint_fingerprint = engine->checkpoint_fingerprint();
    ASSIGN_OR_RETURN(std::string blob, SerializeBundle(m.config(), st, meta));
    return WriteFile(absl::GetFlag(FLAGS_out), blob.data(), blob.size());
  }
  if (mode == "decode") {
    ASSIGN_OR_RETURN(std::string blob, ReadFile(absl::GetFlag(FLAGS_bundle)));
    AssemblerOptions ao;
    ao.expected_checkpoint_fingerprint = engine->checkpoint_fingerprint();
    ASSIGN_OR_RETURN(DecodedBundle b, DeserializeBundle(blob, m.config(), ao));
    RETURN_IF_ERROR(DecodeGreedy(m, &b.state, static_cast<int32_t>(b.header.first_token),
                                 absl::GetFlag(FLAGS_steps), &logits));
    return WriteFile(absl::GetFlag(FLAGS_logits), logits.data(), logits.size() * 4);
  }
  return absl::InvalidArgumentError("mode must be prefill, decode or single");
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) {
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() < 2) {
    std::fprintf(stderr, "usage: handoff_tool prefill|decode|single [flags]\n");
    return 2;
  }
  absl::Status s = kl::Run(args[1]);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
