// Programmatic dependent launch (PDL, sm_90+) for the kernels of a decode step.
//
// A kernel launched with LaunchPdl may be scheduled before the kernel ahead of it on
// the stream has finished: its CTAs become resident once every CTA of that kernel has
// called PdlLaunchDependents (or exited), and run until PdlWait, which returns when
// that kernel has completed and its writes are visible. What runs before PdlWait must
// not read anything an earlier kernel writes, nor write anything at all; prefetching
// immutable weights into L2 is what it is for. The rule for a kernel of ours:
//   kernel start:  [PrefetchL2 of weights]  PdlWait();  PdlLaunchDependents();  ...
// so at most the next kernel is resident early, and the dependency is transitive
// (a kernel completes only after its own PdlWait returned).
//
// Every kernel launched through LaunchPdl must call PdlWait before its first global
// memory access that depends on the stream; kernels launched any other way (<<<>>>,
// cuBLAS) get the ordinary full dependency, and PdlWait in them returns at once.
// Captured into CUDA graphs as programmatic edges. Whether LaunchPdl sets the attribute
// at all is PdlEnabled() (pdl.h: KL_CUDA_PDL and the calling thread's PdlScope); without
// it every launch is fully serialised, as with <<<>>>.
#ifndef KL_KERNELS_CUDA_PDL_CUH_
#define KL_KERNELS_CUDA_PDL_CUH_

#include <cuda_runtime.h>

#include <utility>

#include "kernels/cuda/pdl.h"

// LaunchPdl sets the attribute whatever the device code was compiled for: a kernel
// built for an arch without griddepcontrol would run unguarded, so none may be.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "pdl.cuh: device code must target sm_90 or newer (griddepcontrol)"
#endif

namespace kl::cuda {

__device__ __forceinline__ void PdlWait() {
#ifdef __CUDA_ARCH__
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void PdlLaunchDependents() {
#ifdef __CUDA_ARCH__
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// The usual kernel prologue after any prefetch: wait for the producer, then let the
// next kernel start launching.
__device__ __forceinline__ void PdlBegin() {
  PdlWait();
  PdlLaunchDependents();
}

// Hints the 128-byte line holding p into L2 (weights only, see above).
__device__ __forceinline__ void PrefetchL2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream
// serialisation allowed (when PdlEnabled()). Returns the launch error.
template <class... KArgs, class... Args>
cudaError_t LaunchPdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = PdlEnabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_PDL_CUH_
