// Test helpers for StateBundle tests: the hand-built tiny config, deterministic
// random states, and frame surgery (re-sealing a record after editing it).
#ifndef KL_ENGINE_STATE_BUNDLE_TEST_UTIL_H_
#define KL_ENGINE_STATE_BUNDLE_TEST_UTIL_H_

#include <cstdint>
#include <string>

#include "engine/config/model_config.h"
#include "engine/state/bundle_format.h"
#include "engine/state/sequence_state.h"

namespace kl {
namespace testing_util {

// hidden 256; layers KDA, KDA, KDA, MLA; KDA 4 heads x 64, conv 4; MLA
// kv_lora_rank 64 + rope 16; vocab 4096. Built field by field (not TinyConfig()).
ModelConfig TinyStateConfig();

// A state of the right shapes with values uniform in [-1, 1) (never zero) from `seed`.
SequenceState RandomState(const ModelConfig& config, int64_t num_tokens, uint64_t seed);

// Recomputes the record CRC (offset 8) of an edited frame so that only the
// semantic check under test can refuse it.
std::string Reseal(std::string frame);

// A part frame with arbitrary (possibly inconsistent) fields and a correct CRC.
std::string MakePartFrame(uint64_t bundle_id, PartKind kind, DType dtype, uint32_t layer,
                          uint64_t row_begin, uint64_t row_end, const std::string& payload);

}  // namespace testing_util
}  // namespace kl

#endif  // KL_ENGINE_STATE_BUNDLE_TEST_UTIL_H_
