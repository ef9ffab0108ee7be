// Byte-level BPE merges; see bpe.h.
#include "engine/tokenizer/bpe.h"

#include <limits>
#include <queue>
#include <utility>

namespace kl {
namespace {

constexpr int32_t kNoRank = std::numeric_limits<int32_t>::max();

inline int32_t RankOf(const RankMap& ranks, absl::string_view bytes) {
  const auto it = ranks.find(bytes);
  return it == ranks.end() ? kNoRank : it->second;
}

}  // namespace

void BytePairMergeScan(absl::string_view piece, const RankMap& ranks,
                       std::vector<int32_t>* out) {
  // parts[i].first: start of part i; parts[i].second: rank of the merge of
  // parts i and i+1 (kNoRank if none). Two sentinels end the list.
  const size_t n = piece.size();
  std::vector<std::pair<size_t, int32_t>> parts;
  parts.reserve(n + 1);
  for (size_t i = 0; i + 1 < n; ++i) {
    parts.emplace_back(i, RankOf(ranks, piece.substr(i, 2)));
  }
  parts.emplace_back(n - 1, kNoRank);
  parts.emplace_back(n, kNoRank);
  // Rank of merging parts i and i+1 once part i+1 has absorbed part i+2.
  auto merged_rank = [&](size_t i) {
    if (i + 3 >= parts.size()) return kNoRank;
    return RankOf(ranks,
                  piece.substr(parts[i].first, parts[i + 3].first - parts[i].first));
  };
  while (true) {
    int32_t best = kNoRank;
    size_t best_i = 0;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      if (parts[i].second < best) {
        best = parts[i].second;
        best_i = i;
      }
    }
    if (best == kNoRank) break;
    if (best_i > 0) parts[best_i - 1].second = merged_rank(best_i - 1);
    parts[best_i].second = merged_rank(best_i);
    parts.erase(parts.begin() + best_i + 1);
  }
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    out->push_back(RankOf(
        ranks, piece.substr(parts[i].first, parts[i + 1].first - parts[i].first)));
  }
}

void BytePairMergeHeap(absl::string_view piece, const RankMap& ranks,
                       std::vector<int32_t>* out) {
  // Doubly linked list of parts over byte positions: part p covers
  // [p, next[p]). A heap entry (rank, p, version) proposes merging p with its
  // successor; it is stale if p's version moved on since it was pushed.
  const int n = static_cast<int>(piece.size());
  std::vector<int> next(n), prev(n), version(n, 0);
  std::vector<bool> alive(n, true);
  for (int i = 0; i < n; ++i) {
    next[i] = i + 1;
    prev[i] = i - 1;
  }
  struct Entry {
    int32_t rank;
    int pos;
    int version;
    bool operator>(const Entry& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  auto propose = [&](int p) {
    ++version[p];
    if (next[p] >= n) return;
    const int32_t r = RankOf(ranks, piece.substr(p, next[next[p]] - p));
    if (r != kNoRank) heap.push({r, p, version[p]});
  };
  // Sentinel: next[n-1] == n, and next[n] is read for the last pair only when
  // next[p] < n, so extend `next` by one entry pointing past the end.
  next.push_back(n);
  for (int i = 0; i + 1 < n; ++i) propose(i);
  while (!heap.empty()) {
    const Entry e = heap.top();
    heap.pop();
    if (!alive[e.pos] || e.version != version[e.pos]) continue;
    const int p = e.pos;
    const int q = next[p];  // absorbed into p
    alive[q] = false;
    next[p] = next[q];
    if (next[p] < n) prev[next[p]] = p;
    propose(p);
    if (prev[p] >= 0) propose(prev[p]);
  }
  for (int p = 0; p < n; p = next[p]) {
    out->push_back(RankOf(ranks, piece.substr(p, next[p] - p)));
  }
}

void BytePairEncode(absl::string_view piece, const RankMap& ranks,
                    std::vector<int32_t>* out) {
  if (piece.empty()) return;
  const auto it = ranks.find(piece);
  if (it != ranks.end()) {
    out->push_back(it->second);
    return;
  }
  if (piece.size() <= kBpeHeapThresholdBytes) {
    BytePairMergeScan(piece, ranks, out);
  } else {
    BytePairMergeHeap(piece, ranks, out);
  }
}

}  // namespace kl
