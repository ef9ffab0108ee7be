// The libFuzzer entry points every fuzz target in this package defines
// (LLVMFuzzerInitialize is optional). See tests/fuzz/README.md.
#ifndef KL_TESTS_FUZZ_FUZZ_INTERFACE_H_
#define KL_TESTS_FUZZ_FUZZ_INTERFACE_H_

#include <cstddef>
#include <cstdint>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) __attribute__((weak));

// A fuzz target's own invariant failed (a bug even though nothing crashed):
// prints `what` and aborts, so libFuzzer saves the input and the replay test fails.
#define KL_FUZZ_CHECK(cond, what)                                              \
  do {                                                                         \
    if (!(cond)) ::kl::fuzz::CheckFailed(__FILE__, __LINE__, #cond, (what));   \
  } while (0)

namespace kl {
namespace fuzz {
[[noreturn]] void CheckFailed(const char* file, int line, const char* cond, const char* what);
}  // namespace fuzz
}  // namespace kl

#endif  // KL_TESTS_FUZZ_FUZZ_INTERFACE_H_
