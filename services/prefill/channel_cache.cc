#include "services/prefill/channel_cache.h"

namespace kl {

std::shared_ptr<grpc::Channel> ChannelCache::Get(const std::string& address) {
  absl::MutexLock l(&mu_);
  auto& ch = channels_[address];
  if (!ch) {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(max_message_bytes_);
    args.SetMaxReceiveMessageSize(max_message_bytes_);
    ch = security_.Dial(address, args);
  }
  return ch;
}

}  // namespace kl
