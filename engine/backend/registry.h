// Backend registry: how binaries pick a backend by name without every binary
// linking every backend. "cpu" is always there; "cuda" is registered by
// //engine/backend:cuda_registration, which only GPU binaries link (kl-prefill-cuda,
// kl-decode-cuda), so CPU deployments need no CUDA libraries.
#ifndef KL_ENGINE_BACKEND_REGISTRY_H_
#define KL_ENGINE_BACKEND_REGISTRY_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/backend/cpu_backend.h"
#include "engine/config/model_config.h"

namespace kl {

// What a worker asks of its backend (each backend maps it to its own options).
struct BackendSpec {
  std::string name = "cpu";
  CpuBackendOptions cpu;
  int device = 0;          // accelerator index
  int64_t max_seqs = 64;   // sequences resident at once (decode slots)
  bool fast = false;       // bf16 weights / latents and tensor-core kernels
  bool kda_streamed = true;  // fast: KDA prefill kernels may run concurrently (CudaBackendOptions)
  // Decode-shaped forwards from CUDA graphs. Off for prefill workers: their
  // layer-done callbacks copy or ship each layer, which a graph cannot do.
  bool graphs = true;
  // MLA latent rows (tokens) the device pool holds for all sequences together,
  // per MLA layer; 0 = the backend's default (CUDA: 4,096 per sequence slot).
  int64_t latent_rows = 0;
};

using BackendFactory = std::function<absl::StatusOr<std::unique_ptr<Backend>>(
    const ModelConfig& config, const BackendSpec& spec)>;

// Registers `factory` under `name` (a static initializer calls it); returns true.
bool RegisterBackend(const std::string& name, BackendFactory factory);

// The backend `spec.name` for `config`; NOT_FOUND (naming the linked ones) when
// this binary does not contain it.
absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const ModelConfig& config,
                                                     const BackendSpec& spec);

std::vector<std::string> RegisteredBackends();

}  // namespace kl

#endif  // KL_ENGINE_BACKEND_REGISTRY_H_
