// Streaming detokenizer; see streaming_detokenizer.h.
#include "engine/tokenizer/streaming_detokenizer.h"

#include "engine/tokenizer/utf8.h"

namespace kl {

StreamingDetokenizer::StreamingDetokenizer(const Tokenizer* tokenizer,
                                           bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string StreamingDetokenizer::Push(int32_t id) {
  const absl::StatusOr<absl::string_view> bytes = tokenizer_->TokenBytes(id);
  if (!bytes.ok()) {
    ++invalid_ids_;
    std::string out = Drain(/*final=*/true);
    out.append(kUtf8Replacement.data(), kUtf8Replacement.size());
    return out;
  }
  if (skip_special_tokens_ && tokenizer_->IsSpecial(id)) return std::string();
  pending_.append(bytes->data(), bytes->size());
  return Drain(/*final=*/false);
}

std::string StreamingDetokenizer::Flush() { return Drain(/*final=*/true); }

std::string StreamingDetokenizer::Drain(bool final) {
  std::string out;
  size_t pos = 0;
  while (pos < pending_.size()) {
    const Utf8Scan scan = ScanUtf8(pending_, pos);
    if (scan.kind == Utf8Scan::kIncomplete && !final) break;
    if (scan.kind == Utf8Scan::kValid) {
      out.append(pending_, pos, scan.length);
    } else {
      out.append(kUtf8Replacement.data(), kUtf8Replacement.size());
    }
    pos += scan.length;
  }
  pending_.erase(0, pos);
  return out;
}

}  // namespace kl
