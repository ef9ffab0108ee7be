#include "engine/state/bundle_parts.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kl {

bool RowCoverage::Overlaps(uint64_t begin, uint64_t end) const {
  auto next = ranges_.upper_bound(begin);
  if (next != ranges_.end() && next->first < end) return true;
  return next != ranges_.begin() && std::prev(next)->second > begin;
}

bool RowCoverage::Claim(uint64_t begin, uint64_t end) {
  auto next = ranges_.upper_bound(begin);  // first range starting after `begin`
  if (next != ranges_.end() && next->first < end) return false;
  auto prev = next == ranges_.begin() ? ranges_.end() : std::prev(next);
  if (prev != ranges_.end() && prev->second > begin) return false;
  covered_ += end - begin;
  if (next != ranges_.end() && next->first == end) {  // merge with the following range
    end = next->second;
    ranges_.erase(next);
  }
  if (prev != ranges_.end() && prev->second == begin) {
    prev->second = end;
  } else {
    ranges_.emplace(begin, end);
  }
  return true;
}

std::string RowCoverage::DescribeGaps(int max) const {
  std::string out;
  uint64_t at = 0;
  int n = 0;
  auto add = [&](uint64_t b, uint64_t e) {
    if (n++ < max) absl::StrAppendFormat(&out, "%s[%d, %d)", out.empty() ? "" : ", ", b, e);
  };
  for (const auto& [b, e] : ranges_) {
    if (b > at) add(at, b);
    at = e;
  }
  if (at < rows_) add(at, rows_);
  if (n > max) absl::StrAppendFormat(&out, ", ... (%d gaps)", n);
  return out;
}

PartTable::PartTable(const BundleHeader& header) {
  static constexpr PartKind kKdaKinds[] = {PartKind::kKdaState, PartKind::kConvQ,
                                           PartKind::kConvK, PartKind::kConvV};
  int64_t kda_ordinal = 0, mla_ordinal = 0;
  for (uint32_t layer = 0; layer < header.layer_kinds.size(); ++layer) {
    first_slot_.push_back(static_cast<int64_t>(slots_.size()));
    const bool kda = header.layer_kinds[layer] == kWireLayerKda;
    auto add = [&](PartKind kind, int64_t ordinal) {
      PartSlot s;
      s.kind = kind;
      s.layer = layer;
      s.ordinal = ordinal;
      s.shape = WireShape(header, kind);
      s.dtype = HeaderDType(header, kind);
      s.coverage = RowCoverage(s.shape.rows);
      slots_.push_back(std::move(s));
    };
    if (kda) {
      for (PartKind kind : kKdaKinds) add(kind, kda_ordinal);
      ++kda_ordinal;
    } else {
      add(PartKind::kMlaLatent, mla_ordinal++);
    }
  }
  first_slot_.push_back(static_cast<int64_t>(slots_.size()));
}

PartSlot* PartTable::Find(PartKind kind, uint32_t layer) {
  // size_t first: `layer` is a wire u32, and layer + 1 must not wrap to 0.
  if (static_cast<size_t>(layer) + 1 >= first_slot_.size()) return nullptr;
  for (int64_t i = first_slot_[layer]; i < first_slot_[layer + 1]; ++i) {
    if (slots_[i].kind == kind) return &slots_[i];
  }
  return nullptr;
}

bool PartTable::Complete() const {
  for (const PartSlot& s : slots_) {
    if (!s.coverage.complete()) return false;
  }
  return true;
}

std::string PartTable::DescribeMissing(int max) const {
  std::vector<std::string> items;
  for (size_t i = 0; i < slots_.size(); ++i) {
    const PartSlot& s = slots_[i];
    if (s.coverage.complete()) continue;
    // A KDA layer of which nothing arrived is one item, not four.
    if (s.kind == PartKind::kKdaState && i + 3 < slots_.size()) {
      bool none = true;
      for (size_t j = i; j < i + 4; ++j) none &= slots_[j].coverage.covered() == 0;
      if (none) {
        items.push_back(absl::StrFormat("KDA layer %d (state and conv tails: nothing arrived)",
                                        s.layer));
        i += 3;
        continue;
      }
    }
    items.push_back(absl::StrFormat("%s layer %d (rows %s of %d missing)", PartKindName(s.kind),
                                    s.layer, s.coverage.DescribeGaps(3), s.coverage.rows()));
  }
  std::string out;
  for (int n = 0; n < static_cast<int>(items.size()) && n < max; ++n) {
    absl::StrAppend(&out, n == 0 ? "" : "; ", items[n]);
  }
  if (static_cast<int>(items.size()) > max) {
    absl::StrAppendFormat(&out, "; ... %d items in all", items.size());
  }
  return out;
}

uint64_t PartTable::ExpectedPayloadBytes() const {
  uint64_t total = 0;
  for (const PartSlot& s : slots_) total += s.shape.rows * s.shape.row_elems * DTypeSize(s.dtype);
  return total;
}

}  // namespace kl
