#include "services/prefill/state_fault.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kl {

std::string_view StateFaultName(StateFault f) {
  switch (f) {
    case StateFault::kNone: return "none";
    case StateFault::kCorrupt: return "corrupt";
    case StateFault::kTruncate: return "truncate";
    case StateFault::kDuplicate: return "duplicate";
    case StateFault::kReorder: return "reorder";
    case StateFault::kDropFinal: return "drop_final";
    case StateFault::kCut: return "cut";
  }
  return "?";
}

absl::StatusOr<std::shared_ptr<StateFaultInjector>> StateFaultInjector::Parse(
    const std::string& spec, int64_t every) {
  if (every < 1) return absl::InvalidArgumentError("fault_inject_every must be >= 1");
  if (spec.empty()) return nullptr;
  auto inj = std::make_shared<StateFaultInjector>();
  inj->every_ = every;
  for (absl::string_view piece : absl::StrSplit(spec, ',')) {
    const std::string k(piece);
    bool found = false;
    for (StateFault f : {StateFault::kCorrupt, StateFault::kTruncate, StateFault::kDuplicate,
                         StateFault::kReorder, StateFault::kDropFinal, StateFault::kCut}) {
      if (k == StateFaultName(f)) {
        inj->kinds_.push_back(f);
        found = true;
      }
    }
    if (!found) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown state fault '", k,
          "' (corrupt, truncate, duplicate, reorder, drop_final, cut)"));
    }
  }
  return inj;
}

StateFault StateFaultInjector::Next() {
  if (kinds_.empty()) return StateFault::kNone;
  const int64_t n = pushes_.fetch_add(1);
  if ((n + 1) % every_ != 0) return StateFault::kNone;
  return kinds_[(n / every_) % static_cast<int64_t>(kinds_.size())];
}

}  // namespace kl
