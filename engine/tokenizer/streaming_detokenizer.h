// Incremental detokenization for streaming responses: turns generated token
// ids into text deltas that are always valid UTF-8 and never split a
// character, so each delta can go straight into a proto `string`.
//
// Token bytes are buffered until they form complete characters. A trailing
// incomplete-but-valid sequence is held back (a later token may complete it).
// Bytes that can no longer become valid are emitted as U+FFFD, one per maximal
// invalid subpart, so the concatenation of all deltas plus Flush() equals
// ReplaceInvalidUtf8(Decode(ids)) — Python's decode(errors="replace") — no
// matter how the bytes were split into tokens.
//
// One instance per sequence; not thread-safe. The Tokenizer must outlive it.
#ifndef KL_ENGINE_TOKENIZER_STREAMING_DETOKENIZER_H_
#define KL_ENGINE_TOKENIZER_STREAMING_DETOKENIZER_H_

#include <cstdint>
#include <string>

#include "engine/tokenizer/tokenizer.h"

namespace kl {

class StreamingDetokenizer {
 public:
  // With `skip_special_tokens`, special ids contribute no text (like HF's
  // decode(skip_special_tokens=True) for Kimi, which treats all ids >= the
  // rank count as special); otherwise they contribute their text, e.g.
  // "<|im_end|>".
  explicit StreamingDetokenizer(const Tokenizer* tokenizer,
                                bool skip_special_tokens = false);

  // Adds one token; returns the text that became complete (often empty while
  // a multi-byte character is split across tokens). An id outside the
  // vocabulary cannot be decoded: it is rendered as U+FFFD (after flushing
  // any held-back bytes, which it cuts off) and counted in invalid_ids().
  std::string Push(int32_t id);

  // End of stream: returns whatever is held back, as U+FFFD. The
  // detokenizer can be reused for a new stream afterwards.
  std::string Flush();

  // Bytes currently held back (0..3).
  size_t pending_bytes() const { return pending_.size(); }
  int64_t invalid_ids() const { return invalid_ids_; }

 private:
  // Emits the complete prefix of pending_ (all of it if `final`).
  std::string Drain(bool final);

  const Tokenizer* tokenizer_;
  bool skip_special_tokens_;
  std::string pending_;
  int64_t invalid_ids_ = 0;
};

}  // namespace kl

#endif  // KL_ENGINE_TOKENIZER_STREAMING_DETOKENIZER_H_
