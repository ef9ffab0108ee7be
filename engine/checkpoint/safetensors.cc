// safetensors reader (mmap + header validation) and writer.
#include "engine/checkpoint/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

using Json = nlohmann::json;

// Hugging Face's safetensors refuses headers above 100 MB; so do we.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr char kMetadataKey[] = "__metadata__";

// Elements x element size, or false on overflow.
bool ByteSize(const std::vector<int64_t>& shape, DType dtype, uint64_t* bytes) {
  unsigned __int128 n = DTypeSize(dtype);
  for (int64_t d : shape) {
    n *= static_cast<uint64_t>(d);
    if (n > (static_cast<unsigned __int128>(1) << 62)) return false;
  }
  *bytes = static_cast<uint64_t>(n);
  return true;
}

// Non-negative integer JSON value.
bool AsU64(const Json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(v.get<int64_t>());
    return true;
  }
  return false;
}

struct ParsedEntry {
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

// Validates one tensor entry of the header (everything but overlap and bounds).
absl::Status ParseEntry(const std::string& name, const Json& e, ParsedEntry* out) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": ", what));
  };
  if (!e.is_object()) return bad("header entry is not an object");
  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string()) return bad("missing or non-string dtype");
  const std::string dtype = dt->get<std::string>();
  if (!ParseDTypeName(dtype, &out->dtype)) {
    return bad(absl::StrCat("unknown dtype \"", dtype, "\" (supported: BF16, F16, F32, F64, I32, I64, U8)"));
  }
  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array()) return bad("missing or non-list shape");
  for (const Json& d : *sh) {
    uint64_t v;
    if (!AsU64(d, &v) || v > (1ull << 62)) return bad(absl::StrCat("invalid shape ", sh->dump()));
    out->shape.push_back(static_cast<int64_t>(v));
  }
  auto off = e.find("data_offsets");
  if (off == e.end() || !off->is_array() || off->size() != 2 || !AsU64((*off)[0], &out->begin) ||
      !AsU64((*off)[1], &out->end)) {
    return bad("data_offsets must be [begin, end] with non-negative integers");
  }
  if (out->begin > out->end) {
    return bad(absl::StrCat("data_offsets [", out->begin, ", ", out->end, "] has begin > end"));
  }
  uint64_t bytes;
  if (!ByteSize(out->shape, out->dtype, &bytes)) {
    return bad(absl::StrCat("shape ", ShapeToString(out->shape), " is too large"));
  }
  if (bytes != out->end - out->begin) {
    return bad(absl::StrCat("data_offsets [", out->begin, ", ", out->end, "] hold ",
                            out->end - out->begin, " bytes but shape ", ShapeToString(out->shape),
                            " of ", dtype, " needs ", bytes));
  }
  return absl::OkStatus();
}

absl::Status WithPath(const std::string& path, const absl::Status& s) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(path, ": ", s.message()));
}

}  // namespace

int64_t TensorView::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeToString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, file_bytes_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::InternalError(absl::StrCat(path, ": open failed: ", std::strerror(err)));
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": fstat failed: ", std::strerror(err)));
  }
  f->file_bytes_ = static_cast<uint64_t>(st.st_size);
  if (f->file_bytes_ < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": file is ", f->file_bytes_,
                                            " bytes, too short for the 8-byte header length"));
  }
  f->map_ = mmap(nullptr, f->file_bytes_, PROT_READ, MAP_SHARED, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    return absl::InternalError(absl::StrCat(path, ": mmap failed: ", std::strerror(map_err)));
  }
  const unsigned char* base = static_cast<const unsigned char*>(f->map_);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | base[i];  // little-endian
  if (header_bytes > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_bytes,
                                                   " exceeds the 100 MiB limit (corrupt file?)"));
  }
  if (header_bytes > f->file_bytes_ - 8) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_bytes,
                                            " runs past the end of the file (", f->file_bytes_,
                                            " bytes): truncated or not a safetensors file"));
  }
  f->data_ = reinterpret_cast<const char*>(base) + 8 + header_bytes;
  f->data_bytes_ = f->file_bytes_ - 8 - header_bytes;
  RETURN_IF_ERROR(WithPath(path, f->ParseHeader(reinterpret_cast<const char*>(base) + 8, header_bytes)));
  return f;
}

absl::Status SafetensorsFile::ParseHeader(const char* header, size_t header_bytes) {
  Json root;
  try {
    root = Json::parse(header, header + header_bytes);
  } catch (const Json::exception& e) {
    // Not only parse_error: a number too large for a double (1e999) throws
    // out_of_range (found by //tests/fuzz:safetensors_fuzzer).
    return absl::InvalidArgumentError(absl::StrCat("malformed header JSON: ", e.what()));
  }
  if (!root.is_object()) return absl::InvalidArgumentError("header JSON is not an object");
  std::vector<std::pair<const std::string*, const Entry*>> by_offset;
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == kMetadataKey) {
      if (!it->is_object()) return absl::InvalidArgumentError("__metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat("__metadata__.", m.key(), " is not a string"));
        }
        metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    ParsedEntry p;
    RETURN_IF_ERROR(ParseEntry(it.key(), *it, &p));
    if (p.end > data_bytes_) {
      return absl::DataLossError(absl::StrCat(
          "tensor ", it.key(), ": data_offsets end ", p.end, " is past the end of the data section (",
          data_bytes_, " bytes): file truncated or offsets out of range"));
    }
    auto [pos, inserted] = entries_.emplace(it.key(), Entry{p.dtype, std::move(p.shape), p.begin, p.end});
    if (!inserted) return absl::InvalidArgumentError(absl::StrCat("tensor ", it.key(), " listed twice"));
    if (pos->second.end > pos->second.begin) by_offset.emplace_back(&pos->first, &pos->second);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const Entry& prev = *by_offset[i - 1].second;
    const Entry& cur = *by_offset[i].second;
    if (cur.begin < prev.end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensors ", *by_offset[i - 1].first, " [", prev.begin, ", ", prev.end, ") and ",
          *by_offset[i].first, " [", cur.begin, ", ", cur.end, ") overlap"));
    }
  }
  return absl::OkStatus();
}

std::vector<std::string> SafetensorsFile::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& [name, e] : entries_) names.push_back(name);
  return names;
}

absl::StatusOr<TensorView> SafetensorsFile::Get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor ", name));
  }
  TensorView v;
  v.dtype = it->second.dtype;
  v.shape = it->second.shape;
  v.data = data_ + it->second.begin;
  v.bytes = it->second.end - it->second.begin;
  v.file = path_;
  return v;
}

namespace {

// Owns a FILE*; closes it on scope exit if still open.
struct FileCloser {
  FILE* f;
  ~FileCloser() {
    if (f != nullptr) std::fclose(f);
  }
};

absl::Status WriteBytes(FILE* f, const void* p, size_t n, const std::string& path) {
  if (n != 0 && std::fwrite(p, 1, n, f) != n) {
    return absl::InternalError(absl::StrCat(path, ": write failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  // Order: element size descending, then name; offsets packed contiguously.
  std::vector<const TensorToWrite*> order;
  std::set<std::string> names;
  for (const TensorToWrite& t : tensors) {
    if (t.name.empty() || t.name == kMetadataKey || !names.insert(t.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": invalid or duplicate tensor name \"", t.name, "\""));
    }
    if ((t.data == nullptr) == !t.fill) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", t.name, " needs exactly one of data and fill"));
    }
    order.push_back(&t);
  }
  std::sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    const size_t sa = DTypeSize(a->dtype), sb = DTypeSize(b->dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });
  Json header = Json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  std::vector<uint64_t> sizes;
  uint64_t offset = 0;
  for (const TensorToWrite* t : order) {
    uint64_t bytes;
    if (!ByteSize(t->shape, t->dtype, &bytes)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", t->name, " is too large"));
    }
    for (int64_t d : t->shape) {
      if (d < 0) return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", t->name, " has a negative dim"));
    }
    header[t->name] = {{"dtype", std::string(DTypeName(t->dtype))},
                       {"shape", t->shape},
                       {"data_offsets", {offset, offset + bytes}}};
    sizes.push_back(bytes);
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - (text.size() % 8)) % 8, ' ');  // 8 + header is a multiple of 8
  unsigned char len_le[8];
  for (int i = 0; i < 8; ++i) len_le[i] = static_cast<unsigned char>(text.size() >> (8 * i));

  const std::string tmp = path + ".tmp";
  FileCloser out{std::fopen(tmp.c_str(), "wb")};
  if (out.f == nullptr) {
    return absl::InternalError(absl::StrCat(tmp, ": cannot create: ", std::strerror(errno)));
  }
  std::setvbuf(out.f, nullptr, _IOFBF, 1 << 20);
  RETURN_IF_ERROR(WriteBytes(out.f, len_le, 8, tmp));
  RETURN_IF_ERROR(WriteBytes(out.f, text.data(), text.size(), tmp));
  std::vector<char> buffer;
  for (size_t i = 0; i < order.size(); ++i) {
    const TensorToWrite& t = *order[i];
    if (t.data != nullptr) {
      RETURN_IF_ERROR(WriteBytes(out.f, t.data, sizes[i], tmp));
    } else if (sizes[i] != 0) {
      buffer.resize(sizes[i]);
      t.fill(buffer.data());
      RETURN_IF_ERROR(WriteBytes(out.f, buffer.data(), sizes[i], tmp));
    }
  }
  const int rc = std::fclose(out.f);
  out.f = nullptr;
  if (rc != 0) return absl::InternalError(absl::StrCat(tmp, ": close failed: ", std::strerror(errno)));
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(absl::StrCat("rename ", tmp, " -> ", path, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace kl
