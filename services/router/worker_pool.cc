#include "services/router/worker_pool.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/blocking_counter.h"
#include "engine/common/log.h"
#include "services/router/dns_resolver.h"
#include "services/router/least_loaded_picker.h"
#include "services/router/fingerprint_hex.h"

namespace kl {

const char* WorkerRoleName(WorkerRole role) {
  return role == WorkerRole::kPrefill ? "prefill" : "decode";
}

WorkerEndpoint::WorkerEndpoint(std::string address, WorkerRole role, int max_message_bytes,
                               const ChannelSecurity& security)
    : address_(std::move(address)), role_(role) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  channel_ = security.Dial(address_, args);
  if (role == WorkerRole::kPrefill) {
    prefill_ = v1::Prefill::NewStub(channel_);
  } else {
    decode_ = v1::Decode::NewStub(channel_);
  }
  health_ = grpc::health::v1::Health::NewStub(channel_);
}

// The outcome of checking one worker: a Health.Check and a Stats call issued
// together; both callbacks count down `done`.
struct WorkerPool::CheckResult {
  std::shared_ptr<WorkerEndpoint> endpoint;
  grpc::ClientContext health_ctx, stats_ctx;
  grpc::health::v1::HealthCheckRequest health_request;
  grpc::health::v1::HealthCheckResponse health_response;
  v1::WorkerStatsRequest stats_request;
  v1::WorkerStats stats;
  grpc::Status health_status, stats_status;
};

WorkerPool::WorkerPool(WorkerPoolOptions options) : options_(std::move(options)) {}

std::unique_ptr<WorkerPool> WorkerPool::Start(WorkerPoolOptions options) {
  std::unique_ptr<WorkerPool> pool(new WorkerPool(std::move(options)));
  pool->RefreshNow();
  pool->refresher_ = std::thread([p = pool.get()] { p->RefreshLoop(); });
  return pool;
}

WorkerPool::~WorkerPool() {
  {
    absl::MutexLock l(&stop_mu_);
    stop_ = true;
  }
  if (refresher_.joinable()) refresher_.join();
}

void WorkerPool::RefreshLoop() {
  absl::MutexLock l(&stop_mu_);
  while (!stop_) {
    stop_mu_.AwaitWithTimeout(absl::Condition(&stop_), options_.health_interval);
    if (stop_) break;
    stop_mu_.Unlock();
    RefreshNow();
    stop_mu_.Lock();
  }
}

std::vector<std::string> WorkerPool::TargetAddresses() {
  if (!options_.dns_targets.empty() && absl::Now() >= next_dns_) {
    next_dns_ = absl::Now() + options_.dns_interval;
    std::vector<std::string> resolved;
    bool all_ok = true;
    for (const std::string& target : options_.dns_targets) {
      absl::StatusOr<std::vector<std::string>> r = ResolveHostPort(target);
      if (!r.ok()) {
        all_ok = false;
        KL_LOG(WARNING).Field("pool", WorkerRoleName(options_.role)).Field("target", target)
            << r.status().message();
        continue;
      }
      resolved.insert(resolved.end(), r->begin(), r->end());
    }
    // A failed lookup keeps the last answer: a DNS hiccup must not empty the pool.
    if (all_ok || !resolved.empty()) dns_addresses_ = std::move(resolved);
  }
  std::vector<std::string> out = options_.addresses;
  out.insert(out.end(), dns_addresses_.begin(), dns_addresses_.end());
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

void WorkerPool::SyncMembers(const std::vector<std::string>& addresses) {
  absl::MutexLock l(&mu_);
  for (auto it = members_.begin(); it != members_.end();) {
    if (std::binary_search(addresses.begin(), addresses.end(), it->first)) {
      ++it;
      continue;
    }
    KL_LOG(INFO).Field("pool", WorkerRoleName(options_.role)).Field("worker", it->first)
        << "worker left the pool";
    it = members_.erase(it);
  }
  for (const std::string& a : addresses) {
    if (members_.count(a)) continue;
    Member m;
    m.endpoint = std::make_shared<WorkerEndpoint>(a, options_.role, options_.max_message_bytes,
                                                  options_.security);
    m.state = "not checked yet";
    members_.emplace(a, std::move(m));
    KL_LOG(INFO).Field("pool", WorkerRoleName(options_.role)).Field("worker", a)
        << "worker joined the pool";
  }
}

void WorkerPool::CheckAll(std::vector<std::unique_ptr<CheckResult>>* results) {
  {
    absl::MutexLock l(&mu_);
    for (auto& [address, m] : members_) {
      auto r = std::make_unique<CheckResult>();
      r->endpoint = m.endpoint;
      results->push_back(std::move(r));
    }
  }
  absl::BlockingCounter done(static_cast<int>(2 * results->size()));
  const auto deadline = std::chrono::system_clock::now() +
                        absl::ToChronoNanoseconds(options_.check_timeout);
  for (auto& r : *results) {
    CheckResult* c = r.get();
    c->health_ctx.set_deadline(deadline);
    c->stats_ctx.set_deadline(deadline);
    c->endpoint->health()->async()->Check(&c->health_ctx, &c->health_request,
                                          &c->health_response, [c, &done](grpc::Status s) {
                                            c->health_status = std::move(s);
                                            done.DecrementCount();
                                          });
    auto on_stats = [c, &done](grpc::Status s) {
      c->stats_status = std::move(s);
      done.DecrementCount();
    };
    if (c->endpoint->prefill() != nullptr) {
      c->endpoint->prefill()->async()->Stats(&c->stats_ctx, &c->stats_request, &c->stats,
                                             on_stats);
    } else {
      c->endpoint->decode()->async()->Stats(&c->stats_ctx, &c->stats_request, &c->stats,
                                            on_stats);
    }
  }
  done.Wait();
}

namespace {

// True if the worker's reported fingerprint names another model than `ours`.
bool FingerprintMismatch(uint64_t ours, const std::string& theirs) {
  if (ours == 0 || theirs.empty()) return false;
  uint64_t parsed = 0;
  if (ParseFingerprint(theirs, &parsed)) return parsed != ours;
  return theirs != FormatFingerprint(ours);
}

}  // namespace

void WorkerPool::Apply(const CheckResult& r) {
  absl::MutexLock l(&mu_);
  auto it = members_.find(r.endpoint->address());
  if (it == members_.end() || it->second.endpoint != r.endpoint) return;  // left meanwhile
  Member& m = it->second;
  const bool was_healthy = m.healthy && !m.incompatible;
  m.healthy = false;
  m.incompatible = false;
  m.reserved = 0;  // the fresh sample counts what earlier picks started
  m.load = 0;
  if (!r.health_status.ok()) {
    m.state = absl::StrCat("health check failed: ", r.health_status.error_message());
  } else if (r.health_response.status() !=
             grpc::health::v1::HealthCheckResponse::SERVING) {
    m.state = "NOT_SERVING";
  } else if (r.stats_status.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
    m.healthy = true;  // no Stats: serving, load unknown (0)
  } else if (!r.stats_status.ok()) {
    m.state = absl::StrCat("Stats failed: ", r.stats_status.error_message());
  } else if (r.stats.draining() || !r.stats.ready()) {
    m.state = r.stats.draining() ? "draining" : "not ready";
  } else {
    m.healthy = true;
    m.incompatible = FingerprintMismatch(options_.state_fingerprint, r.stats.state_fingerprint());
    m.load = r.stats.running() + r.stats.waiting() + r.stats.leases_active();
    if (m.incompatible) {
      m.state = absl::StrCat("serves another model (state fingerprint ",
                             r.stats.state_fingerprint(), ", router ",
                             FormatFingerprint(options_.state_fingerprint), ")");
    }
  }
  if (m.healthy && !m.incompatible) {
    m.state.clear();
    m.suspect = false;
  }
  if (was_healthy != (m.healthy && !m.incompatible)) {
    KL_LOG(INFO).Field("pool", WorkerRoleName(options_.role)).Field("worker", it->first)
            .Field("ready", m.healthy && !m.incompatible).Field("state", m.state)
        << "worker readiness changed";
  }
}

void WorkerPool::RefreshNow() {
  absl::MutexLock refresh_lock(&refresh_mu_);
  SyncMembers(TargetAddresses());
  std::vector<std::unique_ptr<CheckResult>> results;
  CheckAll(&results);
  for (const auto& r : results) Apply(*r);
}

PoolSnapshot WorkerPool::Snapshot() const {
  absl::MutexLock l(&mu_);
  return SnapshotLocked();
}

PoolSnapshot WorkerPool::SnapshotLocked() const {
  PoolSnapshot s;
  s.rr_cursor = rr_cursor_;
  for (const auto& [address, m] : members_) {
    WorkerLoad w;
    w.address = address;
    w.ready = m.healthy;
    w.incompatible = m.incompatible;
    w.suspect = m.suspect;
    w.load = m.load;
    w.reserved = m.reserved;
    s.workers.push_back(std::move(w));
  }
  return s;
}

std::string WorkerPool::DescribeLocked() const {
  std::vector<std::string> parts;
  for (const auto& [address, m] : members_) {
    if (parts.size() == 4) {
      parts.push_back("...");
      break;
    }
    parts.push_back(absl::StrCat(address, ": ", m.state.empty() ? "ready" : m.state));
  }
  return absl::StrJoin(parts, "; ");
}

absl::StatusOr<std::shared_ptr<WorkerEndpoint>> WorkerPool::Pick(
    const absl::flat_hash_set<std::string>& exclude, const std::string& preferred, int64_t slack) {
  // Snapshot, policy and reservation under one lock: two concurrent picks
  // never both see the same least-loaded worker.
  absl::MutexLock l(&mu_);
  const PoolSnapshot snapshot = SnapshotLocked();
  const std::optional<size_t> i = PickWorker(snapshot, exclude, preferred, slack);
  const char* role = WorkerRoleName(options_.role);
  if (!i.has_value()) {
    bool any_incompatible = false;
    for (const auto& [a, m] : members_) any_incompatible |= m.healthy && m.incompatible;
    if (any_incompatible) {
      return absl::FailedPreconditionError(absl::StrCat(
          "every ready ", role, " worker serves another model: ", DescribeLocked()));
    }
    if (members_.empty()) {
      return absl::UnavailableError(absl::StrCat("no ", role, " workers known"));
    }
    return absl::UnavailableError(
        absl::StrCat("no ready ", role, " worker (", DescribeLocked(), ")"));
  }
  auto it = members_.find(snapshot.workers[*i].address);
  ++it->second.reserved;
  ++rr_cursor_;
  return it->second.endpoint;
}

void WorkerPool::ReportFailure(const std::string& address) {
  absl::MutexLock l(&mu_);
  auto it = members_.find(address);
  if (it != members_.end()) it->second.suspect = true;
}

}  // namespace kl
