// Bookkeeping shared by BundleWriter and BundleAssembler: the list of parts a
// bundle must contain (derived from its header) and which rows of each have been
// claimed, so both sides can say precisely what is missing or duplicated.
// Not thread-safe; the owners guard it with their mutex.
#ifndef KL_ENGINE_STATE_BUNDLE_PARTS_H_
#define KL_ENGINE_STATE_BUNDLE_PARTS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "engine/state/bundle_format.h"

namespace kl {

// Disjoint row ranges claimed within [0, rows).
class RowCoverage {
 public:
  explicit RowCoverage(uint64_t rows = 0) : rows_(rows) {}

  // Claims [begin, end) (begin < end <= rows(), checked by the caller). Returns
  // false, claiming nothing, if any of those rows was claimed before.
  bool Claim(uint64_t begin, uint64_t end);
  // True if any row of [begin, end) is already claimed.
  bool Overlaps(uint64_t begin, uint64_t end) const;

  uint64_t rows() const { return rows_; }
  uint64_t covered() const { return covered_; }
  bool complete() const { return covered_ == rows_; }
  // "[b, e)" ranges not yet claimed, at most `max` of them, comma separated.
  std::string DescribeGaps(int max) const;

 private:
  uint64_t rows_;
  uint64_t covered_ = 0;
  std::map<uint64_t, uint64_t> ranges_;  // begin -> end; adjacent ranges merged
};

// One tensor of the bundle: a KDA layer's state or conv tail, or an MLA layer's latents.
struct PartSlot {
  PartKind kind = PartKind::kKdaState;
  uint32_t layer = 0;    // model layer index
  int64_t ordinal = 0;   // index into SequenceState::kda (KDA kinds) or ::mla
  PartShape shape;       // wire layout rows x row_elems
  DType dtype = DType::kF32;
  RowCoverage coverage;
  bool any_nonzero = false;  // assembler: some element != 0 (KDA zero-state check)
};

class PartTable {
 public:
  // `header.layer_kinds` must hold only kWireLayerKda / kWireLayerMla (ParseFrame checks).
  explicit PartTable(const BundleHeader& header);

  // The slot of (kind, layer), or nullptr if the bundle has no such part
  // (layer out of range, or a KDA kind for an MLA layer and vice versa).
  PartSlot* Find(PartKind kind, uint32_t layer);

  std::vector<PartSlot>& slots() { return slots_; }
  bool Complete() const;
  // Up to `max` incomplete parts, e.g. "kda_state layer 4 (rows [0, 32) of 32 missing)".
  std::string DescribeMissing(int max) const;
  // Payload bytes of the whole bundle at the header's dtypes.
  uint64_t ExpectedPayloadBytes() const;

 private:
  std::vector<PartSlot> slots_;
  std::vector<int64_t> first_slot_;  // per layer: index of its first slot
};

}  // namespace kl

#endif  // KL_ENGINE_STATE_BUNDLE_PARTS_H_
