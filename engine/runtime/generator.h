// Single-process generation: prefill the prompt, then decode token by token on
// one Model, streaming TokenEvents. The oracle for the cluster's output and the
// engine behind `kl generate --in-process`.
#ifndef KL_ENGINE_RUNTIME_GENERATOR_H_
#define KL_ENGINE_RUNTIME_GENERATOR_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/model.h"
#include "engine/runtime/output_processor.h"

namespace kl {

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids (incl. a final stop token)
  std::string text;
  FinishReason finish = FinishReason::kNone;
  int64_t prompt_tokens = 0;
  uint64_t seed = 0;
  double ttft_seconds = 0;   // prompt in → first token sampled
  double total_seconds = 0;
};

// Called for every event; return false to cancel (finish = kCancelled).
using TokenCallback = std::function<bool(const TokenEvent&)>;

// Validates the prompt (non-empty, ids in range, prompt + max_tokens within
// model_max_length) and the sampling params, then generates.
absl::StatusOr<GenerateResult> Generate(Model& model, const Tokenizer& tokenizer,
                                        const std::vector<int32_t>& prompt,
                                        const SamplingParams& params,
                                        const TokenCallback& on_event = nullptr);

}  // namespace kl

#endif  // KL_ENGINE_RUNTIME_GENERATOR_H_
