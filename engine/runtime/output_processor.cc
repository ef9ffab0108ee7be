#include "engine/runtime/output_processor.h"

#include <algorithm>

namespace kl {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kNone: return "none";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kError: return "error";
  }
  return "?";
}

OutputProcessor::OutputProcessor(const SamplingParams& params, const Tokenizer* tokenizer,
                                 int32_t eos_id)
    : params_(params),
      tokenizer_(tokenizer),
      eos_id_(eos_id),
      detok_(tokenizer, /*skip_special_tokens=*/true),
      stops_(params.stop_strings) {}

TokenEvent OutputProcessor::Accept(int32_t token) {
  TokenEvent ev;
  ev.token = token;
  ev.index = generated_++;
  const bool is_stop_id =
      (!params_.ignore_eos && eos_id_ >= 0 && token == eos_id_) ||
      std::find(params_.stop_token_ids.begin(), params_.stop_token_ids.end(), token) !=
          params_.stop_token_ids.end();
  if (is_stop_id) {
    // The stop token itself produces no text; release what was held back.
    ev.text = stops_.Push(detok_.Flush(), &finished_);
    if (!finished_) ev.text += stops_.Flush();
    ev.finish = FinishReason::kStop;
    finished_ = true;
    return ev;
  }
  // Special tokens (chat markers etc.) are not part of the generated text.
  std::string delta = tokenizer_->IsSpecial(token) ? std::string() : detok_.Push(token);
  bool stopped = false;
  ev.text = stops_.Push(delta, &stopped);
  if (stopped) {
    ev.finish = FinishReason::kStop;
  } else if (generated_ >= params_.max_tokens) {
    bool late_stop = false;
    ev.text += stops_.Push(detok_.Flush(), &late_stop);
    if (!late_stop) ev.text += stops_.Flush();
    ev.finish = late_stop ? FinishReason::kStop : FinishReason::kLength;
  }
  finished_ = ev.finish != FinishReason::kNone;
  return ev;
}

}  // namespace kl
