// Registers the "cuda" backend (linked only into GPU binaries; see registry.h).
#include <cuda_runtime.h>

#include "engine/backend/cuda_backend.h"
#include "engine/backend/registry.h"

namespace kl {
namespace {

const bool kRegistered = RegisterBackend(
    "cuda",
    [](const ModelConfig& config,
       const BackendSpec& spec) -> absl::StatusOr<std::unique_ptr<Backend>> {
      CudaBackendOptions o;
      // Device indices wrap around the visible GPUs (kl local numbers workers
      // 0, 1, 2, ... and shares GPUs when there are fewer).
      int count = 0;
      if (cudaGetDeviceCount(&count) == cudaSuccess && count > 0 && spec.device >= 0) {
        o.device = spec.device % count;
      } else {
        o.device = spec.device;
      }
      o.max_seqs = spec.max_seqs;
      o.bf16_weights = spec.fast;
      o.latent_dtype = spec.fast ? DType::kBF16 : DType::kF32;
      o.kda_tensor_cores = spec.fast;
      o.kda_streamed_prefill = spec.kda_streamed;
      o.mla_tensor_cores = spec.fast;
      o.cuda_graphs = spec.graphs;
      if (spec.latent_rows > 0) o.latent_pages = (spec.latent_rows + o.page_rows - 1) / o.page_rows;
      absl::StatusOr<std::unique_ptr<CudaBackend>> be = CudaBackend::Create(config, o);
      if (!be.ok()) return be.status();
      return std::unique_ptr<Backend>(std::move(*be));
    });

}  // namespace
}  // namespace kl
