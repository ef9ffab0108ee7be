// The embedded demo model: TinyConfig() with deterministic random weights, made
// on first use into a cache folder (atomically: made in a temporary folder, then
// renamed), so the README's command needs no download.
#ifndef KL_TOOLS_KL_EMBEDDED_MODEL_H_
#define KL_TOOLS_KL_EMBEDDED_MODEL_H_

#include <string>

#include "absl/status/statusor.h"

namespace kl {

// Default cache root: $KL_CACHE_DIR, else $XDG_CACHE_HOME/kimi-serve, else
// ~/.cache/kimi-serve (read by main() only).
std::string DefaultCacheDir();

// Returns the folder of the embedded tiny model under `cache_dir`, making it if
// it is missing. Idempotent and safe against concurrent callers.
absl::StatusOr<std::string> EnsureEmbeddedModel(const std::string& cache_dir);

}  // namespace kl

#endif  // KL_TOOLS_KL_EMBEDDED_MODEL_H_
