// Kimi tokenizer; see tokenizer.h.
#include "engine/tokenizer/tokenizer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/kimi_special_tokens.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

// tokenization_kimi.py iterates range(R, R + num_reserved_special_tokens + 2).
constexpr int64_t kMaxSpecialSlots = kNumReservedSpecialTokens + 2;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    const std::string reason = std::strerror(err);
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": ", reason));
    return absl::FailedPreconditionError(absl::StrCat(path, ": ", reason));
  }
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return contents.str();
}

// The id of a bos/eos/unk/pad_token name: `name` if the config set it (must
// exist), else `fallback` if present, else -1.
absl::StatusOr<int32_t> ResolveRole(
    const absl::flat_hash_map<std::string, int32_t>& special_ids,
    const std::string& name, absl::string_view fallback, absl::string_view key,
    absl::string_view config_name) {
  if (!name.empty()) {
    const auto it = special_ids.find(name);
    if (it == special_ids.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_name, ": ", key, " '", absl::CHexEscape(name),
          "' is not one of the special tokens"));
    }
    return it->second;
  }
  const auto it = special_ids.find(fallback);
  return it == special_ids.end() ? -1 : it->second;
}

}  // namespace

// Supplies the special tokens of one SplitForEncoding substring: either by
// scanning the text (Encode with allow_special) or from the chat template's
// marker positions (EncodeChat), which are absolute offsets in the rendered
// prompt; `base` is the substring's offset in it. A marker that straddles a
// substring boundary is not a special token there, exactly as in the
// reference, where each substring is scanned separately.
class Tokenizer::SpecialFinder {
 public:
  explicit SpecialFinder(const Tokenizer* tokenizer) : tokenizer_(tokenizer) {}
  explicit SpecialFinder(std::vector<SpecialMatch> markers)
      : markers_(std::move(markers)) {}

  void SetBase(size_t base) { base_ = base; }

  bool Next(absl::string_view text, size_t pos, SpecialMatch* m) {
    if (tokenizer_ != nullptr) return tokenizer_->FindSpecial(text, pos, m);
    while (next_ < markers_.size() && markers_[next_].start < base_ + pos) {
      ++next_;
    }
    if (next_ == markers_.size() ||
        markers_[next_].end > base_ + text.size()) {
      return false;
    }
    *m = {markers_[next_].start - base_, markers_[next_].end - base_,
          markers_[next_].id};
    ++next_;
    return true;
  }

 private:
  const Tokenizer* tokenizer_ = nullptr;
  std::vector<SpecialMatch> markers_;
  size_t next_ = 0;
  size_t base_ = 0;
};

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(
    const std::string& dir) {
  const std::string model_path = dir + "/tiktoken.model";
  const std::string config_path = dir + "/tokenizer_config.json";
  ASSIGN_OR_RETURN(std::string model_text, ReadFile(model_path));
  ASSIGN_OR_RETURN(std::vector<std::string> ranks,
                   ParseTiktokenModel(model_text, model_path));
  model_text.clear();
  model_text.shrink_to_fit();
  ASSIGN_OR_RETURN(const std::string config_text, ReadFile(config_path));
  ASSIGN_OR_RETURN(TokenizerConfigFile config,
                   ParseTokenizerConfig(config_text, config_path));
  return FromParts(std::move(ranks), config, config_path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromParts(
    std::vector<std::string> rank_bytes, const TokenizerConfigFile& config,
    absl::string_view config_name) {
  const int64_t num_ranks = static_cast<int64_t>(rank_bytes.size());
  if (num_ranks < 256 || num_ranks > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("rank table has ", num_ranks, " tokens; want 256..2^30"));
  }
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  t->num_ranks_ = static_cast<int32_t>(num_ranks);
  t->ranks_.reserve(num_ranks);
  for (int32_t r = 0; r < num_ranks; ++r) {
    if (rank_bytes[r].empty() || !t->ranks_.emplace(rank_bytes[r], r).second) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rank ", r, " is empty or duplicates another token"));
    }
  }
  for (int b = 0; b < 256; ++b) {
    if (!t->ranks_.contains(std::string(1, static_cast<char>(b)))) {
      return absl::InvalidArgumentError(
          absl::StrCat("no rank for the single byte ", b));
    }
  }
  t->tokens_ = std::move(rank_bytes);
  RETURN_IF_ERROR(t->InitSpecials(config, config_name));

  const auto& ids = t->special_ids_;
  ASSIGN_OR_RETURN(t->bos_id_, ResolveRole(ids, config.bos_token, "[BOS]",
                                           "bos_token", config_name));
  ASSIGN_OR_RETURN(t->eos_id_, ResolveRole(ids, config.eos_token, "[EOS]",
                                           "eos_token", config_name));
  ASSIGN_OR_RETURN(t->unk_id_, ResolveRole(ids, config.unk_token, "[UNK]",
                                           "unk_token", config_name));
  ASSIGN_OR_RETURN(t->pad_id_, ResolveRole(ids, config.pad_token, "[PAD]",
                                           "pad_token", config_name));
  ASSIGN_OR_RETURN(t->im_end_id_,
                   ResolveRole(ids, "", "<|im_end|>", "", config_name));
  ASSIGN_OR_RETURN(t->pretokenizer_, PreTokenizer::Create());
  return t;
}

absl::Status Tokenizer::InitSpecials(const TokenizerConfigFile& config,
                                     absl::string_view config_name) {
  const int64_t num_ranks = num_ranks_;
  // Special slots: 256, or more if the config names ids up to R + 257.
  int64_t slots = kNumReservedSpecialTokens;
  for (const AddedToken& a : config.added_tokens) {
    if (a.id < num_ranks) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_name, ": added token ", a.id, " '", absl::CHexEscape(a.content),
          "' collides with BPE rank ", a.id, " (the rank table has ", num_ranks,
          " tokens, so special ids start at ", num_ranks, ")"));
    }
    if (a.id >= num_ranks + kMaxSpecialSlots) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_name, ": added token ", a.id, " '", absl::CHexEscape(a.content),
          "' is outside the reserved special range [", num_ranks, ", ",
          num_ranks + kMaxSpecialSlots, ")"));
    }
    slots = std::max(slots, a.id - num_ranks + 1);
  }
  std::vector<std::string> names(slots);
  marked_special_.assign(slots, false);
  for (const AddedToken& a : config.added_tokens) {
    names[a.id - num_ranks] = a.content;
    marked_special_[a.id - num_ranks] = a.special;
  }
  for (int64_t i = 0; i < slots; ++i) {
    if (names[i].empty()) {
      names[i] = absl::StrCat("<|reserved_token_", num_ranks + i, "|>");
    }
    const int32_t id = static_cast<int32_t>(num_ranks + i);
    if (auto [it, inserted] = special_ids_.emplace(names[i], id); !inserted) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_name, ": special token '", absl::CHexEscape(names[i]),
          "' names both id ", it->second, " and id ", id));
    }
    special_first_byte_[static_cast<unsigned char>(names[i][0])] = true;
    special_lengths_.push_back(names[i].size());
    tokens_.push_back(std::move(names[i]));
  }
  std::sort(special_lengths_.begin(), special_lengths_.end(),
            std::greater<size_t>());
  special_lengths_.erase(
      std::unique(special_lengths_.begin(), special_lengths_.end()),
      special_lengths_.end());
  return absl::OkStatus();
}

bool Tokenizer::FindSpecial(absl::string_view text, size_t pos,
                            SpecialMatch* m) const {
  const size_t n = text.size();
  for (size_t i = pos; i < n; ++i) {
    if (!special_first_byte_[static_cast<unsigned char>(text[i])]) continue;
    for (const size_t len : special_lengths_) {
      if (len > n - i) continue;
      const auto it = special_ids_.find(text.substr(i, len));
      if (it != special_ids_.end()) {
        *m = {i, i + len, it->second};
        return true;
      }
    }
  }
  return false;
}

void Tokenizer::EncodeOrdinary(absl::string_view text,
                               std::vector<int32_t>* out) const {
  pretokenizer_->Split(text, [this, out](absl::string_view piece) {
    BytePairEncode(piece, ranks_, out);
  });
}

void Tokenizer::EncodeSubstring(absl::string_view text, SpecialFinder* finder,
                                std::vector<int32_t>* out) const {
  size_t pos = 0;
  while (true) {
    SpecialMatch m;
    const bool found = finder != nullptr && finder->Next(text, pos, &m);
    const size_t end = found ? m.start : text.size();
    if (end > pos) EncodeOrdinary(text.substr(pos, end - pos), out);
    if (!found) return;
    out->push_back(m.id);
    pos = m.end;
  }
}

std::vector<int32_t> Tokenizer::Encode(absl::string_view text,
                                       bool allow_special) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 1);
  SpecialFinder scanner(this);
  for (absl::string_view sub : SplitForEncoding(text)) {
    EncodeSubstring(sub, allow_special ? &scanner : nullptr, &out);
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::EncodeChat(
    const std::vector<ChatMessage>& messages, bool add_generation_prompt,
    const ChatOptions& options) const {
  const RenderedChat chat =
      RenderChatWithMarkers(messages, add_generation_prompt, options);
  std::vector<SpecialMatch> markers;
  markers.reserve(chat.markers.size());
  for (const RenderedChat::Marker& marker : chat.markers) {
    ASSIGN_OR_RETURN(const int32_t id, SpecialTokenId(marker.token));
    markers.push_back({marker.offset, marker.offset + marker.token.size(), id});
  }
  SpecialFinder finder(std::move(markers));
  std::vector<int32_t> out;
  out.reserve(chat.text.size() / 3 + 1);
  for (absl::string_view sub : SplitForEncoding(chat.text)) {
    finder.SetBase(static_cast<size_t>(sub.data() - chat.text.data()));
    EncodeSubstring(sub, &finder, &out);
  }
  return out;
}

absl::StatusOr<std::string> Tokenizer::Decode(
    absl::Span<const int32_t> ids) const {
  std::string out;
  out.reserve(ids.size() * 4);
  for (const int32_t id : ids) {
    if (!IsValidId(id)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token id ", id, " is outside the vocabulary [0, ", vocab_size(), ")"));
    }
    out += tokens_[id];
  }
  return out;
}

absl::StatusOr<absl::string_view> Tokenizer::TokenBytes(int32_t id) const {
  if (!IsValidId(id)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token id ", id, " is outside the vocabulary [0, ", vocab_size(), ")"));
  }
  return absl::string_view(tokens_[id]);
}

absl::StatusOr<int32_t> Tokenizer::SpecialTokenId(
    absl::string_view content) const {
  const auto it = special_ids_.find(content);
  if (it == special_ids_.end()) {
    return absl::NotFoundError(absl::StrCat(
        "no special token '", absl::CHexEscape(content), "' in this vocabulary"));
  }
  return it->second;
}

bool Tokenizer::IsMarkedSpecial(int32_t id) const {
  return IsSpecial(id) && marked_special_[id - num_ranks_];
}

}  // namespace kl
