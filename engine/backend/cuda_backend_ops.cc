// CudaBackend: the model ops (dense, KDA, MLA, MoE) on the kernels of
// //kernels/cuda and cuBLAS. Memory, graphs and states: cuda_backend.cc.
#include "engine/backend/cuda_backend.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/backend/cuda_backend_impl.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kda_chunk.h"
#include "kernels/cuda/kda_decode.h"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/sampling.h"

namespace kl {

// ---------------------------------------------------------------- dense ops

absl::Status CudaBackend::LinearLd(const float* x, int64_t ldx, int64_t rows, const Weight& w,
                                   float* y, int64_t ldy) {
  ScratchScope scope(this);
  if (rows < 0 || ldx < w.cols || ldy < w.rows) return absl::InvalidArgumentError("Linear: shape");
  if (rows == 0 || w.rows == 0) return absl::OkStatus();
  Impl& m = *impl_;
  const float one = 1.0f, zero = 0.0f;
  // Row-major y = x·wᵀ is column-major yᵀ = w_cmᵀ · x_cm with w_cm = w viewed [in][out].
  if (w.dtype == DType::kF32) {
    KL_CUBLAS_LAUNCH(cublasSgemm(m.cublas, CUBLAS_OP_T, CUBLAS_OP_N, w.rows, rows, w.cols, &one,
                                 static_cast<const float*>(w.data), w.cols, x, ldx, &zero, y, ldy));
    return absl::OkStatus();
  }
  if (w.dtype != DType::kBF16) return absl::InvalidArgumentError("Linear: weight dtype");
  if (cuda::SkinnyGemvSupported(x, ldx, rows, w.data, w.cols)) {  // decode-sized batches
    KL_LAUNCH(cuda::SkinnyGemvBf16(x, ldx, rows, w.data, w.rows, w.cols, y, ldy, m.stream));
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(void* xb, Scratch(rows * ldx * 2));
  KL_LAUNCH(cuda::F32ToBf16(x, rows * ldx, xb, m.stream));
  KL_CUBLAS_LAUNCH(cublasGemmEx(m.cublas, CUBLAS_OP_T, CUBLAS_OP_N, w.rows, rows, w.cols, &one,
                                w.data, CUDA_R_16BF, w.cols, xb, CUDA_R_16BF, ldx, &zero, y,
                                CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status CudaBackend::Linear(const float* x, int64_t rows, const Weight& w, float* y) {
  return LinearLd(x, w.cols, rows, w, y, w.rows);
}

absl::Status CudaBackend::LinearMulti(const float* x, int64_t rows,
                                      const std::vector<const Weight*>& ws,
                                      const std::vector<float*>& ys) {
  if (ws.size() != ys.size() || ws.empty()) {
    return absl::InvalidArgumentError("LinearMulti: ws != ys");
  }
  // Decode-sized batches over bf16 weights of one input width: one launch.
  bool fused = ws.size() <= static_cast<size_t>(cuda::kMaxGemvSegments);
  std::vector<cuda::GemvSegment> segs;
  for (size_t i = 0; fused && i < ws.size(); ++i) {
    const Weight& w = *ws[i];
    fused = w.dtype == DType::kBF16 && w.cols == ws[0]->cols && w.rows > 0 &&
            cuda::SkinnyGemvSupported(x, w.cols, rows, w.data, w.cols);
    segs.push_back({w.data, w.rows, ys[i], w.rows});
  }
  if (!fused) return Backend::LinearMulti(x, rows, ws, ys);
  KL_LAUNCH(cuda::SkinnyGemvMultiBf16(x, ws[0]->cols, rows, segs.data(),
                                      static_cast<int>(segs.size()), ws[0]->cols, impl_->stream));
  return absl::OkStatus();
}

namespace {

// A norm's weight: `dim` fp32 values.
absl::Status CheckNormWeight(const Weight& w, int64_t dim, const char* op) {
  if (w.rows * w.cols != dim || w.dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": weight has ", w.rows * w.cols, " elements, expected ", dim, " fp32"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaBackend::RmsNorm(const float* x, int64_t rows, int64_t dim, int64_t stride,
                                  const Weight& w, double eps, float* y) {
  RETURN_IF_ERROR(CheckNormWeight(w, dim, "RmsNorm"));
  KL_LAUNCH(cuda::RmsNormRows(x, rows, dim, stride, static_cast<const float*>(w.data),
                              static_cast<float>(eps), y, impl_->stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Embedding(const int32_t* ids, int64_t n, const Weight& table, float* y) {
  ScratchScope scope(this);
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= table.rows) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", ids[i], " out of range [0, ", table.rows, ")"));
    }
  }
  ASSIGN_OR_RETURN(void* d_ids, Stage(ids, n * sizeof(int32_t)));
  KL_LAUNCH(cuda::EmbeddingGather(static_cast<const int32_t*>(d_ids), n, table.data, table.dtype,
                                  table.rows, table.cols, y, impl_->stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::GatherRows(const float* src, int64_t dim,
                                     const std::vector<int64_t>& rows, float* dst) {
  ScratchScope scope(this);
  if (rows.empty()) return absl::OkStatus();
  ASSIGN_OR_RETURN(void* d_rows, Stage(rows.data(), rows.size() * sizeof(int64_t)));
  KL_LAUNCH(cuda::GatherRowsF32(src, dim, dim, static_cast<const int64_t*>(d_rows),
                                static_cast<int64_t>(rows.size()), dst, impl_->stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Add(const float* x, int64_t n, float* y) {
  KL_LAUNCH(cuda::AddInPlace(x, n, y, impl_->stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::AddRmsNorm(const float* a, int64_t rows, int64_t dim, float* x,
                                     const Weight& w, double eps, float* y) {
  RETURN_IF_ERROR(CheckNormWeight(w, dim, "AddRmsNorm"));
  KL_LAUNCH(cuda::AddRmsNormRows(a, x, rows, dim, static_cast<const float*>(w.data),
                                 static_cast<float>(eps), y, impl_->stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::SwiGlu(const float* gate, const float* up, int64_t rows, int64_t inter,
                                 float* out) {
  KL_LAUNCH(cuda::SwiGluElementwise(gate, up, rows * inter, out, impl_->stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::GatedRmsNorm(const float* o, const float* z, int64_t rows, int64_t heads,
                                       int64_t dim, const Weight& w, double eps, float* y) {
  if (w.rows * w.cols != dim || w.dtype != DType::kF32) {
    return absl::InvalidArgumentError("GatedRmsNorm: weight shape");
  }
  KL_LAUNCH(cuda::GatedRmsNormRows(o, z, rows, heads, dim, static_cast<const float*>(w.data),
                                   static_cast<float>(eps), y, impl_->stream));
  return absl::OkStatus();
}

// ---------------------------------------------------------------- KDA

absl::Status CudaBackend::KdaMix(float* q, float* k, float* v, float* f, float* b,
                                 const std::vector<SeqSlice>& seqs,
                                 const std::vector<KdaStateRef>& states, const KdaOpWeights& w,
                                 int64_t heads, int64_t head_dim, int64_t conv_width, int64_t,
                                 float* o) {
  ScratchScope scope(this);
  Impl& m = *impl_;
  if (seqs.size() != states.size()) return absl::InvalidArgumentError("KdaMix: seqs != states");
  const int64_t N = static_cast<int64_t>(seqs.size()), dim = heads * head_dim;
  std::vector<int64_t> cu(N + 1, 0);
  std::vector<int32_t> slots(N);
  int64_t max_rows = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (seqs[i].row_begin != cu[i]) {
      return absl::InvalidArgumentError("KdaMix: sequences must be packed contiguously in order");
    }
    if (states[i].slot < 0 || states[i].recurrent != states[0].recurrent) {
      return absl::InvalidArgumentError("KdaMix: states must be slots of one layer's pool");
    }
    cu[i + 1] = cu[i] + seqs[i].rows;
    slots[i] = states[i].slot;
    max_rows = std::max(max_rows, seqs[i].rows);
  }
  const int64_t T = cu[N];
  if (N == 0 || T == 0) return absl::OkStatus();
  ASSIGN_OR_RETURN(void* d_cu, Stage(cu.data(), cu.size() * sizeof(int64_t)));
  ASSIGN_OR_RETURN(void* d_slots, Stage(slots.data(), slots.size() * sizeof(int32_t)));

  // Short conv + SiLU with the slot tails, into scratch (the conv reads earlier rows).
  float* conv_in[3] = {q, k, v};
  float* tails[3] = {states[0].conv_q, states[0].conv_k, states[0].conv_v};
  const Weight* conv_w[3] = {w.conv_q, w.conv_k, w.conv_v};
  float* conv_out[3];
  cuda::ShortConvVarlenParams convs[3];
  for (int j = 0; j < 3; ++j) {
    if (conv_w[j]->dtype != DType::kF32) return absl::InvalidArgumentError("conv weight dtype");
    ASSIGN_OR_RETURN(void* out, Scratch(T * dim * sizeof(float)));
    conv_out[j] = static_cast<float*>(out);
    cuda::ShortConvVarlenParams& p = convs[j];
    p.num_seqs = N;
    p.num_tokens = T;
    p.channels = dim;
    p.width = conv_width;
    p.num_slots = options_.max_seqs;
    p.x = conv_in[j];
    p.w = static_cast<const float*>(conv_w[j]->data);
    p.cu_seqlens = static_cast<const int64_t*>(d_cu);
    p.slots = static_cast<const int32_t*>(d_slots);
    p.tail_pool = tails[j];
    p.out = conv_out[j];
    p.one_token_each = max_rows == 1 && T == N;  // every sequence has exactly one row
  }
  KL_LAUNCH(cuda::ShortConvVarlenMulti(convs, 3, m.stream));
  const float* a_log = static_cast<const float*>(w.a_log->data);
  const float* dt_bias = static_cast<const float*>(w.dt_bias->data);
  const bool small_head = head_dim == 64 || head_dim == 128;
  // The decode and chunk launchers take the same fields (kda_decode.h, kda_chunk.h).
  auto fill = [&](auto& p) {
    p.num_seqs = N;
    p.num_tokens = T;
    p.num_heads = heads;
    p.head_k = head_dim;
    p.head_v = head_dim;
    p.num_slots = options_.max_seqs;
    p.act = DType::kF32;
    p.q = conv_out[0];
    p.k = conv_out[1];
    p.v = conv_out[2];
    p.f = f;
    p.b = b;
    p.a_log = a_log;
    p.dt_bias = dt_bias;
    p.cu_seqlens = static_cast<const int64_t*>(d_cu);
    p.slots = static_cast<const int32_t*>(d_slots);
    p.state_pool = states[0].recurrent;
    p.o = o;
  };
  if (max_rows <= options_.kda_recurrent_max_tokens && small_head) {
    cuda::KdaDecodeParams p;
    fill(p);
    KL_LAUNCH(cuda::KdaRecurrentDecode(p, m.stream));
    return absl::OkStatus();
  }
  cuda::KdaChunkParams p;
  fill(p);
  p.algo = cuda::KdaChunkAlgo::kExact;
  void* o_bf16 = nullptr;
  if (options_.kda_tensor_cores && head_dim == 128) {
    // bf16 operands for the tensor-core chunk kernels; fp32 state across chunks.
    void* bf[5];
    const float* src[5] = {conv_out[0], conv_out[1], conv_out[2], f, b};
    const int64_t n[5] = {T * dim, T * dim, T * dim, T * dim, T * heads};
    for (int j = 0; j < 5; ++j) {
      ASSIGN_OR_RETURN(bf[j], Scratch(n[j] * 2));
      KL_LAUNCH(cuda::F32ToBf16(src[j], n[j], bf[j], m.stream));
    }
    ASSIGN_OR_RETURN(o_bf16, Scratch(T * dim * 2));
    p.act = DType::kBF16;
    p.algo = cuda::KdaChunkAlgo::kTensorCore;
    p.allow_concurrent = options_.kda_streamed_prefill;
    p.q = bf[0];
    p.k = bf[1];
    p.v = bf[2];
    p.f = bf[3];
    p.b = bf[4];
    p.o = o_bf16;
  }
  const size_t ws_bytes = cuda::KdaChunkWorkspaceBytes(p);
  void* ws = nullptr;
  if (ws_bytes > 0) {
    ASSIGN_OR_RETURN(ws, Scratch(static_cast<int64_t>(ws_bytes)));
  }
  KL_LAUNCH(cuda::KdaChunkPrefill(p, ws, ws_bytes, m.stream));
  if (o_bf16 != nullptr) KL_LAUNCH(cuda::Bf16ToF32(o_bf16, T * dim, o, m.stream));
  return absl::OkStatus();
}

// ---------------------------------------------------------------- MLA

absl::Status CudaBackend::MlaAttention(const float* q, const float* latent,
                                       const std::vector<SeqSlice>& seqs,
                                       const std::vector<MlaCacheRef>& caches, const MlaDims& d,
                                       const Weight& kv_b, float* out) {
  ScratchScope scope(this);
  Impl& m = *impl_;
  if (seqs.size() != caches.size()) return absl::InvalidArgumentError("MlaAttention: size");
  const int64_t N = static_cast<int64_t>(seqs.size());
  const int64_t H = d.heads, lora = d.kv_lora_rank, rope = d.qk_rope, lat = lora + rope;
  const int64_t qh = d.qk_nope + rope, kvh = d.qk_nope + d.v_head;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(qh)));
  std::vector<int64_t> cu(N + 1, 0), kv_cu(N + 1, 0);
  std::vector<int32_t> pos(N), lens(N);
  int64_t max_rows = 0, max_len = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (seqs[i].row_begin != cu[i] || caches[i].slot < 0 || caches[i].rows != caches[0].rows) {
      return absl::InvalidArgumentError("MlaAttention: bad sequence layout or cache refs");
    }
    cu[i + 1] = cu[i] + seqs[i].rows;
    pos[i] = static_cast<int32_t>(seqs[i].pos);
    lens[i] = static_cast<int32_t>(seqs[i].pos + seqs[i].rows);
    kv_cu[i + 1] = kv_cu[i] + (seqs[i].rows > 0 ? lens[i] : 0);
    max_rows = std::max(max_rows, seqs[i].rows);
    max_len = std::max<int64_t>(max_len, lens[i]);
  }
  const int64_t T = cu[N];
  if (T == 0) return absl::OkStatus();
  // One block-table view per batch: rows of the slots' table, in batch order.
  std::vector<int32_t> slot_list(N);
  for (int64_t i = 0; i < N; ++i) slot_list[i] = caches[i].slot;
  ASSIGN_OR_RETURN(const int32_t* d_table, StageBlockTable(slot_list));
  ASSIGN_OR_RETURN(void* d_cu, Stage(cu.data(), cu.size() * sizeof(int64_t)));
  ASSIGN_OR_RETURN(void* d_pos, Stage(pos.data(), pos.size() * sizeof(int32_t)));
  const cuda::MlaPagedCache cache =
      m.LatentCache(caches[0].rows, options_.latent_dtype, options_.page_rows, lora, rope, d_table);
  {
    cuda::MlaCacheWriteParams p;
    p.num_seqs = N;
    p.num_tokens = T;
    p.cache = cache;
    p.rows = latent;
    p.cu_seqlens = static_cast<const int64_t*>(d_cu);
    p.start_pos = static_cast<const int32_t*>(d_pos);
    KL_LAUNCH(cuda::MlaCacheWrite(p, m.stream));
  }
  ASSIGN_OR_RETURN(const float* kvb, F32Copy(kv_b));
  const float one = 1.0f, zero = 0.0f;
  if (max_rows == 1) {
    // Decode (absorbed form): one new row per sequence (empty ones get zeros).
    ASSIGN_OR_RETURN(void* d_lens, Stage(lens.data(), lens.size() * sizeof(int32_t)));
    // Rows of the packed batch are the non-empty sequences in order; the kernel
    // takes one row per sequence, so scatter q (and gather out) when some are empty.
    std::vector<int64_t> row_of(N, -1);
    for (int64_t i = 0; i < N; ++i) {
      if (seqs[i].rows == 1) row_of[i] = seqs[i].row_begin;
    }
    ASSIGN_OR_RETURN(void* qcat_v, Scratch(N * H * lat * sizeof(float)));
    float* qcat = static_cast<float*>(qcat_v);
    KL_CUDA_LAUNCH(cudaMemsetAsync(qcat, 0, N * H * lat * sizeof(float), m.stream));
    const bool dense = T == N;
    if (!dense) {
      // Rare (a decode batch with idle members): pad q to N rows and zero the lens.
      std::vector<int64_t> idx;
      for (int64_t i = 0; i < N; ++i) idx.push_back(row_of[i] < 0 ? 0 : row_of[i]);
      ASSIGN_OR_RETURN(void* qp, Scratch(N * H * qh * sizeof(float)));
      RETURN_IF_ERROR(GatherRows(q, H * qh, idx, static_cast<float*>(qp)));
      q = static_cast<const float*>(qp);
      for (int64_t i = 0; i < N; ++i) {
        if (row_of[i] < 0) lens[i] = 0;
      }
      ASSIGN_OR_RETURN(d_lens, Stage(lens.data(), lens.size() * sizeof(int32_t)));
    }
    // q̂[n][h] = W_UK[h]ᵀ q_nope[n][h] (one strided-batched GEMM over heads).
    KL_CUBLAS_LAUNCH(cublasSgemmStridedBatched(m.cublas, CUBLAS_OP_N, CUBLAS_OP_N, lora, N,
                                               d.qk_nope, &one, kvb, lora, kvh * lora, q, H * qh,
                                               qh, &zero, qcat, H * lat, lat, H));
    KL_LAUNCH(cuda::MlaCopyQPe(q, N, H, d.qk_nope, rope, lora, qcat, m.stream));
    cuda::MlaDecodeParams p;
    p.num_seqs = N;
    p.num_heads = H;
    p.cache = cache;
    p.q = qcat;
    p.seq_lens = static_cast<const int32_t*>(d_lens);
    ASSIGN_OR_RETURN(void* obar_v, Scratch(N * H * lora * sizeof(float)));
    float* obar = static_cast<float*>(obar_v);
    p.out = obar;
    p.scale = scale;
    p.max_seq_len_hint = m.context_hint > 0 ? m.context_hint : max_len;
    const size_t ws_bytes = cuda::MlaDecodeWorkspaceBytes(p);
    void* ws = nullptr;
    if (ws_bytes > 0) {
      ASSIGN_OR_RETURN(ws, Scratch(static_cast<int64_t>(ws_bytes)));
    }
    KL_LAUNCH(cuda::MlaDecodeAttention(p, ws, ws_bytes, m.stream));
    // o[n][h] = W_UV[h] ō[n][h].
    float* o_full = out;
    if (!dense) {
      ASSIGN_OR_RETURN(void* of, Scratch(N * H * d.v_head * sizeof(float)));
      o_full = static_cast<float*>(of);
    }
    KL_CUBLAS_LAUNCH(cublasSgemmStridedBatched(
        m.cublas, CUBLAS_OP_T, CUBLAS_OP_N, d.v_head, N, lora, &one, kvb + d.qk_nope * lora, lora,
        kvh * lora, obar, H * lora, lora, &zero, o_full, H * d.v_head, d.v_head, H));
    if (!dense) {
      std::vector<int64_t> idx;
      for (int64_t i = 0; i < N; ++i) {
        if (row_of[i] >= 0) idx.push_back(i);
      }
      RETURN_IF_ERROR(GatherRows(o_full, H * d.v_head, idx, out));
    }
    return absl::OkStatus();
  }
  // Prefill (naive form): every sequence's whole context (prefix + new rows) from
  // the cache, expanded through kv_b; causal attention of the new rows.
  const int64_t L = kv_cu[N];
  ASSIGN_OR_RETURN(void* d_kv_cu, Stage(kv_cu.data(), kv_cu.size() * sizeof(int64_t)));
  ASSIGN_OR_RETURN(void* ctx_v, Scratch(L * lat * sizeof(float)));
  float* ctx = static_cast<float*>(ctx_v);
  {
    cuda::MlaCacheGatherParams p;
    p.num_seqs = N;
    p.num_rows = L;
    p.cache = cache;
    p.kv_cu_seqlens = static_cast<const int64_t*>(d_kv_cu);
    p.out = ctx;
    KL_LAUNCH(cuda::MlaCacheGather(p, m.stream));
  }
  ASSIGN_OR_RETURN(void* kv_v, Scratch(L * H * kvh * sizeof(float)));
  float* kv = static_cast<float*>(kv_v);
  const Weight kvb32{DType::kF32, const_cast<float*>(kvb), kv_b.rows, kv_b.cols};
  RETURN_IF_ERROR(LinearLd(ctx, lat, L, kvb32, kv, H * kvh));
  ASSIGN_OR_RETURN(void* k_v, Scratch(L * H * qh * sizeof(float)));
  ASSIGN_OR_RETURN(void* v_v, Scratch(L * H * d.v_head * sizeof(float)));
  KL_LAUNCH(cuda::MlaBuildKv(kv, ctx, L, H, d.qk_nope, d.v_head, lora, rope,
                             static_cast<float*>(k_v), static_cast<float*>(v_v), m.stream));
  cuda::MlaPrefillParams p;
  p.num_seqs = N;
  p.num_q = T;
  p.num_heads = H;
  p.qk_dim = qh;
  p.v_dim = d.v_head;
  p.q = q;
  p.k = static_cast<const float*>(k_v);
  p.v = static_cast<const float*>(v_v);
  p.q_cu_seqlens = static_cast<const int64_t*>(d_cu);
  p.kv_cu_seqlens = static_cast<const int64_t*>(d_kv_cu);
  p.out = out;
  p.scale = scale;
  if (options_.mla_tensor_cores && cuda::MlaPrefillUsesTensorCores(p)) {
    KL_LAUNCH(cuda::MlaPrefillAttentionBf16(p, m.stream));
  } else {
    KL_LAUNCH(cuda::MlaPrefillAttention(p, m.stream));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------- MoE

absl::Status CudaBackend::Moe(const float* x, int64_t rows, int64_t dim, const MoeParams& p,
                              const MoeOpWeights& w, float* y) {
  ScratchScope scope(this);
  Impl& m = *impl_;
  const int64_t E = p.num_experts, K = p.top_k;
  if (rows == 0) return absl::OkStatus();
  if (static_cast<int64_t>(w.w1->size()) != E || static_cast<int64_t>(w.w2->size()) != E ||
      static_cast<int64_t>(w.w3->size()) != E || E < 1) {
    return absl::InvalidArgumentError("Moe: expert count");
  }
  const DType wd = (*w.w1)[0].dtype;
  // Per-expert pointer tables, built once per layer (keyed by the layer's w1 list).
  auto it = m.expert_tables.find(w.w1);
  if (it == m.expert_tables.end()) {
    std::array<void*, 3> t{};
    const std::vector<Weight>* lists[3] = {w.w1, w.w3, w.w2};
    for (int j = 0; j < 3; ++j) {
      std::vector<const void*> ptrs(E);
      for (int64_t e = 0; e < E; ++e) {
        if ((*lists[j])[e].dtype != wd) return absl::InvalidArgumentError("Moe: mixed dtypes");
        ptrs[e] = (*lists[j])[e].data;
      }
      KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&t[j], E * sizeof(void*)));
      KL_CUDA_RETURN_IF_ERROR(
          cudaMemcpy(t[j], ptrs.data(), E * sizeof(void*), cudaMemcpyHostToDevice));
    }
    it = m.expert_tables.emplace(w.w1, t).first;
  }
  ASSIGN_OR_RETURN(void* logits, Scratch(rows * E * sizeof(float)));
  RETURN_IF_ERROR(Linear(x, rows, *w.router, static_cast<float*>(logits)));
  ASSIGN_OR_RETURN(void* ids, Scratch(rows * K * sizeof(int32_t)));
  ASSIGN_OR_RETURN(void* wts, Scratch(rows * K * sizeof(float)));
  cuda::MoeRouteParams rp;
  rp.num_tokens = rows;
  rp.num_experts = E;
  rp.top_k = K;
  rp.renormalize = p.renormalize;
  rp.routed_scaling_factor = p.routed_scaling_factor;
  rp.biased_weights = p.biased_weights;
  rp.logits = static_cast<const float*>(logits);
  rp.correction_bias =
      w.correction_bias != nullptr ? static_cast<const float*>(w.correction_bias->data) : nullptr;
  rp.topk_ids = static_cast<int32_t*>(ids);
  rp.topk_weights = static_cast<float*>(wts);
  KL_LAUNCH(cuda::MoeRoute(rp, m.stream));
  cuda::MoeExpertsParams ep;
  ep.num_tokens = rows;
  ep.hidden = dim;
  ep.inter = (*w.w1)[0].rows;
  ep.num_experts = E;
  ep.top_k = K;
  ep.weight_dtype = wd;
  ep.x = x;
  ep.topk_ids = static_cast<const int32_t*>(ids);
  ep.topk_weights = static_cast<const float*>(wts);
  ep.w1 = reinterpret_cast<const void* const*>(it->second[0]);
  ep.w3 = reinterpret_cast<const void* const*>(it->second[1]);
  ep.w2 = reinterpret_cast<const void* const*>(it->second[2]);
  ep.out = y;
  ep.accumulate = p.accumulate;
  const size_t ws_bytes = cuda::MoeWorkspaceBytes(ep);
  void* ws = nullptr;
  if (ws_bytes > 0) {
    ASSIGN_OR_RETURN(ws, Scratch(static_cast<int64_t>(ws_bytes)));
  }
  KL_LAUNCH(cuda::MoeExperts(ep, ws, ws_bytes, m.stream));
  return absl::OkStatus();
}

// ---------------------------------------------------------------- sampling

absl::Status CudaBackend::SampleTokens(const float* logits, int64_t rows, int64_t vocab,
                                       absl::Span<const TokenSampling> params,
                                       int32_t* host_tokens) {
  if (static_cast<int64_t>(params.size()) != rows || rows < 0) {
    return absl::InvalidArgumentError("SampleTokens: one parameter set per row");
  }
  if (rows == 0) return absl::OkStatus();
  ScratchScope scope(this);
  Impl& m = *impl_;
  std::vector<cuda::SampleRowParams> p(rows);
  for (int64_t r = 0; r < rows; ++r) {
    p[r].temperature = params[r].temperature;
    p[r].top_p = params[r].top_p;
    p[r].top_k = params[r].top_k;
    p[r].seed = params[r].seed;
    p[r].draw_index = params[r].draw_index;
  }
  ASSIGN_OR_RETURN(void* d_params, Stage(p.data(), rows * sizeof(cuda::SampleRowParams)));
  ASSIGN_OR_RETURN(void* d_tokens, Scratch(rows * sizeof(int32_t)));
  KL_LAUNCH(cuda::SampleTokens(logits, rows, vocab, vocab,
                               static_cast<const cuda::SampleRowParams*>(d_params),
                               static_cast<int32_t*>(d_tokens), m.stream));
  // 4-byte ids through the float download path (a byte copy).
  return Download(static_cast<const float*>(d_tokens), rows, reinterpret_cast<float*>(host_tokens));
}

}  // namespace kl
