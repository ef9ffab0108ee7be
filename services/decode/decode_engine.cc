#include "services/decode/decode_engine.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/common/log.h"

namespace kl {
namespace {

// Safety net only: every event that can make a sequence runnable calls Wake().
constexpr absl::Duration kIdlePoll = absl::Milliseconds(200);

bool IsStopToken(const SamplingParams& p, int32_t eos, int32_t token) {
  if (!p.ignore_eos && eos >= 0 && token == eos) return true;
  return std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) !=
         p.stop_token_ids.end();
}

}  // namespace

DecodeEngine::DecodeEngine(Model* model, LeaseManager* leases, DecodeEngineOptions options)
    : model_(model), leases_(leases), options_(options) {
  thread_ = std::thread([this] { Loop(); });
}

DecodeEngine::~DecodeEngine() {
  {
    absl::MutexLock l(&mu_);
    stop_ = true;
  }
  thread_.join();
}

absl::Status DecodeEngine::Join(DecodeSpec spec, SequenceState state,
                                std::shared_ptr<TokenSink> sink) {
  Sampler sampler(spec.params, spec.next_index);
  auto seq = std::unique_ptr<Sequence>(new Sequence{std::move(spec), std::move(state),
                                                    std::move(sink), std::move(sampler)});
  seq->next_input = seq->spec.last_token;
  seq->index = seq->spec.next_index;
  absl::MutexLock l(&mu_);
  if (stop_) return absl::UnavailableError("decode engine is stopping");
  joining_.push_back(std::move(seq));
  return absl::OkStatus();
}

void DecodeEngine::Wake() {
  absl::MutexLock l(&mu_);
  wake_ = true;
}

DecodeEngineStats DecodeEngine::Stats() const {
  DecodeEngineStats s;
  {
    absl::MutexLock l(&mu_);
    s.joining = static_cast<int64_t>(joining_.size());
  }
  s.running = running_count_.load();
  s.steps = steps_.load();
  s.max_batch_seen = max_batch_seen_.load();
  s.completed = completed_.load();
  return s;
}

void DecodeEngine::Leave(Sequence& seq, const absl::Status& status) {
  // End first: the sink then ignores the revocation that Release sends it.
  seq.sink->End(status);
  // Pool the state before the lease is released: once the slot shows free, its
  // memory is available for the next push.
  if (options_.state_pool) {
    options_.state_pool->Give(std::move(seq.state));
  } else {
    seq.state = SequenceState();  // a device backend's slot and pages go back now
  }
  leases_->ReleaseHeld(seq.spec.lease_id,
                       status.ok() ? absl::CancelledError("decode finished") : status);
}

void DecodeEngine::Loop() {
  for (;;) {
    std::deque<std::unique_ptr<Sequence>> joined;
    bool stop;
    {
      absl::MutexLock l(&mu_);
      stop = stop_;
      joined.swap(joining_);
      wake_ = false;
    }
    for (auto& s : joined) running_.push_back(std::move(s));
    if (stop) {
      for (auto& s : running_) Leave(*s, absl::UnavailableError("decode worker shutting down"));
      running_.clear();
      running_count_ = 0;
      return;
    }
    // Drop sequences whose stream is gone.
    for (auto& s : running_) {
      if (s->sink->Cancelled()) {
        Leave(*s, absl::CancelledError("decode stream cancelled"));
        s.reset();
      }
    }
    running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
    running_count_ = static_cast<int64_t>(running_.size());

    // Runnable sequences, round-robin so paused-then-resumed ones are not starved.
    std::vector<Sequence*> batch;
    const size_t n = running_.size();
    for (size_t k = 0; k < n && static_cast<int64_t>(batch.size()) < options_.max_batch; ++k) {
      Sequence* s = running_[(rotate_ + k) % n].get();
      if (s->sink->HasRoom()) batch.push_back(s);
    }
    ++rotate_;
    if (batch.empty()) {
      absl::MutexLock l(&mu_);
      auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return wake_ || stop_ || !joining_.empty();
      };
      mu_.AwaitWithTimeout(absl::Condition(&ready), kIdlePoll);
      continue;
    }
    Step(batch);
    running_.erase(std::remove(running_.begin(), running_.end(), nullptr), running_.end());
    running_count_ = static_cast<int64_t>(running_.size());
  }
}

void DecodeEngine::Step(std::vector<Sequence*>& batch) {
  std::vector<ForwardItem> items;
  items.reserve(batch.size());
  const bool on_device = options_.device_sampling && model_->backend()->SamplesOnDevice();
  std::vector<TokenSampling> sampling(on_device ? batch.size() : 0);
  for (size_t i = 0; i < batch.size(); ++i) {
    Sequence* s = batch[i];
    items.push_back(ForwardItem{&s->state, absl::MakeConstSpan(&s->next_input, 1), false});
    if (on_device) {
      sampling[i] = s->sampler.Draw(s->index);  // the host Sampler's draw for this token
      items.back().sample = &sampling[i];
    }
  }
  ForwardOutput out;
  const absl::Time step_start = absl::Now();
  const absl::Status fs = model_->Forward(absl::MakeSpan(items), &out);
  if (options_.metrics != nullptr) {
    options_.metrics->step_seconds.Observe(absl::ToDoubleSeconds(absl::Now() - step_start));
    options_.metrics->batch_size.Observe(static_cast<double>(batch.size()));
  }
  steps_.fetch_add(1);
  int64_t seen = max_batch_seen_.load();
  const int64_t size = static_cast<int64_t>(batch.size());
  while (size > seen && !max_batch_seen_.compare_exchange_weak(seen, size)) {
  }
  std::vector<Sequence*> retired;
  if (!fs.ok()) {
    // The states are undefined after a failed Forward: every item must go.
    KL_LOG(ERROR).Field("batch", batch.size()) << "decode step failed: " << fs.ToString();
    for (Sequence* s : batch) {
      Leave(*s, absl::InternalError(absl::StrCat("decode step failed: ", fs.message())));
      retired.push_back(s);
    }
  } else {
    const int64_t vocab = model_->config().vocab_size;
    for (size_t i = 0; i < batch.size(); ++i) {
      Sequence& s = *batch[i];
      int32_t tok;
      if (!out.tokens.empty()) {  // sampled on the device
        tok = out.tokens[i];
        s.sampler.SkipDraw();
      } else {
        tok = s.sampler.Sample(out.logits[i].data(), vocab);
      }
      const int64_t index = s.index++;
      ++s.produced;
      // A sequence whose state fills the model's context ends here, so it can
      // never make the next batched Forward fail for everyone else.
      const bool finished = IsStopToken(s.spec.params, options_.eos_token_id, tok) ||
                            s.produced >= s.spec.max_new_tokens ||
                            s.state.num_tokens >= model_->config().model_max_length;
      s.sink->Emit(tok, index, finished);
      if (finished) {
        completed_.fetch_add(1);
        Leave(s, absl::OkStatus());
        retired.push_back(&s);
        continue;
      }
      s.next_input = tok;
      absl::Status renewed = leases_->Renew(s.spec.lease_id, s.state.num_tokens);
      if (!renewed.ok()) {
        Leave(s, renewed);
        retired.push_back(&s);
      }
    }
  }
  for (auto& s : running_) {
    if (std::find(retired.begin(), retired.end(), s.get()) != retired.end()) s.reset();
  }
}

}  // namespace kl
