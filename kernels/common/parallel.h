// ParallelFor: the one CPU thread pool of the process. Kernels split row ranges
// over it; OpenBLAS keeps its own threads for GEMMs (the two never run at once:
// a GEMM call returns before the next ParallelFor starts).
#ifndef KL_KERNELS_COMMON_PARALLEL_H_
#define KL_KERNELS_COMMON_PARALLEL_H_

#include <cstdint>
#include <functional>

namespace kl {

// Sets the number of threads (including the caller) used by ParallelFor.
// 0 = hardware concurrency. Call before the first ParallelFor; later calls
// resize the pool (not thread-safe against a running ParallelFor).
void SetNumThreads(int n);
int NumThreads();

// Runs fn(begin, end) over [0, n) split into contiguous blocks of at least
// `min_block` items, on the pool; returns when all blocks are done. Nested
// calls (from inside fn) run serially on the calling thread. fn must not throw.
void ParallelFor(int64_t n, int64_t min_block,
                 const std::function<void(int64_t begin, int64_t end)>& fn);

}  // namespace kl

#endif  // KL_KERNELS_COMMON_PARALLEL_H_
