// Fuzz target: the tokenizer (engine/tokenizer) on a synthetic Kimi-format
// vocabulary. Input: one control byte, then the payload.
//   - the payload as text (any bytes: invalid UTF-8, special-token strings):
//     Encode with and without special tokens; Decode must give the bytes back;
//   - the payload as token ids (2 bytes each, mapped mostly into the vocabulary
//     with some out-of-range ids, or 4-byte raw int32 ids when control bit 0 is
//     set): Decode, and the streaming detokenizer, whose deltas must be valid
//     UTF-8 and concatenate to ReplaceInvalidUtf8(Decode(ids));
//   - the payload split at '\x01' into chat messages: EncodeChat.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/streaming_detokenizer.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/utf8.h"
#include "tests/fuzz/fuzz_interface.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

std::vector<int32_t> IdsFromBytes(const std::string& bytes, bool raw, int32_t vocab) {
  std::vector<int32_t> ids;
  if (raw) {
    for (size_t i = 0; i + 4 <= bytes.size(); i += 4) {
      int32_t id;
      std::memcpy(&id, bytes.data() + i, 4);
      ids.push_back(id);
    }
  } else {
    // [-2, vocab + 2): mostly valid ids, so deep paths (multi-byte characters
    // split across tokens, specials) are reached, plus the edges just outside.
    for (size_t i = 0; i + 2 <= bytes.size(); i += 2) {
      const uint32_t v = static_cast<uint8_t>(bytes[i]) | (static_cast<uint8_t>(bytes[i + 1]) << 8);
      ids.push_back(static_cast<int32_t>(v % static_cast<uint32_t>(vocab + 4)) - 2);
    }
  }
  return ids;
}

void CheckStreaming(const kl::Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special) {
  kl::StreamingDetokenizer detok(&tok, skip_special);
  std::string streamed;
  for (int32_t id : ids) {
    const std::string delta = detok.Push(id);
    KL_FUZZ_CHECK(kl::IsValidUtf8(delta), "streamed delta is not valid UTF-8");
    KL_FUZZ_CHECK(detok.pending_bytes() <= 3, "more than 3 bytes held back");
    streamed += delta;
  }
  const std::string tail = detok.Flush();
  KL_FUZZ_CHECK(kl::IsValidUtf8(tail), "flushed tail is not valid UTF-8");
  streamed += tail;
  KL_FUZZ_CHECK(detok.pending_bytes() == 0, "bytes held back after Flush");
  bool all_valid = true;
  for (int32_t id : ids) all_valid = all_valid && tok.IsValidId(id);
  if (all_valid) {
    KL_FUZZ_CHECK(detok.invalid_ids() == 0, "valid ids counted as invalid");
    if (!skip_special) {
      absl::StatusOr<std::string> decoded = tok.Decode(ids);
      KL_FUZZ_CHECK(decoded.ok(), "Decode of valid ids failed");
      KL_FUZZ_CHECK(streamed == kl::ReplaceInvalidUtf8(*decoded),
                    "streamed text != ReplaceInvalidUtf8(Decode(ids))");
    }
  } else {
    KL_FUZZ_CHECK(detok.invalid_ids() > 0, "invalid ids not counted");
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)kl::fuzz::FuzzTokenizer();  // build the fixture before fuzzing starts
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const kl::Tokenizer& tok = kl::fuzz::FuzzTokenizer();
  const uint8_t control = data[0];
  const std::string payload(reinterpret_cast<const char*>(data + 1), size - 1);

  // Text -> ids -> the same bytes, with and without special tokens.
  for (bool allow_special : {false, true}) {
    const std::vector<int32_t> ids = tok.Encode(payload, allow_special);
    for (int32_t id : ids) KL_FUZZ_CHECK(tok.IsValidId(id), "Encode produced an invalid id");
    if (!allow_special) {
      for (int32_t id : ids) KL_FUZZ_CHECK(!tok.IsSpecial(id), "special id from plain text");
    }
    absl::StatusOr<std::string> back = tok.Decode(ids);
    KL_FUZZ_CHECK(back.ok(), "Decode of Encode output failed");
    KL_FUZZ_CHECK(*back == payload, "Decode(Encode(text)) != text");
  }

  // Arbitrary ids.
  const std::vector<int32_t> ids = IdsFromBytes(payload, (control & 1) != 0, tok.vocab_size());
  absl::StatusOr<std::string> decoded = tok.Decode(ids);
  bool all_valid = true;
  for (int32_t id : ids) all_valid = all_valid && tok.IsValidId(id);
  KL_FUZZ_CHECK(decoded.ok() == all_valid, "Decode status disagrees with IsValidId");
  if (!decoded.ok()) {
    KL_FUZZ_CHECK(absl::IsInvalidArgument(decoded.status()), "Decode error is not INVALID_ARGUMENT");
  }
  CheckStreaming(tok, ids, /*skip_special=*/false);
  CheckStreaming(tok, ids, /*skip_special=*/true);

  // Chat: messages separated by '\x01', roles cycling through the known ones
  // and one unknown; user text must never become a special id beyond markers.
  static const char* const kRoles[] = {"system", "user", "assistant", "tool"};
  std::vector<kl::ChatMessage> messages;
  size_t i = 0;
  for (absl::string_view part : absl::StrSplit(payload, '\x01')) {
    messages.push_back({kRoles[((control >> 2) + i++) & 3], std::string(part)});
  }
  absl::StatusOr<std::vector<int32_t>> chat = tok.EncodeChat(messages, (control & 2) != 0);
  KL_FUZZ_CHECK(chat.ok(), std::string(chat.status().ToString()).c_str());
  const kl::RenderedChat rendered = kl::RenderChatWithMarkers(messages, (control & 2) != 0);
  size_t specials = 0;
  for (int32_t id : *chat) specials += tok.IsSpecial(id) ? 1 : 0;
  KL_FUZZ_CHECK(specials == rendered.markers.size(), "chat content produced special ids");
  absl::StatusOr<std::string> chat_text = tok.Decode(*chat);
  KL_FUZZ_CHECK(chat_text.ok() && *chat_text == rendered.text, "chat ids do not decode to the render");
  return 0;
}
