// --backend / --cuda_device / --cuda_fast / --cuda_kda_streamed, shared by kl-prefill
// and kl-decode.
// "cuda" exists only in the GPU builds of the workers (kl-prefill-cuda,
// kl-decode-cuda); the plain binaries answer it with a clear error.
#ifndef KL_SERVICES_COMMON_BACKEND_FLAGS_H_
#define KL_SERVICES_COMMON_BACKEND_FLAGS_H_

#include <cstdint>

#include "engine/backend/registry.h"

namespace kl {

// The spec the flags ask for; `max_seqs` is the worker's concurrent sequences.
BackendSpec BackendSpecFromFlags(int64_t max_seqs);

}  // namespace kl

#endif  // KL_SERVICES_COMMON_BACKEND_FLAGS_H_
