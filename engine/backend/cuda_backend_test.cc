// The CUDA backend against the CPU oracle (needs a GPU; tagged "gpu", skips
// without a device): each op on fresh random inputs, then whole models —
// prefill logits, greedy decode tokens, mixed batches, and StateBundle hand-off
// between the GPU and CPU engines in both directions.
#include "engine/backend/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "engine/backend/cpu_backend.h"
#include "engine/config/model_config.h"
#include "engine/model/model.h"
#include "engine/model/random_source.h"
#include "engine/state/state_bundle.h"
#include "engine/sampling/sampler.h"
#include "gtest/gtest.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.h"

namespace kl {
namespace {

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device"

std::vector<float> Rand(int64_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(g);
  return v;
}

// max |a - b| / max(1, max |b|).
double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, scale = 1;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    diff = std::max(diff, std::fabs(double(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(double(b[i])));
  }
  return diff / scale;
}

// Runs one op on both backends on the same host inputs.
class OpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
    CudaBackendOptions o;
    o.max_seqs = 4;
    gpu_ = CudaBackend::Create(TinyConfig(), o).value();
  }
  Buffer Dev(const std::vector<float>& h) {
    Buffer b = gpu_->Alloc(h.size()).value();
    EXPECT_TRUE(gpu_->Upload(h.data(), h.size(), b.data()).ok());
    return b;
  }
  std::vector<float> Host(const Buffer& b) {
    std::vector<float> h(b.elems());
    EXPECT_TRUE(gpu_->Download(b.data(), b.elems(), h.data()).ok());
    return h;
  }
  Weight Up(Backend* be, const std::vector<float>& w, int64_t rows, int64_t cols,
            DType dtype = DType::kF32) {
    std::vector<uint16_t> bf;
    HostTensor t{DType::kF32, w.data(), rows, cols};
    if (dtype == DType::kBF16) {
      bf.resize(w.size());
      F32ToBf16(w.data(), bf.data(), w.size());
      t = HostTensor{DType::kBF16, bf.data(), rows, cols};
    }
    return be->UploadWeight(t).value();
  }
  CpuBackend cpu_;
  std::unique_ptr<CudaBackend> gpu_;
};

TEST_F(OpTest, LinearFp32IsExactAndBf16WithinTolerance) {
  const int64_t rows = 37, in = 192, out = 130;
  const auto x = Rand(rows * in, 1), w = Rand(out * in, 2, 0.1f);
  std::vector<float> ref(rows * out);
  ASSERT_TRUE(cpu_.Linear(x.data(), rows, Up(&cpu_, w, out, in), ref.data()).ok());
  Buffer dx = Dev(x), dy = gpu_->Alloc(rows * out).value();
  ASSERT_TRUE(gpu_->Linear(dx.data(), rows, Up(gpu_.get(), w, out, in), dy.data()).ok());
  EXPECT_LT(RelErr(Host(dy), ref), 1e-5);
  // bf16 weights: both operands rounded to bf16 (8 mantissa bits), fp32 accumulation.
  Weight wb = Up(gpu_.get(), w, out, in, DType::kBF16);
  EXPECT_EQ(wb.dtype, DType::kBF16);
  ASSERT_TRUE(gpu_->Linear(dx.data(), rows, wb, dy.data()).ok());
  EXPECT_LT(RelErr(Host(dy), ref), 2e-2);
  // Decode-sized batches (<= 8 rows) take the skinny GEMV: fp32 activations, only
  // the weights rounded to bf16.
  for (int64_t r : {1, 3, 8}) {
    std::vector<float> ref_r(r * out);
    ASSERT_TRUE(cpu_.Linear(x.data(), r, Up(&cpu_, w, out, in), ref_r.data()).ok());
    Buffer y = gpu_->Alloc(r * out).value();
    ASSERT_TRUE(gpu_->Linear(dx.data(), r, wb, y.data()).ok());
    EXPECT_LT(RelErr(Host(y), ref_r), 1e-2) << "rows " << r;
  }
}

// Decode-sized GEMVs of few output columns split K over several warps (ops.cu,
// GemvSplit): still within tolerance of the CPU, and a matrix gives the same bits
// alone or fused with a wide one (the split depends on its own shape only).
TEST_F(OpTest, SplitKGemvMatchesCpuAndIsGroupingInvariant) {
  const int64_t in = 2304;
  const std::vector<int64_t> outs = {40, 256, 3000};  // split 8, 8, 1
  const auto x = Rand(8 * in, 61);
  std::vector<std::vector<float>> wh;
  std::vector<Weight> ws;
  std::vector<const Weight*> wp;
  for (size_t i = 0; i < outs.size(); ++i) {
    wh.push_back(Rand(outs[i] * in, 62 + i, 0.05f));
    ws.push_back(Up(gpu_.get(), wh.back(), outs[i], in, DType::kBF16));
  }
  for (const Weight& w : ws) wp.push_back(&w);
  Buffer dx = Dev(x);
  for (int64_t rows : {int64_t{1}, int64_t{3}, int64_t{8}}) {
    std::vector<Buffer> fused;
    std::vector<float*> yp;
    for (int64_t n : outs) {
      fused.push_back(gpu_->Alloc(rows * n).value());
      yp.push_back(fused.back().data());
    }
    ASSERT_TRUE(gpu_->LinearMulti(dx.data(), rows, wp, yp).ok());
    for (size_t i = 0; i < outs.size(); ++i) {
      Buffer single = gpu_->Alloc(rows * outs[i]).value();
      ASSERT_TRUE(gpu_->Linear(dx.data(), rows, ws[i], single.data()).ok());
      EXPECT_EQ(Host(fused[i]), Host(single)) << "rows " << rows << " weight " << i;
      // CPU with the same bf16-rounded weights: only the summation order differs.
      std::vector<float> wr = wh[i];
      for (float& v : wr) v = Bf16ToF32(F32ToBf16(v));
      std::vector<float> ref(rows * outs[i]);
      ASSERT_TRUE(cpu_.Linear(x.data(), rows, Up(&cpu_, wr, outs[i], in), ref.data()).ok());
      EXPECT_LT(RelErr(Host(single), ref), 1e-5) << "rows " << rows << " weight " << i;
    }
  }
}

TEST_F(OpTest, LinearMultiMatchesSeparateLinears) {
  const int64_t in = 256;
  const std::vector<int64_t> outs = {96, 8, 130, 64};
  const int64_t max_rows = 12;
  const auto x = Rand(max_rows * in, 31);
  std::vector<Weight> ws;
  std::vector<const Weight*> wp;
  for (size_t i = 0; i < outs.size(); ++i) {
    ws.push_back(Up(gpu_.get(), Rand(outs[i] * in, 40 + i, 0.1f), outs[i], in, DType::kBF16));
  }
  for (const Weight& w : ws) wp.push_back(&w);
  Buffer dx = Dev(x);
  for (int64_t rows : {int64_t{1}, int64_t{5}, int64_t{8}, max_rows}) {  // 12: beyond the fused sizes
    std::vector<Buffer> fused, single;
    std::vector<float*> yp;
    for (int64_t n : outs) {
      fused.push_back(gpu_->Alloc(rows * n).value());
      single.push_back(gpu_->Alloc(rows * n).value());
      yp.push_back(fused.back().data());
    }
    ASSERT_TRUE(gpu_->LinearMulti(dx.data(), rows, wp, yp).ok());
    for (size_t i = 0; i < outs.size(); ++i) {
      ASSERT_TRUE(gpu_->Linear(dx.data(), rows, ws[i], single[i].data()).ok());
      if (rows <= 8) {  // the same GEMV kernel: bit for bit
        EXPECT_EQ(Host(fused[i]), Host(single[i])) << "rows " << rows << " weight " << i;
      } else {  // cuBLAS may pick split-K reductions whose order varies between calls
        EXPECT_LT(RelErr(Host(fused[i]), Host(single[i])), 1e-6) << "rows " << rows;
      }
    }
  }
}

TEST_F(OpTest, NormsEmbeddingSwiGluAddGather) {
  // Rows of up to 8 values per thread (the staged kernels: every load before the first
  // store; 2304 / 128 are the 48B model's hidden and head sizes) and longer rows (the
  // looping kernels).
  for (const auto& [dim, hd] :
       {std::pair<int64_t, int64_t>{300, 64}, {2304, 128}, {7000, 300}}) {
    SCOPED_TRACE(::testing::Message() << "dim " << dim << " head dim " << hd);
    const int64_t rows = 9, heads = 3, part = dim * 2 / 3;
    const auto x = Rand(rows * dim, 3), nw = Rand(dim, 4), z = Rand(rows * heads * hd, 5);
    const auto o = Rand(rows * heads * hd, 6), gw = Rand(hd, 7);
    // RmsNorm over the first `part` of `dim` columns (stride), in place.
    {
      std::vector<float> ref = x;
      ASSERT_TRUE(
          cpu_.RmsNorm(ref.data(), rows, part, dim, Up(&cpu_, nw, 1, part), 1e-6, ref.data()).ok());
      Buffer d = Dev(x);
      ASSERT_TRUE(
          gpu_->RmsNorm(d.data(), rows, part, dim, Up(gpu_.get(), nw, 1, part), 1e-6, d.data()).ok());
      EXPECT_LT(RelErr(Host(d), ref), 1e-5);
    }
    // The fused residual add + norm: the residual exactly as Add, the norm as RmsNorm.
    {
      const auto a = Rand(rows * dim, 11);
      std::vector<float> ref_x = x, ref_y(x.size());
      ASSERT_TRUE(cpu_.Add(a.data(), rows * dim, ref_x.data()).ok());
      ASSERT_TRUE(cpu_.RmsNorm(ref_x.data(), rows, dim, dim, Up(&cpu_, nw, 1, dim), 1e-6,
                               ref_y.data())
                      .ok());
      Buffer da = Dev(a), dx = Dev(x), dy = gpu_->Alloc(x.size()).value();
      ASSERT_TRUE(gpu_->AddRmsNorm(da.data(), rows, dim, dx.data(), Up(gpu_.get(), nw, 1, dim), 1e-6,
                                   dy.data())
                      .ok());
      EXPECT_EQ(Host(dx), ref_x);
      EXPECT_LT(RelErr(Host(dy), ref_y), 1e-5);
      EXPECT_EQ(gpu_->AddRmsNorm(da.data(), rows, dim, dx.data(), Up(gpu_.get(), nw, 1, part), 1e-6,
                                 dy.data())
                    .code(),
                absl::StatusCode::kInvalidArgument);
    }
    {
      std::vector<float> ref(o.size());
      ASSERT_TRUE(cpu_.GatedRmsNorm(o.data(), z.data(), rows, heads, hd, Up(&cpu_, gw, 1, hd), 1e-5,
                                    ref.data())
                      .ok());
      Buffer d_o = Dev(o), d_z = Dev(z), d_y = gpu_->Alloc(o.size()).value();
      ASSERT_TRUE(gpu_->GatedRmsNorm(d_o.data(), d_z.data(), rows, heads, hd,
                                     Up(gpu_.get(), gw, 1, hd), 1e-5, d_y.data())
                      .ok());
      EXPECT_LT(RelErr(Host(d_y), ref), 1e-5);
    }
  }
  for (DType dt : {DType::kF32, DType::kBF16}) {
    const int64_t vocab = 100, d = 128;
    auto table = Rand(vocab * d, 8);
    if (dt == DType::kBF16) {  // make the table exactly representable in bf16
      for (float& v : table) v = Bf16ToF32(F32ToBf16(v));
    }
    const std::vector<int32_t> ids = {0, 99, 5, 5, 42};
    std::vector<float> ref(ids.size() * d);
    ASSERT_TRUE(
        cpu_.Embedding(ids.data(), ids.size(), Up(&cpu_, table, vocab, d), ref.data()).ok());
    Buffer y = gpu_->Alloc(ref.size()).value();
    Weight wt = Up(gpu_.get(), table, vocab, d, dt);
    ASSERT_TRUE(gpu_->Embedding(ids.data(), ids.size(), wt, y.data()).ok());
    EXPECT_EQ(Host(y), ref);
    const std::vector<int32_t> bad = {3, 100};
    EXPECT_EQ(gpu_->Embedding(bad.data(), 2, wt, y.data()).code(),
              absl::StatusCode::kInvalidArgument);
  }
  {
    const int64_t rows = 9, dim = 300;
    const auto g = Rand(rows * dim, 9), u = Rand(rows * dim, 10);
    std::vector<float> ref(g.size());
    ASSERT_TRUE(cpu_.SwiGlu(g.data(), u.data(), rows, dim, ref.data()).ok());
    Buffer dg = Dev(g), du = Dev(u);
    ASSERT_TRUE(gpu_->SwiGlu(dg.data(), du.data(), rows, dim, dg.data()).ok());
    EXPECT_LT(RelErr(Host(dg), ref), 1e-6);
    std::vector<float> sum = g;
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += u[i];
    Buffer a = Dev(g);
    ASSERT_TRUE(gpu_->Add(du.data(), rows * dim, a.data()).ok());
    EXPECT_EQ(Host(a), sum);
    Buffer sel = gpu_->Alloc(3 * dim).value();
    ASSERT_TRUE(gpu_->GatherRows(du.data(), dim, {8, 0, 8}, sel.data()).ok());
    const std::vector<float> got = Host(sel);
    for (int64_t c = 0; c < dim; ++c) {
      ASSERT_EQ(got[c], u[8 * dim + c]);
      ASSERT_EQ(got[dim + c], u[c]);
      ASSERT_EQ(got[2 * dim + c], u[8 * dim + c]);
    }
  }
}

// The fused one-token path of the grouped short conv (what a decode step runs)
// computes the same outputs and tails as the general varlen path, bit for bit.
TEST(ShortConvVarlen, OneTokenEachMatchesTheGeneralPath) {
  SKIP_WITHOUT_GPU();
  const int64_t N = 6, C = 160, W = 4, num_slots = 8;
  const std::vector<int32_t> slots = {5, 0, -1, 7, 2, 3};  // permuted, one padding row
  std::vector<int64_t> cu(N + 1);
  for (int64_t i = 0; i <= N; ++i) cu[i] = i;
  std::vector<void*> mem;
  auto up = [&](const void* h, size_t bytes) {
    void* d = nullptr;
    EXPECT_EQ(cudaMalloc(&d, bytes), cudaSuccess);
    if (h != nullptr) cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
    else cudaMemset(d, 0xff, bytes);  // NaN: every output must be written
    mem.push_back(d);
    return d;
  };
  auto down = [](const void* d, size_t n) {
    std::vector<float> h(n);
    cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost);
    return h;
  };
  const void* dcu = up(cu.data(), cu.size() * 8);
  const void* ds = up(slots.data(), slots.size() * 4);
  cuda::ShortConvVarlenParams general[3], fused[3];
  std::vector<float> tails0[3];
  for (int j = 0; j < 3; ++j) {
    const auto x = Rand(N * C, 70 + j), w = Rand(C * W, 80 + j, 0.5f);
    tails0[j] = Rand(num_slots * (W - 1) * C, 90 + j);
    const void* dx = up(x.data(), x.size() * 4);
    const void* dw = up(w.data(), w.size() * 4);
    for (int f = 0; f < 2; ++f) {
      cuda::ShortConvVarlenParams& p = f == 0 ? general[j] : fused[j];
      p.num_seqs = N;
      p.num_tokens = N;
      p.channels = C;
      p.width = W;
      p.num_slots = num_slots;
      p.x = static_cast<const float*>(dx);
      p.w = static_cast<const float*>(dw);
      p.cu_seqlens = static_cast<const int64_t*>(dcu);
      p.slots = static_cast<const int32_t*>(ds);
      p.tail_pool = static_cast<float*>(up(tails0[j].data(), tails0[j].size() * 4));
      p.out = static_cast<float*>(up(nullptr, N * C * 4));
      p.one_token_each = f == 1;
    }
  }
  ASSERT_TRUE(cuda::ShortConvVarlenMulti(general, 3, nullptr).ok());
  ASSERT_TRUE(cuda::ShortConvVarlenMulti(fused, 3, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  for (int j = 0; j < 3; ++j) {
    const auto out_g = down(general[j].out, N * C), out_f = down(fused[j].out, N * C);
    const auto tail_g = down(general[j].tail_pool, tails0[j].size());
    const auto tail_f = down(fused[j].tail_pool, tails0[j].size());
    for (float v : out_f) ASSERT_TRUE(std::isfinite(v)) << "conv " << j;
    EXPECT_EQ(out_g, out_f) << "conv " << j;
    EXPECT_EQ(tail_g, tail_f) << "conv " << j;
    EXPECT_NE(tail_f, tails0[j]) << "conv " << j << ": the tails shifted";
  }
  for (auto& p : fused) p.num_tokens = N + 1;  // not one token per sequence
  EXPECT_EQ(cuda::ShortConvVarlenMulti(fused, 3, nullptr).code(), absl::StatusCode::kInvalidArgument);
  for (void* d : mem) cudaFree(d);
}

TEST_F(OpTest, MoeMatchesCpuForBothConventions) {
  const int64_t rows = 21, D = 128, I = 64, E = 8;
  std::vector<Weight> c1, c3, c2, g1, g3, g2;
  for (int64_t e = 0; e < E; ++e) {
    const auto w1 = Rand(I * D, 100 + e, 0.1f), w3 = Rand(I * D, 200 + e, 0.1f);
    const auto w2 = Rand(D * I, 300 + e, 0.1f);
    c1.push_back(Up(&cpu_, w1, I, D));
    c3.push_back(Up(&cpu_, w3, I, D));
    c2.push_back(Up(&cpu_, w2, D, I));
    g1.push_back(Up(gpu_.get(), w1, I, D));
    g3.push_back(Up(gpu_.get(), w3, I, D));
    g2.push_back(Up(gpu_.get(), w2, D, I));
  }
  const auto router = Rand(E * D, 11, 0.2f), bias = Rand(E, 12, 0.01f), x = Rand(rows * D, 13);
  const Weight cr = Up(&cpu_, router, E, D), cb = Up(&cpu_, bias, 1, E);
  const Weight gr = Up(gpu_.get(), router, E, D), gb = Up(gpu_.get(), bias, 1, E);
  for (bool biased : {false, true}) {
    MoeParams p;
    p.num_experts = E;
    p.top_k = 2;
    p.routed_scaling_factor = 2.446;
    p.biased_weights = biased;
    std::vector<float> ref(rows * D);
    ASSERT_TRUE(cpu_.Moe(x.data(), rows, D, p, {&cr, &cb, &c1, &c3, &c2}, ref.data()).ok());
    Buffer dx = Dev(x), dy = gpu_->Alloc(rows * D).value();
    ASSERT_TRUE(gpu_->Moe(dx.data(), rows, D, p, {&gr, &gb, &g1, &g3, &g2}, dy.data()).ok());
    const std::vector<float> plain = Host(dy);
    EXPECT_LT(RelErr(plain, ref), 1e-5) << "biased=" << biased;
    // accumulate: onto what y holds, as one add of the plain result.
    const auto y0 = Rand(rows * D, 14);
    Buffer da = Dev(y0);
    p.accumulate = true;
    ASSERT_TRUE(gpu_->Moe(dx.data(), rows, D, p, {&gr, &gb, &g1, &g3, &g2}, da.data()).ok());
    const std::vector<float> acc = Host(da);
    for (int64_t i = 0; i < rows * D; ++i) ASSERT_EQ(acc[i], y0[i] + plain[i]) << i;
  }
}

// ---------------------------------------------------------------- whole models

struct Engines {
  CpuBackend cpu;
  std::unique_ptr<CudaBackend> gpu;
  std::unique_ptr<Model> cpu_model, gpu_model;
};

// RandomTensorSource with every GEMM matrix rounded to bf16 (what the CUDA
// backend's bf16_weights stores), so a CPU model can hold the same weights.
TensorSource Bf16Matrices(TensorSource src) {
  auto buf = std::make_shared<std::vector<uint16_t>>();
  return [src, buf](const std::string& name, int64_t rows,
                    int64_t cols) -> absl::StatusOr<HostTensor> {
    absl::StatusOr<HostTensor> t = src(name, rows, cols);
    if (!t.ok() || t->dtype != DType::kF32 || rows < 2 || cols < 64) return t;
    buf->resize(rows * cols);
    F32ToBf16(static_cast<const float*>(t->data), buf->data(), buf->size());
    t->dtype = DType::kBF16;
    t->data = buf->data();
    return t;
  };
}

std::unique_ptr<Engines> MakeEngines(const ModelConfig& c, CudaBackendOptions o = {}) {
  auto e = std::make_unique<Engines>();
  auto gpu = CudaBackend::Create(c, o);
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  if (!gpu.ok()) return nullptr;
  e->gpu = std::move(*gpu);
  // With bf16 weights on the GPU the CPU oracle gets the same rounded weights:
  // the comparison then measures the kernels, not the weight rounding (which
  // can flip an MoE routing decision and legitimately change the output).
  const TensorSource cpu_src =
      o.bf16_weights ? Bf16Matrices(RandomTensorSource(7)) : RandomTensorSource(7);
  e->cpu_model = Model::Create(c, cpu_src, &e->cpu).value();
  e->gpu_model = Model::Create(c, RandomTensorSource(7), e->gpu.get()).value();
  return e;
}

std::vector<int32_t> Prompt(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(g() % vocab);
  return t;
}

int32_t Argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

// Prefills `prompt` then decodes `steps` greedy tokens; returns the tokens and
// appends every step's logits to *logits.
std::vector<int32_t> Greedy(Model* m, SequenceState* s, const std::vector<int32_t>& prompt,
                            int steps, std::vector<std::vector<float>>* logits) {
  std::vector<int32_t> out;
  std::vector<int32_t> next = prompt;
  for (int i = 0; i <= steps; ++i) {
    ForwardItem it{s, next};
    ForwardOutput o;
    absl::Status st = m->Forward(absl::MakeSpan(&it, 1), &o);
    EXPECT_TRUE(st.ok()) << st;
    if (!st.ok()) return out;
    logits->push_back(o.logits[0]);
    out.push_back(Argmax(o.logits[0]));
    next = {out.back()};
  }
  return out;
}

TEST(CudaModelTest, TinyModelPrefillAndGreedyDecodeMatchCpu) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = TinyConfig();
  auto e = MakeEngines(c);
  ASSERT_NE(e, nullptr);
  // Prompt lengths: not a multiple of 64, one token, and a multi-chunk one.
  for (int64_t len : {100, 1, 200}) {
    const auto prompt = Prompt(len, c.vocab_size, len);
    // All-position logits of the prefill.
    {
      SequenceState sc = e->cpu_model->NewState(), sg = e->gpu_model->NewState();
      ForwardItem ic{&sc, prompt, true}, ig{&sg, prompt, true};
      ForwardOutput oc, og;
      ASSERT_TRUE(e->cpu_model->Forward(absl::MakeSpan(&ic, 1), &oc).ok());
      ASSERT_TRUE(e->gpu_model->Forward(absl::MakeSpan(&ig, 1), &og).ok());
      EXPECT_LT(RelErr(og.logits[0], oc.logits[0]), 1e-4) << "len " << len;
    }
    SequenceState sc = e->cpu_model->NewState(), sg = e->gpu_model->NewState();
    std::vector<std::vector<float>> lc, lg;
    const auto tc = Greedy(e->cpu_model.get(), &sc, prompt, 24, &lc);
    const auto tg = Greedy(e->gpu_model.get(), &sg, prompt, 24, &lg);
    EXPECT_EQ(tg, tc) << "len " << len;
    for (size_t i = 0; i < std::min(lc.size(), lg.size()); ++i) {
      EXPECT_LT(RelErr(lg[i], lc[i]), 1e-4) << "len " << len << " step " << i;
    }
  }
  EXPECT_EQ(e->gpu->free_slots(), 64);  // every state above was destroyed
}

TEST(CudaModelTest, MixedBatchMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = TinyConfig();
  auto e = MakeEngines(c);
  ASSERT_NE(e, nullptr);
  // Three sequences at different stages in one batch: one prefilling 130 tokens,
  // one decoding, one idle (no tokens), then all decoding together.
  std::vector<SequenceState> sc, sg;
  for (int i = 0; i < 3; ++i) {
    sc.push_back(e->cpu_model->NewState());
    sg.push_back(e->gpu_model->NewState());
  }
  const auto p0 = Prompt(70, c.vocab_size, 1), p1 = Prompt(130, c.vocab_size, 2);
  const auto p2 = Prompt(5, c.vocab_size, 3);
  auto run = [&](std::vector<std::vector<int32_t>> toks) {
    std::vector<ForwardItem> ic, ig;
    for (int i = 0; i < 3; ++i) {
      ic.push_back({&sc[i], toks[i], false});
      ig.push_back({&sg[i], toks[i], false});
    }
    ForwardOutput oc, og;
    EXPECT_TRUE(e->cpu_model->Forward(absl::MakeSpan(ic), &oc).ok());
    absl::Status st = e->gpu_model->Forward(absl::MakeSpan(ig), &og);
    EXPECT_TRUE(st.ok()) << st;
    std::vector<int32_t> next(3, -1);
    for (int i = 0; i < 3; ++i) {
      if (toks[i].empty()) continue;
      EXPECT_LT(RelErr(og.logits[i], oc.logits[i]), 1e-4) << "seq " << i;
      EXPECT_EQ(Argmax(og.logits[i]), Argmax(oc.logits[i])) << "seq " << i;
      next[i] = Argmax(oc.logits[i]);
    }
    return next;
  };
  auto n = run({p0, {}, p2});
  n = run({{n[0]}, p1, {n[2]}});
  for (int step = 0; step < 6; ++step) n = run({{n[0]}, {n[1]}, {n[2]}});
}

// Decode steps replay CUDA graphs (captured on the second step of a shape) and
// give what eager launches give, across a context-bucket boundary (256 → 512).
TEST(CudaModelTest, DecodeRunsFromCudaGraphsAndMatchesEager) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = TinyConfig();
  CudaBackendOptions eager;
  eager.cuda_graphs = false;
  auto g = MakeEngines(c);
  auto e = MakeEngines(c, eager);
  ASSERT_NE(g, nullptr);
  ASSERT_NE(e, nullptr);
  const std::vector<std::vector<int32_t>> prompts = {
      Prompt(240, c.vocab_size, 21), Prompt(100, c.vocab_size, 22), Prompt(30, c.vocab_size, 23)};
  std::vector<SequenceState> sg, se, sc;
  for (int i = 0; i < 3; ++i) {
    sg.push_back(g->gpu_model->NewState());
    se.push_back(e->gpu_model->NewState());
    sc.push_back(g->cpu_model->NewState());
  }
  std::vector<std::vector<int32_t>> toks = prompts;
  for (int step = 0; step < 31; ++step) {
    std::vector<ForwardItem> ig, ie, ic;
    for (int i = 0; i < 3; ++i) {
      ig.push_back({&sg[i], toks[i]});
      ie.push_back({&se[i], toks[i]});
      ic.push_back({&sc[i], toks[i]});
    }
    ForwardOutput og, oe, oc;
    absl::Status st = g->gpu_model->Forward(absl::MakeSpan(ig), &og);
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st;
    // PDL is asked for only inside a small decode forward (kernels/cuda/pdl.h).
    EXPECT_FALSE(cuda::PdlThreadWants()) << "step " << step;
    ASSERT_TRUE(e->gpu_model->Forward(absl::MakeSpan(ie), &oe).ok());
    ASSERT_TRUE(g->cpu_model->Forward(absl::MakeSpan(ic), &oc).ok());
    for (int i = 0; i < 3; ++i) {
      EXPECT_LT(RelErr(og.logits[i], oe.logits[i]), 1e-6) << "step " << step << " seq " << i;
      EXPECT_LT(RelErr(og.logits[i], oc.logits[i]), 1e-4) << "step " << step << " seq " << i;
      toks[i] = {Argmax(oc.logits[i])};
      EXPECT_EQ(Argmax(og.logits[i]), toks[i][0]) << "step " << step << " seq " << i;
    }
  }
  const CudaGraphStats gs = g->gpu->graph_stats(), es = e->gpu->graph_stats();
  // Shapes (3 seqs, bucket 256) and (3 seqs, bucket 512): each eager once,
  // captured once, then replayed: 30 decode steps = 2 eager + 2 captures + 26 replays.
  EXPECT_EQ(gs.captures, 2);
  EXPECT_EQ(gs.replays, 26);
  EXPECT_EQ(es.captures, 0);
  EXPECT_EQ(es.replays, 0);
  {  // a choice the caller made for its thread survives a forward (a graph replay here)
    cuda::PdlScope outer(true);
    std::vector<ForwardItem> ig;
    for (int i = 0; i < 3; ++i) ig.push_back({&sg[i], toks[i]});
    ForwardOutput og;
    ASSERT_TRUE(g->gpu_model->Forward(absl::MakeSpan(ig), &og).ok());
    EXPECT_TRUE(cuda::PdlThreadWants());
  }
  EXPECT_FALSE(cuda::PdlThreadWants());
}

// Decode steps that sample on the device (ForwardItem::sample) give the tokens the host
// Sampler picks from the same GPU's logits, in CUDA graphs (which key on it) and eagerly;
// greedy, temperature, top-k and top-p rows in one batch.
TEST(CudaModelTest, DeviceSamplingMatchesTheHostSampler) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = TinyConfig();
  auto e = MakeEngines(c);
  ASSERT_NE(e, nullptr);
  std::vector<SamplingParams> params(4);
  params[0].temperature = 0;
  params[1].temperature = 1.0;
  params[2].temperature = 0.7;
  params[2].top_k = 20;
  params[3].temperature = 1.3;
  params[3].top_p = 0.8;
  for (int i = 0; i < 4; ++i) params[i].seed = 1000 + i;
  std::vector<SequenceState> dev, host;
  std::vector<Sampler> samplers;
  std::vector<std::vector<int32_t>> toks;
  for (int i = 0; i < 4; ++i) {
    dev.push_back(e->gpu_model->NewState());
    host.push_back(e->gpu_model->NewState());
    samplers.emplace_back(params[i], /*next_index=*/0);
    toks.push_back(Prompt(40 + 20 * i, c.vocab_size, 50 + i));
  }
  int stochastic_differs = 0;
  for (int step = 0; step < 24; ++step) {
    std::vector<TokenSampling> ts(4);
    std::vector<ForwardItem> id, ih;
    for (int i = 0; i < 4; ++i) {
      ts[i] = samplers[i].Draw(step);
      id.push_back({&dev[i], toks[i]});
      id.back().sample = &ts[i];
      ih.push_back({&host[i], toks[i]});
    }
    ForwardOutput od, oh;
    ASSERT_TRUE(e->gpu_model->Forward(absl::MakeSpan(id), &od).ok()) << "step " << step;
    ASSERT_TRUE(e->gpu_model->Forward(absl::MakeSpan(ih), &oh).ok()) << "step " << step;
    ASSERT_EQ(od.tokens.size(), 4u) << "step " << step;
    ASSERT_TRUE(oh.tokens.empty());
    for (int i = 0; i < 4; ++i) {
      EXPECT_TRUE(od.logits[i].empty());
      const int32_t want = samplers[i].Sample(oh.logits[i].data(), c.vocab_size);
      ASSERT_EQ(od.tokens[i], want) << "step " << step << " seq " << i;
      if (i > 0 && want != Argmax(oh.logits[i])) ++stochastic_differs;
      toks[i] = {want};
    }
  }
  EXPECT_GT(stochastic_differs, 0) << "the stochastic rows never left the argmax: a weak test";
  const CudaGraphStats gs = e->gpu->graph_stats();
  EXPECT_GT(gs.replays, 0);  // sampled steps ran from their own graphs
}

TEST(CudaModelTest, BundleHandOffBetweenGpuAndCpu) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = TinyConfig();
  auto e = MakeEngines(c);
  ASSERT_NE(e, nullptr);
  const auto prompt = Prompt(150, c.vocab_size, 9);
  BundleMeta meta;
  meta.request_id = "handoff";
  // Reference: all on the CPU.
  SequenceState ref = e->cpu_model->NewState();
  std::vector<std::vector<float>> lr;
  const auto want = Greedy(e->cpu_model.get(), &ref, prompt, 12, &lr);
  for (bool gpu_first : {true, false}) {
    Model* pre = gpu_first ? e->gpu_model.get() : e->cpu_model.get();
    Model* dec = gpu_first ? e->cpu_model.get() : e->gpu_model.get();
    SequenceState s = pre->NewState();
    ForwardItem it{&s, prompt};
    ForwardOutput o;
    ASSERT_TRUE(pre->Forward(absl::MakeSpan(&it, 1), &o).ok());
    const int32_t first = Argmax(o.logits[0]);
    ASSERT_EQ(first, want[0]);
    ASSERT_TRUE(pre->SyncStateToHost(&s).ok());
    const std::string blob = SerializeBundle(c, s, meta).value();
    ASSERT_TRUE(pre->ReleaseState(&s).ok());
    DecodedBundle d = DeserializeBundle(blob, c).value();
    std::vector<int32_t> got = {first};
    std::vector<std::vector<float>> lg;
    const auto rest = Greedy(dec, &d.state, {first}, 11, &lg);
    got.insert(got.end(), rest.begin(), rest.end());
    EXPECT_EQ(got, want) << (gpu_first ? "gpu prefill → cpu decode" : "cpu prefill → gpu decode");
  }
  EXPECT_EQ(e->gpu->free_slots(), 64);
}

TEST(CudaModelTest, OutOfSlotsIsResourceExhaustedAndSlotsComeBack) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = TinyConfig();
  CudaBackendOptions o;
  o.max_seqs = 2;
  auto e = MakeEngines(c, o);
  ASSERT_NE(e, nullptr);
  std::vector<SequenceState> s(3);
  for (auto& x : s) x = e->gpu_model->NewState();
  const auto p = Prompt(10, c.vocab_size, 4);
  std::vector<ForwardItem> items = {{&s[0], p}, {&s[1], p}, {&s[2], p}};
  ForwardOutput out;
  EXPECT_EQ(e->gpu_model->Forward(absl::MakeSpan(items), &out).code(),
            absl::StatusCode::kResourceExhausted);
  for (auto& x : s) ASSERT_TRUE(e->gpu_model->ReleaseState(&x).ok());
  EXPECT_EQ(e->gpu->free_slots(), 2);
  items.pop_back();
  ASSERT_TRUE(e->gpu_model->Forward(absl::MakeSpan(items), &out).ok());
  EXPECT_EQ(e->gpu->free_slots(), 0);
}

// The 100M-class config (K = 128) on the fast paths — bf16 weights, the
// tensor-core KDA chunk kernel, a bf16 latent cache — against the fp32 CPU
// engine, one path added at a time so a failure names the path.
void CheckFastPaths(bool kda_tc, DType latent, bool graphs) {
  const ModelConfig c = Small100MConfig();
  CudaBackendOptions o;
  o.bf16_weights = true;
  o.kda_tensor_cores = kda_tc;
  o.mla_tensor_cores = kda_tc;
  o.latent_dtype = latent;
  o.cuda_graphs = graphs;
  auto e = MakeEngines(c, o);
  ASSERT_NE(e, nullptr);
  const auto prompt = Prompt(300, c.vocab_size, 5);
  SequenceState sc = e->cpu_model->NewState(), sg = e->gpu_model->NewState();
  std::vector<std::vector<float>> lc;
  const auto tokens = Greedy(e->cpu_model.get(), &sc, prompt, 12, &lc);
  // The GPU follows the CPU's tokens (teacher forcing), so every step compares
  // the same inputs even if a near-tie flips one argmax.
  std::vector<int32_t> next = prompt;
  for (size_t i = 0; i < lc.size(); ++i) {
    ForwardItem it{&sg, next};
    ForwardOutput o;
    ASSERT_TRUE(e->gpu_model->Forward(absl::MakeSpan(&it, 1), &o).ok());
    // Same weights; bf16 activations in the prefill GEMMs, the MoE tensor-core
    // paths, the tensor-core KDA chunk and the bf16 latent cache.
    const double err = RelErr(o.logits[0], lc[i]);
    std::printf("  fast paths (tensor-core prefill=%d latent=%s graphs=%d) step %zu: rel err %.2e\n", kda_tc,
                std::string(DTypeName(latent)).c_str(), graphs, i, err);
    EXPECT_LT(err, 5e-2) << "step " << i;
    next = {tokens[i]};
  }
}

TEST(CudaModelTest, Bf16WeightsStayCloseToCpu) {
  SKIP_WITHOUT_GPU();
  CheckFastPaths(false, DType::kF32, true);
}

TEST(CudaModelTest, Bf16WeightsAndTensorCoreKdaStayCloseToCpu) {
  SKIP_WITHOUT_GPU();
  CheckFastPaths(true, DType::kF32, true);
}

TEST(CudaModelTest, AllFastPathsStayCloseToCpu) {
  SKIP_WITHOUT_GPU();
  CheckFastPaths(true, DType::kBF16, true);
}

TEST(CudaModelTest, AllFastPathsWithoutGraphsStayCloseToCpu) {
  SKIP_WITHOUT_GPU();
  CheckFastPaths(true, DType::kBF16, false);
}

}  // namespace
}  // namespace kl
