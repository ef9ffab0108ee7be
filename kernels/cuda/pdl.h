// When the CUDA kernels launch with programmatic dependent launch (pdl.cuh), as seen
// from host code (no device code here, so plain C++ callers such as the CUDA backend
// can include it).
//
// KL_CUDA_PDL in the environment, read once per process:
//   "0"            never (every launch fully serialised, as with <<<>>>);
//   "1"            every LaunchPdl launch;
//   unset / other  ("auto") only while the calling thread's flag (PdlThreadWants, set
//                  by a PdlScope or directly) is true.
// The CUDA backend sets the flag from BeginForward to EndForward of decode steps of at
// most 8 sequences, where a step is hundreds of latency-bound kernels and the overlap of
// their boundaries pays; at larger batches one of three jobs measured it 2-3% slower
// (docs/benchmarks.md, session 8), so there it stays off.
#ifndef KL_KERNELS_CUDA_PDL_H_
#define KL_KERNELS_CUDA_PDL_H_

#include <cstdlib>
#include <cstring>

namespace kl::cuda {

enum class PdlMode { kOff, kOn, kAuto };

inline PdlMode PdlEnvMode() {
  static const PdlMode mode = [] {
    const char* e = std::getenv("KL_CUDA_PDL");
    if (e != nullptr && std::strcmp(e, "0") == 0) return PdlMode::kOff;
    if (e != nullptr && std::strcmp(e, "1") == 0) return PdlMode::kOn;
    return PdlMode::kAuto;
  }();
  return mode;
}

inline bool& PdlThreadWants() {
  thread_local bool wants = false;
  return wants;
}

// Whether a LaunchPdl call on this thread sets the attribute now.
inline bool PdlEnabled() {
  const PdlMode m = PdlEnvMode();
  return m == PdlMode::kOn || (m == PdlMode::kAuto && PdlThreadWants());
}

// Asks for PDL (in "auto" mode) on this thread for the scope's lifetime. CUDA graphs
// keep what was chosen when they were captured.
class PdlScope {
 public:
  explicit PdlScope(bool want) : prev_(PdlThreadWants()) { PdlThreadWants() = want; }
  ~PdlScope() { PdlThreadWants() = prev_; }
  PdlScope(const PdlScope&) = delete;
  PdlScope& operator=(const PdlScope&) = delete;

 private:
  bool prev_;
};

}  // namespace kl::cuda

#endif  // KL_KERNELS_CUDA_PDL_H_
