// Fuzz target: public request validation (services/router/request_validation)
// as the router runs it: the input is parsed as a serialized
// kl.v1.GenerateRequest (what gRPC hands the service), then
// ValidateGenerateRequest, and for accepted requests EncodePrompt,
// CheckFitsContext and ToWorkerSampling, against a synthetic tokenizer. Also
// ValidateRequestId on the raw id and the Tokenize RPC's encoder.
// Invariants: every refusal is INVALID_ARGUMENT; an accepted request's
// sampling values and prompt tokens are within the limits.
#include <cstddef>
#include <cstdint>
#include <string>

#include "google/protobuf/stubs/logging.h"
#include "proto/generation.pb.h"
#include "services/router/request_validation.h"
#include "tests/fuzz/fuzz_interface.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

void CheckRefusal(const absl::Status& s) {
  KL_FUZZ_CHECK(absl::IsInvalidArgument(s), std::string(s.ToString()).c_str());
  KL_FUZZ_CHECK(!s.message().empty(), "refusal without a message");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Parsing refuses invalid UTF-8 in string fields with an ERROR log line per
  // input; that is expected here and would drown the fuzzer's output.
  google::protobuf::SetLogHandler(nullptr);
  (void)kl::fuzz::FuzzTokenizer();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kl::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  const kl::Tokenizer& tok = kl::fuzz::FuzzTokenizer();
  kl::RequestLimits limits;
  limits.vocab_size = tok.vocab_size();
  limits.max_prompt_tokens = 256;
  limits.max_tokens_limit = 512;
  limits.default_max_tokens = 16;
  limits.context_tokens = 600;

  const absl::Status id_status = kl::ValidateRequestId(request.request_id());
  if (!id_status.ok()) CheckRefusal(id_status);

  absl::StatusOr<kl::SamplingParams> params = kl::ValidateGenerateRequest(request, limits);
  if (!params.ok()) {
    CheckRefusal(params.status());
  } else {
    KL_FUZZ_CHECK(params->max_tokens >= 1 && params->max_tokens <= limits.max_tokens_limit,
                  "accepted max_tokens out of range");
    KL_FUZZ_CHECK(params->temperature >= 0 && params->top_p > 0 && params->top_p <= 1 &&
                      params->top_k >= 0,
                  "accepted sampling values out of range");
    for (int32_t id : params->stop_token_ids) {
      KL_FUZZ_CHECK(id >= 0 && id < limits.vocab_size, "accepted stop token id out of range");
    }
    absl::StatusOr<std::vector<int32_t>> prompt = kl::EncodePrompt(request, tok, limits);
    if (!prompt.ok()) {
      CheckRefusal(prompt.status());
    } else {
      KL_FUZZ_CHECK(!prompt->empty(), "empty prompt accepted");
      KL_FUZZ_CHECK(static_cast<int64_t>(prompt->size()) <= limits.max_prompt_tokens,
                    "prompt longer than max_prompt_tokens accepted");
      for (int32_t id : *prompt) KL_FUZZ_CHECK(tok.IsValidId(id), "prompt id out of range");
      const absl::Status fits =
          kl::CheckFitsContext(static_cast<int64_t>(prompt->size()), params->max_tokens, limits);
      if (!fits.ok()) CheckRefusal(fits);
    }
    if (!params->seed.has_value()) params->seed = 1;
    (void)kl::ToWorkerSampling(*params);
  }

  // The Tokenize RPC takes the same text / chat fields.
  kl::v1::TokenizeRequest tokenize;
  if (request.has_chat()) *tokenize.mutable_chat() = request.chat();
  if (request.prompt_case() == kl::v1::GenerateRequest::kText) tokenize.set_text(request.text());
  absl::StatusOr<std::vector<int32_t>> ids = kl::EncodeTokenizeRequest(tokenize, tok);
  if (!ids.ok()) CheckRefusal(ids.status());
  return 0;
}
