#include "services/router/least_loaded_picker.h"

#include <limits>
#include <vector>

namespace kl {
namespace {

// Candidates of one tier (0, 1 or 2, see the header).
bool InTier(const WorkerLoad& w, int tier, const absl::flat_hash_set<std::string>& exclude) {
  if (!w.ready || w.incompatible) return false;
  if (tier == 2) return true;
  if (exclude.contains(w.address)) return false;
  return tier == 1 || !w.suspect;
}

}  // namespace

std::optional<size_t> PickWorker(const PoolSnapshot& snapshot,
                                 const absl::flat_hash_set<std::string>& exclude,
                                 const std::string& preferred, int64_t slack) {
  for (int tier = 0; tier < 3; ++tier) {
    int64_t best = std::numeric_limits<int64_t>::max();
    std::vector<size_t> tied;
    for (size_t i = 0; i < snapshot.workers.size(); ++i) {
      const WorkerLoad& w = snapshot.workers[i];
      if (!InTier(w, tier, exclude)) continue;
      const int64_t load = w.effective_load();
      if (load < best) {
        best = load;
        tied.clear();
      }
      if (load == best) tied.push_back(i);
    }
    if (tied.empty()) continue;
    if (tier == 0 && !preferred.empty()) {
      for (size_t i = 0; i < snapshot.workers.size(); ++i) {
        const WorkerLoad& w = snapshot.workers[i];
        if (w.address == preferred && InTier(w, 0, exclude) && w.effective_load() <= best + slack) {
          return i;
        }
      }
    }
    return tied[snapshot.rr_cursor % tied.size()];
  }
  return std::nullopt;
}

}  // namespace kl
