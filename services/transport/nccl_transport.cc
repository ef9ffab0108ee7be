// The NCCL DeviceTransport (device_transport.h; design in docs/nccl_transfer.md):
// offers and acceptance, the link registries and rendezvous, and registration. The
// sending and receiving halves are nccl_send.cc and nccl_receive.cc.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/common/log.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/transfer.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/status_util.h"
#include "services/transport/device_transport.h"
#include "services/transport/nccl_internal.h"
#include "services/transport/nccl_link.h"
#include "services/transport/transfer_plan.h"

namespace kl {
namespace {

using namespace nccl_internal;  // NOLINT: this file is the transport built on them

constexpr int kMaxLinksAccepted = 64;  // decode side, all peers together

std::string HostId() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(f, id);
  if (id.empty()) {
    char host[256] = {0};
    gethostname(host, sizeof(host) - 1);
    id = host;
  }
  return id;
}

std::string GpuUuid(int device) {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess) return "";
  return absl::BytesToHexString(std::string(p.uuid.bytes, sizeof(p.uuid.bytes)));
}

uint64_t RandomId() {
  std::random_device rd;
  uint64_t v = 0;
  while (v == 0) v = (uint64_t{rd()} << 32) ^ rd();
  return v;
}
// ---------------------------------------------------------------- transport

class NcclTransport final : public DeviceTransport {
 public:
  explicit NcclTransport(std::shared_ptr<Core> core) : core_(std::move(core)) {
    // Every link's limit is at least this side's timeout (LinkIdleLimit).
    const absl::Duration shortest = LinkIdleLimit(core_->options, /*decode_side=*/false);
    if (shortest != absl::InfiniteDuration()) {
      // Checked a few times per limit (at least every 10 s, at most every 50 ms).
      const absl::Duration every =
          std::clamp(shortest / 4, absl::Milliseconds(50), absl::Seconds(10));
      reaper_ = std::thread([this, every] {
        std::unique_lock<std::mutex> l(reaper_mu_);
        while (!reaper_cv_.wait_for(l, absl::ToChronoMilliseconds(every),
                                    [this] { return reaper_stop_; })) {
          l.unlock();
          CloseIdleLinks();
          l.lock();
        }
      });
    }
  }
  ~NcclTransport() override {
    {
      std::lock_guard<std::mutex> l(reaper_mu_);
      reaper_stop_ = true;
    }
    reaper_cv_.notify_all();
    if (reaper_.joinable()) reaper_.join();
  }

  v1::OpenTransportResponse Accept(const v1::OpenTransportRequest& req) override {
    v1::OpenTransportResponse r;
    r.set_transport("grpc");
    const Core& c = *core_;
    const int mine = NcclLink::Version(), theirs = req.nccl_version();
    if (req.protocol_version() != kDeviceTransportProtocol) {
      r.set_reason(absl::StrCat("protocol ", req.protocol_version(), ", this worker speaks ",
                                kDeviceTransportProtocol));
    } else if (req.layout_tag() != c.layout) {
      r.set_reason(absl::StrCat("state layout differs: peer ", req.layout_tag(), ", here ", c.layout));
    } else if (req.state_fingerprint() != StateFingerprint(c.config)) {
      r.set_reason("model state fingerprint differs");
    } else if (theirs / 100 != mine / 100) {
      r.set_reason(absl::StrCat("NCCL ", theirs, " vs ", mine));
    } else if (req.host_id() != c.host_id && !c.options.cross_host) {
      r.set_reason("peer on another host (--nccl_cross_host is off)");
    } else if (req.gpu_uuid() == c.gpu_uuid) {
      r.set_reason("peer on the same GPU");
    } else {
      {
        std::lock_guard<std::mutex> l(core_->mu);
        if (core_->accepted.size() >= kMaxLinksAccepted) DropOldestIdleLocked();
        if (core_->accepted.size() >= kMaxLinksAccepted) {
          r.set_reason("too many device links");
          return r;
        }
      }
      absl::StatusOr<std::string> id = NcclLink::NewUniqueId();
      if (!id.ok()) {
        r.set_reason(std::string(id.status().message()));
        return r;
      }
      auto link = std::make_shared<NcclLink>(RandomId(), c.device, /*rank=*/1,
                                             req.host_id() + "/" + req.gpu_uuid());
      // A peer's value that is not a plain positive number counts as "never".
      const double peer_idle = req.link_idle_seconds();
      link->set_idle_limit(LinkIdleLimit(
          c.options, /*decode_side=*/true,
          std::isfinite(peer_idle) && peer_idle > 0 && peer_idle <= 1e9 ? absl::Seconds(peer_idle)
                                                                        : absl::ZeroDuration()));
      {
        std::lock_guard<std::mutex> l(core_->mu);
        core_->accepted[link->id()] = link;
        ++core_->stats.links_opened;
      }
      std::thread([core = core_, link, uid = *id] {
        const absl::Time start = absl::Now();
        absl::Status s = link->Init(uid, core->options.init_timeout);
        const int64_t ms = absl::ToInt64Milliseconds(absl::Now() - start);
        core->CountInit(s.ok(), absl::Now() - start);
        if (!s.ok()) {
          KL_LOG(WARNING).Field("link", link->id()).Field("init_ms", ms)
              << "device link init failed: " << s.ToString();
          core->Forget(link);
        } else {
          KL_LOG(INFO).Field("link", link->id()).Field("peer", link->peer()).Field("init_ms", ms)
              << "device link ready";
        }
      }).detach();
      r.set_transport("nccl");
      r.set_reason("");
      r.set_link_id(link->id());
      r.set_nccl_unique_id(*id);
      r.set_init_timeout_seconds(absl::ToDoubleSeconds(c.options.init_timeout));
    }
    return r;
  }

  absl::StatusOr<std::unique_ptr<DeviceReceive>> BeginReceive(
      uint64_t link_id, const v1::DeviceTransfer& transfer, int64_t num_tokens) override {
    std::shared_ptr<NcclLink> link;
    {
      std::lock_guard<std::mutex> l(core_->mu);
      auto it = core_->accepted.find(link_id);
      if (it == core_->accepted.end()) {
        return absl::NotFoundError(absl::StrCat("no device link ", link_id, " on this worker"));
      }
      link = it->second;
    }
    // The sender uses a link only once its own set-up finished, which needs
    // ours: ours ends a moment later. Never hold a gRPC thread for long.
    const absl::Time until = absl::Now() + absl::Seconds(2);
    while (link->state() == NcclLink::State::kInit && absl::Now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (!link->TryAcquire()) {
      return absl::AbortedError(absl::StrCat("device link ", link_id, " is not ready"));
    }
    auto fail = [&](absl::Status s) {
      link->Abort();
      core_->Forget(link);
      return s;
    };
    PlanSummary summary;
    absl::Status v = ValidateTransferPlan(transfer.messages(), core_->config, num_tokens,
                                          core_->sizes, &summary);
    if (!v.ok()) return fail(v);
    const int64_t messages = transfer.messages_size();
    const int64_t page_rows = core_->access->page_rows();
    const int64_t pages = (num_tokens + page_rows - 1) / page_rows;
    std::vector<int64_t> mla_bytes = MlaBytes(transfer.messages());
    const int64_t staging_cap = StagingCapacity(mla_bytes);
    absl::Status s = link->Reserve(staging_cap * (core_->options.pipeline ? 2 : 1),
                                   std::max<int64_t>(pages, 1),
                                   std::max<int64_t>(messages, 1) * kMaxSpans);
    if (!s.ok()) return fail(s);
    SequenceState state;
    s = core_->access->AllocateState(&state, num_tokens);
    if (!s.ok()) return fail(s);
    absl::StatusOr<std::vector<Piece>> pieces = Prepare(*link, transfer, state, pages);
    if (!pieces.ok()) {
      link->Abort();  // drains before `state` (the slot) goes
      core_->Forget(link);
      return pieces.status();
    }
    return NewNcclReceive(core_, link, std::move(state), *std::move(pieces), std::move(mla_bytes),
                          staging_cap, summary.total_bytes);
  }

  absl::StatusOr<std::unique_ptr<DeviceSend>> BeginSend(
      const std::string& address, const std::shared_ptr<grpc::Channel>& channel,
      std::vector<v1::DeviceMessage> plan) override {
    std::shared_ptr<NcclLink> link;
    bool open = false, sync = false;
    {
      std::lock_guard<std::mutex> l(core_->mu);
      auto g = core_->grpc_only_until.find(address);
      if (g != core_->grpc_only_until.end() && absl::Now() < g->second) {
        ++core_->stats.fallbacks;
        return absl::UnavailableError("peer takes gRPC transfers");
      }
      auto& links = core_->outgoing[address];
      for (auto& k : links) {
        if (k->TryAcquire()) {
          link = k;
          break;
        }
      }
      open = link == nullptr && static_cast<int>(links.size()) < core_->options.links_per_peer;
      // Only the first link to a peer may be waited for: with transfers to the
      // peer in flight, its half of a new communicator's set-up can wait for
      // their kernels on its GPU, and this (engine) thread would wait on
      // transfers it feeds. (Protocol 2 posts receives only for data that is
      // ready, which makes such waits short; the rule stays for safety.)
      sync = core_->options.sync_open && links.empty();
    }
    if (link == nullptr && open) {
      if (sync) {
        absl::StatusOr<std::shared_ptr<NcclLink>> l = Open(core_, address, channel);
        if (l.ok() && (*l)->TryAcquire()) link = *l;
      } else {
        std::thread([core = core_, address, channel] { Open(core, address, channel).IgnoreError(); })
            .detach();
      }
    }
    if (link == nullptr) {
      core_->Count(&DeviceTransportStats::fallbacks);
      return absl::UnavailableError("no free device link to " + address);
    }
    int64_t rows = 0;
    for (const auto& m : plan) rows = std::max<int64_t>(rows, m.row_end());
    const int64_t pages = (rows + core_->access->page_rows() - 1) / core_->access->page_rows();
    const int64_t halves = core_->options.pipeline ? 2 : 1;
    absl::Status s = link->Reserve(StagingCapacity(MlaBytes(plan)) * halves,
                                   std::max<int64_t>(pages, 1),
                                   std::max<int64_t>(static_cast<int64_t>(plan.size()), 1) * kMaxSpans);
    if (s.ok()) {
      link->ResetWork();
      NcclLink* l = link.get();
      const size_t n = plan.size();
      const bool pipeline = core_->options.pipeline;
      l->Post([l, n, pipeline]() -> absl::Status {
        RETURN_IF_ERROR(cuda::CudaStatus(
            cudaMemsetAsync(l->d_sums(), 0, n * kMaxSpans * sizeof(uint64_t), l->stream()),
            "checksum scratch"));
        if (!pipeline) return absl::OkStatus();
        // The checksums run on the second stream, behind freed(h): make both
        // halves' events follow the reset, so no checksum adds into old sums.
        for (int h = 0; h < 2; ++h) {
          RETURN_IF_ERROR(cuda::CudaStatus(cudaEventRecord(l->freed(h), l->stream()), "staging"));
        }
        return absl::OkStatus();
      });
    }
    if (!s.ok()) {
      link->Abort();
      core_->Forget(link);
      return absl::UnavailableError(s.message());
    }
    return NewNcclSend(core_, link, std::move(plan));
  }

  v1::OpenTransportRequest Offer() const override { return MakeOffer(*core_); }
  PlanSizes plan_sizes() const override { return core_->sizes; }

  DeviceTransportStats Stats() const override {
    std::lock_guard<std::mutex> l(core_->mu);
    DeviceTransportStats s = core_->stats;
    s.links_ready = 0;
    for (const auto& [id, k] : core_->accepted) {
      s.links_ready += k->state() == NcclLink::State::kReady || k->state() == NcclLink::State::kBusy;
    }
    for (const auto& [peer, v] : core_->outgoing) {
      for (const auto& k : v) {
        s.links_ready += k->state() == NcclLink::State::kReady || k->state() == NcclLink::State::kBusy;
      }
    }
    return s;
  }

 private:
  static v1::OpenTransportRequest MakeOffer(const Core& c) {
    v1::OpenTransportRequest r;
    r.set_protocol_version(kDeviceTransportProtocol);
    r.set_host_id(c.host_id);
    r.set_gpu_uuid(c.gpu_uuid);
    r.set_nccl_version(NcclLink::Version());
    r.set_layout_tag(c.layout);
    r.set_state_fingerprint(StateFingerprint(c.config));
    const absl::Duration idle = LinkIdleLimit(c.options, /*decode_side=*/false);
    r.set_link_idle_seconds(idle == absl::InfiniteDuration() ? 0 : absl::ToDoubleSeconds(idle));
    return r;
  }

  // Prefill side: rendezvous with the decode worker and join the communicator.
  static absl::StatusOr<std::shared_ptr<NcclLink>> Open(const std::shared_ptr<Core>& core,
                                                        const std::string& address,
                                                        const std::shared_ptr<grpc::Channel>& channel) {
    auto placeholder = std::make_shared<NcclLink>(0, core->device, 0, address);
    {
      std::lock_guard<std::mutex> l(core->mu);
      core->outgoing[address].push_back(placeholder);  // counts against links_per_peer
    }
    auto drop = [&](absl::Status s) {
      placeholder->set_state(NcclLink::State::kDead);
      core->Forget(placeholder);
      return s;
    };
    auto stub = v1::Decode::NewStub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::OpenTransportResponse resp;
    const grpc::Status gs = stub->OpenTransport(&ctx, MakeOffer(*core), &resp);
    if (!gs.ok()) {
      if (gs.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
        std::lock_guard<std::mutex> l(core->mu);
        core->grpc_only_until[address] = absl::Now() + absl::Seconds(60);
      }
      return drop(FromGrpcStatus(gs));
    }
    if (resp.transport() != "nccl") {
      KL_LOG(INFO).Field("peer", address) << "device link refused, using gRPC: " << resp.reason();
      {
        std::lock_guard<std::mutex> l(core->mu);
        core->grpc_only_until[address] = absl::Now() + absl::Seconds(60);
      }
      return drop(absl::UnavailableError(resp.reason()));  // Forget takes core->mu
    }
    auto link = std::make_shared<NcclLink>(resp.link_id(), core->device, 0, address);
    link->set_idle_limit(LinkIdleLimit(core->options, /*decode_side=*/false));
    {
      std::lock_guard<std::mutex> l(core->mu);
      auto& v = core->outgoing[address];
      std::replace(v.begin(), v.end(), placeholder, link);
      ++core->stats.links_opened;
    }
    const absl::Duration timeout =
        std::min(core->options.init_timeout, absl::Seconds(resp.init_timeout_seconds()));
    const absl::Time start = absl::Now();
    absl::Status s = link->Init(resp.nccl_unique_id(), timeout);
    const int64_t ms = absl::ToInt64Milliseconds(absl::Now() - start);
    core->CountInit(s.ok(), absl::Now() - start);
    if (!s.ok()) {
      KL_LOG(WARNING).Field("peer", address).Field("init_ms", ms)
          << "device link init failed, gRPC for 60 s: " << s.ToString();
      core->Forget(link);
      // E.g. a network policy that blocks NCCL's sockets: do not retry at once.
      std::lock_guard<std::mutex> l(core->mu);
      core->grpc_only_until[address] = absl::Now() + absl::Seconds(60);
      return s;
    }
    KL_LOG(INFO).Field("peer", address).Field("link", link->id()).Field("init_ms", ms)
        << "device link ready";
    return link;
  }

  // Closes the links that carried nothing for longer than their limit
  // (LinkIdleLimit, set when each was made): taken first (a transfer may be
  // picking one this moment), dropped from the registries, aborted. The
  // peer's end goes at its own limit, which on the decode side is twice the
  // longer of both sides' timeouts. The link's buffers are freed on this
  // thread (cudaFree waits for the work queued on this GPU so far).
  void CloseIdleLinks() {
    const absl::Time now = absl::Now();
    auto idle = [now](const std::shared_ptr<NcclLink>& k) {
      return k->state() == NcclLink::State::kReady && now - k->last_used() > k->idle_limit() &&
             k->TryAcquire();
    };
    std::vector<std::shared_ptr<NcclLink>> closed;
    {
      std::lock_guard<std::mutex> l(core_->mu);
      for (auto it = core_->accepted.begin(); it != core_->accepted.end();) {
        if (idle(it->second)) {
          closed.push_back(it->second);
          it = core_->accepted.erase(it);
        } else {
          ++it;
        }
      }
      for (auto& [peer, links] : core_->outgoing) {
        for (auto it = links.begin(); it != links.end();) {
          if (idle(*it)) {
            closed.push_back(*it);
            it = links.erase(it);
          } else {
            ++it;
          }
        }
      }
      core_->stats.links_dropped += static_cast<int64_t>(closed.size());
      core_->stats.links_idle_closed += static_cast<int64_t>(closed.size());
    }
    for (const auto& k : closed) {
      const int64_t idle_s = absl::ToInt64Seconds(now - k->last_used());
      KL_LOG(INFO).Field("link", k->id()).Field("peer", k->peer()).Field("idle_s", idle_s)
          << "device link closed: idle";
      k->Abort(/*expected=*/true);
    }
  }

  void DropOldestIdleLocked() {
    std::shared_ptr<NcclLink> oldest;
    for (const auto& [id, k] : core_->accepted) {
      if (k->state() != NcclLink::State::kReady) continue;
      if (oldest == nullptr || k->last_used() < oldest->last_used()) oldest = k;
    }
    // Only a link no transfer holds: take it first (a BeginReceive may have
    // found it a moment ago).
    if (oldest == nullptr || !oldest->TryAcquire()) return;
    core_->accepted.erase(oldest->id());
    ++core_->stats.links_dropped;
    std::thread([oldest] { oldest->Abort(/*expected=*/true); }).detach();
  }

  // Decode side: resolves every plan message against the new state (on this
  // thread, so the link's worker never touches the SequenceState) and queues
  // the page list's upload and the checksum scratch's reset; the receives are
  // posted per announced group (NcclReceive::Receive).
  absl::StatusOr<std::vector<Piece>> Prepare(NcclLink& link, const v1::DeviceTransfer& transfer,
                                             const SequenceState& state, int64_t pages) {
    RETURN_IF_ERROR(cuda::CudaStatus(cudaSetDevice(link.device()), "cudaSetDevice"));
    auto list = core_->access->SlotPages(state);
    if (!list.ok()) return list.status();
    if (static_cast<int64_t>(list->size()) < pages) return absl::InternalError("pages missing");
    std::copy(list->begin(), list->begin() + pages, link.h_pages());
    const int64_t messages = transfer.messages_size();
    std::vector<Piece> pieces;
    for (int64_t i = 0; i < messages; ++i) {
      auto p = Resolve(*core_, link, state, transfer.messages(static_cast<int>(i)), i);
      if (!p.ok()) return p.status();
      pieces.push_back(*std::move(p));
    }
    NcclLink* l = &link;
    link.ResetWork();
    link.Post([l, pages, messages]() -> absl::Status {
      cudaStream_t st = l->stream();
      RETURN_IF_ERROR(cuda::CudaStatus(
          cudaMemcpyAsync(l->d_pages(), l->h_pages(), pages * sizeof(int32_t),
                          cudaMemcpyHostToDevice, st),
          "page list"));
      return cuda::CudaStatus(
          cudaMemsetAsync(l->d_sums(), 0, messages * kMaxSpans * sizeof(uint64_t), st),
          "checksum scratch");
    });
    return pieces;
  }

  const std::shared_ptr<Core> core_;
  std::mutex reaper_mu_;
  std::condition_variable reaper_cv_;
  bool reaper_stop_ = false;
  std::thread reaper_;  // last: starts after the members it uses
};

const bool kRegistered = RegisterDeviceTransport(
    [](const ModelConfig& config, DeviceStateAccess* access,
       const DeviceTransportOptions& options) -> absl::StatusOr<std::unique_ptr<DeviceTransport>> {
      // NVLink multicast stays off (it can take a shared host's GPUs out of
      // service); an operator's explicit setting wins.
      setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
      auto core = std::make_shared<Core>();
      core->config = config;
      core->access = access;
      core->device = access->device();
      core->options = options;
      core->sizes.kda_layer_bytes = KdaLayerBytes(config);
      core->sizes.latent_row_bytes = access->latent_row_bytes();
      core->sizes.max_message_bytes = options.message_bytes;
      core->host_id = HostId();
      core->gpu_uuid = GpuUuid(access->device());
      core->layout = access->layout_tag();
      KL_LOG(INFO).Field("nccl", NcclLink::Version()).Field("gpu", core->gpu_uuid.substr(0, 8))
          << "NCCL device transport available";
      return std::unique_ptr<DeviceTransport>(new NcclTransport(std::move(core)));
    });

}  // namespace
}  // namespace kl
