// Checking and converting a public GenerateRequest: INVALID_ARGUMENT whose
// message names the offending field (docs/cluster.md "Status codes"), the
// prompt's tokens, and the sampling parameters the workers get.
//
// Split in two so that gRPC's threads only do O(request size) work:
// ValidateGenerateRequest runs before admission; EncodePrompt (which may
// tokenize a long text) runs on a router driver thread.
#ifndef KL_SERVICES_ROUTER_REQUEST_VALIDATION_H_
#define KL_SERVICES_ROUTER_REQUEST_VALIDATION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/sampling/sampler.h"
#include "engine/tokenizer/tokenizer.h"
#include "proto/generation.pb.h"
#include "proto/worker.pb.h"
#include "services/common/request_context.h"

namespace kl {

struct RequestLimits {
  int64_t vocab_size = 0;          // valid token ids are [0, vocab_size)
  int64_t max_prompt_tokens = 0;   // prompt length limit, tokens
  int64_t max_tokens_limit = 0;    // largest sampling.max_tokens accepted
  int64_t default_max_tokens = 0;  // sampling.max_tokens when unset
  int64_t context_tokens = 0;      // prompt + max_tokens must fit (model_max_length); 0 = unchecked
};

inline constexpr size_t kMaxRequestIdBytes = kRequestIdMaxBytes;

// "" is fine (the router generates one); otherwise <= 128 printable ASCII.
absl::Status ValidateRequestId(const std::string& id);
// A fresh id, "r-" + 16 hex digits.
std::string NewRequestId();
// A random sampling seed for requests that set none (reported in Usage.seed).
uint64_t RandomSeed();

// Everything but tokenization: a prompt is present and non-empty, chat roles,
// token ids in the vocabulary and within the length limit, sampling values
// (engine ValidateSamplingParams) and max_tokens. Returns the effective
// SamplingParams (defaults applied; `seed` still unset if the client set none).
absl::StatusOr<SamplingParams> ValidateGenerateRequest(const v1::GenerateRequest& request,
                                                       const RequestLimits& limits);

// The prompt's token ids: text (no special tokens), chat (model's chat
// format) or token ids as given. INVALID_ARGUMENT if it comes out empty or
// longer than limits.max_prompt_tokens. `request` passed ValidateGenerateRequest.
// INVALID_ARGUMENT naming sampling.max_tokens when prompt + max_tokens does not
// fit the model's context (a decode would otherwise run off its end).
absl::Status CheckFitsContext(int64_t prompt_tokens, int64_t max_tokens,
                              const RequestLimits& limits);

absl::StatusOr<std::vector<int32_t>> EncodePrompt(const v1::GenerateRequest& request,
                                                  const Tokenizer& tokenizer,
                                                  const RequestLimits& limits);

// Tokenize RPC: text or chat. INVALID_ARGUMENT when neither is set.
absl::StatusOr<std::vector<int32_t>> EncodeTokenizeRequest(const v1::TokenizeRequest& request,
                                                           const Tokenizer& tokenizer);

// What the workers need; `params.seed` must be set.
v1::WorkerSampling ToWorkerSampling(const SamplingParams& params);

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_REQUEST_VALIDATION_H_
