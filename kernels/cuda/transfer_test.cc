// Transfer kernels vs their host definitions (GPU; skips without a device).
#include "kernels/cuda/transfer.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace kl::cuda {
namespace {

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::vector<uint8_t> RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng());
  return b;
}

TEST(Checksum64Host, DetectsFlipsSwapsAndLength) {
  std::vector<uint8_t> a = RandomBytes(4096, 1);
  const uint64_t base = Checksum64Host(a.data(), a.size());
  for (size_t bit : {0, 7, 100 * 8 + 3, 4095 * 8 + 7}) {
    std::vector<uint8_t> b = a;
    b[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    EXPECT_NE(Checksum64Host(b.data(), b.size()), base) << bit;
  }
  std::vector<uint8_t> swapped = a;  // two 8-byte words exchanged
  std::swap_ranges(swapped.begin(), swapped.begin() + 8, swapped.begin() + 64);
  EXPECT_NE(Checksum64Host(swapped.data(), swapped.size()), base);
  std::vector<uint8_t> zeros(64, 0);  // zero padding does not alias a shorter buffer
  EXPECT_NE(Checksum64Host(zeros.data(), 60), Checksum64Host(zeros.data(), 64));
  // Spans of one message number their words on: two equal-size spans exchanged
  // (as KDA parts of one message could be) change the message's sum.
  const uint8_t* x = a.data();
  const uint8_t* y = a.data() + 1024;
  const uint64_t in_order = Checksum64Host(x, 1024, 0) + Checksum64Host(y, 1024, 128);
  const uint64_t exchanged = Checksum64Host(y, 1024, 0) + Checksum64Host(x, 1024, 128);
  EXPECT_NE(in_order, exchanged);
  EXPECT_EQ(in_order, Checksum64Host(x, 2048, 0));  // = one span over both, 8-byte aligned
}

TEST(TransferKernels, ChecksumMatchesHost) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  for (size_t n : {size_t{0}, size_t{4}, size_t{12}, size_t{4096}, size_t{3} << 20, (size_t{64} << 20) + 4}) {
    std::vector<uint8_t> h = RandomBytes(n, static_cast<uint32_t>(n));
    void* d = nullptr;
    uint64_t* out = nullptr;
    ASSERT_EQ(cudaMalloc(&d, n + 16), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&out, 8), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d, h.data(), n, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_TRUE(Checksum64(d, static_cast<int64_t>(n), out, nullptr).ok());
    uint64_t got = 0;
    ASSERT_EQ(cudaMemcpy(&got, out, 8, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(got, Checksum64Host(h.data(), static_cast<int64_t>(n))) << n;
    cudaFree(d);
    cudaFree(out);
  }
  EXPECT_FALSE(Checksum64(nullptr, 6, nullptr, nullptr).ok());
}

// The fault injector's bit flip: flips exactly the bit asked for, twice
// restores the byte, and refuses a bad bit.
TEST(TransferKernels, FlipBitFlipsOneBitAndTwiceRestores) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  std::vector<uint8_t> h = RandomBytes(64, 5);
  void* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, h.size()), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d, h.data(), h.size(), cudaMemcpyHostToDevice), cudaSuccess);
  char* byte = static_cast<char*>(d) + 37;
  ASSERT_TRUE(FlipBit(byte, 3, nullptr).ok());
  std::vector<uint8_t> got(h.size());
  ASSERT_EQ(cudaMemcpy(got.data(), d, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (size_t i = 0; i < h.size(); ++i) {
    EXPECT_EQ(got[i], i == 37 ? static_cast<uint8_t>(h[i] ^ 0x08) : h[i]) << i;
  }
  ASSERT_TRUE(FlipBit(byte, 3, nullptr).ok());
  ASSERT_EQ(cudaMemcpy(got.data(), d, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(got, h);
  EXPECT_FALSE(FlipBit(byte, 8, nullptr).ok());
  EXPECT_FALSE(FlipBit(nullptr, 0, nullptr).ok());
  cudaFree(d);
}

TEST(TransferKernels, BatchedChecksumsMatchHostPerSpanAndShared) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  // More spans than one launch takes, of mixed sizes (empty, tiny, odd word
  // counts, multi-block), some sharing an output (their sum).
  const int n = kChecksumBatch + 13;
  std::vector<std::vector<uint8_t>> host(n);
  std::vector<void*> dev(n, nullptr);
  uint64_t* outs = nullptr;
  ASSERT_EQ(cudaMalloc(&outs, n * 8), cudaSuccess);
  ASSERT_EQ(cudaMemset(outs, 0, n * 8), cudaSuccess);
  std::vector<ChecksumSpan> spans(n);
  std::vector<uint64_t> want(n, 0);
  for (int i = 0; i < n; ++i) {
    const size_t bytes = i % 7 == 0 ? 0 : (i % 5 == 0 ? (size_t{1} << 20) + 12 : 4 * (i * 37 % 500 + 1));
    host[i] = RandomBytes(bytes, 100 + i);
    ASSERT_EQ(cudaMalloc(&dev[i], bytes + 16), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(dev[i], host[i].data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    const int slot = i % 3 == 2 ? i - 1 : i;  // every third span adds into its neighbour's
    const int64_t first_word = i % 4 == 1 ? 1000 + i : 0;
    spans[i] = ChecksumSpan{dev[i], static_cast<int64_t>(bytes), outs + slot, first_word};
    want[slot] += Checksum64Host(host[i].data(), static_cast<int64_t>(bytes), first_word);
  }
  ASSERT_TRUE(Checksum64Batch(spans.data(), n, nullptr).ok());
  std::vector<uint64_t> got(n);
  ASSERT_EQ(cudaMemcpy(got.data(), outs, n * 8, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int i = 0; i < n; ++i) EXPECT_EQ(got[i], want[i]) << i;
  ChecksumSpan bad{dev[1], 6, outs};
  EXPECT_FALSE(Checksum64Batch(&bad, 1, nullptr).ok());
  for (void* p : dev) cudaFree(p);
  cudaFree(outs);
}

TEST(TransferKernels, PackUnpackRoundTripThroughScatteredPages) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  const int64_t page_rows = 4, row_bytes = 1152, pages_total = 16;
  const std::vector<int32_t> pages = {9, 2, 15, 0, 7};  // a sequence's pages, in row order
  const int64_t rows = 18;                              // last page partly used
  std::vector<uint8_t> pool_h = RandomBytes(pages_total * page_rows * row_bytes, 5);
  void *pool = nullptr, *flat = nullptr, *pool2 = nullptr;
  int32_t* d_pages = nullptr;
  ASSERT_EQ(cudaMalloc(&pool, pool_h.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&pool2, pool_h.size()), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&flat, rows * row_bytes), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&d_pages, pages.size() * 4), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(pool, pool_h.data(), pool_h.size(), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(pool2, 0, pool_h.size()), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_pages, pages.data(), pages.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  PagedRows src{pool, d_pages, page_rows, row_bytes};
  // Two ranges, as a chunked prefill ships them.
  ASSERT_TRUE(PackRows(src, 0, 7, flat, nullptr).ok());
  ASSERT_TRUE(PackRows(src, 7, rows, static_cast<char*>(flat) + 7 * row_bytes, nullptr).ok());
  std::vector<uint8_t> flat_h(rows * row_bytes);
  ASSERT_EQ(cudaMemcpy(flat_h.data(), flat, flat_h.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* want = pool_h.data() + (pages[r / page_rows] * page_rows + r % page_rows) * row_bytes;
    ASSERT_EQ(std::memcmp(flat_h.data() + r * row_bytes, want, row_bytes), 0) << r;
  }
  PagedRows dst{pool2, d_pages, page_rows, row_bytes};
  ASSERT_TRUE(UnpackRows(flat, 0, rows, dst, nullptr).ok());
  std::vector<uint8_t> pool2_h(pool_h.size());
  ASSERT_EQ(cudaMemcpy(pool2_h.data(), pool2, pool2_h.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = (pages[r / page_rows] * page_rows + r % page_rows) * row_bytes;
    ASSERT_EQ(std::memcmp(pool2_h.data() + off, pool_h.data() + off, row_bytes), 0) << r;
  }
  EXPECT_EQ(pool2_h[(1 * page_rows) * row_bytes], 0);  // a page not listed stays untouched
  EXPECT_FALSE(PackRows(PagedRows{pool, d_pages, page_rows, 1000}, 0, 1, flat, nullptr).ok());
  cudaFree(pool);
  cudaFree(pool2);
  cudaFree(flat);
  cudaFree(d_pages);
}

// Pack and scatter that also sum what they move: the sum equals Checksum64 of
// the packed bytes (sender) and of the received bytes (receiver), added into
// the output like Checksum64Batch (zeroed by the caller); a flipped byte in
// the flat buffer changes the receiver's sum; an empty range adds nothing
// but its zero length term; a large range spans many blocks.
TEST(TransferKernels, PackAndUnpackSumWhatTheyMove) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  for (const int64_t rows : {int64_t{0}, int64_t{1}, int64_t{37}, int64_t{5000}}) {
    const int64_t page_rows = 16, row_bytes = 1152;
    const int64_t npages = std::max<int64_t>(1, (rows + page_rows - 1) / page_rows);
    std::vector<int32_t> pages(npages);
    for (int64_t i = 0; i < npages; ++i) pages[i] = static_cast<int32_t>((i * 7 + 3) % npages);
    std::vector<uint8_t> pool_h = RandomBytes(npages * page_rows * row_bytes, 11 + rows);
    void *pool = nullptr, *flat = nullptr, *pool2 = nullptr;
    int32_t* d_pages = nullptr;
    uint64_t* d_sum = nullptr;
    ASSERT_EQ(cudaMalloc(&pool, pool_h.size()), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&pool2, pool_h.size()), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&flat, std::max<int64_t>(1, rows) * row_bytes), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_pages, pages.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_sum, 3 * sizeof(uint64_t)), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(pool, pool_h.data(), pool_h.size(), cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_pages, pages.data(), pages.size() * 4, cudaMemcpyHostToDevice),
              cudaSuccess);
    ASSERT_EQ(cudaMemset(d_sum, 0, 3 * sizeof(uint64_t)), cudaSuccess);
    const PagedRows src{pool, d_pages, page_rows, row_bytes}, dst{pool2, d_pages, page_rows, row_bytes};
    ASSERT_TRUE(PackRows(src, 0, rows, flat, nullptr, d_sum).ok());
    std::vector<uint8_t> flat_h(rows * row_bytes);
    ASSERT_EQ(cudaMemcpy(flat_h.data(), flat, flat_h.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* want =
          pool_h.data() + (pages[r / page_rows] * page_rows + r % page_rows) * row_bytes;
      ASSERT_EQ(std::memcmp(flat_h.data() + r * row_bytes, want, row_bytes), 0) << rows << " " << r;
    }
    ASSERT_TRUE(UnpackRows(flat, 0, rows, dst, nullptr, d_sum + 1).ok());
    std::vector<uint8_t> pool2_h(pool_h.size());
    ASSERT_EQ(cudaMemcpy(pool2_h.data(), pool2, pool2_h.size(), cudaMemcpyDeviceToHost),
              cudaSuccess);
    for (int64_t r = 0; r < rows; ++r) {  // the summing scatter wrote every row
      const int64_t off = (pages[r / page_rows] * page_rows + r % page_rows) * row_bytes;
      ASSERT_EQ(std::memcmp(pool2_h.data() + off, pool_h.data() + off, row_bytes), 0) << r;
    }
    if (rows > 0) {  // one flipped byte on the "wire"
      ASSERT_EQ(cudaMemset(static_cast<char*>(flat) + (rows * row_bytes) / 2, 0x5a, 1), cudaSuccess);
      ASSERT_TRUE(UnpackRows(flat, 0, rows, dst, nullptr, d_sum + 2).ok());
    }
    uint64_t got[3] = {};
    ASSERT_EQ(cudaMemcpy(got, d_sum, sizeof(got), cudaMemcpyDeviceToHost), cudaSuccess);
    const uint64_t want = Checksum64Host(flat_h.data(), static_cast<int64_t>(flat_h.size()));
    EXPECT_EQ(got[0], want) << rows;
    EXPECT_EQ(got[1], want) << rows;
    if (rows > 0 && flat_h[(rows * row_bytes) / 2] != 0x5a) {
      EXPECT_NE(got[2], want) << rows;
    }
    // A range that does not start at row 0 (a plan piece): positions count
    // from the message's first word, not from the sequence's first row.
    if (rows > 9) {
      ASSERT_EQ(cudaMemset(d_sum, 0, sizeof(uint64_t)), cudaSuccess);
      ASSERT_TRUE(PackRows(src, 7, rows, flat, nullptr, d_sum).ok());
      std::vector<uint8_t> part((rows - 7) * row_bytes);
      ASSERT_EQ(cudaMemcpy(part.data(), flat, part.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      EXPECT_EQ(0, std::memcmp(part.data(), flat_h.data() + 7 * row_bytes, part.size()));
      uint64_t got_part = 0;
      ASSERT_EQ(cudaMemcpy(&got_part, d_sum, sizeof(got_part), cudaMemcpyDeviceToHost),
                cudaSuccess);
      EXPECT_EQ(got_part, Checksum64Host(part.data(), static_cast<int64_t>(part.size()))) << rows;
    }
    cudaFree(pool);
    cudaFree(pool2);
    cudaFree(flat);
    cudaFree(d_pages);
    cudaFree(d_sum);
  }
}

}  // namespace
}  // namespace kl::cuda
