#include "tests/common/tiny_oracle.h"

#include "engine/runtime/generator.h"
#include "gtest/gtest.h"
#include "tools/make_checkpoint/maker.h"

namespace kl::testing {

TinyOracle::TinyOracle(const std::string& model_dir, uint64_t seed, int threads,
                       BackendSpec backend) {
  MakerOptions mo;
  mo.seed = seed;
  EXPECT_TRUE(MakeCheckpoint(TinyConfig(), model_dir, mo).ok());
  LocalEngineOptions o;
  o.model_dir = model_dir;
  o.threads = threads;
  o.backend = std::move(backend);
  engine_ = std::move(LocalEngine::Open(o).value());
}

std::vector<int32_t> TinyOracle::Greedy(const std::string& prompt, int64_t max_tokens,
                                        bool ignore_eos) {
  std::vector<int32_t> ids;
  {
    std::lock_guard<std::mutex> l(mu_);
    ids = engine_->tokenizer().Encode(prompt, /*allow_special=*/false);
  }
  return GreedyIds(ids, max_tokens, ignore_eos);
}

std::vector<int32_t> TinyOracle::GreedyIds(const std::vector<int32_t>& ids, int64_t max_tokens,
                                           bool ignore_eos) {
  std::lock_guard<std::mutex> l(mu_);
  SamplingParams p;
  p.temperature = 0;
  p.max_tokens = max_tokens;
  p.ignore_eos = ignore_eos;
  auto r = Generate(engine_->model(), engine_->tokenizer(), ids, p);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->tokens : std::vector<int32_t>{};
}

}  // namespace kl::testing
