// CUDA runtime errors as absl::Status (kernels never exit or abort on a CUDA
// error: the launcher returns the status and the caller decides).
#ifndef KL_KERNELS_CUDA_CUDA_STATUS_H_
#define KL_KERNELS_CUDA_CUDA_STATUS_H_

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kl::cuda {

// OkStatus for cudaSuccess, else Internal("<what>: <cuda error name>: <message>").
inline absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), ": ", cudaGetErrorString(err)));
}

}  // namespace kl::cuda

// Evaluates a cudaError_t expression; returns a non-OK status from the caller on error.
#define KL_CUDA_RETURN_IF_ERROR(expr)                                              \
  do {                                                                             \
    const cudaError_t kl_cuda_err_ = (expr);                                       \
    if (kl_cuda_err_ != cudaSuccess) return ::kl::cuda::CudaStatus(kl_cuda_err_, #expr); \
  } while (0)

#endif  // KL_KERNELS_CUDA_CUDA_STATUS_H_
