#include "services/common/backend_flags.h"

#include <string>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, backend, "cpu",
          "compute backend: cpu, or cuda (GPU builds kl-prefill-cuda / kl-decode-cuda only)");
ABSL_FLAG(int, cuda_device, 0, "GPU index for --backend=cuda (modulo the visible GPUs)");
ABSL_FLAG(bool, cuda_fast, true,
          "--backend=cuda: bf16 weights and latent cache, tensor-core KDA prefill (false: "
          "fp32 everywhere, bit-for-bit closer to the CPU engine)");
ABSL_FLAG(bool, cuda_kda_streamed, true,
          "--backend=cuda, --cuda_fast: run the two KDA prefill kernels of a long single "
          "sequence at the same time (faster; needs at least half of the GPU's SMs for this "
          "process: set false under MPS with an active-thread limit)");

namespace kl {

BackendSpec BackendSpecFromFlags(int64_t max_seqs) {
  BackendSpec s;
  s.name = absl::GetFlag(FLAGS_backend);
  s.device = absl::GetFlag(FLAGS_cuda_device);
  s.fast = absl::GetFlag(FLAGS_cuda_fast);
  s.kda_streamed = absl::GetFlag(FLAGS_cuda_kda_streamed);
  s.max_seqs = max_seqs;
  return s;
}

}  // namespace kl
