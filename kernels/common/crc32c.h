// CRC-32C (Castagnoli; reflected polynomial 0x82F63B78, init and final xor
// 0xFFFFFFFF) — the checksum of every StateBundle record (engine/state/FORMAT.md).
// The same function as iSCSI / ext4 / leveldb / Intel's `crc32` instruction, so a
// checksum computed anywhere else (a GPU kernel, another language) can be checked.
#ifndef KL_KERNELS_COMMON_CRC32C_H_
#define KL_KERNELS_COMMON_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace kl {

// Returns the CRC-32C of data[0, n), continuing from `init`, which is the
// CRC-32C of the bytes that precede `data` (0 for the start of a message):
//   Crc32c(b, nb, Crc32c(a, na)) == CRC-32C of a‖b.
// Crc32c("123456789", 9) == 0xE3069283. Uses the SSE4.2 `crc32` instruction on
// three interleaved streams when the CPU has it (checked once at run time),
// else a portable slicing-by-8 table. Thread-safe; `data` may be unaligned.
uint32_t Crc32c(const void* data, size_t n, uint32_t init = 0);

// Returns the CRC-32C of a‖b given crc1 = CRC of a, crc2 = CRC of b and
// len2 = the length of b in bytes (a's length is not needed). O(log len2).
// Lets checksums of chunks computed independently (threads, a GPU, parallel
// streams) be merged into the checksum of the whole.
uint32_t Crc32cCombine(uint32_t crc1, uint32_t crc2, size_t len2);

// The portable table implementation, always available (tests and the benchmark
// compare the two). Same contract as Crc32c.
uint32_t Crc32cPortable(const void* data, size_t n, uint32_t init = 0);

// True if Crc32c uses the SSE4.2 instruction on this CPU.
bool Crc32cHardwareAvailable();

}  // namespace kl

#endif  // KL_KERNELS_COMMON_CRC32C_H_
