// CRC-32C: SSE4.2 three-stream kernel, portable slicing-by-8 fallback, and the
// GF(2) arithmetic behind Crc32cCombine and the stream merging.
//
// Representation: a CRC "register" is a polynomial over GF(2) of degree < 32 in
// reflected bit order (bit 31 = coefficient of x^0, bit 0 = x^31), as the `crc32`
// instruction keeps it. Feeding n zero bytes to a register r yields
// r * x^(8n) mod P. Hence, for registers (no pre/post inversion) and for final
// CRCs alike: crc(a‖b) = crc(a) * x^(8|b|) mod P  xor  crc(b)  (the inversions
// cancel), which is both Crc32cCombine and how the three streams are merged.
#include "kernels/common/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace kl {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

// a * b mod P (reflected representation).
constexpr uint32_t MulModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (int i = 0; i < 32; ++i) {
    if (a & 0x80000000u) product ^= b;
    a <<= 1;
    b = (b & 1u) ? (b >> 1) ^ kPoly : b >> 1;  // b *= x
  }
  return product;
}

// kXPow2[k] = x^(2^k) mod P, k in [0, 67): enough for x^(8n) with any 64-bit n.
constexpr int kNumPowers = 67;
constexpr std::array<uint32_t, kNumPowers> MakeXPow2() {
  std::array<uint32_t, kNumPowers> t{};
  t[0] = 0x40000000u;  // x^1
  for (int k = 1; k < kNumPowers; ++k) t[k] = MulModP(t[k - 1], t[k - 1]);
  return t;
}
constexpr std::array<uint32_t, kNumPowers> kXPow2 = MakeXPow2();

// x^(8n) mod P: the operator "append n zero bytes".
constexpr uint32_t XPow8N(uint64_t n) {
  uint32_t result = 0x80000000u;  // x^0
  for (int bit = 0; n != 0; ++bit, n >>= 1) {
    if (n & 1u) result = MulModP(result, kXPow2[bit + 3]);
  }
  return result;
}

// --- portable slicing-by-8
using SliceTables = std::array<std::array<uint32_t, 256>, 8>;
constexpr SliceTables MakeSliceTables() {
  SliceTables t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t r = b;
    for (int i = 0; i < 8; ++i) r = (r & 1u) ? (r >> 1) ^ kPoly : r >> 1;
    t[0][b] = r;
  }
  for (int k = 1; k < 8; ++k) {
    for (uint32_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xff];
  }
  return t;
}
constexpr SliceTables kSlice = MakeSliceTables();

uint32_t PortableRegister(uint32_t reg, const uint8_t* p, size_t n) {
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);  // little-endian host (x86-64, aarch64)
    w ^= reg;
    reg = kSlice[7][w & 0xff] ^ kSlice[6][(w >> 8) & 0xff] ^ kSlice[5][(w >> 16) & 0xff] ^
          kSlice[4][(w >> 24) & 0xff] ^ kSlice[3][(w >> 32) & 0xff] ^
          kSlice[2][(w >> 40) & 0xff] ^ kSlice[1][(w >> 48) & 0xff] ^ kSlice[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) reg = (reg >> 8) ^ kSlice[0][(reg ^ *p++) & 0xff];
  return reg;
}

#if defined(__x86_64__)
// Multiplication of a register by a fixed x^(8L), split by input byte:
// Shift(r) = t[0][r & 0xff] ^ t[1][(r >> 8) & 0xff] ^ ... (linearity).
using ShiftTable = std::array<std::array<uint32_t, 256>, 4>;
constexpr ShiftTable MakeShiftTable(uint64_t len_bytes) {
  ShiftTable t{};
  const uint32_t op = XPow8N(len_bytes);
  for (int j = 0; j < 4; ++j) {
    for (uint32_t b = 0; b < 256; ++b) t[j][b] = MulModP(op, b << (8 * j));
  }
  return t;
}
inline uint32_t Shift(const ShiftTable& t, uint32_t r) {
  return t[0][r & 0xff] ^ t[1][(r >> 8) & 0xff] ^ t[2][(r >> 16) & 0xff] ^ t[3][r >> 24];
}

// Block lengths of the three-stream loop: three independent `crc32` chains hide
// the instruction's 3-cycle latency (throughput 1/cycle on current x86 cores).
constexpr size_t kLongBlock = 8192;
constexpr size_t kShortBlock = 256;
constexpr ShiftTable kShiftLong = MakeShiftTable(kLongBlock);
constexpr ShiftTable kShiftShort = MakeShiftTable(kShortBlock);

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Consumes rounds of 3 * block bytes; returns the updated register.
template <size_t kBlock>
__attribute__((target("sse4.2"))) inline uint32_t ThreeWay(uint32_t reg, const uint8_t*& p,
                                                           size_t& n, const ShiftTable& shift) {
  while (n >= 3 * kBlock) {
    uint64_t c0 = reg, c1 = 0, c2 = 0;
    for (size_t i = 0; i < kBlock; i += 8) {
      c0 = _mm_crc32_u64(c0, Load64(p + i));
      c1 = _mm_crc32_u64(c1, Load64(p + kBlock + i));
      c2 = _mm_crc32_u64(c2, Load64(p + 2 * kBlock + i));
    }
    reg = Shift(shift, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
    reg = Shift(shift, reg) ^ static_cast<uint32_t>(c2);
    p += 3 * kBlock;
    n -= 3 * kBlock;
  }
  return reg;
}

__attribute__((target("sse4.2"))) uint32_t HardwareRegister(uint32_t reg, const uint8_t* p,
                                                             size_t n) {
  reg = ThreeWay<kLongBlock>(reg, p, n, kShiftLong);
  reg = ThreeWay<kShortBlock>(reg, p, n, kShiftShort);
  uint64_t c = reg;
  for (; n >= 8; n -= 8, p += 8) c = _mm_crc32_u64(c, Load64(p));
  reg = static_cast<uint32_t>(c);
  for (; n > 0; --n, ++p) reg = _mm_crc32_u8(reg, *p);
  return reg;
}

bool DetectHardware() { return __builtin_cpu_supports("sse4.2"); }
#else
uint32_t HardwareRegister(uint32_t reg, const uint8_t* p, size_t n) {
  return PortableRegister(reg, p, n);
}
bool DetectHardware() { return false; }
#endif

using RegisterFn = uint32_t (*)(uint32_t, const uint8_t*, size_t);
RegisterFn ChooseImplementation() {
  return DetectHardware() ? &HardwareRegister : &PortableRegister;
}

}  // namespace

uint32_t Crc32c(const void* data, size_t n, uint32_t init) {
  static const RegisterFn fn = ChooseImplementation();
  return ~fn(~init, static_cast<const uint8_t*>(data), n);
}

uint32_t Crc32cPortable(const void* data, size_t n, uint32_t init) {
  return ~PortableRegister(~init, static_cast<const uint8_t*>(data), n);
}

uint32_t Crc32cCombine(uint32_t crc1, uint32_t crc2, size_t len2) {
  return MulModP(XPow8N(len2), crc1) ^ crc2;
}

bool Crc32cHardwareAvailable() {
  static const bool available = DetectHardware();
  return available;
}

}  // namespace kl
