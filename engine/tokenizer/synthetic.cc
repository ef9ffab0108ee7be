// Synthetic Kimi-format tokenizer writer; see synthetic.h.
#include "engine/tokenizer/synthetic.h"

#include "kernels/common/splitmix64.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <queue>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/kimi_special_tokens.h"
#include "engine/tokenizer/pretokenizer.h"
#include "engine/tokenizer/utf8.h"
#include "engine/tokenizer/vocab_files.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

// Bytes of seeded random text added to the fixed corpus.
constexpr size_t kRandomTextBytes = 96 * 1024;
// Longest token the random fill creates, in bytes.
constexpr size_t kMaxFillTokenBytes = 16;

// SplitMix64: tiny, fully specified, so vocabularies match across platforms
// (std::uniform_int_distribution is implementation-defined).
class Rng : public SplitMix64 {
 public:
  using SplitMix64::SplitMix64;
  size_t Below(size_t n) { return static_cast<size_t>(Next() % n); }
  bool Chance(int percent) { return Below(100) < static_cast<size_t>(percent); }
};

template <size_t N>
const char* Pick(Rng& rng, const char* const (&pool)[N]) {
  return pool[rng.Below(N)];
}

// Text mixing pieces of the corpus (so its words recur often enough to be
// merged), syllable words, numbers, runs of the corpus's CJK characters, code
// fragments and punctuation: enough that BPE learns realistic tokens.
std::string RandomText(uint64_t seed, size_t bytes,
                       const std::vector<std::string>& corpus_pieces,
                       const std::vector<std::string>& cjk_chars) {
  static const char* const kOnsets[] = {"",  "b",  "c",  "d",  "f",  "g",
                                        "h", "j",  "k",  "l",  "m",  "n",
                                        "p", "r",  "s",  "t",  "v",  "w",
                                        "th", "st", "ch", "sh", "pr", "tr"};
  static const char* const kVowels[] = {"a", "e", "i", "o", "u",
                                        "ai", "ea", "ou", "y", "ee"};
  static const char* const kCodas[] = {"",  "",  "n",  "r",  "s",  "t",
                                       "l", "m", "nd", "ng", "st", "ck"};
  static const char* const kCode[] = {"foo_bar(", "->", "::", "{", "}",
                                      "==", " += 1;", "[i]", "();", "\t"};
  static const char* const kSeparators[] = {" ", " ", " ", " ", " ", ", ",
                                            ". ", "\n", "\n\n", "; ", "'s ",
                                            " (", ") ", "? ", "! ", "  "};
  Rng rng(seed ^ 0x5EED5EED5EED5EEDULL);
  std::string out;
  out.reserve(bytes + 64);
  while (out.size() < bytes) {
    const size_t kind = rng.Below(100);
    if (kind < 40) {
      out += corpus_pieces[rng.Below(corpus_pieces.size())];
      continue;
    }
    if (kind < 70) {
      std::string word;
      const size_t syllables = 1 + rng.Below(3);
      for (size_t i = 0; i < syllables; ++i) {
        word += Pick(rng, kOnsets);
        word += Pick(rng, kVowels);
        word += Pick(rng, kCodas);
      }
      if (rng.Chance(3)) {
        for (char& c : word) c = static_cast<char>(c - 'a' + 'A');
      } else if (rng.Chance(12)) {
        word[0] = static_cast<char>(word[0] - 'a' + 'A');
      }
      out += word;
    } else if (kind < 80) {
      const size_t digits = 1 + rng.Below(6);
      for (size_t i = 0; i < digits; ++i) {
        out.push_back(static_cast<char>('0' + rng.Below(10)));
      }
    } else if (kind < 92) {
      const size_t chars = 1 + rng.Below(6);
      for (size_t i = 0; i < chars; ++i) {
        out += cjk_chars[rng.Below(cjk_chars.size())];
      }
    } else {
      out += Pick(rng, kCode);
    }
    out += Pick(rng, kSeparators);
  }
  return out;
}

// Incremental BPE trainer over pre-tokenized words. Picks the most frequent
// adjacent pair (ties: smaller left id, then smaller right id) until no pair
// occurs twice or `num_ranks` tokens exist.
class BpeTrainer {
 public:
  BpeTrainer(std::vector<std::string>* tokens,
             absl::flat_hash_map<std::string, int32_t>* ids)
      : tokens_(*tokens), ids_(*ids) {}

  void AddWord(absl::string_view bytes, int64_t count) {
    Word w;
    w.count = count;
    for (unsigned char c : bytes) w.symbols.push_back(c);
    words_.push_back(std::move(w));
  }

  void Train(size_t num_ranks) {
    for (int32_t w = 0; w < static_cast<int32_t>(words_.size()); ++w) {
      AddPairs(w, +1);
    }
    for (const auto& [key, count] : pair_count_) heap_.push({count, key});
    while (tokens_.size() < num_ranks && !heap_.empty()) {
      const Entry top = heap_.top();
      heap_.pop();
      const auto it = pair_count_.find(top.key);
      if (it == pair_count_.end() || it->second != top.count) continue;  // stale
      if (top.count < 2) break;
      Merge(top.key);
    }
  }

 private:
  struct Word {
    std::vector<int32_t> symbols;
    int64_t count;
    int64_t last_merge = -1;
  };
  struct Entry {
    int64_t count;
    uint64_t key;
    bool operator<(const Entry& o) const {  // max-heap: count, then min key
      return count != o.count ? count < o.count : key > o.key;
    }
  };
  static uint64_t Key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b);
  }

  void AddPairs(int32_t w, int sign) {
    const Word& word = words_[w];
    for (size_t i = 0; i + 1 < word.symbols.size(); ++i) {
      const uint64_t key = Key(word.symbols[i], word.symbols[i + 1]);
      pair_count_[key] += sign * word.count;
      touched_.insert(key);
      if (sign > 0) pair_words_[key].push_back(w);
    }
  }

  void Merge(uint64_t key) {
    const int32_t a = static_cast<int32_t>(key >> 32);
    const int32_t b = static_cast<int32_t>(key & 0xFFFFFFFF);
    std::string merged = tokens_[a] + tokens_[b];
    int32_t id;
    if (auto it = ids_.find(merged); it != ids_.end()) {
      id = it->second;  // reachable another way already: reuse, no new rank
    } else {
      id = static_cast<int32_t>(tokens_.size());
      ids_.emplace(merged, id);
      tokens_.push_back(std::move(merged));
    }
    ++merges_;
    touched_.clear();
    const std::vector<int32_t> word_ids = std::move(pair_words_[key]);
    pair_words_.erase(key);
    for (const int32_t w : word_ids) {
      Word& word = words_[w];
      if (word.last_merge == merges_) continue;  // listed twice
      word.last_merge = merges_;
      AddPairs(w, -1);
      std::vector<int32_t> out;
      out.reserve(word.symbols.size());
      for (size_t i = 0; i < word.symbols.size(); ++i) {
        if (i + 1 < word.symbols.size() && word.symbols[i] == a &&
            word.symbols[i + 1] == b) {
          out.push_back(id);
          ++i;
        } else {
          out.push_back(word.symbols[i]);
        }
      }
      word.symbols = std::move(out);
      AddPairs(w, +1);
    }
    // Deterministic push order (the heap's pop order depends only on the
    // entries, but keep it simple to reason about).
    std::vector<uint64_t> touched(touched_.begin(), touched_.end());
    std::sort(touched.begin(), touched.end());
    for (const uint64_t k : touched) {
      const int64_t count = pair_count_[k];
      if (count <= 0) {
        pair_count_.erase(k);
      } else {
        heap_.push({count, k});
      }
    }
  }

  std::vector<std::string>& tokens_;
  absl::flat_hash_map<std::string, int32_t>& ids_;
  std::vector<Word> words_;
  absl::flat_hash_map<uint64_t, int64_t> pair_count_;
  absl::flat_hash_map<uint64_t, std::vector<int32_t>> pair_words_;
  absl::flat_hash_set<uint64_t> touched_;
  std::priority_queue<Entry> heap_;
  int64_t merges_ = 0;
};

absl::Status WriteFileAtomically(const std::string& path,
                                 absl::string_view contents) {
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(tmp, ": ", std::strerror(errno)));
  }
  const bool wrote =
      std::fwrite(contents.data(), 1, contents.size(), f) == contents.size();
  const bool closed = std::fclose(f) == 0;
  if (!wrote || !closed || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string reason = std::strerror(errno);
    std::remove(tmp.c_str());
    return absl::DataLossError(absl::StrCat(path, ": write failed: ", reason));
  }
  return absl::OkStatus();
}

std::string TiktokenModelText(const std::vector<std::string>& ranks) {
  std::string out;
  out.reserve(ranks.size() * 16);
  for (size_t r = 0; r < ranks.size(); ++r) {
    absl::StrAppend(&out, Base64Encode(ranks[r]), " ", r, "\n");
  }
  return out;
}

// tokenizer_config.json and special_tokens_map.json, shaped like Kimi's.
std::pair<std::string, std::string> ConfigTexts(int64_t num_ranks) {
  nlohmann::ordered_json decoder = nlohmann::ordered_json::object();
  for (const KimiNamedSpecialToken& t : kKimiNamedSpecialTokens) {
    decoder[std::to_string(num_ranks + t.offset)] = {
        {"content", t.content}, {"lstrip", false},      {"normalized", false},
        {"rstrip", false},      {"single_word", false}, {"special", t.special}};
  }
  // tokenization_kimi.py's default additional_special_tokens.
  const nlohmann::ordered_json additional = {
      "<|im_end|>",        "<|im_user|>", "<|im_assistant|>",
      "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
      "<|im_system|>",     "<|im_middle|>"};
  nlohmann::ordered_json config = {
      {"added_tokens_decoder", decoder},
      {"additional_special_tokens", additional},
      {"auto_map",
       {{"AutoTokenizer", {"tokenization_kimi.TikTokenTokenizer", nullptr}}}},
      {"bos_token", "[BOS]"},
      {"clean_up_tokenization_spaces", false},
      {"eos_token", "[EOS]"},
      {"extra_special_tokens", nlohmann::ordered_json::object()},
      {"model_max_length", 1048576},
      {"pad_token", "[PAD]"},
      {"tokenizer_class", "TikTokenTokenizer"},
      {"unk_token", "[UNK]"},
  };
  nlohmann::ordered_json map = {
      {"additional_special_tokens", additional},
      {"bos_token", "[BOS]"},
      {"eos_token", "[EOS]"},
      {"pad_token", "[PAD]"},
      {"unk_token", "[UNK]"},
  };
  return {config.dump(2) + "\n", map.dump(2) + "\n"};
}

absl::Status CheckVocabSize(int64_t vocab_size) {
  if (vocab_size < kMinSyntheticVocabSize ||
      vocab_size > kMaxSyntheticVocabSize) {
    return absl::InvalidArgumentError(absl::StrCat(
        "synthetic vocab_size ", vocab_size, " is outside [",
        kMinSyntheticVocabSize, ", ", kMaxSyntheticVocabSize, "]"));
  }
  return absl::OkStatus();
}

}  // namespace

SyntheticSpecialIds SpecialIdsForVocab(int64_t vocab_size) {
  const int64_t first = vocab_size - kNumReservedSpecialTokens;
  return {first + kKimiBosOffset, first + kKimiImEndOffset,
          first + kKimiPadOffset};
}

absl::StatusOr<std::vector<std::string>> BuildSyntheticRanks(int64_t num_ranks,
                                                             uint64_t seed) {
  if (num_ranks < 256 ||
      num_ranks > kMaxSyntheticVocabSize - kNumReservedSpecialTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("synthetic rank count ", num_ranks, " is out of range"));
  }
  std::vector<std::string> tokens;
  tokens.reserve(num_ranks);
  absl::flat_hash_map<std::string, int32_t> ids;
  ids.reserve(num_ranks);
  for (int b = 0; b < 256; ++b) {
    tokens.emplace_back(1, static_cast<char>(b));
    ids.emplace(tokens.back(), b);
  }

  // 1. BPE merges learned from the corpus plus seeded random text.
  ASSIGN_OR_RETURN(std::unique_ptr<PreTokenizer> pretokenizer,
                   PreTokenizer::Create());
  std::map<std::string, int64_t> word_counts;  // ordered: deterministic
  pretokenizer->Split(SyntheticCorpus(), [&word_counts](absl::string_view p) {
    ++word_counts[std::string(p)];
  });
  std::vector<std::string> corpus_pieces;
  std::set<std::string> cjk_chars;  // ordered: deterministic
  for (const auto& [piece, count] : word_counts) {
    corpus_pieces.push_back(piece);
    for (size_t i = 0; i < piece.size();) {
      const Utf8Scan scan = ScanUtf8(piece, i);
      if (scan.kind == Utf8Scan::kValid && scan.length == 3) {
        cjk_chars.insert(piece.substr(i, 3));
      }
      i += scan.length;
    }
  }
  const std::string random_text =
      RandomText(seed, kRandomTextBytes, corpus_pieces,
                 std::vector<std::string>(cjk_chars.begin(), cjk_chars.end()));
  pretokenizer->Split(random_text, [&word_counts](absl::string_view p) {
    ++word_counts[std::string(p)];
  });
  BpeTrainer trainer(&tokens, &ids);
  for (const auto& [word, count] : word_counts) trainer.AddWord(word, count);
  trainer.Train(static_cast<size_t>(num_ranks));

  // 2. Seeded concatenations of existing tokens fill the rest.
  Rng rng(seed);
  const int64_t max_attempts = 64 * num_ranks + 1024;
  for (int64_t attempt = 0;
       static_cast<int64_t>(tokens.size()) < num_ranks; ++attempt) {
    if (attempt > max_attempts) {
      return absl::InternalError("synthetic vocabulary fill did not converge");
    }
    const std::string& a = tokens[rng.Below(tokens.size())];
    const std::string& b = tokens[rng.Below(tokens.size())];
    if (a.size() + b.size() > kMaxFillTokenBytes) continue;
    std::string merged = a + b;
    if (ids.contains(merged)) continue;
    ids.emplace(merged, static_cast<int32_t>(tokens.size()));
    tokens.push_back(std::move(merged));
  }
  return tokens;
}

absl::Status WriteSyntheticTokenizer(const std::string& dir, int64_t vocab_size,
                                     uint64_t seed) {
  RETURN_IF_ERROR(CheckVocabSize(vocab_size));
  const int64_t num_ranks = vocab_size - kNumReservedSpecialTokens;
  ASSIGN_OR_RETURN(const std::vector<std::string> ranks,
                   BuildSyntheticRanks(num_ranks, seed));
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, ": cannot create directory: ", ec.message()));
  }
  const auto [config, special_map] = ConfigTexts(num_ranks);
  RETURN_IF_ERROR(
      WriteFileAtomically(dir + "/tiktoken.model", TiktokenModelText(ranks)));
  RETURN_IF_ERROR(WriteFileAtomically(dir + "/tokenizer_config.json", config));
  RETURN_IF_ERROR(
      WriteFileAtomically(dir + "/special_tokens_map.json", special_map));
  return absl::OkStatus();
}

}  // namespace kl
