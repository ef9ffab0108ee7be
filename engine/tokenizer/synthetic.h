// A synthetic Kimi-format tokenizer folder for test checkpoints: real file
// formats and Kimi's special-token layout, with a small deterministic BPE
// vocabulary instead of Moonshot's 163,584 ranks.
//
// Ranks: the 256 single bytes (rank = byte value), then merges learned by a
// plain BPE trainer over an embedded corpus (English prose, code, Chinese,
// numbers) plus seeded random text, pre-tokenized with Kimi's regex; once the
// corpus stops yielding merges (pairs seen fewer than twice), seeded random
// concatenations of existing tokens fill the table. Every multi-byte token is
// the concatenation of two lower-ranked tokens. Deterministic: the same
// (vocab_size, seed) writes byte-identical files on every platform. The
// 163,840-token vocabulary of the 48B config takes about a second.
#ifndef KL_ENGINE_TOKENIZER_SYNTHETIC_H_
#define KL_ENGINE_TOKENIZER_SYNTHETIC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kl {

// Smallest vocabulary the writer accepts: 256 byte ranks + 256 specials.
inline constexpr int64_t kMinSyntheticVocabSize = 512;
inline constexpr int64_t kMaxSyntheticVocabSize = int64_t{1} << 24;

// Special ids of a synthetic (or real Kimi) vocabulary of `vocab_size` ids,
// laid out like Kimi's: the 256 specials occupy [vocab_size - 256, vocab_size).
// For vocab_size = 163,840 these are Kimi-Linear's config.json ids
// (163584, 163586, 163839).
struct SyntheticSpecialIds {
  int64_t bos;     // "[BOS]", the first special id
  int64_t eos;     // "<|im_end|>": end of turn, the model's eos_token_id
  int64_t pad;     // "[PAD]", the last id
};
SyntheticSpecialIds SpecialIdsForVocab(int64_t vocab_size);

// Writes `dir`/tiktoken.model (vocab_size - 256 ranks), tokenizer_config.json
// (added_tokens_decoder with Kimi's named specials at Kimi's offsets; bos
// "[BOS]", eos "[EOS]", unk "[UNK]", pad "[PAD]", as in Kimi's file) and
// special_tokens_map.json. Creates `dir` if needed; overwrites the files.
// InvalidArgument unless kMinSyntheticVocabSize <= vocab_size <=
// kMaxSyntheticVocabSize.
absl::Status WriteSyntheticTokenizer(const std::string& dir, int64_t vocab_size,
                                     uint64_t seed);

// The rank table WriteSyntheticTokenizer writes: token bytes indexed by rank.
absl::StatusOr<std::vector<std::string>> BuildSyntheticRanks(int64_t num_ranks,
                                                             uint64_t seed);

// The embedded training corpus (a few KB of varied text).
absl::string_view SyntheticCorpus();

}  // namespace kl

#endif  // KL_ENGINE_TOKENIZER_SYNTHETIC_H_
