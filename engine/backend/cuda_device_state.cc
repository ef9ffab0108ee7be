// CudaBackend's DeviceStateAccess (device_state.h): the slot and page geometry
// a device transport reads and writes.
#include <cuda_runtime.h>

#include <mutex>

#include "absl/strings/str_cat.h"
#include "engine/backend/cuda_backend.h"
#include "engine/backend/cuda_backend_impl.h"
#include "kernels/cuda/kda_state_layout.h"

namespace kl {

class CudaDeviceState final : public DeviceStateAccess {
 public:
  explicit CudaDeviceState(CudaBackend* be) : be_(be) {}

  int device() const override { return be_->options_.device; }

  std::string layout_tag() const override {
    const ModelConfig& c = be_->config_;
    return absl::StrCat("kda=f32,kda_slice=", cuda::KdaStateSliceWidth(c.kda_head_dim),
                        ",tail=f32,hkv=", c.KdaStateElems(), ",tail_elems=",
                        c.ConvTailElems(), ",latent=", std::string(DTypeName(be_->options_.latent_dtype)),
                        ",lat=", c.MlaLatentDim(), ",page_rows=", be_->options_.page_rows);
  }
  int64_t page_rows() const override { return be_->options_.page_rows; }
  int64_t latent_row_bytes() const override {
    return be_->config_.MlaLatentDim() * DTypeSize(be_->options_.latent_dtype);
  }

  absl::Status KdaSpans(const SequenceState& s, int64_t kda_index,
                        std::vector<DeviceSpan>* spans) override {
    ASSIGN_OR_RETURN(int32_t slot, be_->SlotOf(&s));
    const CudaBackend::Impl& m = *be_->impl_;
    if (kda_index < 0 || kda_index >= static_cast<int64_t>(m.kda_state.size())) {
      return absl::InvalidArgumentError("KdaSpans: layer out of range");
    }
    const int64_t hkv = be_->config_.KdaStateElems(), tail = be_->config_.ConvTailElems();
    spans->clear();
    spans->push_back({m.kda_state[kda_index] + slot * hkv, hkv * int64_t{sizeof(float)}});
    if (tail > 0) {
      for (int j = 0; j < 3; ++j) {
        spans->push_back({m.kda_tail[kda_index][j] + slot * tail, tail * int64_t{sizeof(float)}});
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<void*> LatentPool(int64_t mla_index) override {
    const CudaBackend::Impl& m = *be_->impl_;
    if (mla_index < 0 || mla_index >= static_cast<int64_t>(m.mla_pool.size())) {
      return absl::InvalidArgumentError("LatentPool: layer out of range");
    }
    return m.mla_pool[mla_index];
  }

  absl::StatusOr<std::vector<int32_t>> SlotPages(const SequenceState& s) override {
    ASSIGN_OR_RETURN(int32_t slot, be_->SlotOf(&s));
    CudaBackend::Impl& m = *be_->impl_;
    std::lock_guard<std::mutex> l(m.mu);
    return m.slot_pages[slot];
  }

  absl::Status AllocateState(SequenceState* s, int64_t num_tokens) override {
    if (s->device != nullptr) return absl::FailedPreconditionError("state is already bound");
    if (num_tokens < 0) return absl::InvalidArgumentError("negative token count");
    ASSIGN_OR_RETURN(std::shared_ptr<CudaResidency> res, be_->TakeSlot());
    if (be_->config_.NumMlaLayers() > 0 && num_tokens > 0) {
      RETURN_IF_ERROR(be_->EnsurePages(res->slot, num_tokens));  // pages go back with `res`
    }
    s->kda.clear();
    s->mla.clear();
    s->num_tokens = num_tokens;
    s->device = std::move(res);
    return absl::OkStatus();
  }

  absl::Status RecordCompute(void* event) override {
    CudaBackend::Impl& m = *be_->impl_;
    if (m.mode == CudaBackend::Impl::Mode::kCapture || m.mode == CudaBackend::Impl::Mode::kReplay) {
      return absl::FailedPreconditionError("RecordCompute inside a CUDA graph");
    }
    KL_CUDA_RETURN_IF_ERROR(cudaEventRecord(static_cast<cudaEvent_t>(event), m.stream));
    return absl::OkStatus();
  }

 private:
  CudaBackend* const be_;
};

DeviceStateAccess* CudaBackend::device_state() {
  std::lock_guard<std::mutex> l(impl_->mu);
  if (impl_->device_state == nullptr) impl_->device_state = std::make_unique<CudaDeviceState>(this);
  return impl_->device_state.get();
}

}  // namespace kl
