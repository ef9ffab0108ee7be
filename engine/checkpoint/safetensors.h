// safetensors files: a validating, memory-mapped reader and a streaming writer.
//
// Format: u64 little-endian header length N, N bytes of JSON
//   {"<tensor>": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<string>", ...}}
// then the data section; offsets are relative to its start.
#ifndef KL_ENGINE_CHECKPOINT_SAFETENSORS_H_
#define KL_ENGINE_CHECKPOINT_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/dtype.h"

namespace kl {

// A borrowed view of one tensor's bytes inside a mapped file. Valid while the
// owning SafetensorsFile (or Checkpoint) is alive. `data` is 2-byte aligned at
// least for files written by WriteSafetensors (see there), not necessarily for
// foreign files: read elements with memcpy or through ToF32.
struct TensorView {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t bytes = 0;
  std::string file;  // path of the file holding it, for messages

  int64_t NumElements() const;
};

// "[8192, 512]": shapes in messages.
std::string ShapeToString(const std::vector<int64_t>& shape);

// A read-only, memory-mapped safetensors file whose header has been fully
// validated: header length within the file (and <= 100 MiB), valid JSON, every
// tensor with a known dtype, non-negative shape, data_offsets inside the data
// section whose size equals elements x dtype size, and no two tensors overlapping.
// Immutable after Open; all methods are thread-safe.
class SafetensorsFile {
 public:
  // Errors (all name the path, and the tensor where there is one):
  //   NOT_FOUND         the file does not exist;
  //   DATA_LOSS         the file is shorter than its header says (truncated);
  //   INVALID_ARGUMENT  malformed header (bad JSON, unknown dtype, bad shape or offsets,
  //                     overlapping tensors, size mismatch);
  //   INTERNAL          open/mmap failure.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_bytes() const { return file_bytes_; }
  // The "__metadata__" map (string values only, as the format requires).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Tensor names, sorted.
  std::vector<std::string> TensorNames() const;
  bool Contains(const std::string& name) const { return entries_.count(name) != 0; }
  // NOT_FOUND if the file has no such tensor.
  absl::StatusOr<TensorView> Get(const std::string& name) const;

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    uint64_t begin;  // relative to the data section
    uint64_t end;
  };
  SafetensorsFile() = default;
  absl::Status ParseHeader(const char* header, size_t header_bytes);

  std::string path_;
  void* map_ = nullptr;
  uint64_t file_bytes_ = 0;
  const char* data_ = nullptr;  // start of the data section inside map_
  uint64_t data_bytes_ = 0;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// One tensor for WriteSafetensors. Give either `data` (NumElements x DTypeSize
// bytes, borrowed until the call returns) or `fill`, which is called once with a
// buffer of exactly that many bytes to write the tensor into (lets callers
// generate large tensors one at a time instead of holding a whole shard).
struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  std::function<void(void* dst)> fill;
};

// Writes a safetensors file as Hugging Face's library does: header padded with
// spaces so the data section starts 8-byte aligned, tensors packed contiguously
// (no gaps) ordered by element size, largest first, then by name (so every tensor
// starts aligned to its element size). The file is written to "<path>.tmp" and
// renamed, so a failed write never leaves a valid-looking file. Output is a pure
// function of the arguments (byte-identical across runs). Tensor names must be
// unique and non-empty and not "__metadata__"; INVALID_ARGUMENT otherwise.
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace kl

#endif  // KL_ENGINE_CHECKPOINT_SAFETENSORS_H_
