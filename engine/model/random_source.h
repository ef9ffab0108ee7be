// A TensorSource of deterministic random weights for any config (benchmarks,
// tests, and configs too large to write to disk). Values depend only on the seed
// and the tensor name. Initialisation follows the checkpoint maker's scheme:
// linear weights N(0, 1/in), norms 1, A_log = log U(1,16), dt_bias 0.5·N(0,1).
#ifndef KL_ENGINE_MODEL_RANDOM_SOURCE_H_
#define KL_ENGINE_MODEL_RANDOM_SOURCE_H_

#include <cstdint>

#include "engine/model/weights.h"

namespace kl {

// The returned source keeps one buffer; each HostTensor it returns is valid until
// the source is called again (LoadWeights uploads before the next call).
TensorSource RandomTensorSource(uint64_t seed);

}  // namespace kl

#endif  // KL_ENGINE_MODEL_RANDOM_SOURCE_H_
