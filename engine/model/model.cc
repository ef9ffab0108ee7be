#include "engine/model/model.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"

namespace kl {

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const ModelConfig& config,
                                                     const TensorSource& source, Backend* backend,
                                                     const ModelOptions& options) {
  RETURN_IF_ERROR(config.Validate());
  if (options.kda_chunk < 1) return absl::InvalidArgumentError("kda_chunk must be >= 1");
  std::unique_ptr<Model> m(new Model(config, options, backend));
  ASSIGN_OR_RETURN(m->weights_, LoadWeights(config, source, backend));
  return m;
}

absl::Status Model::Validate(absl::Span<ForwardItem> items) const {
  const auto& c = config_;
  for (size_t i = 0; i < items.size(); ++i) {
    const ForwardItem& it = items[i];
    if (it.state == nullptr) return absl::InvalidArgumentError(absl::StrCat("item ", i, ": no state"));
    const SequenceState& s = *it.state;
    if (s.device != nullptr) {
      // Device-resident: the backend made it to this config's shapes and checks
      // that it holds it (BindStates); the host vectors are only a snapshot.
    } else if (static_cast<int64_t>(s.kda.size()) != c.NumKdaLayers() ||
        static_cast<int64_t>(s.mla.size()) != c.NumMlaLayers()) {
      return absl::InvalidArgumentError(absl::StrCat("item ", i, ": state has ", s.kda.size(),
                                                     " KDA and ", s.mla.size(),
                                                     " MLA layers, model has ", c.NumKdaLayers(),
                                                     " and ", c.NumMlaLayers()));
    }
    for (const auto& l : s.kda) {
      if (s.device != nullptr) break;
      if (static_cast<int64_t>(l.recurrent.size()) != c.KdaStateElems() ||
          static_cast<int64_t>(l.conv_q.size()) != c.ConvTailElems() ||
          static_cast<int64_t>(l.conv_k.size()) != c.ConvTailElems() ||
          static_cast<int64_t>(l.conv_v.size()) != c.ConvTailElems()) {
        return absl::InvalidArgumentError(absl::StrCat("item ", i, ": KDA state of wrong size"));
      }
    }
    for (const auto& l : s.mla) {
      if (s.device != nullptr) break;
      if (static_cast<int64_t>(l.latent.size()) < s.num_tokens * c.MlaLatentDim()) {
        return absl::InvalidArgumentError(absl::StrCat("item ", i, ": MLA cache shorter than ",
                                                       s.num_tokens, " tokens"));
      }
    }
    for (int32_t t : it.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", t, " out of range [0, ", c.vocab_size, ")"));
      }
    }
    if (s.num_tokens + static_cast<int64_t>(it.tokens.size()) > c.model_max_length) {
      return absl::InvalidArgumentError(absl::StrCat("sequence would exceed model_max_length ",
                                                     c.model_max_length));
    }
  }
  return absl::OkStatus();
}

absl::Status Model::Forward(absl::Span<ForwardItem> items, ForwardOutput* out,
                            const LayerDoneCallback& on_layer_done) {
  RETURN_IF_ERROR(Validate(items));
  std::vector<SequenceState*> states(items.size());
  ForwardShape shape;
  shape.num_seqs = static_cast<int64_t>(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    states[i] = items[i].state;
    const int64_t n = static_cast<int64_t>(items[i].tokens.size());
    shape.num_tokens += n;
    shape.max_new_tokens = std::max(shape.max_new_tokens, n);
    shape.max_context = std::max(shape.max_context, items[i].state->num_tokens + n);
    if (n > 0) shape.logits_rows += items[i].all_logits ? n : 1;
  }
  // Sampling on the device: every item has tokens, wants only its last row's logits and
  // asks for it (ForwardItem::sample); then only the ids come back.
  shape.device_sampling = backend_->SamplesOnDevice() && !items.empty();
  for (size_t i = 0; i < items.size() && shape.device_sampling; ++i) {
    shape.device_sampling =
        items[i].sample != nullptr && !items[i].all_logits && !items[i].tokens.empty();
  }
  RETURN_IF_ERROR(backend_->BindStates(states));
  RETURN_IF_ERROR(backend_->BeginForward(shape));
  absl::Status st = ForwardBound(items, states, out, on_layer_done, shape.device_sampling);
  absl::Status end = backend_->EndForward(st);
  if (!st.ok()) return st;
  if (!end.ok()) return end;
  for (size_t i = 0; i < items.size(); ++i) items[i].state->num_tokens += items[i].tokens.size();
  return absl::OkStatus();
}

absl::Status Model::ForwardBound(absl::Span<ForwardItem> items,
                                 const std::vector<SequenceState*>& states, ForwardOutput* out,
                                 const LayerDoneCallback& on_layer_done, bool device_sampling) {
  const auto& c = config_;
  const int64_t D = c.hidden_size;
  // Pack the batch: rows of item i are [seqs[i].row_begin, + rows).
  std::vector<SeqSlice> seqs(items.size());
  std::vector<int32_t> ids;
  int64_t rows = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    seqs[i].row_begin = rows;
    seqs[i].rows = static_cast<int64_t>(items[i].tokens.size());
    seqs[i].pos = items[i].state->num_tokens;
    rows += seqs[i].rows;
    ids.insert(ids.end(), items[i].tokens.begin(), items[i].tokens.end());
  }
  out->logits.assign(items.size(), {});
  out->tokens.clear();
  if (rows == 0) return absl::OkStatus();

  Backend* be = backend_;
  ASSIGN_OR_RETURN(Buffer x, be->Alloc(rows * D));
  ASSIGN_OR_RETURN(Buffer h, be->Alloc(rows * D));
  ASSIGN_OR_RETURN(Buffer a, be->Alloc(rows * D));
  RETURN_IF_ERROR(be->Embedding(ids.data(), rows, weights_.embed, x.data()));
  int64_t kda_index = 0, mla_index = 0;
  // Each layer: h = norm(x); a = mixer(h); x += a; h = norm(x); a = ffn(h); x += a.
  // The residual adds run fused with the norm that follows them.
  if (c.num_hidden_layers > 0) {
    RETURN_IF_ERROR(be->RmsNorm(x.data(), rows, D, D, weights_.layers[0].input_norm,
                                c.rms_norm_eps, h.data()));
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = weights_.layers[l];
    if (c.IsKda(l)) {
      RETURN_IF_ERROR(KdaLayer(l, kda_index++, h.data(), rows, states, seqs, a.data()));
    } else {
      RETURN_IF_ERROR(MlaLayer(l, mla_index++, h.data(), rows, states, seqs, a.data()));
    }
    if (on_layer_done) {
      // Device-resident states: the listener reads this layer from host memory.
      const bool kda = c.IsKda(l);
      const int64_t index = (kda ? kda_index : mla_index) - 1;
      for (size_t i = 0; i < states.size(); ++i) {
        if (states[i]->device == nullptr || seqs[i].rows == 0) continue;
        if (!items[i].sync_layers_to_host) continue;
        RETURN_IF_ERROR(be->SyncLayerToHost(states[i], kda, index, seqs[i].pos,
                                            seqs[i].pos + seqs[i].rows));
      }
      on_layer_done(l);
    }
    RETURN_IF_ERROR(be->AddRmsNorm(a.data(), rows, D, x.data(), L.post_norm, c.rms_norm_eps,
                                   h.data()));
    RETURN_IF_ERROR(Ffn(l, h.data(), rows, a.data()));
    if (l + 1 < c.num_hidden_layers) {
      RETURN_IF_ERROR(be->AddRmsNorm(a.data(), rows, D, x.data(),
                                     weights_.layers[l + 1].input_norm, c.rms_norm_eps, h.data()));
    } else {
      RETURN_IF_ERROR(be->Add(a.data(), rows * D, x.data()));
    }
  }

  // Final norm + lm_head on the rows that need logits.
  std::vector<int64_t> want;  // packed row indices
  for (size_t i = 0; i < items.size(); ++i) {
    if (seqs[i].rows == 0) continue;
    if (items[i].all_logits) {
      for (int64_t r = 0; r < seqs[i].rows; ++r) want.push_back(seqs[i].row_begin + r);
    } else {
      want.push_back(seqs[i].row_begin + seqs[i].rows - 1);
    }
  }
  const int64_t nw = static_cast<int64_t>(want.size());
  ASSIGN_OR_RETURN(Buffer sel, be->Alloc(nw * D));
  ASSIGN_OR_RETURN(Buffer logits, be->Alloc(nw * c.vocab_size));
  RETURN_IF_ERROR(be->GatherRows(x.data(), D, want, sel.data()));
  RETURN_IF_ERROR(be->RmsNorm(sel.data(), nw, D, D, weights_.final_norm, c.rms_norm_eps,
                              sel.data()));
  RETURN_IF_ERROR(be->Linear(sel.data(), nw, weights_.lm_head, logits.data()));
  // Sampling on the device (decided in Forward: one row per item): only the ids come
  // back, into out->tokens (filled by EndForward).
  if (device_sampling) {
    std::vector<TokenSampling> params(items.size());
    for (size_t i = 0; i < items.size(); ++i) params[i] = *items[i].sample;
    out->tokens.assign(items.size(), -1);
    return be->SampleTokens(logits.data(), nw, c.vocab_size, params, out->tokens.data());
  }
  int64_t j = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    if (seqs[i].rows == 0) continue;
    const int64_t n = items[i].all_logits ? seqs[i].rows : 1;
    out->logits[i].resize(n * c.vocab_size);
    RETURN_IF_ERROR(be->Download(logits.data() + j * c.vocab_size, n * c.vocab_size,
                                 out->logits[i].data()));
    j += n;
  }
  return absl::OkStatus();
}

absl::Status Model::KdaLayer(int64_t layer, int64_t kda_index, const float* h, int64_t rows,
                             const std::vector<SequenceState*>& states,
                             const std::vector<SeqSlice>& seqs, float* out) {
  const auto& c = config_;
  const KdaLayerWeights& w = weights_.layers[layer].kda;
  const int64_t KD = c.KdaDim(), K = c.kda_head_dim, H = c.kda_num_heads;
  Backend* be = backend_;
  ASSIGN_OR_RETURN(Buffer q, be->Alloc(rows * KD));
  ASSIGN_OR_RETURN(Buffer k, be->Alloc(rows * KD));
  ASSIGN_OR_RETURN(Buffer v, be->Alloc(rows * KD));
  ASSIGN_OR_RETURN(Buffer f, be->Alloc(rows * KD));
  ASSIGN_OR_RETURN(Buffer z, be->Alloc(rows * KD));
  ASSIGN_OR_RETURN(Buffer low, be->Alloc(rows * K));
  ASSIGN_OR_RETURN(Buffer b, be->Alloc(rows * H));
  ASSIGN_OR_RETURN(Buffer o, be->Alloc(rows * KD));
  ASSIGN_OR_RETURN(Buffer low_g, be->Alloc(rows * K));
  // Every projection of h in one call (one launch on a GPU at decode sizes).
  RETURN_IF_ERROR(be->LinearMulti(h, rows, {&w.q, &w.k, &w.v, &w.f_a, &w.b, &w.g_a},
                                  {q.data(), k.data(), v.data(), low.data(), b.data(),
                                   low_g.data()}));
  RETURN_IF_ERROR(be->Linear(low.data(), rows, w.f_b, f.data()));
  RETURN_IF_ERROR(be->Linear(low_g.data(), rows, w.g_b, z.data()));
  std::vector<KdaStateRef> refs;
  RETURN_IF_ERROR(be->KdaRefs(states, kda_index, &refs));
  const KdaOpWeights ow{&w.conv_q, &w.conv_k, &w.conv_v, &w.a_log, &w.dt_bias};
  RETURN_IF_ERROR(be->KdaMix(q.data(), k.data(), v.data(), f.data(), b.data(), seqs, refs, ow, H,
                             K, c.short_conv_kernel_size, options_.kda_chunk, o.data()));
  RETURN_IF_ERROR(be->GatedRmsNorm(o.data(), z.data(), rows, H, K, w.o_norm, c.rms_norm_eps,
                                   o.data()));
  return be->Linear(o.data(), rows, w.o, out);
}

absl::Status Model::MlaLayer(int64_t layer, int64_t mla_index, const float* h, int64_t rows,
                             const std::vector<SequenceState*>& states,
                             const std::vector<SeqSlice>& seqs, float* out) {
  const auto& c = config_;
  const MlaLayerWeights& w = weights_.layers[layer].mla;
  const int64_t H = c.num_attention_heads, lat = c.MlaLatentDim();
  Backend* be = backend_;
  ASSIGN_OR_RETURN(Buffer q, be->Alloc(rows * H * c.MlaQHeadDim()));
  ASSIGN_OR_RETURN(Buffer kv, be->Alloc(rows * lat));
  ASSIGN_OR_RETURN(Buffer attn, be->Alloc(rows * H * c.v_head_dim));
  RETURN_IF_ERROR(be->LinearMulti(h, rows, {&w.q, &w.kv_a}, {q.data(), kv.data()}));
  // c = RMSNorm(c_raw) in place on the first kv_lora_rank columns of each row.
  RETURN_IF_ERROR(be->RmsNorm(kv.data(), rows, c.kv_lora_rank, lat, w.kv_a_norm,
                              c.mla_kv_norm_eps, kv.data()));
  std::vector<MlaCacheRef> caches;
  RETURN_IF_ERROR(be->MlaRefs(states, mla_index, seqs, lat, &caches));
  const MlaDims d{H, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim};
  RETURN_IF_ERROR(be->MlaAttention(q.data(), kv.data(), seqs, caches, d, w.kv_b, attn.data()));
  return be->Linear(attn.data(), rows, w.o, out);
}

absl::Status Model::Ffn(int64_t layer, const float* h, int64_t rows, float* out) {
  const auto& c = config_;
  const FfnWeights& w = weights_.layers[layer].ffn;
  const int64_t D = c.hidden_size;
  Backend* be = backend_;
  const bool has_dense = !w.gate.empty();
  if (has_dense) {
    const int64_t I = w.gate.rows;
    ASSIGN_OR_RETURN(Buffer g, be->Alloc(rows * I));
    ASSIGN_OR_RETURN(Buffer u, be->Alloc(rows * I));
    RETURN_IF_ERROR(be->LinearMulti(h, rows, {&w.gate, &w.up}, {g.data(), u.data()}));
    RETURN_IF_ERROR(be->SwiGlu(g.data(), u.data(), rows, I, g.data()));
    RETURN_IF_ERROR(be->Linear(g.data(), rows, w.down, out));
  }
  if (!w.moe) {
    if (!has_dense) return absl::InternalError(absl::StrCat("layer ", layer, " has no FFN"));
    return absl::OkStatus();
  }
  MoeParams p;
  p.num_experts = c.num_experts;
  p.top_k = c.num_experts_per_token;
  p.renormalize = c.moe_renormalize;
  p.routed_scaling_factor = c.routed_scaling_factor;
  p.biased_weights = options_.moe_convention == MoeWeightConvention::kBiased;
  const MoeOpWeights mw{&w.router, &w.correction_bias, &w.w1, &w.w3, &w.w2};
  p.accumulate = has_dense;  // onto the shared expert's output, no separate add
  return be->Moe(h, rows, D, p, mw, out);
}

}  // namespace kl
