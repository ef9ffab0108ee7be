// The NCCL DeviceTransport (device_transport.h; design in docs/nccl_transfer.md).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <functional>
#include <map>
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
#include "services/transport/nccl_link.h"
#include "services/transport/transfer_plan.h"

namespace kl {
namespace {

constexpr int kMaxSpans = 4;           // a KDA layer: state + 3 conv tails
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

absl::Duration TransferBudget(const DeviceTransportOptions& o, int64_t bytes) {
  return o.transfer_timeout + absl::Seconds(static_cast<double>(bytes) / 1e9);
}

// What the link registries share with background threads (link init), so a
// thread that outlives a call never touches a destroyed transport.
struct Core {
  ModelConfig config;
  DeviceStateAccess* access;
  int device = 0;  // access->device(), read once (background threads use it)
  DeviceTransportOptions options;
  PlanSizes sizes;
  std::string host_id;
  std::string gpu_uuid;
  std::string layout;

  mutable std::mutex mu;
  std::map<uint64_t, std::shared_ptr<NcclLink>> accepted;                  // decode side
  std::map<std::string, std::vector<std::shared_ptr<NcclLink>>> outgoing;  // prefill side
  std::map<std::string, absl::Time> grpc_only_until;  // peers that answered "grpc"
  DeviceTransportStats stats;

  void Count(int64_t DeviceTransportStats::*field, int64_t n = 1) {
    std::lock_guard<std::mutex> l(mu);
    stats.*field += n;
  }
  // Drops a dead link from the registries.
  void Forget(const std::shared_ptr<NcclLink>& link) {
    std::lock_guard<std::mutex> l(mu);
    if (accepted.erase(link->id()) > 0) ++stats.links_dropped;
    auto it = outgoing.find(link->peer());
    if (it != outgoing.end()) {
      auto& v = it->second;
      const size_t before = v.size();
      v.erase(std::remove(v.begin(), v.end(), link), v.end());
      if (v.size() != before) ++stats.links_dropped;
    }
  }
};

// The spans of a plan message's device memory on this side (KDA: the slot's
// state + tails; MLA: the link's staging buffer).
absl::Status KdaMessageSpans(Core& core, const SequenceState& s, int64_t layer, void** ptrs,
                             int64_t* bytes, int* n) {
  int64_t kda_index = 0;
  for (int64_t l = 0; l < layer; ++l) kda_index += core.config.IsKda(l) ? 1 : 0;
  std::vector<DeviceSpan> spans;
  RETURN_IF_ERROR(core.access->KdaSpans(s, kda_index, &spans));
  if (spans.size() > kMaxSpans) return absl::InternalError("KDA layer of more than 4 spans");
  *n = static_cast<int>(spans.size());
  for (int i = 0; i < *n; ++i) {
    ptrs[i] = spans[i].ptr;
    bytes[i] = spans[i].bytes;
  }
  return absl::OkStatus();
}

int64_t MlaIndex(const ModelConfig& c, int64_t layer) {
  int64_t i = 0;
  for (int64_t l = 0; l < layer; ++l) i += c.IsKda(l) ? 0 : 1;
  return i;
}

absl::StatusOr<cuda::PagedRows> Paged(Core& core, NcclLink& link, int64_t layer) {
  cuda::PagedRows p;
  auto pool = core.access->LatentPool(MlaIndex(core.config, layer));
  if (!pool.ok()) return pool.status();
  p.pool = *pool;
  p.pages = link.d_pages();
  p.page_rows = core.access->page_rows();
  p.row_bytes = core.access->latent_row_bytes();
  return p;
}

std::vector<uint64_t> FoldSums(const NcclLink& link, int64_t messages) {
  std::vector<uint64_t> out(messages);
  for (int64_t m = 0; m < messages; ++m) {
    uint64_t v = 0;
    for (int j = 0; j < kMaxSpans; ++j) v += link.h_sums()[m * kMaxSpans + j];
    out[m] = v;
  }
  return out;
}

// One plan message resolved to device addresses on the calling thread, so the
// link's worker never touches the SequenceState.
struct Piece {
  int64_t index = 0;
  bool kda = false;
  void* ptrs[kMaxSpans] = {};
  int64_t bytes[kMaxSpans] = {};
  int n = 0;
  int64_t row_begin = 0, row_end = 0;  // MLA
  cuda::PagedRows paged;               // MLA (pages: the link's device list)
  cudaEvent_t after = nullptr;         // compute to wait for (sender)
};

// A group's spans on this side, in plan order, with their checksum outputs
// (d_sums[index * kMaxSpans + span]). MLA messages get consecutive aligned
// places from `base` in the link's staging buffer (their ptrs[0] is set here).
struct GroupSpans {
  std::vector<void*> ptrs;
  std::vector<int64_t> bytes;
  std::vector<cuda::ChecksumSpan> sums;
};

GroupSpans PlaceGroup(NcclLink& link, char* base, std::vector<Piece>& group) {
  GroupSpans g;
  int64_t offset = 0;
  for (Piece& p : group) {
    if (!p.kda) {
      p.ptrs[0] = base + offset;
      offset += AlignStaging(p.bytes[0]);
    }
    int64_t word = 0;  // the message's spans number their words on
    for (int j = 0; j < p.n; ++j) {
      g.ptrs.push_back(p.ptrs[j]);
      g.bytes.push_back(p.bytes[j]);
      g.sums.push_back({p.ptrs[j], p.bytes[j], link.d_sums() + p.index * kMaxSpans + j, word});
      word += (p.bytes[j] + 7) / 8;
    }
  }
  return g;
}

absl::StatusOr<Piece> Resolve(Core& core, NcclLink& link, const SequenceState& s,
                              const v1::DeviceMessage& m, int64_t index) {
  Piece p;
  p.index = index;
  p.kda = m.kda();
  if (m.kda()) {
    RETURN_IF_ERROR(KdaMessageSpans(core, s, m.layer(), p.ptrs, p.bytes, &p.n));
    int64_t total = 0;
    for (int j = 0; j < p.n; ++j) total += p.bytes[j];
    if (total != m.bytes()) return absl::InternalError("KDA spans disagree with the plan");
  } else {
    auto paged = Paged(core, link, m.layer());
    if (!paged.ok()) return paged.status();
    p.paged = *paged;
    p.row_begin = m.row_begin();
    p.row_end = m.row_end();
    p.ptrs[0] = link.staging();
    p.bytes[0] = m.bytes();
    p.n = 1;
  }
  return p;
}

// ------------------------------------------------------------------ sending

class NcclSend final : public DeviceSend {
 public:
  NcclSend(std::shared_ptr<Core> core, std::shared_ptr<NcclLink> link,
           std::vector<v1::DeviceMessage> plan)
      : core_(std::move(core)),
        link_(std::move(link)),
        plan_(std::move(plan)),
        mla_bytes_(MlaBytes(plan_)),
        staging_cap_(StagingCapacity(mla_bytes_)),
        pipeline_(core_->options.pipeline) {
    for (const auto& m : plan_) bytes_ += m.bytes();
  }
  ~NcclSend() override { End(false); }

  uint64_t link_id() const override { return link_->id(); }
  const std::vector<v1::DeviceMessage>& plan() const override { return plan_; }
  void InjectCut() override { cut_at_ = static_cast<int64_t>(plan_.size()) / 2; }

  absl::Status OnLayer(const SequenceState& state, int64_t layer, int64_t row_begin,
                       int64_t row_end) override {
    std::lock_guard<std::mutex> l(mu_);
    if (ended_) return absl::CancelledError("device send ended");
    if (!status_.ok()) return status_;
    if (next_ >= static_cast<int64_t>(plan_.size())) return Fail("layer past the plan's end");
    const v1::DeviceMessage& m = plan_[next_];
    if (m.layer() != layer || (!m.kda() && (m.row_begin() != row_begin || m.row_end() != row_end))) {
      return Fail(absl::StrCat("layer ", layer, " rows [", row_begin, ", ", row_end,
                               ") is not plan message ", next_));
    }
    if (hold_ == nullptr) hold_ = state.device;  // keeps the slot until the sends end
    const int64_t i = next_++;
    if (core_->options.ship_at_end) return absl::OkStatus();
    absl::Status s = Queue(state, i);
    return s.ok() ? s : Fail(std::string(s.message()));
  }

  absl::Status AfterForward(const SequenceState& state) override {
    std::lock_guard<std::mutex> l(mu_);
    if (!status_.ok() || !core_->options.ship_at_end) return status_;
    for (int64_t i = 0; i < next_; ++i) {
      absl::Status s = Queue(state, i);
      if (!s.ok()) return Fail(std::string(s.message()));
    }
    return absl::OkStatus();
  }

  void SetWake(std::function<void()> wake) override {
    std::lock_guard<std::mutex> l(mu_);
    wake_ = std::move(wake);
  }

  absl::Status TakeGroups(std::vector<MessageGroup>* groups, bool* drained) override {
    std::lock_guard<std::mutex> l(mu_);
    if (!status_.ok()) return status_;
    groups->insert(groups->end(), ready_.begin(), ready_.end());
    ready_.clear();
    *drained = announced_ == queued_;
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<uint64_t>> Complete(const std::function<bool()>& peer_alive) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (status_.ok() && cut_at_ >= 0) {
        status_ = absl::UnavailableError("device transfer cut (fault injection)");
      } else if (status_.ok() && (next_ != static_cast<int64_t>(plan_.size()) ||
                                  announced_ != next_)) {
        status_ = absl::InternalError(absl::StrCat("device transfer: ", next_, " of ",
                                                   plan_.size(), " messages queued, ",
                                                   announced_, " sent"));
      }
      if (status_.ok()) {
        NcclLink* link = link_.get();
        const size_t n = plan_.size();
        link->Post([link, n] {
          RETURN_IF_ERROR(cuda::CudaStatus(
              cudaMemcpyAsync(link->h_sums(), link->d_sums(), n * kMaxSpans * sizeof(uint64_t),
                              cudaMemcpyDeviceToHost, link->stream()),
              "checksums"));
          return cuda::CudaStatus(cudaEventRecord(link->done(), link->stream()), "event");
        });
      }
    }
    absl::Status w;
    {
      std::lock_guard<std::mutex> l(mu_);
      w = status_;
    }
    if (w.ok()) {
      // In slices: between them the pusher checks that the decode worker has
      // not ended the call (a refused group, a revoked lease), whose receives
      // would then never match the sends still spinning here.
      const absl::Time deadline = absl::Now() + TransferBudget(core_->options, bytes_);
      bool drained = false;
      for (;;) {
        const absl::Time slice = std::min(deadline, absl::Now() + absl::Milliseconds(100));
        w = drained ? link_->Wait(link_->done(), slice, &stop_) : link_->Drain(slice, &stop_);
        if (w.ok() && !drained) {
          drained = true;
          continue;
        }
        if (w.ok() || w.code() != absl::StatusCode::kDeadlineExceeded || absl::Now() >= deadline) {
          break;
        }
        if (!peer_alive()) {
          w = absl::UnavailableError("the decode worker ended the transfer");
          break;
        }
      }
      if (!w.ok()) w = absl::Status(w.code(), absl::StrCat("device send: ", w.message()));
    }
    if (!w.ok()) {
      {
        std::lock_guard<std::mutex> l(mu_);
        if (status_.ok()) status_ = w;
      }
      End(false);
      return w;
    }
    return FoldSums(*link_, static_cast<int64_t>(plan_.size()));
  }

  void End(bool ok) override {
    stop_ = true;
    std::shared_ptr<StateResidency> hold;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (ended_) return;
      ended_ = true;
      hold = std::move(hold_);
    }
    if (ok) {
      link_->Touch();
      link_->set_state(NcclLink::State::kReady);
      core_->Count(&DeviceTransportStats::transfers_ok);
      core_->Count(&DeviceTransportStats::bytes, bytes_);
    } else {
      link_->Abort();  // ends the sends, drains the stream: the slot is no longer read
      core_->Forget(link_);
      core_->Count(&DeviceTransportStats::transfers_failed);
    }
    hold.reset();
  }

 private:
  // A queued plan message: its device spans, the compute event that makes it
  // ready, and (MLA) the sequence's page list at that moment.
  struct Pending {
    Piece piece;
    std::vector<int32_t> pages;
  };

  // mu_ held. The engine thread gets the error back and cancels the push,
  // which wakes the pusher.
  absl::Status Fail(const std::string& why) {
    status_ = absl::InternalError(absl::StrCat("device send: ", why));
    return status_;
  }

  // Marks the compute done so far and queues plan message `i` for the link's
  // worker (mu_ held; calling thread: the prefill engine's).
  absl::Status Queue(const SequenceState& state, int64_t i) {
    if (cut_at_ >= 0 && i >= cut_at_) return absl::OkStatus();  // FAULT INJECTION
    NcclLink* link = link_.get();
    RETURN_IF_ERROR(cuda::CudaStatus(cudaSetDevice(link->device()), "cudaSetDevice"));
    auto piece = Resolve(*core_, *link, state, plan_[i], i);
    if (!piece.ok()) return piece.status();
    auto ev = link->Event(i);
    if (!ev.ok()) return ev.status();
    piece->after = *ev;
    RETURN_IF_ERROR(core_->access->RecordCompute(*ev));
    Pending p{*std::move(piece), {}};
    if (!p.piece.kda) {
      auto list = core_->access->SlotPages(state);  // pages only grow
      if (!list.ok()) return list.status();
      p.pages = *std::move(list);
    }
    pending_.push_back(std::move(p));
    ++queued_;
    link->Post([this] { return PumpAndReport(); });
    return absl::OkStatus();
  }

  absl::Status PumpAndReport() {
    absl::Status s = Pump();
    if (!s.ok()) {
      std::function<void()> wake;
      {
        std::lock_guard<std::mutex> l(mu_);
        if (status_.ok()) status_ = absl::Status(s.code(), absl::StrCat("device send: ", s.message()));
        wake = wake_;
      }
      if (wake) wake();
    }
    return s;
  }

  // Link worker: waits until the oldest queued message's data is ready, takes
  // it and the queued messages right behind it that are ready too (and fit the
  // staging), packs and checksums them, announces the group and sends it as one
  // NCCL group. Only this worker pops pending_; the engine only appends.
  absl::Status Pump() {
    NcclLink* link = link_.get();
    cudaEvent_t head;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (pending_.empty()) return absl::OkStatus();  // an earlier pump took it
      head = pending_.front().piece.after;
    }
    // A layer's compute may take a long chunk: as long as it takes (End stops it).
    RETURN_IF_ERROR(link->Wait(head, absl::InfiniteFuture(), &stop_));
    std::vector<Pending> group;
    int64_t staging = 0;
    for (;;) {
      cudaEvent_t after;
      int64_t index;
      {
        std::lock_guard<std::mutex> l(mu_);
        if (pending_.empty() || static_cast<int64_t>(group.size()) >= kMaxGroupMessages) break;
        after = pending_.front().piece.after;
        index = pending_.front().piece.index;
      }
      const int64_t need = AlignStaging(mla_bytes_[index]);
      if (!group.empty() && (staging + need > staging_cap_ || !ReadySoon(after))) break;
      staging += need;
      std::lock_guard<std::mutex> l(mu_);
      group.push_back(std::move(pending_.front()));
      pending_.pop_front();
    }
    // Serial: everything on the link's stream. Pipelined: pack + checksum on
    // the second stream into staging half h, once the send that last used h
    // is done; the send waits for them; so group g + 1 packs while g moves.
    cudaStream_t st = link->stream();
    const int h = pipeline_ ? static_cast<int>(groups_made_++ % 2) : 0;
    cudaStream_t prep = pipeline_ ? link->aux_stream() : st;
    char* base = static_cast<char*>(link->staging()) + h * staging_cap_;
    if (pipeline_) {
      RETURN_IF_ERROR(cuda::CudaStatus(cudaStreamWaitEvent(prep, link->freed(h), 0), "staging"));
    }
    std::vector<Piece> pieces;
    for (Pending& g : group) {
      if (!g.piece.kda) {
        const int64_t have = static_cast<int64_t>(g.pages.size());
        if (have > pages_sent_) {  // the new tail of the page list
          std::copy(g.pages.begin() + pages_sent_, g.pages.end(), link->h_pages() + pages_sent_);
          RETURN_IF_ERROR(cuda::CudaStatus(
              cudaMemcpyAsync(link->d_pages() + pages_sent_, link->h_pages() + pages_sent_,
                              (have - pages_sent_) * sizeof(int32_t), cudaMemcpyHostToDevice,
                              prep),
              "page list"));
          pages_sent_ = have;
        }
      }
      pieces.push_back(std::move(g.piece));
    }
    GroupSpans spans = PlaceGroup(*link, base, pieces);
    for (const Piece& p : pieces) {
      if (!p.kda) RETURN_IF_ERROR(cuda::PackRows(p.paged, p.row_begin, p.row_end, p.ptrs[0], prep));
    }
    RETURN_IF_ERROR(
        cuda::Checksum64Batch(spans.sums.data(), static_cast<int>(spans.sums.size()), prep));
    if (pipeline_) {
      RETURN_IF_ERROR(cuda::CudaStatus(cudaEventRecord(link->filled(h), prep), "staging"));
      RETURN_IF_ERROR(cuda::CudaStatus(cudaStreamWaitEvent(st, link->filled(h), 0), "staging"));
    }
    std::function<void()> wake;
    {
      std::lock_guard<std::mutex> l(mu_);
      ready_.push_back({pieces.front().index, static_cast<int64_t>(pieces.size())});
      announced_ += static_cast<int64_t>(pieces.size());
      wake = wake_;
    }
    if (wake) wake();  // the pusher announces it; the receiver posts the receives
    RETURN_IF_ERROR(
        link->Send(spans.ptrs.data(), spans.bytes.data(), static_cast<int>(spans.ptrs.size())));
    if (!pipeline_) return absl::OkStatus();
    return cuda::CudaStatus(cudaEventRecord(link->freed(h), st), "staging");
  }

  // True if `event` completes within a short grace (messages queued together,
  // e.g. ship-at-end, become ready microseconds apart).
  static bool ReadySoon(cudaEvent_t event) {
    const absl::Time until = absl::Now() + absl::Microseconds(50);
    for (;;) {
      if (cudaEventQuery(event) == cudaSuccess) return true;
      if (absl::Now() >= until) return false;
      std::this_thread::yield();
    }
  }

  const std::shared_ptr<Core> core_;
  const std::shared_ptr<NcclLink> link_;
  const std::vector<v1::DeviceMessage> plan_;
  const std::vector<int64_t> mla_bytes_;
  const int64_t staging_cap_;  // per staging half when pipelined
  const bool pipeline_;
  int64_t bytes_ = 0;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  absl::Status status_;
  int64_t next_ = 0;
  int64_t groups_made_ = 0;  // the link's worker only
  std::deque<Pending> pending_;     // queued, not yet taken by the worker
  int64_t queued_ = 0;              // messages queued (fault injection skips some)
  int64_t announced_ = 0;           // messages in groups handed to TakeGroups
  std::vector<MessageGroup> ready_;  // announced, not yet taken
  std::function<void()> wake_;
  int64_t pages_sent_ = 0;  // the link's worker only
  int64_t cut_at_ = -1;
  bool ended_ = false;
  std::shared_ptr<StateResidency> hold_;
};

// ---------------------------------------------------------------- receiving

class NcclReceive final : public DeviceReceive {
 public:
  NcclReceive(std::shared_ptr<Core> core, std::shared_ptr<NcclLink> link, SequenceState state,
              std::vector<Piece> pieces, std::vector<int64_t> mla_bytes, int64_t staging_cap,
              int64_t bytes)
      : pipeline_(core->options.pipeline),
        core_(std::move(core)),
        link_(std::move(link)),
        state_(std::move(state)),
        pieces_(std::move(pieces)),
        mla_bytes_(std::move(mla_bytes)),
        staging_cap_(staging_cap),
        messages_(static_cast<int64_t>(pieces_.size())),
        bytes_(bytes) {}
  ~NcclReceive() override { Abort(); }

  absl::Status Receive(const MessageGroup& g) override {
    std::lock_guard<std::mutex> l(mu_);
    if (done_) return absl::AbortedError("device receive ended");
    RETURN_IF_ERROR(ValidateGroup(mla_bytes_, posted_, g, staging_cap_));
    if (absl::Status w = link_->WorkStatus(); !w.ok()) {  // an earlier group failed
      return absl::Status(w.code(), absl::StrCat("device receive: ", w.message()));
    }
    std::vector<Piece> group(pieces_.begin() + g.first, pieces_.begin() + g.first + g.count);
    posted_ += g.count;
    const bool last = posted_ == messages_;
    const bool pipeline = pipeline_;
    const int h = pipeline ? static_cast<int>(groups_++ % 2) : 0;
    const int64_t half = staging_cap_;
    NcclLink* link = link_.get();
    const int64_t messages = messages_;
    // Serial: everything on the link's stream. Pipelined: the receive into
    // staging half h waits until the scatter that last read h is done; the
    // checksum and scatter run on the second stream behind the receive, so
    // group g scatters while g + 1 moves.
    link->Post([link, group = std::move(group), last, messages, pipeline, h,
                half]() mutable -> absl::Status {
      cudaStream_t st = link->stream();
      cudaStream_t post = pipeline ? link->aux_stream() : st;
      if (pipeline) {
        RETURN_IF_ERROR(cuda::CudaStatus(cudaStreamWaitEvent(st, link->freed(h), 0), "staging"));
      }
      GroupSpans spans = PlaceGroup(*link, static_cast<char*>(link->staging()) + h * half, group);
      RETURN_IF_ERROR(
          link->Recv(spans.ptrs.data(), spans.bytes.data(), static_cast<int>(spans.ptrs.size())));
      if (pipeline) {
        RETURN_IF_ERROR(cuda::CudaStatus(cudaEventRecord(link->filled(h), st), "staging"));
        RETURN_IF_ERROR(cuda::CudaStatus(cudaStreamWaitEvent(post, link->filled(h), 0), "staging"));
      }
      RETURN_IF_ERROR(
          cuda::Checksum64Batch(spans.sums.data(), static_cast<int>(spans.sums.size()), post));
      for (const Piece& p : group) {
        if (!p.kda) {
          RETURN_IF_ERROR(cuda::UnpackRows(p.ptrs[0], p.row_begin, p.row_end, p.paged, post));
        }
      }
      if (pipeline) {
        RETURN_IF_ERROR(cuda::CudaStatus(cudaEventRecord(link->freed(h), post), "staging"));
      }
      if (!last) return absl::OkStatus();
      RETURN_IF_ERROR(cuda::CudaStatus(
          cudaMemcpyAsync(link->h_sums(), link->d_sums(), messages * kMaxSpans * sizeof(uint64_t),
                          cudaMemcpyDeviceToHost, post),
          "checksums"));
      return cuda::CudaStatus(cudaEventRecord(link->done(), post), "event");
    });
    return absl::OkStatus();
  }

  absl::StatusOr<SequenceState> Complete(const std::vector<uint64_t>& checksums) override {
    int64_t posted;
    {
      std::lock_guard<std::mutex> l(mu_);
      posted = posted_;
    }
    if (static_cast<int64_t>(checksums.size()) != messages_ || posted != messages_) {
      Abort();
      return absl::DataLossError(absl::StrCat("device transfer: ", checksums.size(),
                                              " checksums and ", posted, " announced of ",
                                              messages_, " messages"));
    }
    const absl::Time deadline = absl::Now() + TransferBudget(core_->options, bytes_);
    absl::Status w = link_->Drain(deadline, &stop_);
    if (w.ok()) w = link_->Wait(link_->done(), deadline, &stop_);
    if (!w.ok()) {
      Abort();
      return absl::Status(w.code(), absl::StrCat("device receive: ", w.message()));
    }
    const std::vector<uint64_t> got = FoldSums(*link_, messages_);
    std::lock_guard<std::mutex> l(mu_);
    if (done_) return absl::AbortedError("device receive aborted");
    done_ = true;
    for (int64_t m = 0; m < messages_; ++m) {
      if (got[m] != checksums[m]) {
        // The sender drops its end when we refuse: drop ours too.
        link_->Abort();
        core_->Forget(link_);
        core_->Count(&DeviceTransportStats::transfers_failed);
        state_ = SequenceState();  // frees the slot (the stream is drained)
        return absl::DataLossError(absl::StrCat("device transfer: checksum mismatch in message ",
                                                m, " of ", messages_));
      }
    }
    link_->Touch();
    link_->set_state(NcclLink::State::kReady);  // every operation completed: reusable
    core_->Count(&DeviceTransportStats::transfers_ok);
    core_->Count(&DeviceTransportStats::bytes, bytes_);
    return std::move(state_);
  }

  void Abort() override {
    stop_ = true;
    std::lock_guard<std::mutex> l(mu_);
    if (done_) return;
    done_ = true;
    link_->Abort();  // pending receives end; the worker stops; the stream drains
    core_->Forget(link_);
    core_->Count(&DeviceTransportStats::transfers_failed);
    state_ = SequenceState();  // now the slot may go back
  }

 private:
  const bool pipeline_;  // declared (so initialised) before core_, read from the argument
  const std::shared_ptr<Core> core_;
  const std::shared_ptr<NcclLink> link_;
  std::mutex mu_;
  SequenceState state_;
  const std::vector<Piece> pieces_;  // resolved against state_ (MLA: staging set per group)
  const std::vector<int64_t> mla_bytes_;
  const int64_t staging_cap_;
  const int64_t messages_;
  const int64_t bytes_;
  int64_t posted_ = 0;  // messages whose receives were posted (mu_)
  int64_t groups_ = 0;  // groups posted (mu_): picks the staging half
  std::atomic<bool> stop_{false};
  bool done_ = false;
};

// ---------------------------------------------------------------- transport

class NcclTransport final : public DeviceTransport {
 public:
  explicit NcclTransport(std::shared_ptr<Core> core) : core_(std::move(core)) {}

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
      {
        std::lock_guard<std::mutex> l(core_->mu);
        core_->accepted[link->id()] = link;
        ++core_->stats.links_opened;
      }
      std::thread([core = core_, link, uid = *id] {
        absl::Status s = link->Init(uid, core->options.init_timeout);
        if (!s.ok()) {
          KL_LOG(WARNING).Field("link", link->id()) << "device link init failed: " << s.ToString();
          core->Forget(link);
        } else {
          KL_LOG(INFO).Field("link", link->id()).Field("peer", link->peer()) << "device link ready";
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
    return std::unique_ptr<DeviceReceive>(new NcclReceive(core_, link, std::move(state),
                                                          *std::move(pieces), std::move(mla_bytes),
                                                          staging_cap, summary.total_bytes));
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
    return std::unique_ptr<DeviceSend>(new NcclSend(core_, link, std::move(plan)));
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
    {
      std::lock_guard<std::mutex> l(core->mu);
      auto& v = core->outgoing[address];
      std::replace(v.begin(), v.end(), placeholder, link);
      ++core->stats.links_opened;
    }
    const absl::Duration timeout =
        std::min(core->options.init_timeout, absl::Seconds(resp.init_timeout_seconds()));
    absl::Status s = link->Init(resp.nccl_unique_id(), timeout);
    if (!s.ok()) {
      KL_LOG(WARNING).Field("peer", address) << "device link init failed, gRPC for 60 s: "
                                             << s.ToString();
      core->Forget(link);
      // E.g. a network policy that blocks NCCL's sockets: do not retry at once.
      std::lock_guard<std::mutex> l(core->mu);
      core->grpc_only_until[address] = absl::Now() + absl::Seconds(60);
      return s;
    }
    KL_LOG(INFO).Field("peer", address).Field("link", link->id()) << "device link ready";
    return link;
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
    std::thread([oldest] { oldest->Abort(); }).detach();
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
      core->host_id = HostId();
      core->gpu_uuid = GpuUuid(access->device());
      core->layout = access->layout_tag();
      KL_LOG(INFO).Field("nccl", NcclLink::Version()).Field("gpu", core->gpu_uuid.substr(0, 8))
          << "NCCL device transport available";
      return std::unique_ptr<DeviceTransport>(new NcclTransport(std::move(core)));
    });

}  // namespace
}  // namespace kl
