#include "kernels/common/crc32c.h"

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kl {
namespace {

// Bit-at-a-time reference, independent of both implementations under test.
uint32_t ReferenceCrc32c(const uint8_t* p, size_t n) {
  uint32_t r = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    r ^= p[i];
    for (int b = 0; b < 8; ++b) r = (r & 1u) ? (r >> 1) ^ 0x82F63B78u : r >> 1;
  }
  return ~r;
}

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

TEST(Crc32c, StandardCheckValue) {
  const char* s = "123456789";
  EXPECT_EQ(Crc32c(s, 9), 0xE3069283u);
  EXPECT_EQ(Crc32cPortable(s, 9), 0xE3069283u);
  EXPECT_EQ(Crc32c(s, 0), 0u);
}

// RFC 3720 (iSCSI) appendix B.4 test vectors.
TEST(Crc32c, Rfc3720Vectors) {
  uint8_t buf[32];
  std::memset(buf, 0, 32);
  EXPECT_EQ(Crc32c(buf, 32), 0x8A9136AAu);
  std::memset(buf, 0xFF, 32);
  EXPECT_EQ(Crc32c(buf, 32), 0x62A8AB43u);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(Crc32c(buf, 32), 0x46DD794Eu);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<uint8_t>(31 - i);
  EXPECT_EQ(Crc32c(buf, 32), 0x113FDB5Cu);
}

TEST(Crc32c, ImplementationsAgreeWithReference) {
  // Lengths straddle the 3 x 8192 and 3 x 256 stream blocks and the 8-byte steps;
  // offsets make the data unaligned.
  const std::vector<uint8_t> data = RandomBytes(3 * 8192 * 2 + 4096 + 64, 1);
  const size_t lengths[] = {0, 1, 7, 8, 9, 255, 767, 768, 769, 3 * 8192 - 1, 3 * 8192,
                            3 * 8192 + 1, 3 * 8192 + 3 * 256 + 13, 2 * 3 * 8192 + 4000};
  for (size_t offset : {0, 1, 3, 5}) {
    for (size_t n : lengths) {
      const uint8_t* p = data.data() + offset;
      const uint32_t want = ReferenceCrc32c(p, n);
      EXPECT_EQ(Crc32c(p, n), want) << "n=" << n << " offset=" << offset;
      EXPECT_EQ(Crc32cPortable(p, n), want) << "n=" << n << " offset=" << offset;
    }
  }
}

TEST(Crc32c, RandomBuffersHardwareMatchesPortable) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t n = rng() % 200000;
    const std::vector<uint8_t> v = RandomBytes(n, trial + 100);
    ASSERT_EQ(Crc32c(v.data(), n), Crc32cPortable(v.data(), n)) << "n=" << n;
  }
}

TEST(Crc32c, StreamingExtendsAcrossSplits) {
  const std::vector<uint8_t> v = RandomBytes(100000, 3);
  const uint32_t whole = Crc32c(v.data(), v.size());
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 100; ++trial) {
    size_t a = rng() % v.size(), b = rng() % v.size();
    if (a > b) std::swap(a, b);
    uint32_t c = Crc32c(v.data(), a);
    c = Crc32c(v.data() + a, b - a, c);
    c = Crc32cPortable(v.data() + b, v.size() - b, c);
    ASSERT_EQ(c, whole) << a << " " << b;
  }
}

TEST(Crc32c, CombineMatchesWholeBuffer) {
  const std::vector<uint8_t> v = RandomBytes(70000, 5);
  std::mt19937_64 rng(13);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t split = rng() % (v.size() + 1);
    const uint32_t c1 = Crc32c(v.data(), split);
    const uint32_t c2 = Crc32c(v.data() + split, v.size() - split);
    ASSERT_EQ(Crc32cCombine(c1, c2, v.size() - split), Crc32c(v.data(), v.size())) << split;
  }
  // Empty second part is the identity; many chunks combine left to right.
  EXPECT_EQ(Crc32cCombine(0x12345678u, 0, 0), 0x12345678u);
  uint32_t acc = 0;
  for (size_t off = 0; off < v.size(); off += 4097) {
    const size_t len = std::min<size_t>(4097, v.size() - off);
    acc = Crc32cCombine(acc, Crc32c(v.data() + off, len), len);
  }
  EXPECT_EQ(acc, Crc32c(v.data(), v.size()));
}

TEST(Crc32c, CombineWithHugeLength) {
  // len2 near 2^40: only checks that the exponentiation agrees with splitting it.
  const uint64_t big = (uint64_t{1} << 40) + 12345;
  const uint32_t c1 = 0xDEADBEEFu;
  const uint32_t step = Crc32cCombine(Crc32cCombine(c1, 0, big - 1000), 0, 1000);
  EXPECT_EQ(Crc32cCombine(c1, 0, big), step);
  EXPECT_NE(Crc32cCombine(c1, 0, big), Crc32cCombine(c1, 0, big + 1));
}

TEST(Crc32c, DetectsEverySingleBitFlip) {
  std::vector<uint8_t> v = RandomBytes(4096, 9);
  const uint32_t good = Crc32c(v.data(), v.size());
  for (size_t bit = 0; bit < v.size() * 8; bit += 7) {
    v[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    ASSERT_NE(Crc32c(v.data(), v.size()), good) << bit;
    v[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
  }
}

}  // namespace
}  // namespace kl
