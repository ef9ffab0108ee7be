// Kimi's chat format (the K2-family chat_template.jinja, restricted to plain
// text content; no tools, images or tool-call sections):
//
//   [<|im_system|>system<|im_middle|>{default system prompt}<|im_end|>]
//   for each message:
//     <|im_user|>{name}<|im_middle|>{content}<|im_end|>        role "user"
//     <|im_assistant|>{name}<|im_middle|>{content}<|im_end|>   role "assistant"
//     <|im_system|>{name}<|im_middle|>{content}<|im_end|>      any other role
//   [<|im_assistant|>assistant<|im_middle|>]                   generation prompt
//
// {name} is the message's `name` if set, else its role (the template's
// `message.get('name') or message['role']`). The default system turn is
// inserted only when there is at least one message and the first one's role
// is not "system". No whitespace is added anywhere (every Jinja tag strips).
#ifndef KL_ENGINE_TOKENIZER_CHAT_TEMPLATE_H_
#define KL_ENGINE_TOKENIZER_CHAT_TEMPLATE_H_

#include <cstddef>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace kl {

struct ChatMessage {
  std::string role;     // "system", "user", "assistant"; others render as system
  std::string content;  // plain text, inserted verbatim
  std::string name = "";  // optional speaker name; empty = use `role`
};

// The default system prompt of Kimi's templates when the conversation does not
// start with a system message. [UNVERIFIED for Kimi-Linear: K2-Instruct,
// Moonlight and Kimi-VL use this string; K2-0905/K2-Thinking changed it to
// "You are Kimi, an AI assistant created by Moonshot AI."] Overridable below.
inline constexpr absl::string_view kKimiDefaultSystemPrompt =
    "You are a helpful assistant";

struct ChatOptions {
  std::string default_system_prompt = std::string(kKimiDefaultSystemPrompt);
};

// The rendered prompt plus where the template (not the user) put each
// special-token marker, so that a caller can encode user content as plain
// text while the markers become special ids.
struct RenderedChat {
  struct Marker {
    size_t offset;          // byte offset in `text`
    absl::string_view token;  // marker text, e.g. "<|im_end|>" (static storage)
  };
  std::string text;
  std::vector<Marker> markers;  // in increasing offset order
};

RenderedChat RenderChatWithMarkers(const std::vector<ChatMessage>& messages,
                                   bool add_generation_prompt,
                                   const ChatOptions& options = {});

// Just the text of RenderChatWithMarkers.
std::string RenderChat(const std::vector<ChatMessage>& messages,
                       bool add_generation_prompt,
                       const ChatOptions& options = {});

}  // namespace kl

#endif  // KL_ENGINE_TOKENIZER_CHAT_TEMPLATE_H_
