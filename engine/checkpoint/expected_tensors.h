// The tensor inventory of a Kimi-Linear checkpoint for a given config (spec §2):
// names, shapes and storage dtype class. Shared by the loader (Checkpoint::Open
// checks every entry) and the random checkpoint maker (writes exactly these).
#ifndef KL_ENGINE_CHECKPOINT_EXPECTED_TENSORS_H_
#define KL_ENGINE_CHECKPOINT_EXPECTED_TENSORS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "engine/config/model_config.h"

namespace kl {

// What a tensor is; lets the maker pick an initialiser without parsing names.
enum class TensorKind : uint8_t {
  kEmbedding,  // model.embed_tokens.weight [V, D]
  kLmHead,     // lm_head.weight [V, D]
  kLinear,     // any nn.Linear weight [out, in]; fan_in = shape[1]
  kNorm,       // RMSNorm weights (decoder norms, final norm, o_norm, kv_a_layernorm)
  kConv,       // KDA depthwise conv weights [C, 1, W]
  kALog,       // KDA A_log [1, 1, H, 1] (fp32)
  kDtBias,     // KDA dt_bias [H*K] (fp32)
  kScoreBias,  // MoE gate.e_score_correction_bias [E] (fp32)
};

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;      // canonical shape, as in the official checkpoint
  std::vector<int64_t> alt_shape;  // also accepted by the loader (same memory layout); empty = none
  TensorKind kind = TensorKind::kLinear;
  // True for A_log, dt_bias and e_score_correction_bias, which the official
  // checkpoint stores in fp32 whatever the model dtype.
  bool fp32 = false;

  int64_t NumElements() const;
};

// Every tensor a checkpoint for `c` must contain, in module order (embedding,
// then per layer: input norm, mixer, post-attention norm, FFN; final norm,
// lm_head unless tied). Kimi48BConfig() yields 20,493 entries. `c` must be valid.
// Accepted alternates: q/k/v_conv1d [C, W] for [C, 1, W]; A_log [H] for [1, 1, H, 1].
std::vector<TensorSpec> ExpectedTensors(const ModelConfig& c);

}  // namespace kl

#endif  // KL_ENGINE_CHECKPOINT_EXPECTED_TENSORS_H_
