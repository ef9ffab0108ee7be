#include "engine/backend/backend.h"

#include "absl/strings/str_cat.h"
#include "kernels/common/status_macros.h"

namespace kl {

// Host-resident defaults: the SequenceState's vectors are the state.

absl::Status Backend::BindStates(const std::vector<SequenceState*>& states) {
  for (const SequenceState* s : states) {
    if (s->device != nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("state is held by another backend than ", Name()));
    }
  }
  return absl::OkStatus();
}

absl::Status Backend::KdaRefs(const std::vector<SequenceState*>& states, int64_t kda_index,
                              std::vector<KdaStateRef>* refs) {
  refs->resize(states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    KdaLayerState& st = states[i]->kda[kda_index];
    (*refs)[i] = {st.recurrent.data(), st.conv_q.data(), st.conv_k.data(), st.conv_v.data()};
  }
  return absl::OkStatus();
}

absl::Status Backend::MlaRefs(const std::vector<SequenceState*>& states, int64_t mla_index,
                              const std::vector<SeqSlice>& seqs, int64_t row_elems,
                              std::vector<MlaCacheRef>* refs) {
  refs->resize(states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    MlaLayerCache& mc = states[i]->mla[mla_index];
    mc.latent.resize((seqs[i].pos + seqs[i].rows) * row_elems);
    (*refs)[i].rows = mc.latent.data();
  }
  return absl::OkStatus();
}

absl::Status Backend::LinearMulti(const float* x, int64_t rows,
                                  const std::vector<const Weight*>& ws,
                                  const std::vector<float*>& ys) {
  if (ws.size() != ys.size()) return absl::InvalidArgumentError("LinearMulti: ws != ys");
  for (size_t i = 0; i < ws.size(); ++i) RETURN_IF_ERROR(Linear(x, rows, *ws[i], ys[i]));
  return absl::OkStatus();
}

absl::Status Backend::AddRmsNorm(const float* a, int64_t rows, int64_t dim, float* x,
                                 const Weight& w, double eps, float* y) {
  RETURN_IF_ERROR(Add(a, rows * dim, x));
  return RmsNorm(x, rows, dim, dim, w, eps, y);
}

absl::Status Backend::GatherRows(const float* src, int64_t dim, const std::vector<int64_t>& rows,
                                 float* dst) {
  // Through host memory: correct for any backend, fast only for host backends.
  std::vector<float> row(dim);
  for (size_t j = 0; j < rows.size(); ++j) {
    RETURN_IF_ERROR(Download(src + rows[j] * dim, dim, row.data()));
    RETURN_IF_ERROR(Upload(row.data(), dim, dst + static_cast<int64_t>(j) * dim));
  }
  return absl::OkStatus();
}

}  // namespace kl
