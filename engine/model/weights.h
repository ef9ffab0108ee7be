// ModelWeights: every parameter of a Kimi-Linear model, uploaded to a backend,
// named after the checkpoint tensors of spec §2.
#ifndef KL_ENGINE_MODEL_WEIGHTS_H_
#define KL_ENGINE_MODEL_WEIGHTS_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/config/model_config.h"

namespace kl {

struct KdaLayerWeights {
  Weight q, k, v;                 // [KdaDim][D]
  Weight conv_q, conv_k, conv_v;  // [KdaDim][W]
  Weight a_log;                   // [1][H] fp32
  Weight dt_bias;                 // [1][KdaDim] fp32
  Weight f_a, f_b;                // [K][D], [KdaDim][K]
  Weight b;                       // [H][D]
  Weight g_a, g_b;                // [K][D], [KdaDim][K]
  Weight o_norm;                  // [1][K]
  Weight o;                       // [D][KdaDim]
};

struct MlaLayerWeights {
  Weight q;          // [H*(nope+rope)][D]
  Weight kv_a;       // [kv_lora+rope][D]
  Weight kv_a_norm;  // [1][kv_lora]
  Weight kv_b;       // [H*(nope+v)][kv_lora]
  Weight o;          // [D][H*v]
};

struct FfnWeights {
  bool moe = false;
  Weight gate, up, down;           // dense MLP, or the shared experts of a MoE layer
  Weight router;                   // [E][D]
  Weight correction_bias;          // [1][E] fp32
  std::vector<Weight> w1, w3, w2;  // routed experts
};

struct LayerWeights {
  Weight input_norm, post_norm;  // [1][D]
  KdaLayerWeights kda;           // when the layer is KDA
  MlaLayerWeights mla;           // when the layer is MLA
  FfnWeights ffn;
};

struct ModelWeights {
  Weight embed;       // [vocab][D]
  Weight final_norm;  // [1][D]
  Weight lm_head;     // [vocab][D] (the embedding when tied)
  std::vector<LayerWeights> layers;
};

// Supplies one checkpoint tensor by name as a host tensor viewed as [rows][cols]
// (the caller states the 2-D view it expects; the source checks the element count).
using TensorSource =
    std::function<absl::StatusOr<HostTensor>(const std::string& name, int64_t rows, int64_t cols)>;

// Uploads every tensor of `config` (spec §2 names) from `source` to `backend`.
absl::StatusOr<ModelWeights> LoadWeights(const ModelConfig& config, const TensorSource& source,
                                         Backend* backend);

}  // namespace kl

#endif  // KL_ENGINE_MODEL_WEIGHTS_H_
