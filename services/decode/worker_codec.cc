#include "services/decode/worker_codec.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "kernels/common/status_macros.h"

namespace kl {

absl::StatusOr<SamplingParams> SamplingFromProto(const v1::WorkerSampling& s, int64_t max_tokens,
                                                 int64_t vocab_size) {
  SamplingParams p;
  p.temperature = s.temperature();
  p.top_p = s.top_p() == 0.0 ? 1.0 : s.top_p();
  p.top_k = s.top_k();
  p.seed = s.seed();
  p.max_tokens = max_tokens;
  p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  p.ignore_eos = s.ignore_eos();
  SamplingLimits limits;
  limits.vocab_size = vocab_size;
  limits.max_tokens = std::max<int64_t>(max_tokens, 1);
  RETURN_IF_ERROR(ValidateSamplingParams(p, limits));
  return p;
}

std::string FingerprintHex(uint64_t fingerprint) {
  return absl::StrFormat("0x%016x", fingerprint);
}

}  // namespace kl
