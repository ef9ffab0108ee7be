// Programmatic dependent launch (pdl.h / pdl.cuh): the scope logic on the host, and on
// the GPU that a consumer launched early still sees its producer's write (eager and in
// a CUDA graph), that it really does start early when PDL is on, and never when off.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/pdl.h"
#include "kernels/cuda/pdl_test_kernels.h"

namespace kl::cuda {
namespace {

bool HasCudaDevice() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

TEST(Pdl, ScopeDecidesInAutoMode) {
  if (PdlEnvMode() != PdlMode::kAuto) GTEST_SKIP() << "KL_CUDA_PDL is set";
  EXPECT_FALSE(PdlEnabled());
  {
    PdlScope on(true);
    EXPECT_TRUE(PdlEnabled());
    {
      PdlScope off(false);
      EXPECT_FALSE(PdlEnabled());
    }
    EXPECT_TRUE(PdlEnabled());
  }
  EXPECT_FALSE(PdlEnabled());
}

struct Buffers {
  int32_t *value = nullptr, *seen = nullptr;
  uint64_t *t_end = nullptr, *t_start = nullptr;
  int rounds;
  explicit Buffers(int r) : rounds(r) {
    EXPECT_EQ(cudaMalloc(&value, 4), cudaSuccess);
    EXPECT_EQ(cudaMalloc(&seen, r * 32 * 4), cudaSuccess);
    EXPECT_EQ(cudaMalloc(&t_end, r * 8), cudaSuccess);
    EXPECT_EQ(cudaMalloc(&t_start, r * 32 * 8), cudaSuccess);
  }
  ~Buffers() {
    cudaFree(value);
    cudaFree(seen);
    cudaFree(t_end);
    cudaFree(t_start);
  }
  void Reset(cudaStream_t s) {
    cudaMemsetAsync(value, 0, 4, s);
    cudaMemsetAsync(seen, 0xff, rounds * 32 * 4, s);
  }
  // Checks every consumer saw its producer's value; returns the rounds in which some
  // consumer CTA started before the producer ended.
  int CheckAndCountEarly() {
    std::vector<int32_t> seen_h(rounds * 32);
    std::vector<uint64_t> end_h(rounds), start_h(rounds * 32);
    EXPECT_EQ(cudaMemcpy(seen_h.data(), seen, seen_h.size() * 4, cudaMemcpyDeviceToHost),
              cudaSuccess);
    EXPECT_EQ(cudaMemcpy(end_h.data(), t_end, end_h.size() * 8, cudaMemcpyDeviceToHost),
              cudaSuccess);
    EXPECT_EQ(cudaMemcpy(start_h.data(), t_start, start_h.size() * 8, cudaMemcpyDeviceToHost),
              cudaSuccess);
    int early = 0;
    for (int i = 0; i < rounds; ++i) {
      for (int c = 0; c < 32; ++c) {
        EXPECT_EQ(seen_h[i * 32 + c], i + 1) << "round " << i << " consumer CTA " << c;
      }
      const auto from = start_h.begin() + i * 32;
      const uint64_t first = *std::min_element(from, from + 32);
      early += first < end_h[i] ? 1 : 0;
    }
    return early;
  }
};

constexpr int kRounds = 16;
constexpr int64_t kSpinNs = 50000;

TEST(Pdl, ConsumerSeesProducerEagerAndStartsEarly) {
  if (!HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  if (PdlEnvMode() == PdlMode::kOff) GTEST_SKIP() << "KL_CUDA_PDL=0";
  cudaStream_t s;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  Buffers b(kRounds);
  b.Reset(s);
  {
    PdlScope on(true);
    ASSERT_EQ(testing::LaunchPdlPairs(kRounds, kSpinNs, b.value, b.seen, b.t_end, b.t_start, s),
              cudaSuccess);
  }
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  // Each consumer is launched while its 50-us producer spins: it must start early.
  EXPECT_GE(b.CheckAndCountEarly(), kRounds / 2);
  cudaStreamDestroy(s);
}

TEST(Pdl, ConsumerSeesProducerInGraphReplays) {
  if (!HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  if (PdlEnvMode() == PdlMode::kOff) GTEST_SKIP() << "KL_CUDA_PDL=0";
  cudaStream_t s;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  Buffers b(kRounds);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  {
    PdlScope on(true);
    ASSERT_EQ(testing::LaunchPdlPairs(kRounds, kSpinNs, b.value, b.seen, b.t_end, b.t_start, s),
              cudaSuccess);
  }
  ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int replay = 0; replay < 2; ++replay) {
    b.Reset(s);
    ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    EXPECT_GE(b.CheckAndCountEarly(), kRounds / 2) << "replay " << replay;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
}

TEST(Pdl, OffMeansFullySerialised) {
  if (!HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  if (PdlEnvMode() == PdlMode::kOn) GTEST_SKIP() << "KL_CUDA_PDL=1";
  cudaStream_t s;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  Buffers b(kRounds);
  b.Reset(s);
  ASSERT_FALSE(PdlEnabled());
  ASSERT_EQ(testing::LaunchPdlPairs(kRounds, kSpinNs, b.value, b.seen, b.t_end, b.t_start, s),
            cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  EXPECT_EQ(b.CheckAndCountEarly(), 0);
  cudaStreamDestroy(s);
}

}  // namespace
}  // namespace kl::cuda
