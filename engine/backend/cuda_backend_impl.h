// Private to the CUDA backend's sources (cuda_backend.cc: lifecycle, memory, CUDA
// graphs and state residency; cuda_backend_ops.cc: the model ops): the
// device-side state behind CudaBackend and the launch macros both files use.
#ifndef KL_ENGINE_BACKEND_CUDA_BACKEND_IMPL_H_
#define KL_ENGINE_BACKEND_CUDA_BACKEND_IMPL_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend/cuda_backend.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/mla.h"

namespace kl {
namespace cuda_backend_internal {

constexpr int64_t kAlign = 256;

inline absl::Status CublasStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(s)));
}

#define KL_CUBLAS(expr) RETURN_IF_ERROR(CublasStatus((expr), #expr))

// Device work of an op. While a captured graph is being replayed the op's host
// side runs (it stages this step's inputs into the pinned buffers the graph
// reads) but its launches are skipped: the graph holds them.
#define KL_LAUNCH(expr)                      \
  do {                                       \
    if (!Replaying()) RETURN_IF_ERROR(expr); \
  } while (0)
#define KL_CUBLAS_LAUNCH(expr)         \
  do {                                 \
    if (!Replaying()) KL_CUBLAS(expr); \
  } while (0)
#define KL_CUDA_LAUNCH(expr)                         \
  do {                                               \
    if (!Replaying()) KL_CUDA_RETURN_IF_ERROR(expr); \
  } while (0)

inline int64_t AlignUp(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace cuda_backend_internal

using cuda_backend_internal::AlignUp;
using cuda_backend_internal::CublasStatus;
using cuda_backend_internal::kAlign;

struct CudaBackend::Impl {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  void* cublas_workspace = nullptr;
  cudaDeviceProp prop{};

  // Activation arena: chunks kept across forwards, rewound at BeginForward.
  struct Chunk {
    char* base = nullptr;
    int64_t size = 0;
  };
  std::vector<Chunk> chunks;
  size_t chunk_index = 0;
  int64_t chunk_offset = 0;
  // Stack discipline: every allocation records the top before it; a freed
  // allocation rewinds the top once everything above it is freed too. Reuse
  // within a forward is safe because all work is ordered on one stream.
  struct Frame {
    size_t chunk;
    int64_t offset;
    bool freed;
  };
  std::vector<Frame> frames;
  int64_t generation = 0;  // bumps every forward (stale Buffer owners do nothing)
  bool in_forward = false;
  bool pdl_prev = false;  // the thread's PDL choice before BeginForward (kernels/cuda/pdl.h)
  std::vector<void*> loose;  // scratch made outside a forward; freed at the next sync point

  // Pinned host staging of a forward (same bump scheme; chunks are never freed
  // while the backend lives, since graphs bake their addresses).
  std::vector<Chunk> host_chunks;
  size_t host_index = 0;
  int64_t host_offset = 0;
  struct PendingCopy {
    const void* src;  // pinned
    void* dst;        // caller's host memory
    int64_t bytes;
  };
  std::vector<PendingCopy> pending;  // Download()s completed at EndForward

  // CUDA graphs of decode shapes.
  enum class Mode { kIdle, kEager, kCapture, kReplay };
  Mode mode = Mode::kIdle;
  // seqs, context bucket, logit rows, sampled on the device (0 / 1)
  using GraphKey = std::tuple<int64_t, int64_t, int64_t, int64_t>;
  struct GraphEntry {
    cudaGraphExec_t exec = nullptr;
    std::vector<int64_t> staging;  // sizes staged during capture (+ upload, - download)
    int64_t last_use = 0;
  };
  std::map<GraphKey, GraphEntry> graphs;
  std::map<GraphKey, int64_t> seen;
  GraphKey key{};
  std::vector<int64_t> staging;  // this forward's staging log
  int64_t context_hint = 0;      // MLA decode split hint of this forward (0: none)
  int64_t forwards = 0;
  CudaGraphStats stats;

  std::vector<void*> weight_allocs;
  std::map<const void*, float*> f32_copies;                   // bf16 weight → fp32 copy
  std::map<const void*, std::array<void*, 3>> expert_tables;  // MoE w1 vector → pointer arrays

  // State pools.
  std::vector<float*> kda_state;                // per KDA layer: [slots][H] pool layout
  std::vector<std::array<float*, 3>> kda_tail;  // per KDA layer: q, k, v [slots][W-1][KD]
  std::vector<void*> mla_pool;                  // per MLA layer: [pages][page_rows][lat]
  int32_t* block_table = nullptr;               // [slots][max_pages_per_seq]
  std::vector<int32_t> block_table_host;
  int64_t max_pages_per_seq = 0;
  int64_t latent_pages = 0;

  mutable std::mutex mu;  // guards the free lists and slot_pages
  std::vector<int32_t> free_slots;
  std::vector<int32_t> free_pages;
  std::vector<std::vector<int32_t>> slot_pages;

  std::unique_ptr<DeviceStateAccess> device_state;  // made on first use

  // The paged latent cache whose pool is `pool` (an MLA layer's: latent_dtype
  // rows of lora + rope) as the MLA kernels see it, through the device block
  // table `table` ([rows][max_pages_per_seq]).
  cuda::MlaPagedCache LatentCache(void* pool, DType latent_dtype, int64_t page_rows, int64_t lora,
                                  int64_t rope, const int32_t* table) const {
    return {pool, latent_dtype, latent_pages, page_rows, lora, rope, table, max_pages_per_seq};
  }
};

// A sequence's claim on a slot (and the pages recorded for it in slot_pages).
struct CudaResidency final : StateResidency {
  CudaBackend* backend = nullptr;
  int32_t slot = -1;
  ~CudaResidency() override { backend->FreeResidency(slot, {}); }
};


}  // namespace kl

#endif  // KL_ENGINE_BACKEND_CUDA_BACKEND_IMPL_H_
