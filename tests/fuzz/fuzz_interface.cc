#include "tests/fuzz/fuzz_interface.h"

#include <cstdio>
#include <cstdlib>

namespace kl {
namespace fuzz {

void CheckFailed(const char* file, int line, const char* cond, const char* what) {
  std::fprintf(stderr, "%s:%d: fuzz invariant failed: %s (%s)\n", file, line, cond, what);
  std::abort();
}

}  // namespace fuzz
}  // namespace kl
