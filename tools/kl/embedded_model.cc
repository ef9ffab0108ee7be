#include "tools/kl/embedded_model.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "engine/common/log.h"
#include "engine/config/model_config.h"
#include "kernels/common/status_macros.h"
#include "tools/make_checkpoint/maker.h"

namespace kl {
namespace fs = std::filesystem;

// Bump when TinyConfig(), the maker's initialisation or the tokenizer writer
// change, so old caches are not reused.
constexpr char kEmbeddedName[] = "tiny-v1";
constexpr uint64_t kEmbeddedSeed = 20251030;

std::string DefaultCacheDir() {
  if (const char* d = std::getenv("KL_CACHE_DIR"); d && *d) return d;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) return std::string(x) + "/kimi-serve";
  if (const char* h = std::getenv("HOME"); h && *h) return std::string(h) + "/.cache/kimi-serve";
  return "/tmp/kimi-serve";
}

absl::StatusOr<std::string> EnsureEmbeddedModel(const std::string& cache_dir) {
  const fs::path dir = fs::path(cache_dir) / kEmbeddedName;
  std::error_code ec;
  if (fs::exists(dir / "config.json", ec)) return dir.string();
  fs::create_directories(cache_dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create cache folder ", cache_dir, ": ", ec.message()));
  }
  const fs::path tmp = fs::path(cache_dir) / absl::StrCat(".", kEmbeddedName, ".", getpid());
  fs::remove_all(tmp, ec);
  MakerOptions opts;
  opts.seed = kEmbeddedSeed;
  KL_LOG(INFO).Field("dir", dir.string()) << "making the embedded tiny model (first use)";
  RETURN_IF_ERROR(MakeCheckpoint(TinyConfig(), tmp.string(), opts));
  fs::rename(tmp, dir, ec);
  if (ec) {
    fs::remove_all(tmp, ec);  // another process won the race: use its copy
    if (!fs::exists(dir / "config.json")) {
      return absl::InternalError(absl::StrCat("could not place the embedded model in ", dir.string()));
    }
  }
  return dir.string();
}

}  // namespace kl
