#include "services/router/client_limiter.h"

namespace kl {

ClientLimiter::Slot::~Slot() { limiter_->Release(client_); }

std::unique_ptr<ClientLimiter::Slot> ClientLimiter::TryAcquire(const std::string& client) {
  absl::MutexLock l(&mu_);
  int64_t& n = in_use_[client];
  if (limit_ > 0 && n >= limit_) return nullptr;
  ++n;
  ++total_;
  return std::unique_ptr<Slot>(new Slot(shared_from_this(), client));
}

void ClientLimiter::Release(const std::string& client) {
  absl::MutexLock l(&mu_);
  auto it = in_use_.find(client);
  if (it == in_use_.end()) return;  // not reachable: every slot was counted
  if (--it->second == 0) in_use_.erase(it);
  --total_;
}

int64_t ClientLimiter::InUse(const std::string& client) const {
  absl::MutexLock l(&mu_);
  auto it = in_use_.find(client);
  return it == in_use_.end() ? 0 : it->second;
}

int64_t ClientLimiter::TotalInUse() const {
  absl::MutexLock l(&mu_);
  return total_;
}

std::string PeerClientKey(const std::string& peer) {
  // "ipv4:a.b.c.d:port", "ipv6:[::1]:port", "unix:/path" (no port).
  if (peer.rfind("ipv4:", 0) == 0 || peer.rfind("ipv6:", 0) == 0) {
    const size_t colon = peer.rfind(':');
    if (colon > 4) return peer.substr(0, colon);
  }
  return peer;
}

}  // namespace kl
