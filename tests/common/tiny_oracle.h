// The single-process engine on a freshly made tiny checkpoint: the greedy tokens
// the cluster tests (tests/integration, tests/fault) compare every stream with.
#ifndef KL_TESTS_COMMON_TINY_ORACLE_H_
#define KL_TESTS_COMMON_TINY_ORACLE_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/runtime/local_engine.h"

namespace kl::testing {

class TinyOracle {
 public:
  // Makes the tiny model (random weights from `seed`) in `model_dir` and opens it;
  // the worker processes of the test load the same folder.
  TinyOracle(const std::string& model_dir, uint64_t seed, int threads = 0,
             BackendSpec backend = {});
  // Greedy tokens of `prompt` (thread-safe).
  std::vector<int32_t> Greedy(const std::string& prompt, int64_t max_tokens, bool ignore_eos);
  // The same for a prompt given as token ids.
  std::vector<int32_t> GreedyIds(const std::vector<int32_t>& prompt, int64_t max_tokens,
                                 bool ignore_eos);

 private:
  std::mutex mu_;
  std::unique_ptr<LocalEngine> engine_;
};

}  // namespace kl::testing

#endif  // KL_TESTS_COMMON_TINY_ORACLE_H_
