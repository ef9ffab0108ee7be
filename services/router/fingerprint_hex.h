// Model fingerprints on the wire: ModelInfo and WorkerStats carry the 64-bit
// StateFingerprint / checkpoint fingerprint as hex text.
#ifndef KL_SERVICES_ROUTER_FINGERPRINT_HEX_H_
#define KL_SERVICES_ROUTER_FINGERPRINT_HEX_H_

#include <cstdint>
#include <string>

namespace kl {

// "0x" + 16 lowercase hex digits, as the workers write it in WorkerStats.
std::string FormatFingerprint(uint64_t fingerprint);
// Parses "0x…" or plain hex (any case, up to 16 digits); false otherwise.
bool ParseFingerprint(const std::string& text, uint64_t* out);

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_FINGERPRINT_HEX_H_
