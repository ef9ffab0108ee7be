// Byte-level BPE over a tiktoken rank table: the merge step of
// tiktoken's byte_pair_encode, reproduced exactly (including tie-breaking).
//
// Within one pre-token piece, repeatedly merge the adjacent pair of parts whose
// concatenation has the lowest rank; among equal ranks the leftmost pair wins.
// Parts start as single bytes. Short pieces use tiktoken's O(n·m) scan; long
// pieces (pathological inputs such as a 25,000-character run) use a min-heap
// over a linked list, O(n log n), with the same (rank, position) order.
#ifndef KL_ENGINE_TOKENIZER_BPE_H_
#define KL_ENGINE_TOKENIZER_BPE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"

namespace kl {

// Token bytes -> rank. Looked up with string_view keys (heterogeneous).
using RankMap = absl::flat_hash_map<std::string, int32_t>;

// Pieces longer than this (bytes) take the heap path.
inline constexpr size_t kBpeHeapThresholdBytes = 128;

// Appends the ranks of `piece` to `out`. Like tiktoken, a piece that is itself
// a rank maps straight to it. Precondition: all 256 single bytes are ranks
// (Tokenizer verifies this at load time), so this cannot fail.
void BytePairEncode(absl::string_view piece, const RankMap& ranks,
                    std::vector<int32_t>* out);

// The two merge strategies, exposed so tests can check they agree.
void BytePairMergeScan(absl::string_view piece, const RankMap& ranks,
                       std::vector<int32_t>* out);
void BytePairMergeHeap(absl::string_view piece, const RankMap& ranks,
                       std::vector<int32_t>* out);

}  // namespace kl

#endif  // KL_ENGINE_TOKENIZER_BPE_H_
