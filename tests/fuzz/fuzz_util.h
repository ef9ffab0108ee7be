// Fixtures shared by the fuzz targets and the seed-corpus generator: small,
// deterministic instances of the real objects, so each fuzz iteration is fast.
#ifndef KL_TESTS_FUZZ_FUZZ_UTIL_H_
#define KL_TESTS_FUZZ_FUZZ_UTIL_H_

#include <cstdint>

#include "engine/config/model_config.h"
#include "engine/tokenizer/tokenizer.h"

namespace kl {
namespace fuzz {

// Vocabulary of FuzzTokenizer(): 768 BPE ranks + Kimi's 256 specials.
inline constexpr int64_t kFuzzVocabSize = 1024;

// A synthetic Kimi-format tokenizer (engine/tokenizer/synthetic.h), built once
// per process through the real files and Tokenizer::Load. Aborts if that fails
// (a fuzz run without its fixture would test nothing).
const Tokenizer& FuzzTokenizer();

// The model whose StateBundles the bundle fuzzer decodes: layers KDA, MLA;
// KDA 2 heads x 4 (conv width 3), MLA kv_lora_rank 4 + rope 2; max length 64,
// so a whole bundle of a few tokens is well under 1 KiB.
ModelConfig FuzzBundleConfig();

}  // namespace fuzz
}  // namespace kl

#endif  // KL_TESTS_FUZZ_FUZZ_UTIL_H_
