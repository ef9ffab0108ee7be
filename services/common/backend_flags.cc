#include "services/common/backend_flags.h"

#include <algorithm>
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

ABSL_FLAG(int64_t, cuda_latent_rows, 0,
          "--backend=cuda: MLA latent rows (tokens) the GPU pool holds for all sequences "
          "together (per MLA layer); 0 = 4096 per sequence slot. Long contexts need more: a "
          "decode worker admits a request only while its prompt + max_tokens fit");

namespace kl {

BackendSpec BackendSpecFromFlags(int64_t max_seqs) {
  BackendSpec s;
  s.name = absl::GetFlag(FLAGS_backend);
  s.device = absl::GetFlag(FLAGS_cuda_device);
  s.fast = absl::GetFlag(FLAGS_cuda_fast);
  s.kda_streamed = absl::GetFlag(FLAGS_cuda_kda_streamed);
  s.max_seqs = max_seqs;
  s.latent_rows = std::max<int64_t>(0, absl::GetFlag(FLAGS_cuda_latent_rows));
  return s;
}

}  // namespace kl
