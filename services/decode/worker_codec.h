// Conversions between the worker protos (proto/worker.proto) and engine
// structs, shared by kl-decode and kl-prefill (kl-prefill is a Decode client).
#ifndef KL_SERVICES_DECODE_WORKER_CODEC_H_
#define KL_SERVICES_DECODE_WORKER_CODEC_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/sampling/sampler.h"
#include "proto/worker.pb.h"

namespace kl {

// WorkerSampling -> SamplingParams with `max_tokens`, validated against
// `vocab_size` (INVALID_ARGUMENT naming the field). The seed is always set
// (prefill and decode must draw from the same stream); top_p 0 means unset
// (proto3 default), i.e. 1.0.
absl::StatusOr<SamplingParams> SamplingFromProto(const v1::WorkerSampling& s, int64_t max_tokens,
                                                 int64_t vocab_size);

// "0x" + 16 hex digits, as Stats reports fingerprints.
std::string FingerprintHex(uint64_t fingerprint);

}  // namespace kl

#endif  // KL_SERVICES_DECODE_WORKER_CODEC_H_
