#include "engine/runtime/generator.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"

namespace kl {

absl::StatusOr<GenerateResult> Generate(Model& model, const Tokenizer& tokenizer,
                                        const std::vector<int32_t>& prompt,
                                        const SamplingParams& params,
                                        const TokenCallback& on_event) {
  const ModelConfig& c = model.config();
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  SamplingLimits lim;
  lim.vocab_size = c.vocab_size;
  lim.max_tokens = c.model_max_length;
  RETURN_IF_ERROR(ValidateSamplingParams(params, lim));
  if (static_cast<int64_t>(prompt.size()) + params.max_tokens > c.model_max_length) {
    return absl::InvalidArgumentError(absl::StrCat("prompt (", prompt.size(),
                                                   " tokens) + max_tokens exceeds the context of ",
                                                   c.model_max_length));
  }
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  Sampler sampler(params);
  OutputProcessor out(params, &tokenizer, static_cast<int32_t>(c.eos_token_id));
  GenerateResult res;
  res.prompt_tokens = static_cast<int64_t>(prompt.size());
  res.seed = sampler.seed();
  SequenceState state = model.NewState();
  std::vector<int32_t> next = prompt;
  ForwardOutput fo;
  while (true) {
    ForwardItem item{&state, next, false};
    RETURN_IF_ERROR(model.Forward(absl::MakeSpan(&item, 1), &fo));
    const int32_t tok = sampler.Sample(fo.logits[0].data(), c.vocab_size);
    if (res.tokens.empty()) {
      res.ttft_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    }
    TokenEvent ev = out.Accept(tok);
    res.tokens.push_back(tok);
    res.text += ev.text;
    res.finish = ev.finish;
    if (on_event && !on_event(ev)) {
      res.finish = FinishReason::kCancelled;
      break;
    }
    if (ev.finish != FinishReason::kNone) break;
    next.assign(1, tok);
  }
  res.total_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return res;
}

}  // namespace kl
