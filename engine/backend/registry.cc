#include "engine/backend/registry.h"

#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kl {
namespace {

std::mutex& Mu() {
  static std::mutex mu;
  return mu;
}

std::map<std::string, BackendFactory>& Factories() {
  static auto* f = new std::map<std::string, BackendFactory>{
      {"cpu", [](const ModelConfig&, const BackendSpec& spec)
                  -> absl::StatusOr<std::unique_ptr<Backend>> {
         return std::unique_ptr<Backend>(std::make_unique<CpuBackend>(spec.cpu));
       }}};
  return *f;
}

}  // namespace

bool RegisterBackend(const std::string& name, BackendFactory factory) {
  std::lock_guard<std::mutex> l(Mu());
  Factories()[name] = std::move(factory);
  return true;
}

std::vector<std::string> RegisteredBackends() {
  std::lock_guard<std::mutex> l(Mu());
  std::vector<std::string> names;
  for (const auto& [n, f] : Factories()) names.push_back(n);
  return names;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(const ModelConfig& config,
                                                     const BackendSpec& spec) {
  BackendFactory f;
  {
    std::lock_guard<std::mutex> l(Mu());
    auto it = Factories().find(spec.name);
    if (it != Factories().end()) f = it->second;
  }
  if (!f) {
    return absl::NotFoundError(absl::StrCat("backend '", spec.name,
                                            "' is not linked into this binary (it has: ",
                                            absl::StrJoin(RegisteredBackends(), ", "),
                                            "); GPU backends come with the *-cuda binaries"));
  }
  return f(config, spec);
}

}  // namespace kl
