// The named special tokens of the Kimi (K2 / Kimi-Linear) tokenizer, by offset
// from the first special id (= the number of BPE ranks; 163,584 for Kimi, so
// offset 2 is id 163,586). Source: the added_tokens_decoder of Kimi's
// tokenizer_config.json. Every other slot in the 256 reserved ones is unnamed
// and called "<|reserved_token_{id}|>" (tokenization_kimi.py's fallback name).
// Used by the synthetic tokenizer writer; real folders are read from their
// own tokenizer_config.json.
#ifndef KL_ENGINE_TOKENIZER_KIMI_SPECIAL_TOKENS_H_
#define KL_ENGINE_TOKENIZER_KIMI_SPECIAL_TOKENS_H_

namespace kl {

// Special-token slots reserved after the BPE ranks (num_reserved_special_tokens).
inline constexpr int kNumReservedSpecialTokens = 256;

struct KimiNamedSpecialToken {
  int offset;           // id - number of BPE ranks
  const char* content;  // the token's text
  bool special;         // added_tokens_decoder "special" flag
};

inline constexpr KimiNamedSpecialToken kKimiNamedSpecialTokens[] = {
    {0, "[BOS]", true},
    {1, "[EOS]", true},
    {2, "<|im_end|>", true},
    {3, "<|im_user|>", true},
    {4, "<|im_assistant|>", true},
    {6, "<|start_header_id|>", true},
    {7, "<|end_header_id|>", true},
    {9, "[EOT]", true},
    {10, "<|im_system|>", true},
    {11, "<|tool_calls_section_begin|>", false},
    {12, "<|tool_calls_section_end|>", false},
    {13, "<|tool_call_begin|>", false},
    {14, "<|tool_call_argument_begin|>", false},
    {15, "<|tool_call_end|>", false},
    {17, "<|im_middle|>", true},
    {254, "[UNK]", true},
    {255, "[PAD]", true},
};

// Offsets of the tokens the serving stack looks up by role.
inline constexpr int kKimiBosOffset = 0;     // [BOS]
inline constexpr int kKimiImEndOffset = 2;   // <|im_end|>: end of turn = model eos
inline constexpr int kKimiPadOffset = 255;   // [PAD]

}  // namespace kl

#endif  // KL_ENGINE_TOKENIZER_KIMI_SPECIAL_TOKENS_H_
