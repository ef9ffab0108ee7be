// Throughput of Crc32c (hardware three-stream path) and the portable fallback,
// in-cache (64 KiB) and out of cache (64 MiB). Run:
//   bazel run -c opt //kernels/common:crc32c_bench
#include <chrono>
#include <cstdio>
#include <vector>

#include "kernels/common/crc32c.h"

namespace {

template <typename Fn>
double GbPerSecond(const std::vector<uint8_t>& buf, Fn fn) {
  volatile uint32_t sink = 0;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const size_t target_bytes = size_t{1} << 30;
    const size_t iters = target_bytes / buf.size() + 1;
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < iters; ++i) sink = sink + fn(buf.data(), buf.size());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double gbps = iters * buf.size() / s / 1e9;
    if (gbps > best) best = gbps;
  }
  return best;
}

}  // namespace

int main() {
  std::printf("crc32c: hardware path %s\n", kl::Crc32cHardwareAvailable() ? "yes" : "no");
  for (size_t size : {size_t{4096}, size_t{64} << 10, size_t{64} << 20}) {
    std::vector<uint8_t> buf(size);
    for (size_t i = 0; i < size; ++i) buf[i] = static_cast<uint8_t>(i * 131 + 7);
    const double hw = GbPerSecond(buf, [](const uint8_t* p, size_t n) { return kl::Crc32c(p, n); });
    const double sw =
        GbPerSecond(buf, [](const uint8_t* p, size_t n) { return kl::Crc32cPortable(p, n); });
    std::printf("size %9zu B: Crc32c %6.2f GB/s   portable %5.2f GB/s\n", size, hw, sw);
  }
  return 0;
}
