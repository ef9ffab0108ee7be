// One gRPC channel per decode-worker address, shared by every push to it
// (channels multiplex streams and reconnect on their own). Thread-safe.
#ifndef KL_SERVICES_PREFILL_CHANNEL_CACHE_H_
#define KL_SERVICES_PREFILL_CHANNEL_CACHE_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "services/common/tls.h"

namespace kl {

class ChannelCache {
 public:
  // `max_message_bytes` bounds one StatePart (a frame is <= ~2 MiB by default).
  // `security`: the cluster's mutual TLS (this worker's certificate), or plaintext.
  explicit ChannelCache(int max_message_bytes = 64 << 20, ChannelSecurity security = {})
      : max_message_bytes_(max_message_bytes), security_(std::move(security)) {}

  // The channel to `address` (host:port), created on first use.
  std::shared_ptr<grpc::Channel> Get(const std::string& address);

 private:
  const int max_message_bytes_;
  const ChannelSecurity security_;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<grpc::Channel>> channels_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kl

#endif  // KL_SERVICES_PREFILL_CHANNEL_CACHE_H_
