#include "services/prefill/prefill_engine.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/common/log.h"
#include "services/transport/transfer_plan.h"

namespace kl {

PrefillJob::PrefillJob(Spec spec, Done done) : spec_(std::move(spec)), done_fn_(std::move(done)) {}

void PrefillJob::Cancel(const absl::Status& why) { Complete(why); }

bool PrefillJob::Complete(const absl::StatusOr<PrefillResult>& result) {
  if (completed_.exchange(true)) return false;
  Done done = std::move(done_fn_);
  done(result);
  std::shared_ptr<StatePusher> pusher;
  {
    absl::MutexLock l(&mu_);
    pusher = std::move(pusher_);
  }
  if (pusher && !result.ok()) pusher->Cancel(result.status());
  return true;
}

PrefillEngine::PrefillEngine(Model* model, PrefillEngineOptions options)
    : model_(model), options_(std::move(options)), channels_(64 << 20, options_.push_security) {
  const ModelConfig& c = model_->config();
  int64_t kda = 0, mla = 0;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) ordinal_.push_back(c.IsKda(l) ? kda++ : mla++);
  if (options_.prefix_cache_bytes > 0) {
    prefix_cache_ = std::make_unique<PrefixCache>(options_.prefix_cache_bytes);
  }
  thread_ = std::thread([this] { Loop(); });
}

PrefillEngine::~PrefillEngine() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  thread_.join();
  std::vector<std::weak_ptr<StatePusher>> live;
  {
    absl::MutexLock l(&mu_);
    live.swap(live_pushers_);
  }
  for (auto& w : live) {
    if (auto p = w.lock()) p->Cancel(absl::UnavailableError("prefill worker stopping"));
  }
  senders_.WaitAllExited();
}

absl::Status PrefillEngine::Submit(std::shared_ptr<PrefillJob> job) {
  absl::MutexLock l(&mu_);
  if (stop_ || draining_) return absl::UnavailableError("prefill worker is draining");
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queue) {
    return absl::ResourceExhaustedError(
        absl::StrCat("prefill queue full (", options_.max_queue, " waiting)"));
  }
  queue_.push_back(std::move(job));
  return absl::OkStatus();
}

void PrefillEngine::Drain() {
  absl::MutexLock l(&mu_);
  draining_ = true;
}

bool PrefillEngine::WaitIdle(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    const PrefillEngineStats s = Stats();
    if (s.waiting == 0 && s.running == 0 && s.transfers_in_flight == 0) return true;
    if (absl::Now() >= deadline) return false;
    absl::SleepFor(absl::Milliseconds(20));
  }
}

PrefillEngineStats PrefillEngine::Stats() const {
  PrefillEngineStats s;
  {
    absl::MutexLock l(&mu_);
    s.waiting = static_cast<int64_t>(queue_.size());
    s.draining = draining_;
  }
  s.running = running_.load();
  s.transfers_in_flight = senders_.live();
  s.completed = completed_.load();
  s.forwards = forwards_.load();
  return s;
}

int64_t PrefillEngine::TokensToCompute(PrefillJob& job) {
  if (!job.looked_up_) {
    job.looked_up_ = true;
    if (prefix_cache_ != nullptr) job.hit_ = prefix_cache_->Lookup(job.spec().tokens);
  }
  const int64_t n = static_cast<int64_t>(job.spec().tokens.size());
  return job.hit_ ? n - static_cast<int64_t>(job.hit_->tokens.size()) : n;
}

std::vector<std::shared_ptr<PrefillJob>> PrefillEngine::NextBatch() {
  std::vector<std::shared_ptr<PrefillJob>> batch;
  int64_t total = 0;
  while (!queue_.empty()) {
    std::shared_ptr<PrefillJob>& job = queue_.front();
    if (job->done()) {  // cancelled while waiting
      queue_.pop_front();
      continue;
    }
    // A prefix-cache hit counts only the tokens it computes: a long
    // conversation's short new turn batches with other prompts.
    const int64_t n = TokensToCompute(*job);
    if (batch.empty() && n > options_.max_batch_tokens) {  // runs alone, chunked
      batch.push_back(std::move(job));
      queue_.pop_front();
      break;
    }
    if (n > options_.max_batch_tokens || total + n > options_.max_batch_tokens ||
        static_cast<int64_t>(batch.size()) >= options_.max_batch_seqs) {
      break;
    }
    total += n;
    batch.push_back(std::move(job));
    queue_.pop_front();
  }
  return batch;
}

void PrefillEngine::Loop() {
  for (;;) {
    std::vector<std::shared_ptr<PrefillJob>> batch;
    {
      absl::MutexLock l(&mu_);
      mu_.Await(absl::Condition(
          +[](PrefillEngine* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(e->mu_) {
            return e->stop_ || !e->queue_.empty();
          },
          this));
      if (stop_) {
        for (auto& job : queue_) job->Complete(absl::UnavailableError("prefill worker stopping"));
        queue_.clear();
        return;
      }
      batch = NextBatch();
    }
    if (batch.empty()) continue;
    running_ = static_cast<int64_t>(batch.size());
    if (TokensToCompute(*batch[0]) > options_.max_batch_tokens) {
      RunChunked(batch[0]);
    } else {
      RunBatch(batch);
    }
    running_ = 0;
  }
}

std::shared_ptr<DeviceSend> PrefillEngine::StartDeviceSend(const PrefillJob& job,
                                                            const PushTarget& target) {
  if (options_.transport == nullptr) return nullptr;
  // Frame faults need frames: those pushes go over gRPC.
  if (target.fault == StateFault::kTruncate || target.fault == StateFault::kDuplicate ||
      target.fault == StateFault::kReorder) {
    return nullptr;
  }
  const ModelConfig& c = model_->config();
  const int64_t n = static_cast<int64_t>(job.spec().tokens.size());
  const int64_t chunk = n > options_.max_batch_tokens ? options_.max_batch_tokens : n;
  absl::StatusOr<std::unique_ptr<DeviceSend>> send = options_.transport->BeginSend(
      target.address, target.channel,
      BuildTransferPlan(c, n, chunk, options_.transport->plan_sizes()));
  if (!send.ok()) {
    KL_LOG(DEBUG).Field("target", target.address) << "state goes over gRPC: "
                                                  << send.status().message();
    return nullptr;
  }
  if (target.fault == StateFault::kCut) (*send)->InjectCut();
  // Damaged data in turn: a KDA message, then an MLA message.
  if (target.fault == StateFault::kCorrupt) (*send)->InjectCorrupt(device_corrupts_++ % 2 == 1);
  return std::shared_ptr<DeviceSend>(std::move(*send));
}

std::shared_ptr<StatePusher> PrefillEngine::StartJob(const std::shared_ptr<PrefillJob>& job) {
  if (job->done()) return nullptr;
  ScopedRequestId rid(job->spec().request_id);  // engine-thread log lines about this job
  const PrefillJob::Spec& spec = job->spec();
  job->started_ = absl::Now();
  job->result_.queue_seconds = absl::ToDoubleSeconds(job->started_ - job->enqueued_);
  if (options_.metrics != nullptr) options_.metrics->queue_time.Observe(job->result_.queue_seconds);
  job->result_.num_tokens = static_cast<int64_t>(spec.tokens.size());
  TokensToCompute(*job);  // the lookup, if NextBatch did not do it
  const std::shared_ptr<const PrefixCache::Entry> hit = std::move(job->hit_);
  // A hit starts from a host copy of the cached state (adopted by a device
  // backend like an imported bundle); the forward covers the rest.
  job->state_ = std::make_shared<SequenceState>(hit ? hit->state : model_->NewState());
  job->cached_ = hit ? static_cast<int64_t>(hit->tokens.size()) : 0;
  job->result_.cached_tokens = job->cached_;
  BundleMeta meta;
  meta.request_id = spec.request_id.substr(0, kMaxRequestIdBytes);
  // The header goes out before the token is sampled, so it carries none; the
  // Decode request carries it (last_token).
  meta.first_token = -1;
  meta.checkpoint_fingerprint = options_.checkpoint_fingerprint;
  absl::StatusOr<std::unique_ptr<BundleWriter>> writer =
      BundleWriter::Create(model_->config(), job->result_.num_tokens, meta, options_.bundle);
  if (!writer.ok()) {
    FailJob(*job, absl::InternalError(absl::StrCat("bundle writer: ", writer.status().message())));
    return nullptr;
  }
  PushTarget target;
  target.channel = channels_.Get(spec.target_address);
  target.address = spec.target_address;
  target.lease_id = spec.lease_id;
  target.request_id = spec.request_id;
  target.deadline = spec.deadline;
  if (options_.fault_injector != nullptr) target.fault = options_.fault_injector->Next();
  if (job->cached_ == 0) job->device_ = StartDeviceSend(*job, target);
  target.device = job->device_;
  // `done` holds the job until the push ends (the pusher drops it after the call).
  auto done = [this, job](absl::StatusOr<PushResult> push) {
    PrefillMetrics* const m = options_.metrics;
    if (!push.ok()) {
      if (m != nullptr) m->CountTransferFailure(push.status().code());
      job->Complete(push.status());
      return;
    }
    if (m != nullptr) {
      m->kda_bytes.Increment(static_cast<double>(push->kda_bytes));
      m->mla_bytes.Increment(static_cast<double>(push->mla_bytes));
      m->other_bytes.Increment(static_cast<double>(push->bytes - push->kda_bytes - push->mla_bytes));
      m->bundle_seconds.Observe(push->transfer_seconds);
      if (!push->device) {  // a device transfer's parts move together on the GPU
        m->kda_seconds.Observe(push->kda_seconds);
        if (push->mla_bytes > 0) m->mla_seconds.Observe(push->mla_seconds);
      }
    }
    // result_ was written before pusher->Finish(), which this follows.
    PrefillResult result = job->result_;
    result.transfer_seconds = push->transfer_seconds;
    result.transfer_bytes = push->bytes;
    if (!job->Complete(result)) return;  // cancelled meanwhile
    completed_.fetch_add(1);
    // A state pushed from its host vectors is whole there: keep it for
    // prompts that extend this one. After the reply (the copy does not delay
    // the first token) and off the engine thread; nothing writes the state now.
    if (prefix_cache_ != nullptr && job->device_ == nullptr && job->cacheable_.load()) {
      prefix_cache_->Insert(job->spec().tokens, *job->state_);
    }
  };
  std::shared_ptr<StatePusher> pusher =
      StatePusher::Start(model_->config(), *std::move(writer), job->state_, std::move(target),
                         std::move(done), &senders_);
  {
    absl::MutexLock l(&mu_);
    live_pushers_.erase(std::remove_if(live_pushers_.begin(), live_pushers_.end(),
                                       [](const auto& w) { return w.expired(); }),
                        live_pushers_.end());
    live_pushers_.push_back(pusher);
  }
  bool cancelled;
  {
    absl::MutexLock l(&job->mu_);
    job->pusher_ = pusher;
    cancelled = job->done();
  }
  if (cancelled) {  // Cancel ran before pusher_ was set: it could not reach the push
    pusher->Cancel(absl::CancelledError("prefill cancelled"));
    return nullptr;
  }
  return pusher;
}

void PrefillEngine::RunBatch(const std::vector<std::shared_ptr<PrefillJob>>& batch) {
  std::vector<std::shared_ptr<PrefillJob>> jobs;
  std::vector<std::shared_ptr<StatePusher>> pushers;
  for (const auto& job : batch) {
    if (auto p = StartJob(job)) {
      jobs.push_back(job);
      pushers.push_back(std::move(p));
    }
  }
  if (jobs.empty()) return;
  std::vector<ForwardItem> items;
  std::vector<TokenSampling> sampling(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    const auto& job = jobs[i];
    const std::vector<int32_t>& t = job->spec().tokens;
    items.push_back({job->state_.get(),
                     absl::MakeConstSpan(t.data() + job->cached_, t.size() - job->cached_), false,
                     job->device_ == nullptr});
    if (SampleOnDevice(*job, &sampling[i])) items.back().sample = &sampling[i];
  }
  const ModelConfig& c = model_->config();
  // Runs on this thread between layers: queue references only.
  auto on_layer = [&](int64_t layer) {
    for (size_t i = 0; i < jobs.size(); ++i) {
      if (pushers[i]->failed()) continue;
      if (jobs[i]->device_ != nullptr) {
        const int64_t n = static_cast<int64_t>(jobs[i]->spec().tokens.size());
        absl::Status s = jobs[i]->device_->OnLayer(*jobs[i]->state_, layer, 0, n);
        if (!s.ok()) pushers[i]->Cancel(s);
        continue;
      }
      if (c.IsKda(layer)) {
        pushers[i]->ShipKdaLayer(layer, ordinal_[layer]);
      } else {
        const int64_t n = static_cast<int64_t>(jobs[i]->spec().tokens.size());
        pushers[i]->ShipMlaRows(layer, ordinal_[layer], 0, n, /*copy_now=*/false);
      }
    }
  };
  ForwardOutput out;
  if (options_.metrics != nullptr) {
    int64_t n = 0;
    for (const auto& job : jobs) {
      n += static_cast<int64_t>(job->spec().tokens.size()) - job->cached_;  // tokens computed
    }
    options_.metrics->batch_tokens.Observe(static_cast<double>(n));
  }
  const absl::Status s = model_->Forward(absl::MakeSpan(items), &out, on_layer);
  forwards_.fetch_add(1);
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (s.ok() && jobs[i]->device_ != nullptr) {
      absl::Status a = jobs[i]->device_->AfterForward(*jobs[i]->state_);
      if (!a.ok()) pushers[i]->Cancel(a);
    }
  }
  // A device backend's slots go back now: every layer was copied to host memory
  // for the pushers (Model::Forward syncs layers when a listener is given), or
  // a device transfer holds the slot until its sends are done.
  for (const auto& job : jobs) model_->ReleaseState(job->state_.get()).IgnoreError();
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (!s.ok()) {
      FailJob(*jobs[i], absl::InternalError(absl::StrCat("prefill forward: ", s.message())));
    } else {
      FinishJob(*jobs[i], out, i);
    }
  }
}

void PrefillEngine::RunChunked(const std::shared_ptr<PrefillJob>& job) {
  ScopedRequestId rid(job->spec().request_id);
  std::shared_ptr<StatePusher> pusher = StartJob(job);
  if (!pusher) return;
  const ModelConfig& c = model_->config();
  const std::vector<int32_t>& tokens = job->spec().tokens;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t chunk = options_.max_batch_tokens;
  ForwardOutput out;
  const int64_t first = job->cached_;  // a prefix-cache hit starts past the cached tokens
  for (int64_t begin = first; begin < n; begin += chunk) {
    // A cancelled job, or one whose push already failed, stops here.
    if (job->done() || pusher->failed()) return;
    const int64_t end = std::min(n, begin + chunk);
    const bool last = end == n;
    ForwardItem item{job->state_.get(), absl::MakeConstSpan(tokens.data() + begin, end - begin),
                     false, job->device_ == nullptr};
    TokenSampling sampling;
    if (last && SampleOnDevice(*job, &sampling)) item.sample = &sampling;
    auto on_layer = [&](int64_t layer) {
      if (pusher->failed()) return;
      if (job->device_ != nullptr) {
        if (c.IsKda(layer) && !last) return;  // final state only
        absl::Status s = job->device_->OnLayer(*job->state_, layer, begin, end);
        if (!s.ok()) pusher->Cancel(s);
        return;
      }
      if (c.IsKda(layer)) {
        if (last) pusher->ShipKdaLayer(layer, ordinal_[layer]);  // final state only
      } else {
        // Rows of this chunk (the first also ships the cached rows); copied
        // unless no later chunk can move them.
        pusher->ShipMlaRows(layer, ordinal_[layer], begin == first ? 0 : begin, end,
                            /*copy_now=*/!last);
      }
    };
    if (options_.metrics != nullptr) options_.metrics->batch_tokens.Observe(static_cast<double>(end - begin));
    const absl::Status s = model_->Forward(absl::MakeSpan(&item, 1), &out, on_layer);
    forwards_.fetch_add(1);
    if (!s.ok()) {
      model_->ReleaseState(job->state_.get()).IgnoreError();
      FailJob(*job, absl::InternalError(absl::StrCat("prefill forward: ", s.message())));
      return;
    }
  }
  if (job->device_ != nullptr) {
    absl::Status a = job->device_->AfterForward(*job->state_);
    if (!a.ok()) pusher->Cancel(a);
  }
  model_->ReleaseState(job->state_.get()).IgnoreError();
  FinishJob(*job, out, 0);
}

void PrefillEngine::FailJob(PrefillJob& job, const absl::Status& status) {
  // The job's done callback logs the failure, under the request's id.
  job.Complete(status);
}

bool PrefillEngine::SampleOnDevice(const PrefillJob& job, TokenSampling* out) const {
  if (!options_.device_sampling || !model_->backend()->SamplesOnDevice()) return false;
  const int64_t index = job.spec().sample_index;
  *out = Sampler(job.spec().params, index).Draw(index);  // the host Sampler's draw
  return true;
}

void PrefillEngine::FinishJob(PrefillJob& job, const ForwardOutput& out, size_t item) {
  std::shared_ptr<StatePusher> pusher;
  {
    absl::MutexLock l(&job.mu_);
    pusher = job.pusher_;
  }
  if (job.done() || pusher == nullptr) return;
  if (!out.tokens.empty()) {  // sampled on the device
    job.result_.token = out.tokens[item];
  } else {
    Sampler sampler(job.spec().params, job.spec().sample_index);
    job.result_.token = sampler.Sample(out.logits[item].data(), model_->config().vocab_size);
  }
  job.result_.prefill_seconds = absl::ToDoubleSeconds(absl::Now() - job.started_);
  job.cacheable_ = true;  // before Finish: the push's completion reads it
  if (options_.metrics != nullptr) options_.metrics->prefill_time.Observe(job.result_.prefill_seconds);
  pusher->Finish();
}

}  // namespace kl
