// CudaBackend: sequence-state residency — slots and latent pages, binding
// states for a forward, copies between device and host (bundle export and
// import, layer by layer for pushes), and the device pointers the ops read.
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/backend/cuda_backend.h"
#include "engine/backend/cuda_backend_impl.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kda_state_layout.h"
#include "kernels/cuda/mla.h"

namespace kl {

absl::StatusOr<int32_t> CudaBackend::SlotOf(const SequenceState* s) const {
  if (s->device == nullptr || s->device->owner != this) {
    return absl::FailedPreconditionError("state is not bound to this CUDA backend");
  }
  return static_cast<const CudaResidency*>(s->device.get())->slot;
}

void CudaBackend::FreeResidency(int32_t slot, const std::vector<int32_t>&) {
  std::lock_guard<std::mutex> l(impl_->mu);
  auto& pages = impl_->slot_pages[slot];
  impl_->free_pages.insert(impl_->free_pages.end(), pages.begin(), pages.end());
  pages.clear();
  impl_->free_slots.push_back(slot);
}

Backend::LatentCapacity CudaBackend::latent_capacity() const {
  LatentCapacity c;
  c.rows = impl_->latent_pages * options_.page_rows;
  c.granularity = options_.page_rows;
  c.max_rows_per_sequence = impl_->max_pages_per_seq * options_.page_rows;
  return c;
}

absl::Status CudaBackend::EnsurePages(int32_t slot, int64_t rows) {
  Impl& m = *impl_;
  const int64_t need = (rows + options_.page_rows - 1) / options_.page_rows;
  if (need > m.max_pages_per_seq) {
    return absl::ResourceExhaustedError(absl::StrCat("MLA latent cache: a sequence of ", rows,
                                                     " tokens needs ", need, " pages, at most ",
                                                     m.max_pages_per_seq, " per sequence"));
  }
  int64_t have;
  {
    std::lock_guard<std::mutex> l(m.mu);
    auto& pages = m.slot_pages[slot];
    have = static_cast<int64_t>(pages.size());
    if (need <= have) return absl::OkStatus();
    if (static_cast<int64_t>(m.free_pages.size()) < need - have) {
      return absl::ResourceExhaustedError(absl::StrCat("MLA latent cache full: ", need - have,
                                                       " more pages needed, ", m.free_pages.size(),
                                                       " free"));
    }
    for (int64_t i = have; i < need; ++i) {
      pages.push_back(m.free_pages.back());
      m.free_pages.pop_back();
      m.block_table_host[slot * m.max_pages_per_seq + i] = pages.back();
    }
  }
  // The device sees block tables only through StageBlockTable (per batch).
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<CudaResidency>> CudaBackend::TakeSlot() {
  Impl& m = *impl_;
  int32_t slot;
  {
    std::lock_guard<std::mutex> l(m.mu);
    if (m.free_slots.empty()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("CUDA backend: all ", options_.max_seqs, " state slots are in use"));
    }
    slot = m.free_slots.back();
    m.free_slots.pop_back();
  }
  auto res = std::make_shared<CudaResidency>();
  res->owner = this;
  res->backend = this;
  res->slot = slot;  // from here on the destructor gives the slot (and pages) back
  return res;
}

absl::Status CudaBackend::BindStates(const std::vector<SequenceState*>& states) {
  // The calling thread may never have used this GPU: Model::Forward binds
  // before BeginForward, and an adopted host state (a pushed bundle, a prefix
  // cache hit) is the first CUDA work a worker thread does. Without this, a
  // worker on GPU 1 staged through GPU 0's context (an illegal address).
  RETURN_IF_ERROR(UseDevice());
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  const int64_t lat = c.MlaLatentDim(), HKV = c.KdaStateElems(), tail = c.ConvTailElems();
  void* staged = nullptr;  // one layer's canonical state on the device (see below)
  for (SequenceState* s : states) {
    if (s->device != nullptr) {
      if (s->device->owner != this) {
        return absl::FailedPreconditionError("state is held by another backend");
      }
      continue;
    }
    // Adopt: host vectors (zeros of a new sequence or an imported bundle) → slot.
    if (static_cast<int64_t>(s->kda.size()) != c.NumKdaLayers() ||
        static_cast<int64_t>(s->mla.size()) != c.NumMlaLayers()) {
      return absl::InvalidArgumentError("state does not match the model's layers");
    }
    ASSIGN_OR_RETURN(std::shared_ptr<CudaResidency> res, TakeSlot());
    const int32_t slot = res->slot;
    for (int64_t i = 0; i < c.NumKdaLayers(); ++i) {
      const KdaLayerState& ks = s->kda[i];
      if (static_cast<int64_t>(ks.recurrent.size()) != HKV ||
          static_cast<int64_t>(ks.conv_q.size()) != tail ||
          static_cast<int64_t>(ks.conv_k.size()) != tail ||
          static_cast<int64_t>(ks.conv_v.size()) != tail) {
        return absl::InvalidArgumentError("KDA state of wrong size");
      }
      // Canonical host [H][K][V] -> device scratch -> the slot's pool layout
      // (kda_state_layout.h). Outside a forward one scratch buffer serves every layer of
      // every adopted state (stream order makes the reuse safe); inside one, Stage.
      if (m.in_forward) {
        ASSIGN_OR_RETURN(staged, Stage(ks.recurrent.data(), HKV * sizeof(float)));
      } else {
        if (staged == nullptr) {
          ASSIGN_OR_RETURN(staged, Scratch(HKV * sizeof(float)));
        }
        KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staged, ks.recurrent.data(), HKV * sizeof(float),
                                                cudaMemcpyHostToDevice, m.stream));
      }
      RETURN_IF_ERROR(cuda::KdaStateToPool(static_cast<const float*>(staged), c.kda_num_heads,
                                           c.kda_head_dim, c.kda_head_dim,
                                           m.kda_state[i] + slot * HKV, m.stream));
      const std::vector<float>* tails[3] = {&ks.conv_q, &ks.conv_k, &ks.conv_v};
      for (int j = 0; j < 3; ++j) {
        if (tail == 0) continue;
        KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.kda_tail[i][j] + slot * tail, tails[j]->data(),
                                                tail * sizeof(float), cudaMemcpyHostToDevice,
                                                m.stream));
      }
    }
    const int64_t n = s->num_tokens;
    if (c.NumMlaLayers() > 0 && n > 0) {
      RETURN_IF_ERROR(EnsurePages(slot, n));
      std::vector<int64_t> cu = {0, n};
      std::vector<int32_t> start = {0};
      ASSIGN_OR_RETURN(void* d_cu, Stage(cu.data(), 2 * sizeof(int64_t)));
      ASSIGN_OR_RETURN(void* d_start, Stage(start.data(), sizeof(int32_t)));
      ASSIGN_OR_RETURN(const int32_t* table, StageBlockTable({slot}));
      for (int64_t i = 0; i < c.NumMlaLayers(); ++i) {
        if (static_cast<int64_t>(s->mla[i].latent.size()) < n * lat) {
          return absl::InvalidArgumentError("MLA cache shorter than the sequence");
        }
        ASSIGN_OR_RETURN(void* rows, Stage(s->mla[i].latent.data(), n * lat * sizeof(float)));
        cuda::MlaCacheWriteParams p;
        p.num_seqs = 1;
        p.num_tokens = n;
        p.cache = m.LatentCache(m.mla_pool[i], options_.latent_dtype, options_.page_rows,
                                c.kv_lora_rank, c.qk_rope_head_dim, table);
        p.rows = static_cast<const float*>(rows);
        p.cu_seqlens = static_cast<const int64_t*>(d_cu);
        p.start_pos = static_cast<const int32_t*>(d_start);
        RETURN_IF_ERROR(cuda::MlaCacheWrite(p, m.stream));
      }
    }
    s->device = std::move(res);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::KdaLayerToHost(int64_t kda_index, int32_t slot, KdaLayerState* ks,
                                         void* canonical) {
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  const int64_t HKV = c.KdaStateElems(), tail = c.ConvTailElems();
  ks->recurrent.resize(HKV);
  // Pool layout -> canonical [H][K][V] in scratch -> host (stream-ordered; the caller syncs).
  RETURN_IF_ERROR(cuda::KdaStateFromPool(m.kda_state[kda_index] + slot * HKV, c.kda_num_heads,
                                         c.kda_head_dim, c.kda_head_dim,
                                         static_cast<float*>(canonical), m.stream));
  KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ks->recurrent.data(), canonical, HKV * sizeof(float),
                                          cudaMemcpyDeviceToHost, m.stream));
  std::vector<float>* tails[3] = {&ks->conv_q, &ks->conv_k, &ks->conv_v};
  for (int j = 0; j < 3; ++j) {
    tails[j]->resize(tail);
    if (tail == 0) continue;
    KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tails[j]->data(), m.kda_tail[kda_index][j] + slot * tail,
                                            tail * sizeof(float), cudaMemcpyDeviceToHost,
                                            m.stream));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::MlaRowsToHost(int64_t mla_index, int32_t slot, int64_t row_begin,
                                        int64_t row_end, std::vector<float>* host) {
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  const int64_t lat = c.MlaLatentDim(), rows = row_end - row_begin;
  if (static_cast<int64_t>(host->size()) < row_end * lat) host->resize(row_end * lat);
  if (rows <= 0) return absl::OkStatus();
  // Only the window's rows: a chunked push asks for each chunk's rows once.
  const int64_t cu[2] = {0, rows};
  ASSIGN_OR_RETURN(void* d_cu, Stage(cu, sizeof(cu)));
  ASSIGN_OR_RETURN(const int32_t* table, StageBlockTable({slot}));
  ASSIGN_OR_RETURN(void* out, Scratch(rows * lat * sizeof(float)));
  cuda::MlaCacheGatherParams p;
  p.num_seqs = 1;
  p.num_rows = rows;
  p.cache = m.LatentCache(m.mla_pool[mla_index], options_.latent_dtype, options_.page_rows,
                          c.kv_lora_rank, c.qk_rope_head_dim, table);
  p.kv_cu_seqlens = static_cast<const int64_t*>(d_cu);
  p.first_row = row_begin;
  p.out = static_cast<float*>(out);
  RETURN_IF_ERROR(cuda::MlaCacheGather(p, m.stream));
  KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host->data() + row_begin * lat, out,
                                          rows * lat * sizeof(float), cudaMemcpyDeviceToHost,
                                          m.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::SyncStateToHost(SequenceState* s) {
  if (s->device == nullptr) return absl::OkStatus();
  RETURN_IF_ERROR(UseDevice());
  ASSIGN_OR_RETURN(int32_t slot, SlotOf(s));
  const ModelConfig& c = config_;
  s->kda.resize(c.NumKdaLayers());
  s->mla.resize(c.NumMlaLayers());
  void* canonical = nullptr;  // one layer's state in the canonical layout, reused per layer
  if (c.NumKdaLayers() > 0) {
    ASSIGN_OR_RETURN(canonical, Scratch(c.KdaStateElems() * sizeof(float)));
  }
  for (int64_t i = 0; i < c.NumKdaLayers(); ++i) {
    RETURN_IF_ERROR(KdaLayerToHost(i, slot, &s->kda[i], canonical));
  }
  for (int64_t i = 0; i < c.NumMlaLayers(); ++i) {
    s->mla[i].latent.resize(s->num_tokens * c.MlaLatentDim());
    RETURN_IF_ERROR(MlaRowsToHost(i, slot, 0, s->num_tokens, &s->mla[i].latent));
  }
  KL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(impl_->stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::SyncLayerToHost(SequenceState* s, bool kda, int64_t index,
                                          int64_t row_begin, int64_t row_end) {
  if (s->device == nullptr) return absl::OkStatus();
  RETURN_IF_ERROR(UseDevice());
  ASSIGN_OR_RETURN(int32_t slot, SlotOf(s));
  Impl& m = *impl_;
  if (m.mode == Impl::Mode::kCapture || m.mode == Impl::Mode::kReplay) {
    return absl::FailedPreconditionError("SyncLayerToHost inside a CUDA graph");
  }
  const ModelConfig& c = config_;
  ScratchScope scope(this);
  if (kda) {
    if (index < 0 || index >= c.NumKdaLayers()) return absl::InvalidArgumentError("KDA layer");
    s->kda.resize(c.NumKdaLayers());
    ASSIGN_OR_RETURN(void* canonical, Scratch(c.KdaStateElems() * sizeof(float)));
    RETURN_IF_ERROR(KdaLayerToHost(index, slot, &s->kda[index], canonical));
  } else {
    if (index < 0 || index >= c.NumMlaLayers() || row_begin < 0 || row_end < row_begin) {
      return absl::InvalidArgumentError("MLA layer or rows");
    }
    s->mla.resize(c.NumMlaLayers());
    RETURN_IF_ERROR(MlaRowsToHost(index, slot, row_begin, row_end, &s->mla[index].latent));
  }
  KL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(m.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::ReleaseState(SequenceState* s) {
  if (s->device == nullptr) return absl::OkStatus();
  RETURN_IF_ERROR(UseDevice());
  RETURN_IF_ERROR(SlotOf(s).status());
  // Work queued on the slot must finish before another sequence can take it.
  KL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(impl_->stream));
  s->device.reset();
  return absl::OkStatus();
}

absl::Status CudaBackend::KdaRefs(const std::vector<SequenceState*>& states, int64_t kda_index,
                                  std::vector<KdaStateRef>* refs) {
  Impl& m = *impl_;
  if (kda_index < 0 || kda_index >= static_cast<int64_t>(m.kda_state.size())) {
    return absl::InvalidArgumentError("KdaRefs: layer out of range");
  }
  refs->resize(states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    ASSIGN_OR_RETURN(int32_t slot, SlotOf(states[i]));
    (*refs)[i] = {m.kda_state[kda_index], m.kda_tail[kda_index][0], m.kda_tail[kda_index][1],
                  m.kda_tail[kda_index][2], slot};
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::MlaRefs(const std::vector<SequenceState*>& states, int64_t mla_index,
                                  const std::vector<SeqSlice>& seqs, int64_t row_elems,
                                  std::vector<MlaCacheRef>* refs) {
  Impl& m = *impl_;
  if (mla_index < 0 || mla_index >= static_cast<int64_t>(m.mla_pool.size()) ||
      row_elems != config_.MlaLatentDim() || seqs.size() != states.size()) {
    return absl::InvalidArgumentError("MlaRefs: bad arguments");
  }
  refs->resize(states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    ASSIGN_OR_RETURN(int32_t slot, SlotOf(states[i]));
    RETURN_IF_ERROR(EnsurePages(slot, seqs[i].pos + seqs[i].rows));
    (*refs)[i].rows = static_cast<float*>(m.mla_pool[mla_index]);
    (*refs)[i].slot = slot;
  }
  return absl::OkStatus();
}

}  // namespace kl
