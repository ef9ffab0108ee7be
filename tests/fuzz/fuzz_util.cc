#include "tests/fuzz/fuzz_util.h"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>

#include "engine/tokenizer/synthetic.h"

namespace kl {
namespace fuzz {
namespace {

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "fuzz fixture: %s\n", what.c_str());
  std::abort();
}

std::unique_ptr<Tokenizer> BuildTokenizer() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string templ = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") +
                      "/kl_fuzz_tokenizer_XXXXXX";
  if (mkdtemp(templ.data()) == nullptr) Die("mkdtemp failed for " + templ);
  absl::Status written = WriteSyntheticTokenizer(templ, kFuzzVocabSize, /*seed=*/7);
  if (!written.ok()) Die(written.ToString());
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::Load(templ);
  std::error_code ec;
  std::filesystem::remove_all(templ, ec);  // everything is in memory now
  if (!tok.ok()) Die(tok.status().ToString());
  return *std::move(tok);
}

}  // namespace

const Tokenizer& FuzzTokenizer() {
  static const Tokenizer* const tokenizer = BuildTokenizer().release();
  return *tokenizer;
}

ModelConfig FuzzBundleConfig() {
  ModelConfig c;
  c.hidden_size = 16;
  c.num_hidden_layers = 2;
  c.vocab_size = 64;
  c.intermediate_size = 32;
  c.kda_num_heads = 2;
  c.kda_head_dim = 4;
  c.short_conv_kernel_size = 3;
  c.num_attention_heads = 2;
  c.kv_lora_rank = 4;
  c.qk_nope_head_dim = 4;
  c.qk_rope_head_dim = 2;
  c.v_head_dim = 4;
  c.model_max_length = 64;
  c.layer_kinds = {LayerKind::kKda, LayerKind::kMla};
  return c;
}

}  // namespace fuzz
}  // namespace kl
