// Plan messages resolved to device spans, group placement and checksum folding
// (nccl_internal.h).
#include <string>
#include <vector>

#include "kernels/common/status_macros.h"
#include "services/transport/nccl_internal.h"

namespace kl::nccl_internal {

absl::Duration TransferBudget(const DeviceTransportOptions& o, int64_t bytes) {
  return o.transfer_timeout + absl::Seconds(static_cast<double>(bytes) / 1e9);
}

absl::Status KdaMessageSpans(Core& core, const SequenceState& s, int64_t layer, void** ptrs,
                             int64_t* bytes, int* n) {
  int64_t kda_index = 0;
  for (int64_t l = 0; l < layer; ++l) kda_index += core.config.IsKda(l) ? 1 : 0;
  std::vector<DeviceSpan> spans;
  RETURN_IF_ERROR(core.access->KdaSpans(s, kda_index, &spans));
  if (spans.size() > kMaxSpans) return absl::InternalError("KDA layer of more than 4 spans");
  *n = static_cast<int>(spans.size());
  for (int i = 0; i < *n; ++i) {
    ptrs[i] = spans[i].ptr;
    bytes[i] = spans[i].bytes;
  }
  return absl::OkStatus();
}

int64_t MlaIndex(const ModelConfig& c, int64_t layer) {
  int64_t i = 0;
  for (int64_t l = 0; l < layer; ++l) i += c.IsKda(l) ? 0 : 1;
  return i;
}

absl::StatusOr<cuda::PagedRows> Paged(Core& core, NcclLink& link, int64_t layer) {
  cuda::PagedRows p;
  auto pool = core.access->LatentPool(MlaIndex(core.config, layer));
  if (!pool.ok()) return pool.status();
  p.pool = *pool;
  p.pages = link.d_pages();
  p.page_rows = core.access->page_rows();
  p.row_bytes = core.access->latent_row_bytes();
  return p;
}

std::vector<uint64_t> FoldSums(const NcclLink& link, int64_t messages) {
  std::vector<uint64_t> out(messages);
  for (int64_t m = 0; m < messages; ++m) {
    uint64_t v = 0;
    for (int j = 0; j < kMaxSpans; ++j) v += link.h_sums()[m * kMaxSpans + j];
    out[m] = v;
  }
  return out;
}

GroupSpans PlaceGroup(NcclLink& link, char* base, std::vector<Piece>& group) {
  GroupSpans g;
  int64_t offset = 0;
  for (Piece& p : group) {
    if (!p.kda) {
      p.ptrs[0] = base + offset;
      offset += AlignStaging(p.bytes[0]);
    }
    int64_t word = 0;  // the message's spans number their words on
    for (int j = 0; j < p.n; ++j) {
      g.ptrs.push_back(p.ptrs[j]);
      g.bytes.push_back(p.bytes[j]);
      // An MLA message's one span is summed by the pack / scatter pass itself.
      if (p.kda) {
        g.sums.push_back({p.ptrs[j], p.bytes[j], link.d_sums() + p.index * kMaxSpans + j, word});
      }
      word += (p.bytes[j] + 7) / 8;
    }
  }
  return g;
}

absl::StatusOr<Piece> Resolve(Core& core, NcclLink& link, const SequenceState& s,
                              const v1::DeviceMessage& m, int64_t index) {
  Piece p;
  p.index = index;
  p.kda = m.kda();
  if (m.kda()) {
    RETURN_IF_ERROR(KdaMessageSpans(core, s, m.layer(), p.ptrs, p.bytes, &p.n));
    int64_t total = 0;
    for (int j = 0; j < p.n; ++j) total += p.bytes[j];
    if (total != m.bytes()) return absl::InternalError("KDA spans disagree with the plan");
  } else {
    auto paged = Paged(core, link, m.layer());
    if (!paged.ok()) return paged.status();
    p.paged = *paged;
    p.row_begin = m.row_begin();
    p.row_end = m.row_end();
    p.ptrs[0] = link.staging();
    p.bytes[0] = m.bytes();
    p.n = 1;
  }
  return p;
}

}  // namespace kl::nccl_internal
