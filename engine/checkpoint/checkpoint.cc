// Checkpoint directory loading: index / single-file discovery, shard mapping,
// validation against the config, fp32 reads and the fingerprint.
#include "engine/checkpoint/checkpoint.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <unordered_map>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "engine/common/log.h"
#include "kernels/common/parallel.h"
#include "kernels/common/status_macros.h"

namespace kl {
namespace {

using Json = nlohmann::json;

constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ull;
constexpr uint64_t kFnvPrime = 0x100000001b3ull;
constexpr size_t kFingerprintEdgeBytes = 4096;
constexpr int kMaxUnknownTensorWarnings = 20;

uint64_t Fnv1a(const void* p, size_t n, uint64_t h = kFnvOffset) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) {
    h ^= b[i];
    h *= kFnvPrime;
  }
  return h;
}

uint64_t Fnv1a(const std::string& s, uint64_t h) { return Fnv1a(s.data(), s.size(), h); }

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return buf.str();
}

bool IsFloat(DType t) {
  return t == DType::kBF16 || t == DType::kF16 || t == DType::kF32 || t == DType::kF64;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir,
                                                             const ModelConfig& config) {
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = dir;
  ckpt->config_ = config;
  const std::string index_path = dir + "/" + kSafetensorsIndexFile;
  const std::string single_path = dir + "/" + kSingleSafetensorsFile;
  if (FileExists(index_path)) {
    RETURN_IF_ERROR(ckpt->LoadIndex(index_path));
  } else if (FileExists(single_path)) {
    RETURN_IF_ERROR(ckpt->LoadSingleFile(single_path));
  } else {
    return absl::NotFoundError(absl::StrCat("no ", kSafetensorsIndexFile, " or ",
                                            kSingleSafetensorsFile, " in ", dir));
  }
  RETURN_IF_ERROR(ckpt->CheckAgainstConfig());
  return ckpt;
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir + "/config.json"));
  return Open(dir, config);
}

absl::Status Checkpoint::AddShard(const std::string& shard_name, const SafetensorsFile** out) {
  auto it = shards_.find(shard_name);
  if (it == shards_.end()) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f =
        SafetensorsFile::Open(dir_ + "/" + shard_name);
    if (!f.ok()) {
      if (f.status().code() == absl::StatusCode::kNotFound) {
        return absl::NotFoundError(absl::StrCat("shard ", shard_name, " listed in ",
                                                kSafetensorsIndexFile, " does not exist in ", dir_));
      }
      return f.status();
    }
    it = shards_.emplace(shard_name, *std::move(f)).first;
  }
  *out = it->second.get();
  return absl::OkStatus();
}

absl::Status Checkpoint::LoadIndex(const std::string& index_path) {
  ASSIGN_OR_RETURN(std::string text, ReadTextFile(index_path));
  Json root;
  try {
    root = Json::parse(text);
  } catch (const Json::exception& e) {  // also out_of_range: a number beyond double
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": malformed JSON: ", e.what()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": not a JSON object"));
  }
  auto wm = root.find("weight_map");
  if (wm == root.end() || !wm->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": no \"weight_map\" object"));
  }
  // Validate names first, then open each distinct shard once.
  std::map<std::string, std::string> weight_map;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map[\"", it.key(),
                                                     "\"] is not a string"));
    }
    const std::string shard = it->get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      return absl::InvalidArgumentError(absl::StrCat(
          index_path, ": weight_map[\"", it.key(), "\"] = \"", shard, "\" is not a plain file name"));
    }
    weight_map.emplace(it.key(), shard);
  }
  for (const auto& [tensor, shard] : weight_map) {
    const SafetensorsFile* file;
    RETURN_IF_ERROR(AddShard(shard, &file));
    if (!file->Contains(tensor)) {
      return absl::InvalidArgumentError(absl::StrCat(kSafetensorsIndexFile, " in ", dir_, " maps ",
                                                     tensor, " to shard ", shard,
                                                     ", which does not contain it"));
    }
    tensors_.emplace(tensor, file);
  }
  // Tensors present in a shard but absent from the index are ignored, as HF does.
  for (const auto& [name, file] : shards_) {
    for (const std::string& t : file->TensorNames()) {
      if (weight_map.count(t) == 0) {
        KL_LOG(WARNING).Field("tensor", t).Field("shard", name)
            << "tensor in shard is not in the weight_map; ignored";
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Checkpoint::LoadSingleFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::Open(path));
  const SafetensorsFile* file = f.get();
  for (const std::string& t : file->TensorNames()) tensors_.emplace(t, file);
  shards_.emplace(kSingleSafetensorsFile, std::move(f));
  return absl::OkStatus();
}

absl::Status Checkpoint::CheckAgainstConfig() const {
  const std::vector<TensorSpec> specs = ExpectedTensors(config_);
  std::set<std::string> expected;
  absl::Status first_error;
  int64_t missing = 0;
  for (const TensorSpec& spec : specs) {
    expected.insert(spec.name);
    auto it = tensors_.find(spec.name);
    if (it == tensors_.end()) {
      if (++missing == 1 && first_error.ok()) {
        first_error = absl::NotFoundError(absl::StrCat("missing tensor ", spec.name, " (expected ",
                                                       ShapeToString(spec.shape), ") in ", dir_));
      }
      continue;
    }
    if (!first_error.ok()) continue;
    ASSIGN_OR_RETURN(TensorView v, it->second->Get(spec.name));
    if (v.shape != spec.shape && (spec.alt_shape.empty() || v.shape != spec.alt_shape)) {
      first_error = absl::InvalidArgumentError(absl::StrCat(
          "tensor ", spec.name, " in ", v.file, " has shape ", ShapeToString(v.shape),
          ", expected ", ShapeToString(spec.shape),
          spec.alt_shape.empty() ? "" : absl::StrCat(" or ", ShapeToString(spec.alt_shape))));
    } else if (!IsFloat(v.dtype)) {
      first_error = absl::InvalidArgumentError(
          absl::StrCat("tensor ", spec.name, " in ", v.file, " has dtype ", std::string(DTypeName(v.dtype)),
                       ", expected a float type (BF16, F16, F32, F64)"));
    }
  }
  if (!first_error.ok()) {
    if (missing > 1) {
      return absl::Status(first_error.code(), absl::StrCat(first_error.message(), " (", missing,
                                                           " expected tensors missing in all)"));
    }
    return first_error;
  }
  int unknown = 0;
  for (const auto& [name, file] : tensors_) {
    if (expected.count(name) != 0) continue;
    if (++unknown <= kMaxUnknownTensorWarnings) {
      KL_LOG(WARNING).Field("tensor", name).Field("file", file->path())
          << "unknown tensor in checkpoint (not used by this config)";
    }
  }
  if (unknown > kMaxUnknownTensorWarnings) {
    KL_LOG(WARNING).Field("count", unknown).Field("dir", dir_) << "unknown tensors in checkpoint";
  }
  return absl::OkStatus();
}

absl::StatusOr<TensorView> Checkpoint::Get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("no tensor ", name, " in checkpoint ", dir_));
  }
  return it->second->Get(name);
}

absl::Status Checkpoint::ReadF32(const std::string& name, std::vector<float>* out) const {
  ASSIGN_OR_RETURN(TensorView v, Get(name));
  out->resize(static_cast<size_t>(v.NumElements()));
  return ReadF32(name, out->data(), out->size());
}

absl::Status Checkpoint::ReadF32(const std::string& name, float* out, size_t n) const {
  ASSIGN_OR_RETURN(TensorView v, Get(name));
  if (static_cast<int64_t>(n) != v.NumElements()) {
    return absl::InvalidArgumentError(absl::StrCat("ReadF32(", name, "): buffer holds ", n,
                                                   " floats but the tensor has ", v.NumElements()));
  }
  if (!IsFloat(v.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("ReadF32(", name, "): dtype ", std::string(DTypeName(v.dtype)),
                                                   " in ", v.file, " is not a float type"));
  }
  const char* src = static_cast<const char*>(v.data);
  const size_t elem = DTypeSize(v.dtype);
  constexpr int64_t kBlock = 1 << 16;  // elements per task: conversion is memory bound
  ParallelFor(static_cast<int64_t>(n), kBlock, [&](int64_t begin, int64_t end) {
    ToF32(v.dtype, src + begin * elem, out + begin, static_cast<size_t>(end - begin));
  });
  return absl::OkStatus();
}

uint64_t Checkpoint::CheckpointFingerprint() const {
  std::call_once(fingerprint_once_, [this] {
    uint64_t h = Fnv1a(ModelConfigToJson(config_), kFnvOffset);
    for (const auto& [name, file] : tensors_) {  // sorted by name
      absl::StatusOr<TensorView> v = file->Get(name);
      if (!v.ok()) continue;  // cannot happen: tensors_ only lists present tensors
      h = Fnv1a(name, h);
      h = Fnv1a(std::string(DTypeName(v->dtype)), h);
      h = Fnv1a(ShapeToString(v->shape), h);
      const size_t edge = std::min(v->bytes, kFingerprintEdgeBytes);
      const char* data = static_cast<const char*>(v->data);
      h = Fnv1a(data, edge, h);
      h = Fnv1a(data + v->bytes - edge, edge, h);
    }
    fingerprint_ = h;
  });
  return fingerprint_;
}

std::vector<std::string> Checkpoint::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& [name, file] : tensors_) names.push_back(name);
  return names;
}

std::vector<std::string> Checkpoint::ShardNames() const {
  std::vector<std::string> names;
  for (const auto& [name, file] : shards_) names.push_back(name);
  return names;
}

uint64_t Checkpoint::TotalTensorBytes() const {
  uint64_t total = 0;
  for (const auto& [name, file] : tensors_) {
    absl::StatusOr<TensorView> v = file->Get(name);
    if (v.ok()) total += v->bytes;
  }
  return total;
}

}  // namespace kl
