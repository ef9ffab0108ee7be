// SequenceState: everything a sequence carries between forward calls on the CPU
// backend — per KDA layer the recurrent state and the three conv tails, per MLA
// layer the latent cache rows. This is what a StateBundle exports and imports.
//
// Layouts (the StateBundle layout tags name them; see state_bundle.h):
//   KDA recurrent state S: fp32 [H][K][V] row-major (S[h][d_k][d_v]), spec §3.6.
//   Conv tails q/k/v: fp32 [W-1][KdaDim] time-major, oldest first; the last W-1
//     *pre-conv* projections; zeros before the sequence start.
//   MLA latent rows: fp32 [T][kv_lora_rank + qk_rope_head_dim]; each row is the
//     RMS-normalised latent c (first kv_lora_rank) then k_pe (qk_rope_head_dim).
#ifndef KL_ENGINE_STATE_SEQUENCE_STATE_H_
#define KL_ENGINE_STATE_SEQUENCE_STATE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/config/model_config.h"

namespace kl {

struct KdaLayerState {
  std::vector<float> recurrent;  // [H][K][V]
  std::vector<float> conv_q;     // [W-1][KdaDim]
  std::vector<float> conv_k;     // [W-1][KdaDim]
  std::vector<float> conv_v;     // [W-1][KdaDim]
};

struct MlaLayerCache {
  std::vector<float> latent;  // [num_tokens][MlaLatentDim], appended per token
};

// Where a device backend keeps a sequence's state (its slot in the backend's
// state pools and its latent pages). Owned through SequenceState::device; the
// destructor gives the memory back to the backend, which must outlive it.
struct StateResidency {
  virtual ~StateResidency() = default;
  const void* owner = nullptr;  // the backend that holds the state
};

struct SequenceState {
  int64_t num_tokens = 0;            // tokens already consumed (prompt + generated)
  std::vector<KdaLayerState> kda;    // one per KDA layer, in layer order
  std::vector<MlaLayerCache> mla;    // one per MLA layer, in layer order
  // Set while the state lives in a device backend's memory (Backend::BindStates):
  // the device copy is then the state, and kda / mla above are only a snapshot
  // as of the adoption or the last Backend::SyncStateToHost. Null: the host
  // vectors are the state (the CPU backend). Copies of a SequenceState share it.
  std::shared_ptr<StateResidency> device;

  // A zero state of the right shapes for `config` (a fresh sequence).
  static SequenceState Zero(const ModelConfig& config);
};

inline SequenceState SequenceState::Zero(const ModelConfig& config) {
  SequenceState s;
  const int64_t nk = config.NumKdaLayers(), nm = config.NumMlaLayers();
  s.kda.resize(nk);
  for (auto& l : s.kda) {
    l.recurrent.assign(config.KdaStateElems(), 0.0f);
    l.conv_q.assign(config.ConvTailElems(), 0.0f);
    l.conv_k.assign(config.ConvTailElems(), 0.0f);
    l.conv_v.assign(config.ConvTailElems(), 0.0f);
  }
  s.mla.resize(nm);
  return s;
}

}  // namespace kl

#endif  // KL_ENGINE_STATE_SEQUENCE_STATE_H_
