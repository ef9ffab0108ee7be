// Fuzz target: the safetensors reader (engine/checkpoint). SafetensorsFile
// opens a path and mmaps it, so each input is written to an anonymous memfd and
// opened as /proc/self/fd/N: the real Open (size checks, mmap, header parse)
// runs, with no disk I/O. Every tensor of an accepted file must be readable and
// lie inside the file.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "engine/checkpoint/safetensors.h"
#include "tests/fuzz/fuzz_interface.h"

namespace {

bool WriteAll(int fd, const uint8_t* data, size_t size) {
  while (size > 0) {
    const ssize_t n = write(fd, data, size);
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = memfd_create("safetensors_fuzz", MFD_CLOEXEC);
  if (fd < 0) return 0;  // environment problem, not a finding
  if (!WriteAll(fd, data, size)) {
    close(fd);
    return 0;
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  auto file = kl::SafetensorsFile::Open(path);
  if (file.ok()) {
    KL_FUZZ_CHECK((*file)->file_bytes() == size, "file_bytes differs from the input size");
    for (const std::string& name : (*file)->TensorNames()) {
      absl::StatusOr<kl::TensorView> view = (*file)->Get(name);
      KL_FUZZ_CHECK(view.ok(), "listed tensor cannot be read");
      KL_FUZZ_CHECK(view->bytes <= size, "tensor larger than the file");
      KL_FUZZ_CHECK(view->NumElements() >= 0, "negative element count");
      KL_FUZZ_CHECK(static_cast<uint64_t>(view->NumElements()) * kl::DTypeSize(view->dtype) ==
                        view->bytes,
                    "tensor bytes != elements x dtype size");
      // Touch the first and last byte: ASan / a SIGBUS would catch a view
      // pointing outside the mapping.
      if (view->bytes > 0) {
        volatile char first = static_cast<const char*>(view->data)[0];
        volatile char last = static_cast<const char*>(view->data)[view->bytes - 1];
        (void)first;
        (void)last;
      }
    }
    KL_FUZZ_CHECK(!(*file)->Get("__fuzz_no_such_tensor__").ok(), "unknown tensor found");
  } else {
    const absl::StatusCode code = file.status().code();
    KL_FUZZ_CHECK(code == absl::StatusCode::kInvalidArgument ||
                      code == absl::StatusCode::kDataLoss,
                  std::string(file.status().ToString()).c_str());
  }
  close(fd);
  return 0;
}
