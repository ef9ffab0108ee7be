// Per-client concurrency limit of the router (--max_concurrent_per_client):
// a client (its API key's name, or its peer IP when auth is off) may hold at
// most `limit` Generate streams at once; one more gets RESOURCE_EXHAUSTED at
// once, before it takes an admission-queue place, so one client cannot fill
// the queue others share.
//
// A slot is an RAII object: the request's GenerateCall owns it and drops it
// when the call ends, however it ends (finished, failed, cancelled, deadline
// exceeded, rejected later).
//
// Thread-safety: all methods may be called from any thread.
#ifndef KL_SERVICES_ROUTER_CLIENT_LIMITER_H_
#define KL_SERVICES_ROUTER_CLIENT_LIMITER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace kl {

class ClientLimiter : public std::enable_shared_from_this<ClientLimiter> {
 public:
  class Slot {
   public:
    ~Slot();
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    const std::string& client() const { return client_; }

   private:
    friend class ClientLimiter;
    Slot(std::shared_ptr<ClientLimiter> limiter, std::string client)
        : limiter_(std::move(limiter)), client_(std::move(client)) {}
    std::shared_ptr<ClientLimiter> limiter_;  // a slot keeps its limiter alive
    std::string client_;
  };

  // `limit` streams per client; 0 = unlimited (slots are still counted).
  // Owned by shared_ptr (slots share it): use Create.
  static std::shared_ptr<ClientLimiter> Create(int64_t limit) {
    return std::shared_ptr<ClientLimiter>(new ClientLimiter(limit));
  }

  // A slot for `client`, or null when it already holds `limit`.
  std::unique_ptr<Slot> TryAcquire(const std::string& client);

  int64_t limit() const { return limit_; }
  int64_t InUse(const std::string& client) const;
  int64_t TotalInUse() const;

 private:
  explicit ClientLimiter(int64_t limit) : limit_(limit) {}
  void Release(const std::string& client);
  const int64_t limit_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, int64_t> in_use_ ABSL_GUARDED_BY(mu_);  // no zero entries
  int64_t total_ ABSL_GUARDED_BY(mu_) = 0;
};

// The client key of a call without an API key: the peer's address without
// the port ("ipv4:10.0.0.7:53211" -> "ipv4:10.0.0.7"), so a client's many
// connections share one budget.
std::string PeerClientKey(const std::string& peer);

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_CLIENT_LIMITER_H_
