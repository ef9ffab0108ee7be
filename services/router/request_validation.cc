#include "services/router/request_validation.h"

#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_format.h"
#include "kernels/common/status_macros.h"
#include "services/common/request_context.h"

namespace kl {
namespace {

absl::Status Bad(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, " ", what));
}

std::mt19937_64& ThreadRng() {
  thread_local std::mt19937_64 rng([] {
    std::random_device rd;
    return (static_cast<uint64_t>(rd()) << 32) ^ rd();
  }());
  return rng;
}

// ValidateSamplingParams names engine fields; the public API nests them
// under "sampling." and calls the stop strings "stop".
absl::Status PublicFieldNames(const absl::Status& s) {
  if (s.ok()) return s;
  std::string m(s.message());
  if (absl::StartsWith(m, "stop_strings")) {
    m = absl::StrCat("sampling.stop", m.substr(strlen("stop_strings")));
  } else if (!absl::StartsWith(m, "sampling.")) {
    m = absl::StrCat("sampling.", m);
  }
  return absl::Status(s.code(), m);
}

// `field` is where the chat sits in the request ("prompt.chat", "input.chat").
absl::Status ValidateChat(const v1::ChatPrompt& chat, absl::string_view field) {
  if (chat.messages().empty()) return Bad(absl::StrCat(field, ".messages"), "is empty");
  for (int i = 0; i < chat.messages_size(); ++i) {
    const std::string& role = chat.messages(i).role();
    if (role != "system" && role != "user" && role != "assistant") {
      return Bad(absl::StrCat(field, ".messages[", i, "].role"),
                 absl::StrCat("must be \"system\", \"user\" or \"assistant\", got \"",
                              absl::CHexEscape(role), "\""));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> EncodeChat(const v1::ChatPrompt& chat,
                                                const Tokenizer& tokenizer) {
  std::vector<ChatMessage> messages;
  for (const v1::ChatMessage& m : chat.messages()) {
    messages.push_back(ChatMessage{m.role(), m.content()});
  }
  // add_generation_prompt defaults to true (generation.proto).
  const bool gen_prompt = !chat.has_add_generation_prompt() || chat.add_generation_prompt();
  return tokenizer.EncodeChat(messages, gen_prompt);
}

absl::Status ValidateTokenIds(const v1::TokenIds& ids, const RequestLimits& limits) {
  if (ids.ids().empty()) return Bad("prompt.token_ids", "is empty");
  if (ids.ids_size() > limits.max_prompt_tokens) {
    return Bad("prompt.token_ids", absl::StrCat("has ", ids.ids_size(),
                                                " tokens, more than max_prompt_tokens ",
                                                limits.max_prompt_tokens));
  }
  for (int i = 0; i < ids.ids_size(); ++i) {
    const int32_t id = ids.ids(i);
    if (id < 0 || id >= limits.vocab_size) {
      return Bad(absl::StrCat("prompt.token_ids[", i, "]"),
                 absl::StrCat("= ", id, " is not a token id of this model [0, ",
                              limits.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SamplingParams> ToSamplingParams(const v1::SamplingParams& s,
                                                const RequestLimits& limits) {
  SamplingParams p;
  if (s.has_temperature()) p.temperature = s.temperature();
  if (s.has_top_p()) p.top_p = s.top_p();
  if (s.has_top_k()) p.top_k = s.top_k();
  if (s.has_seed()) p.seed = s.seed();
  p.max_tokens = s.has_max_tokens() ? s.max_tokens()
                                    : std::min(limits.default_max_tokens, limits.max_tokens_limit);
  p.stop_strings.assign(s.stop().begin(), s.stop().end());
  p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  p.ignore_eos = s.ignore_eos();
  SamplingLimits sl;
  sl.vocab_size = limits.vocab_size;
  sl.max_tokens = limits.max_tokens_limit;
  RETURN_IF_ERROR(PublicFieldNames(ValidateSamplingParams(p, sl)));
  return p;
}

}  // namespace

absl::Status ValidateRequestId(const std::string& id) {
  const absl::Status s = CheckRequestId(id);  // the same rule as x-request-id metadata
  return s.ok() ? s : Bad("request_id", s.message());
}

std::string NewRequestId() { return absl::StrFormat("r-%016x", ThreadRng()()); }

uint64_t RandomSeed() { return ThreadRng()(); }

absl::StatusOr<SamplingParams> ValidateGenerateRequest(const v1::GenerateRequest& request,
                                                       const RequestLimits& limits) {
  RETURN_IF_ERROR(ValidateRequestId(request.request_id()));
  switch (request.prompt_case()) {
    case v1::GenerateRequest::PROMPT_NOT_SET:
      return Bad("prompt", "is not set (text, chat or token_ids)");
    case v1::GenerateRequest::kText:
      if (request.text().empty()) return Bad("prompt.text", "is empty");
      break;
    case v1::GenerateRequest::kChat:
      RETURN_IF_ERROR(ValidateChat(request.chat(), "prompt.chat"));
      break;
    case v1::GenerateRequest::kTokenIds:
      RETURN_IF_ERROR(ValidateTokenIds(request.token_ids(), limits));
      break;
  }
  return ToSamplingParams(request.sampling(), limits);
}

absl::StatusOr<std::vector<int32_t>> EncodePrompt(const v1::GenerateRequest& request,
                                                  const Tokenizer& tokenizer,
                                                  const RequestLimits& limits) {
  std::vector<int32_t> ids;
  const char* field = "prompt.token_ids";
  if (request.has_text()) {
    field = "prompt.text";
    ids = tokenizer.Encode(request.text(), /*allow_special=*/false);
  } else if (request.has_chat()) {
    field = "prompt.chat";
    ASSIGN_OR_RETURN(ids, EncodeChat(request.chat(), tokenizer));
  } else {
    ids.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
  }
  if (ids.empty()) return Bad(field, "encodes to no tokens");
  if (static_cast<int64_t>(ids.size()) > limits.max_prompt_tokens) {
    return Bad(field, absl::StrCat("is ", ids.size(), " tokens, more than max_prompt_tokens ",
                                   limits.max_prompt_tokens));
  }
  return ids;
}

absl::Status CheckFitsContext(int64_t prompt_tokens, int64_t max_tokens,
                              const RequestLimits& limits) {
  if (limits.context_tokens > 0 && prompt_tokens + max_tokens > limits.context_tokens) {
    return Bad("sampling.max_tokens",
               absl::StrCat(max_tokens, " with a prompt of ", prompt_tokens,
                            " tokens exceeds the model's context of ", limits.context_tokens,
                            " tokens"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> EncodeTokenizeRequest(const v1::TokenizeRequest& request,
                                                           const Tokenizer& tokenizer) {
  if (request.has_text()) return tokenizer.Encode(request.text(), /*allow_special=*/false);
  if (!request.has_chat()) return Bad("input", "is not set (text or chat)");
  RETURN_IF_ERROR(ValidateChat(request.chat(), "input.chat"));
  return EncodeChat(request.chat(), tokenizer);
}

v1::WorkerSampling ToWorkerSampling(const SamplingParams& p) {
  v1::WorkerSampling w;
  w.set_temperature(p.temperature);
  w.set_top_p(p.top_p);
  w.set_top_k(p.top_k);
  w.set_seed(p.seed.value_or(0));
  for (int32_t id : p.stop_token_ids) w.add_stop_token_ids(id);
  w.set_ignore_eos(p.ignore_eos);
  return w;
}

}  // namespace kl
