// The sending half of an NCCL transfer (prefill side): messages queued with their
// compute events, grouped by the link's worker, announced, sent (docs/nccl_transfer.md).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/common/log.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/transfer.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/status_util.h"
#include "services/transport/nccl_internal.h"

namespace kl::nccl_internal {
namespace {


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
  // Called before the first OnLayer; the link's worker reads corrupt_at_ only
  // after that (through mu_ and the link's queue).
  void InjectCorrupt(bool mla) override {
    corrupt_at_ = FaultTargetMessage(plan_, mla);
    if (corrupt_at_ < 0) KL_LOG(WARNING) << "FAULT INJECTION: no message to damage in this plan";
  }

  absl::Status OnLayer(const SequenceState& state, int64_t layer, int64_t row_begin,
                       int64_t row_end) override {
    std::lock_guard<std::mutex> l(mu_);
    if (ended_) return absl::CancelledError("device send ended");
    if (!status_.ok()) return status_;
    absl::StatusOr<int64_t> end = LayerMessagesEnd(plan_, next_, layer, row_begin, row_end);
    if (!end.ok()) return Fail(std::string(end.status().message()));
    const int64_t first = next_;
    next_ = *end;
    if (hold_ == nullptr) hold_ = state.device;  // keeps the slot until the sends end
    if (core_->options.ship_at_end) return absl::OkStatus();
    for (int64_t i = first; i < next_; ++i) {
      absl::Status s = Queue(state, i);
      if (!s.ok()) return Fail(std::string(s.message()));
    }
    return absl::OkStatus();
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
      // Once the queued work has run, the end of the sends is polled with
      // yields for its first 5 ms only, however many slices the wait takes;
      // then with short sleeps.
      absl::Time spin_until;
      bool drained = false;
      for (;;) {
        const absl::Time now = absl::Now();
        const absl::Time slice = std::min(deadline, now + absl::Milliseconds(100));
        w = drained ? link_->Wait(link_->done(), slice, &stop_,
                                  std::max(absl::ZeroDuration(), spin_until - now))
                    : link_->Drain(slice, &stop_);
        if (w.ok() && !drained) {
          drained = true;
          spin_until = absl::Now() + absl::Milliseconds(5);
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
      core_->Count(&DeviceTransportStats::messages, static_cast<int64_t>(plan_.size()));
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
    // A layer's compute may take a long chunk: as long as it takes (End stops
    // it), polling every 50 us after a short yield (a core spinning through a
    // whole layer would take CPU from the engine).
    RETURN_IF_ERROR(link->Wait(head, absl::InfiniteFuture(), &stop_, absl::Microseconds(200)));
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
      if (!p.kda) {  // packed and summed in one pass
        RETURN_IF_ERROR(cuda::PackRows(p.paged, p.row_begin, p.row_end, p.ptrs[0], prep,
                                       link->d_sums() + p.index * kMaxSpans));
      }
    }
    RETURN_IF_ERROR(
        cuda::Checksum64Batch(spans.sums.data(), static_cast<int>(spans.sums.size()), prep));
    // FAULT INJECTION: one bit of the message damaged after it was summed.
    char* damaged_kda = nullptr;
    for (const Piece& p : pieces) {
      if (p.index != corrupt_at_) continue;
      int j = 0;
      while (j + 1 < p.n && p.bytes[j] == 0) ++j;  // the first non-empty span
      char* byte = static_cast<char*>(p.ptrs[j]) + p.bytes[j] / 2;
      RETURN_IF_ERROR(cuda::FlipBit(byte, 5, prep));
      if (p.kda) damaged_kda = byte;
    }
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
    // A KDA message goes out of the sequence's state itself: restored once sent.
    // (If the send failed, the link is aborted and the state, left damaged, is
    // never decoded: the prefill worker drops it and a retry prefills afresh.)
    if (damaged_kda != nullptr) RETURN_IF_ERROR(cuda::FlipBit(damaged_kda, 5, st));
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
  int64_t corrupt_at_ = -1;  // fault injection: the plan message damaged in flight
  bool ended_ = false;
  std::shared_ptr<StateResidency> hold_;
};

}  // namespace

std::unique_ptr<DeviceSend> NewNcclSend(std::shared_ptr<Core> core, std::shared_ptr<NcclLink> link,
                                        std::vector<v1::DeviceMessage> plan) {
  return std::unique_ptr<DeviceSend>(new NcclSend(std::move(core), std::move(link), std::move(plan)));
}

}  // namespace kl::nccl_internal
