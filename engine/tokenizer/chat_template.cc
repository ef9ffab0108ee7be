// Kimi chat rendering; see chat_template.h.
#include "engine/tokenizer/chat_template.h"

namespace kl {
namespace {

constexpr absl::string_view kImSystem = "<|im_system|>";
constexpr absl::string_view kImUser = "<|im_user|>";
constexpr absl::string_view kImAssistant = "<|im_assistant|>";
constexpr absl::string_view kImMiddle = "<|im_middle|>";
constexpr absl::string_view kImEnd = "<|im_end|>";

class Renderer {
 public:
  void Marker(absl::string_view token) {
    out_.markers.push_back({out_.text.size(), token});
    out_.text.append(token.data(), token.size());
  }
  void Text(absl::string_view text) { out_.text.append(text.data(), text.size()); }
  void Turn(absl::string_view role_marker, absl::string_view name,
            absl::string_view content) {
    Marker(role_marker);
    Text(name);
    Marker(kImMiddle);
    Text(content);
    Marker(kImEnd);
  }
  RenderedChat Finish() { return std::move(out_); }

 private:
  RenderedChat out_;
};

absl::string_view RoleMarker(absl::string_view role) {
  if (role == "user") return kImUser;
  if (role == "assistant") return kImAssistant;
  return kImSystem;
}

}  // namespace

RenderedChat RenderChatWithMarkers(const std::vector<ChatMessage>& messages,
                                   bool add_generation_prompt,
                                   const ChatOptions& options) {
  Renderer r;
  if (!messages.empty() && messages.front().role != "system") {
    r.Turn(kImSystem, "system", options.default_system_prompt);
  }
  for (const ChatMessage& m : messages) {
    r.Turn(RoleMarker(m.role), m.name.empty() ? m.role : m.name, m.content);
  }
  if (add_generation_prompt) {
    r.Marker(kImAssistant);
    r.Text("assistant");
    r.Marker(kImMiddle);
  }
  return r.Finish();
}

std::string RenderChat(const std::vector<ChatMessage>& messages,
                       bool add_generation_prompt, const ChatOptions& options) {
  return RenderChatWithMarkers(messages, add_generation_prompt, options).text;
}

}  // namespace kl
