// Small helpers the multi-process suites share (tests/integration, tests/fault,
// tests/gpu): deterministic prompts, greedy requests, a decode worker's stats.
#ifndef KL_TESTS_COMMON_CLUSTER_UTIL_H_
#define KL_TESTS_COMMON_CLUSTER_UTIL_H_

#include <cstdint>
#include <string>

#include "proto/generation.pb.h"
#include "proto/worker.pb.h"

namespace kl::testing {

// `words` words from a fixed mixed-script vocabulary, varied by `seed`.
std::string WordPrompt(int words, int seed);

// Greedy generation of at most `max_tokens` tokens.
v1::GenerateRequest GreedyRequest(const std::string& prompt, int64_t max_tokens,
                                  bool ignore_eos = true);

// Decode.Stats of the (plaintext) decode worker at `address`; fails the test on error.
v1::WorkerStats DecodeStats(const std::string& address);

}  // namespace kl::testing

#endif  // KL_TESTS_COMMON_CLUSTER_UTIL_H_
