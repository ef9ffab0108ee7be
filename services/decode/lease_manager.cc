#include "services/decode/lease_manager.h"

#include <algorithm>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kl {

std::string NewRandomId() {
  // libstdc++'s random_device reads getrandom()/RDRAND: not predictable from
  // earlier ids, unlike a seeded PRNG.
  static std::random_device* rd = new std::random_device();
  static absl::Mutex* mu = new absl::Mutex();
  uint32_t w[4];
  {
    absl::MutexLock l(mu);
    for (uint32_t& x : w) x = (*rd)();
  }
  return absl::StrFormat("%08x%08x%08x%08x", w[0], w[1], w[2], w[3]);
}

LeaseManager::LeaseManager(LeaseManagerOptions options, Clock clock)
    : options_(options), clock_(clock ? std::move(clock) : Clock([] { return absl::Now(); })) {}

LeaseManager::~LeaseManager() {
  Deferred deferred;
  {
    absl::MutexLock l(&mu_);
    while (!leases_.empty()) {
      EraseLocked(leases_.begin(), /*held=*/false,
                  absl::UnavailableError("decode worker shutting down"), &deferred);
    }
  }
  Run(deferred);
}

void LeaseManager::Run(Deferred& deferred) {
  for (auto& f : deferred) f();
  deferred.clear();
}

void LeaseManager::EraseLocked(absl::flat_hash_map<std::string, Lease>::iterator it, bool held,
                               const absl::Status& why, Deferred* deferred) {
  Lease& lease = it->second;
  if (lease.push) deferred->push_back([p = std::move(lease.push), why] { p->OnLeaseRevoked(why); });
  if (lease.consumer) {
    deferred->push_back([c = std::move(lease.consumer), why] { c->OnLeaseRevoked(why); });
  }
  // A sequence already handed to the decode engine keeps its pages until the
  // engine lets it go (its Release then comes for an erased lease): its rows
  // stay reserved until then, so no new lease can count on them early.
  if (lease.handed_over && !held && lease.reserved_rows > 0) {
    draining_rows_[it->first] = lease.reserved_rows;
  } else {
    reserved_rows_ -= lease.reserved_rows;
  }
  // The state (if any) is freed with the lease, outside the lock via the
  // deferred list so a large free does not hold up other RPCs.
  if (lease.has_state) {
    auto st = std::make_shared<SequenceState>(std::move(lease.state));
    deferred->push_back([st]() mutable { st.reset(); });
  }
  leases_.erase(it);
}

absl::StatusOr<LeaseGrant> LeaseManager::Reserve(const std::string& request_id,
                                                 int64_t max_total_tokens) {
  if (max_total_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_total_tokens must be >= 0, got ", max_total_tokens));
  }
  if (options_.max_rows_per_lease > 0 && max_total_tokens > options_.max_rows_per_lease) {
    return absl::OutOfRangeError(absl::StrCat("a sequence of up to ", max_total_tokens,
                                              " tokens does not fit this worker's latent cache (",
                                              options_.max_rows_per_lease, " rows at most)"));
  }
  const int64_t g = std::max<int64_t>(1, options_.latent_row_granularity);
  // No bound given: the most one sequence may take.
  const int64_t want = max_total_tokens > 0              ? max_total_tokens
                       : options_.max_rows_per_lease > 0 ? options_.max_rows_per_lease
                                                         : options_.latent_rows_capacity;
  const int64_t rows = (want + g - 1) / g * g;
  if (options_.latent_rows_capacity > 0 && rows > options_.latent_rows_capacity) {
    return absl::OutOfRangeError(absl::StrCat("a sequence of up to ", want,
                                              " tokens does not fit this worker's latent rows (",
                                              options_.latent_rows_capacity, " in all)"));
  }
  absl::MutexLock l(&mu_);
  if (draining_) return absl::UnavailableError("decode worker is draining");
  if (static_cast<int64_t>(leases_.size()) >= options_.slots) {
    return absl::ResourceExhaustedError(
        absl::StrCat("all ", options_.slots, " decode slots are leased"));
  }
  if (options_.latent_rows_capacity > 0 && reserved_rows_ + rows > options_.latent_rows_capacity) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "latent rows: ", rows, " requested, ", options_.latent_rows_capacity - reserved_rows_,
        " of ", options_.latent_rows_capacity, " free"));
  }
  std::string id = NewRandomId();
  while (leases_.contains(id)) id = NewRandomId();
  Lease& lease = leases_[id];
  lease.request_id = request_id;
  lease.max_total_tokens = max_total_tokens;
  lease.reserved_rows = rows;
  lease.expires = clock_() + options_.ttl;
  reserved_rows_ += rows;
  return LeaseGrant{id, options_.ttl};
}

bool LeaseManager::Release(const std::string& lease_id, const absl::Status& why) {
  return ReleaseImpl(lease_id, why, /*held=*/false);
}

bool LeaseManager::ReleaseHeld(const std::string& lease_id, const absl::Status& why) {
  return ReleaseImpl(lease_id, why, /*held=*/true);
}

bool LeaseManager::ReleaseImpl(const std::string& lease_id, const absl::Status& why, bool held) {
  Deferred deferred;
  {
    absl::MutexLock l(&mu_);
    auto it = leases_.find(lease_id);
    if (it == leases_.end()) {
      // The holder letting go of a state whose lease ended before: its rows now.
      if (auto d = draining_rows_.find(lease_id); held && d != draining_rows_.end()) {
        reserved_rows_ -= d->second;
        draining_rows_.erase(d);
      }
      return false;
    }
    EraseLocked(it, held, why, &deferred);
  }
  Run(deferred);
  return true;
}

absl::StatusOr<PushTicket> LeaseManager::BeginPush(const std::string& lease_id,
                                                   std::shared_ptr<LeaseListener> listener) {
  Deferred deferred;
  PushTicket ticket;
  {
    absl::MutexLock l(&mu_);
    auto it = leases_.find(lease_id);
    if (it == leases_.end()) {
      return absl::NotFoundError(absl::StrCat("unknown or expired lease ", lease_id));
    }
    Lease& lease = it->second;
    if (lease.has_state || lease.handed_over) {
      return absl::AlreadyExistsError(
          absl::StrCat("lease ", lease_id, " already holds a complete state"));
    }
    if (lease.push) {
      deferred.push_back([p = std::move(lease.push)] {
        p->OnLeaseRevoked(absl::AbortedError("superseded by a newer PushState on the same lease"));
      });
    }
    lease.push = std::move(listener);
    lease.push_id = next_push_id_++;
    lease.expires = clock_() + options_.ttl;
    ticket.push_id = lease.push_id;
    ticket.max_total_tokens = lease.max_total_tokens;
    ticket.request_id = lease.request_id;
  }
  Run(deferred);
  return ticket;
}

absl::StatusOr<LeaseManager::Lease*> LeaseManager::FindPushLocked(const std::string& lease_id,
                                                                  uint64_t push_id) {
  auto it = leases_.find(lease_id);
  if (it == leases_.end()) {
    return absl::NotFoundError(absl::StrCat("lease ", lease_id, " expired or was released"));
  }
  if (it->second.push_id != push_id) {
    return absl::AbortedError("superseded by a newer PushState on the same lease");
  }
  return &it->second;
}

absl::Status LeaseManager::RenewPush(const std::string& lease_id, uint64_t push_id) {
  absl::MutexLock l(&mu_);
  absl::StatusOr<Lease*> lease = FindPushLocked(lease_id, push_id);
  if (!lease.ok()) return lease.status();
  (*lease)->expires = clock_() + options_.ttl;
  return absl::OkStatus();
}

void LeaseManager::EndPush(const std::string& lease_id, uint64_t push_id) {
  std::shared_ptr<LeaseListener> drop;  // destroyed outside the lock
  absl::MutexLock l(&mu_);
  absl::StatusOr<Lease*> lease = FindPushLocked(lease_id, push_id);
  if (!lease.ok()) return;
  drop = std::move((*lease)->push);
  (*lease)->push_id = 0;
}

absl::Status LeaseManager::AdoptState(const std::string& lease_id, uint64_t push_id,
                                      SequenceState state) {
  std::shared_ptr<StateConsumer> consumer;
  std::shared_ptr<LeaseListener> drop;
  {
    absl::MutexLock l(&mu_);
    absl::StatusOr<Lease*> found = FindPushLocked(lease_id, push_id);
    if (!found.ok()) return found.status();
    Lease& lease = **found;
    if (lease.max_total_tokens > 0 && state.num_tokens > lease.max_total_tokens) {
      return absl::FailedPreconditionError(
          absl::StrCat("state holds ", state.num_tokens, " tokens but lease ", lease_id,
                       " reserved ", lease.max_total_tokens));
    }
    drop = std::move(lease.push);
    lease.push_id = 0;
    lease.tokens = state.num_tokens;
    lease.expires = clock_() + options_.ttl;
    if (lease.consumer) {
      lease.handed_over = true;
      consumer = lease.consumer;
    } else {
      lease.has_state = true;
      lease.state = std::move(state);
    }
  }
  if (consumer) consumer->OnStateReady(std::move(state));
  return absl::OkStatus();
}

absl::Status LeaseManager::Claim(const std::string& lease_id,
                                 std::shared_ptr<StateConsumer> consumer) {
  SequenceState state;
  {
    absl::MutexLock l(&mu_);
    auto it = leases_.find(lease_id);
    if (it == leases_.end()) {
      return absl::NotFoundError(absl::StrCat("unknown or expired lease ", lease_id));
    }
    Lease& lease = it->second;
    if (lease.consumer || lease.handed_over) {
      return absl::AlreadyExistsError(
          absl::StrCat("lease ", lease_id, " is already claimed by a Decode stream"));
    }
    lease.consumer = consumer;
    if (!lease.has_state) return absl::OkStatus();  // OnStateReady comes with AdoptState
    lease.has_state = false;
    lease.handed_over = true;
    state = std::move(lease.state);
    lease.state = SequenceState();
  }
  consumer->OnStateReady(std::move(state));
  return absl::OkStatus();
}

absl::Status LeaseManager::Renew(const std::string& lease_id, int64_t num_tokens) {
  absl::MutexLock l(&mu_);
  auto it = leases_.find(lease_id);
  if (it == leases_.end()) {
    return absl::NotFoundError(absl::StrCat("lease ", lease_id, " expired or was released"));
  }
  it->second.expires = clock_() + options_.ttl;
  it->second.tokens = num_tokens;
  return absl::OkStatus();
}

int64_t LeaseManager::ExpireOverdue() {
  Deferred deferred;
  int64_t n = 0;
  {
    absl::MutexLock l(&mu_);
    const absl::Time now = clock_();
    for (auto it = leases_.begin(); it != leases_.end();) {
      auto cur = it++;
      if (cur->second.expires > now) continue;
      EraseLocked(cur, /*held=*/false,
                  absl::NotFoundError(absl::StrCat("lease ", cur->first, " expired after ",
                                                   absl::FormatDuration(options_.ttl),
                                                   " without progress")),
                  &deferred);
      ++n;
    }
    expired_total_ += n;
  }
  Run(deferred);
  return n;
}

void LeaseManager::SetDraining(bool draining) {
  absl::MutexLock l(&mu_);
  draining_ = draining;
}

LeaseStats LeaseManager::Stats() const {
  absl::MutexLock l(&mu_);
  LeaseStats s;
  s.slots_total = options_.slots;
  s.slots_used = static_cast<int64_t>(leases_.size());
  for (const auto& [id, lease] : leases_) {
    if (lease.handed_over) {
      ++s.decoding;
    } else {
      ++s.leases_waiting;
    }
    if (lease.push) ++s.pushes_in_flight;
    s.latent_rows_used += lease.tokens;
  }
  s.latent_rows_capacity = options_.latent_rows_capacity;
  s.expired_total = expired_total_;
  s.draining = draining_;
  return s;
}

}  // namespace kl
