// OutputProcessor: what happens to each sampled token of one request — stop
// conditions (eos, stop ids, stop strings, max_tokens), streaming
// detokenisation that never splits a UTF-8 character, and stop-string hold-back.
// Shared by the in-process generator and the decode worker, so both finish
// requests identically.
#ifndef KL_ENGINE_RUNTIME_OUTPUT_PROCESSOR_H_
#define KL_ENGINE_RUNTIME_OUTPUT_PROCESSOR_H_

#include <cstdint>
#include <memory>
#include <string>

#include "engine/sampling/sampler.h"
#include "engine/sampling/stop_matcher.h"
#include "engine/tokenizer/streaming_detokenizer.h"
#include "engine/tokenizer/tokenizer.h"

namespace kl {

enum class FinishReason : uint8_t {
  kNone = 0,       // still running
  kStop = 1,       // eos, a stop token id or a stop string
  kLength = 2,     // max_tokens reached
  kCancelled = 3,  // the client went away or cancelled
  kError = 4,
};
const char* FinishReasonName(FinishReason r);

// One step of output for the client.
struct TokenEvent {
  int32_t token = -1;          // the sampled id
  int64_t index = 0;           // 0-based position among generated tokens
  std::string text;            // text released by this token (may be empty)
  FinishReason finish = FinishReason::kNone;
};

class OutputProcessor {
 public:
  // `tokenizer` must outlive this. `eos_id` < 0 disables eos (besides ignore_eos).
  OutputProcessor(const SamplingParams& params, const Tokenizer* tokenizer, int32_t eos_id);

  // Accepts the next sampled token. After an event with finish != kNone, the
  // request is over and Accept must not be called again.
  TokenEvent Accept(int32_t token);
  int64_t generated() const { return generated_; }
  bool finished() const { return finished_; }

 private:
  SamplingParams params_;
  const Tokenizer* tokenizer_;
  int32_t eos_id_;
  StreamingDetokenizer detok_;
  StopMatcher stops_;
  int64_t generated_ = 0;
  bool finished_ = false;
};

}  // namespace kl

#endif  // KL_ENGINE_RUNTIME_OUTPUT_PROCESSOR_H_
