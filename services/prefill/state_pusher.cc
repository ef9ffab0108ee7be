#include "services/prefill/state_pusher.h"

#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/common/log.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/server_util.h"
#include "services/common/status_util.h"

namespace kl {

void SenderTracker::Enter() {
  absl::MutexLock l(&mu_);
  ++live_;
}

void SenderTracker::Exit() {
  absl::MutexLock l(&mu_);
  --live_;
}

int64_t SenderTracker::live() const {
  absl::MutexLock l(&mu_);
  return live_;
}

void SenderTracker::WaitAllExited() {
  absl::MutexLock l(&mu_);
  mu_.Await(absl::Condition(
      +[](int64_t* live) { return *live == 0; }, &live_));
}

absl::Status PushErrorToPrefillStatus(const absl::Status& push, const std::string& address) {
  const std::string msg = absl::StrCat("state push to ", address, ": ", push.message());
  switch (push.code()) {
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kCancelled:
    case absl::StatusCode::kResourceExhausted:
      return absl::Status(push.code(), msg);
    default:
      return absl::InternalError(msg);
  }
}

StatePusher::StatePusher(const ModelConfig& config, std::unique_ptr<BundleWriter> writer,
                         std::shared_ptr<const SequenceState> state, PushTarget target, Done done)
    : config_(config),
      writer_(std::move(writer)),
      state_(std::move(state)),
      target_(std::move(target)),
      done_(std::move(done)) {}

std::shared_ptr<StatePusher> StatePusher::Start(const ModelConfig& config,
                                                std::unique_ptr<BundleWriter> writer,
                                                std::shared_ptr<const SequenceState> state,
                                                PushTarget target, Done done,
                                                SenderTracker* tracker) {
  auto p = std::make_shared<StatePusher>(config, std::move(writer), std::move(state),
                                         std::move(target), std::move(done));
  tracker->Enter();
  std::thread([self = p, tracker]() mutable {
    self->Run();
    self.reset();
    tracker->Exit();  // last: the tracker's owner may be waiting to go away
  }).detach();
  return p;
}

void StatePusher::Enqueue(Item item) {
  absl::MutexLock l(&mu_);
  if (finish_ || cancel_.has_value()) return;
  items_.push_back(std::move(item));
}

void StatePusher::ShipKdaLayer(int64_t layer, int64_t ordinal) {
  Item it;
  it.kda = true;
  it.layer = layer;
  it.ordinal = ordinal;
  Enqueue(std::move(it));
}

void StatePusher::ShipMlaRows(int64_t layer, int64_t ordinal, int64_t begin, int64_t end,
                              bool copy_now) {
  if (end <= begin || failed()) return;
  Item it;
  it.layer = layer;
  it.ordinal = ordinal;
  it.begin = begin;
  it.end = end;
  if (copy_now) {
    const int64_t dim = config_.MlaLatentDim();
    const float* rows = state_->mla[ordinal].latent.data() + begin * dim;
    it.copy.assign(rows, rows + (end - begin) * dim);
  }
  Enqueue(std::move(it));
}

void StatePusher::Finish() {
  absl::MutexLock l(&mu_);
  finish_ = true;
}

void StatePusher::Cancel(const absl::Status& why) {
  {
    absl::MutexLock l(&mu_);
    if (!cancel_.has_value()) cancel_ = why;
    items_.clear();
  }
  failed_ = true;
  ctx_.TryCancel();  // unblocks a Write waiting on flow control
  // A device transfer: abort the link, which also ends a wait for the sends.
  if (target_.device != nullptr) target_.device->End(false);
}

absl::StatusOr<std::vector<BundleFrame>> StatePusher::Serialize(const Item& item) {
  if (item.kda) return writer_->AddKdaLayer(item.layer, state_->kda[item.ordinal]);
  const int64_t dim = config_.MlaLatentDim();
  const float* rows = item.copy.empty()
                          ? state_->mla[item.ordinal].latent.data() + item.begin * dim
                          : item.copy.data();
  return writer_->AddMlaRows(item.layer, item.begin,
                             absl::MakeConstSpan(rows, (item.end - item.begin) * dim));
}

void StatePusher::Run() {
  if (target_.device != nullptr) {
    RunDevice();
    return;
  }
  auto stub = v1::Decode::NewStub(target_.channel);
  ctx_.set_deadline(target_.deadline);
  if (!target_.request_id.empty()) ctx_.AddMetadata(kRequestIdKey, target_.request_id);
  v1::PushStateResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::StatePart>> stream = stub->PushState(&ctx_, &response);

  PushResult result;
  absl::Time first_sent;
  auto send = [&](BundleFrame frame) {
    v1::StatePart part;
    if (result.frames == 0) {
      part.set_lease_id(target_.lease_id);
      part.set_request_id(target_.request_id);
      first_sent = absl::Now();
    }
    ++result.frames;
    result.bytes += static_cast<int64_t>(frame.bytes.size());
    part.set_frame(std::move(frame.bytes));
    if (stream->Write(part)) return true;
    failed_ = true;  // the decode worker ended the stream: its status says why
    return false;
  };

  // FAULT INJECTION (tests only): the first part frame is damaged as
  // target_.fault says; "reorder" holds the header back until after it.
  const StateFault fault = target_.fault;
  bool fault_pending =
      fault != StateFault::kNone && fault != StateFault::kDropFinal && fault != StateFault::kCut;
  std::optional<BundleFrame> held_header;
  if (fault != StateFault::kNone) {
    KL_LOG(WARNING).Field("fault", StateFaultName(fault)).Field("target", target_.address)
        << "FAULT INJECTION: damaging this state push";
  }
  auto send_damaged = [&](BundleFrame f) {
    switch (fault) {
      case StateFault::kCorrupt:
        f.bytes.back() ^= 0x10;  // a payload byte: parts always carry one
        return send(std::move(f));
      case StateFault::kTruncate:
        f.bytes.resize(f.bytes.size() > 8 ? f.bytes.size() - 8 : 0);
        return send(std::move(f));
      case StateFault::kDuplicate: {
        BundleFrame copy = f;
        return send(std::move(copy)) && send(std::move(f));
      }
      case StateFault::kReorder:
        return send(std::move(f)) && send(*std::move(held_header));
      default:
        return send(std::move(f));
    }
  };

  int64_t items_sent = 0;
  absl::Status local;     // an error of ours (serialisation)
  bool closed = false;    // the final record went out and the stream was half-closed
  bool ok = true;
  if (fault == StateFault::kReorder) {
    held_header = writer_->HeaderFrame();
  } else {
    ok = send(writer_->HeaderFrame());
  }
  while (ok) {
    Item item;
    bool finishing = false;
    {
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(
          +[](StatePusher* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) {
            return !p->items_.empty() || p->finish_ || p->cancel_.has_value();
          },
          this));
      if (cancel_.has_value()) break;
      if (!items_.empty()) {
        item = std::move(items_.front());
        items_.pop_front();
      } else {
        finishing = true;
      }
    }
    if (finishing) {
      absl::StatusOr<BundleFrame> final = writer_->Finish();
      if (!final.ok()) {
        local = absl::InternalError(absl::StrCat("bundle incomplete: ", final.status().message()));
        break;
      }
      ok = (fault == StateFault::kDropFinal || send(*std::move(final))) && stream->WritesDone();
      closed = ok;
      break;
    }
    if (fault == StateFault::kCut && ++items_sent > config_.num_hidden_layers / 2) {
      local = absl::UnavailableError("state push cut (fault injection)");
      break;
    }
    const absl::Time item_start = absl::Now();
    const int64_t bytes_before = result.bytes;
    absl::StatusOr<std::vector<BundleFrame>> frames = Serialize(item);
    if (!frames.ok()) {
      local = absl::InternalError(absl::StrCat("bundle writer: ", frames.status().message()));
      break;
    }
    for (BundleFrame& f : *frames) {
      if (fault_pending && f.type == RecordType::kPart) {
        fault_pending = false;
        if (!(ok = send_damaged(std::move(f)))) break;
        continue;
      }
      if (!(ok = send(std::move(f)))) break;
    }
    const double item_seconds = absl::ToDoubleSeconds(absl::Now() - item_start);
    (item.kda ? result.kda_bytes : result.mla_bytes) += result.bytes - bytes_before;
    (item.kda ? result.kda_seconds : result.mla_seconds) += item_seconds;
  }
  if (!local.ok()) ctx_.TryCancel();
  const grpc::Status gs = stream->Finish();
  Conclude(local, closed, gs, result, first_sent);
}

void StatePusher::Conclude(absl::Status local, bool closed, const grpc::Status& gs,
                           PushResult result, absl::Time first_sent) {
  std::optional<absl::Status> cancelled;
  {
    absl::MutexLock l(&mu_);
    cancelled = cancel_;
  }
  absl::StatusOr<PushResult> outcome;
  if (cancelled.has_value()) {
    outcome = *cancelled;
  } else if (!local.ok()) {
    outcome = local;
  } else if (!gs.ok()) {
    outcome = PushErrorToPrefillStatus(FromGrpcStatus(gs), target_.address);
  } else if (!closed) {
    outcome = absl::InternalError(
        absl::StrCat("state push to ", target_.address, " ended before the bundle was sent"));
  } else {
    result.transfer_seconds = absl::ToDoubleSeconds(absl::Now() - first_sent);
    outcome = result;
  }
  if (!outcome.ok()) failed_ = true;
  if (target_.device != nullptr) target_.device->End(outcome.ok());
  Done done = std::move(done_);
  done(std::move(outcome));
}

void StatePusher::RunDevice() {
  DeviceSend& device = *target_.device;
  auto stub = v1::Decode::NewStub(target_.channel);
  ctx_.set_deadline(target_.deadline);
  if (!target_.request_id.empty()) ctx_.AddMetadata(kRequestIdKey, target_.request_id);
  v1::PushStateResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::StatePart>> stream = stub->PushState(&ctx_, &response);

  const StateFault fault = target_.fault;
  if (fault != StateFault::kNone) {
    KL_LOG(WARNING).Field("fault", StateFaultName(fault)).Field("target", target_.address)
        << "FAULT INJECTION: damaging this device transfer";
  }
  PushResult result;
  result.device = true;
  for (const v1::DeviceMessage& m : device.plan()) {
    result.bytes += m.bytes();
    (m.kda() ? result.kda_bytes : result.mla_bytes) += m.bytes();
  }
  const absl::Time first_sent = absl::Now();
  absl::Status local;
  bool closed = false;
  {
    v1::StatePart part;
    part.set_lease_id(target_.lease_id);
    part.set_request_id(target_.request_id);
    part.set_frame(writer_->HeaderFrame().bytes);
    part.mutable_device()->set_link_id(device.link_id());
    for (const v1::DeviceMessage& m : device.plan()) *part.mutable_device()->add_messages() = m;
    result.frames = 1;
    result.bytes += static_cast<int64_t>(part.frame().size());
    if (!stream->Write(part)) failed_ = true;
  }
  // While the forward runs, the stream announces each group of messages as its
  // data becomes ready (the link sends it right after; the decode worker posts
  // the receives then), and a progress message every second of silence keeps
  // the lease renewed through long prefills. After the forward, once every
  // queued message has been announced, the sends are waited for.
  device.SetWake([this] {
    absl::MutexLock l(&mu_);
    device_wake_ = true;
  });
  bool finishing = false;
  while (!failed_) {
    std::vector<MessageGroup> groups;
    bool drained = false;
    if (absl::Status t = device.TakeGroups(&groups, &drained); !t.ok()) {
      local = t;
      break;
    }
    if (!groups.empty()) {
      v1::StatePart part;
      for (const MessageGroup& g : groups) {
        v1::DeviceGroup* d = part.add_device_groups();
        d->set_first(g.first);
        d->set_count(g.count);
      }
      if (!stream->Write(part)) {
        failed_ = true;
        break;
      }
    }
    if (finishing && drained) break;
    bool woke, cancelled;
    {
      absl::MutexLock l(&mu_);
      woke = mu_.AwaitWithTimeout(
          absl::Condition(
              +[](StatePusher* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) {
                return p->device_wake_ || p->cancel_.has_value() ||
                       (p->finish_ && !p->finish_seen_);
              },
              this),
          absl::Seconds(1));
      cancelled = cancel_.has_value();
      device_wake_ = false;
      if (finish_) finish_seen_ = finishing = true;
    }
    if (cancelled) {
      finishing = false;
      break;
    }
    if (!woke && groups.empty() && !stream->Write(v1::StatePart())) failed_ = true;
  }
  if (finishing && local.ok() && !failed_) {
    // A progress message per slice of the wait: it fails once the decode
    // worker has ended the call, which then ends the wait.
    absl::StatusOr<std::vector<uint64_t>> sums = device.Complete([&] {
      if (!stream->Write(v1::StatePart())) failed_ = true;
      return !failed_.load();
    });
    if (!sums.ok()) {
      if (!failed_) local = sums.status();  // else the decode worker's status says why
    } else if (fault != StateFault::kDropFinal) {
      v1::StatePart done;
      for (uint64_t v : *sums) done.add_device_checksums(v);
      done.set_device_done(true);
      closed = stream->Write(done) && stream->WritesDone();
    } else {
      closed = stream->WritesDone();
    }
  }
  device.SetWake(nullptr);  // nothing calls into this pusher from the link any more
  // A write that failed means the decode worker ended the call: its status says why.
  if (!local.ok() || (!finishing && !failed_)) ctx_.TryCancel();
  const grpc::Status gs = stream->Finish();
  Conclude(local, closed, gs, result, first_sent);
}

}  // namespace kl
