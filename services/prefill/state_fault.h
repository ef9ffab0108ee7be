// FAULT INJECTION, for tests only (off by default): damages the StateBundle a
// prefill worker pushes, so the fault suite can check end to end that the
// decode worker detects every kind of damaged transfer, never decodes it, and
// that the router retries or fails the request with a clear status
// (docs/reliability.md). Enabled only by kl-prefill's
// --fault_inject_state=KIND[,KIND...] flag; each push takes the next kind in
// turn (with --fault_inject_every=N only every Nth push is damaged).
//
// Kinds (what the sender does to the frame stream):
//   corrupt     flips one payload bit of the first part frame (CRC mismatch)
//   truncate    cuts the last 8 bytes off the first part frame
//   duplicate   sends the first part frame twice
//   reorder     sends the first part frame before the header
//   drop_final  closes the stream without the final record
//   cut         over a device link: stops sending after half the plan's
//               messages and aborts the link (a sender dying mid-transfer);
//               over gRPC: cancels the push after half the parts
// Over a device link, corrupt flips one bit of a message's data on its way,
// after the sender summed it (the first KDA message and the first MLA message
// in turn, so each kind's receiver-side sum is tested), and drop_final closes
// the stream without the checksums; truncate, duplicate and reorder are frame
// faults, so those pushes go over gRPC.
#ifndef KL_SERVICES_PREFILL_STATE_FAULT_H_
#define KL_SERVICES_PREFILL_STATE_FAULT_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kl {

enum class StateFault { kNone, kCorrupt, kTruncate, kDuplicate, kReorder, kDropFinal, kCut };

std::string_view StateFaultName(StateFault f);

// Picks the fault of each push in turn. Thread-safe.
class StateFaultInjector {
 public:
  // `spec`: comma-separated kinds (above); empty = never inject (null). `every` >= 1.
  static absl::StatusOr<std::shared_ptr<StateFaultInjector>> Parse(const std::string& spec,
                                                                   int64_t every);

  bool enabled() const { return !kinds_.empty(); }
  // The fault for the next push (kNone for the pushes in between).
  StateFault Next();

 private:
  std::vector<StateFault> kinds_;
  int64_t every_ = 1;
  std::atomic<int64_t> pushes_{0};
};

}  // namespace kl

#endif  // KL_SERVICES_PREFILL_STATE_FAULT_H_
