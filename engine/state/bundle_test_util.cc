#include "engine/state/bundle_test_util.h"

#include <cstring>
#include <random>

#include "kernels/common/crc32c.h"

namespace kl {
namespace testing_util {

ModelConfig TinyStateConfig() {
  ModelConfig c;
  c.hidden_size = 256;
  c.num_hidden_layers = 4;
  c.vocab_size = 4096;
  c.kda_num_heads = 4;
  c.kda_head_dim = 64;
  c.short_conv_kernel_size = 4;
  c.num_attention_heads = 4;
  c.kv_lora_rank = 64;
  c.qk_nope_head_dim = 32;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 32;
  c.layer_kinds = {LayerKind::kKda, LayerKind::kKda, LayerKind::kKda, LayerKind::kMla};
  return c;
}

SequenceState RandomState(const ModelConfig& config, int64_t num_tokens, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  auto fill = [&](std::vector<float>& v) {
    for (float& x : v) {
      do x = dist(rng); while (x == 0.0f);
    }
  };
  SequenceState s = SequenceState::Zero(config);
  s.num_tokens = num_tokens;
  for (KdaLayerState& l : s.kda) {
    fill(l.recurrent);
    fill(l.conv_q);
    fill(l.conv_k);
    fill(l.conv_v);
  }
  for (MlaLayerCache& m : s.mla) {
    m.latent.resize(static_cast<size_t>(num_tokens) * config.MlaLatentDim());
    fill(m.latent);
  }
  return s;
}

std::string Reseal(std::string frame) {
  uint16_t header_bytes;
  std::memcpy(&header_bytes, frame.data() + 6, 2);
  const uint32_t crc = Crc32c(frame.data() + 12, header_bytes - 12, Crc32c(frame.data(), 8));
  std::memcpy(frame.data() + 8, &crc, 4);
  return frame;
}

std::string MakePartFrame(uint64_t bundle_id, PartKind kind, DType dtype, uint32_t layer,
                          uint64_t row_begin, uint64_t row_end, const std::string& payload) {
  PartRecord r;
  r.bundle_id = bundle_id;
  r.kind = kind;
  r.dtype = dtype;
  r.layer = layer;
  r.row_begin = row_begin;
  r.row_end = row_end;
  r.payload_bytes = payload.size();
  r.payload_crc = Crc32c(payload.data(), payload.size());
  std::string frame(kPartRecordBytes, '\0');
  WritePartRecordHeader(r, frame.data());
  return frame + payload;
}

}  // namespace testing_util
}  // namespace kl
