// CudaBackend: lifecycle, device memory (arena, pinned staging) and CUDA graphs
// of decode steps. Sequence-state residency: cuda_backend_state.cc; the model
// ops: cuda_backend_ops.cc.
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
#include "kernels/cuda/ops.h"
#include "kernels/cuda/pdl.h"

namespace kl {
namespace {

// Decode steps of at most this many sequences launch their kernels with programmatic
// dependent launch (kernels/cuda/pdl.h): the GEMV regime (<= 8 rows), where a step is
// ~525 latency-bound kernels. H200, 48B shape: batch 1 3.79 -> 3.40 ms per token, batch
// 8 12.09 -> 11.74 ms; batches 16 and 64 unchanged in two jobs, 2-3% slower in a third
// (docs/benchmarks.md, session 8).
constexpr int64_t kPdlMaxBatch = 8;

}  // namespace

CudaBackend::CudaBackend(const ModelConfig& config, const CudaBackendOptions& options)
    : config_(config), options_(options), impl_(std::make_unique<Impl>()) {}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(
    const ModelConfig& config, const CudaBackendOptions& options) {
  RETURN_IF_ERROR(config.Validate());
  if (options.max_seqs < 1 || options.max_seqs > (1 << 20) || options.page_rows < 1 ||
      options.latent_pages < 0 || options.arena_chunk_bytes < (1 << 20) ||
      options.kda_recurrent_max_tokens < 0) {
    return absl::InvalidArgumentError("CudaBackend: bad options");
  }
  if (options.latent_dtype != DType::kF32 && options.latent_dtype != DType::kBF16) {
    return absl::InvalidArgumentError("CudaBackend: latent_dtype must be f32 or bf16");
  }
  std::unique_ptr<CudaBackend> be(new CudaBackend(config, options));
  RETURN_IF_ERROR(be->Init());
  return be;
}

absl::Status CudaBackend::Init() {
  Impl& m = *impl_;
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    return absl::UnavailableError(absl::StrCat("no CUDA device: ", cudaGetErrorString(e)));
  }
  if (options_.device < 0 || options_.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", options_.device, " out of range [0, ", count, ")"));
  }
  KL_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
  KL_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&m.prop, options_.device));
  KL_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
  KL_CUBLAS(cublasCreate(&m.cublas));
  KL_CUBLAS(cublasSetStream(m.cublas, m.stream));
  // Exact fp32 GEMMs (no TF32) for fp32 weights; bf16 GEMMs use tensor cores anyway.
  KL_CUBLAS(cublasSetMathMode(m.cublas, CUBLAS_DEFAULT_MATH));
  // A fixed workspace so cuBLAS never allocates inside a CUDA graph capture.
  constexpr size_t kCublasWs = size_t{32} << 20;
  KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&m.cublas_workspace, kCublasWs));
  KL_CUBLAS(cublasSetWorkspace(m.cublas, m.cublas_workspace, kCublasWs));

  const ModelConfig& c = config_;
  const int64_t S = options_.max_seqs;
  const int64_t tail = c.ConvTailElems();
  for (int64_t i = 0; i < c.NumKdaLayers(); ++i) {
    float* st = nullptr;
    KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&st, S * c.KdaStateElems() * sizeof(float)));
    m.kda_state.push_back(st);
    std::array<float*, 3> t{};
    for (auto& p : t) {
      KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, std::max<int64_t>(1, S * tail) * sizeof(float)));
    }
    m.kda_tail.push_back(t);
  }
  const int64_t rows_per_seq_default = 4096;
  m.latent_pages = options_.latent_pages > 0
                       ? options_.latent_pages
                       : S * ((rows_per_seq_default + options_.page_rows - 1) / options_.page_rows);
  m.max_pages_per_seq = std::min<int64_t>(
      m.latent_pages, (c.model_max_length + options_.page_rows - 1) / options_.page_rows);
  const int64_t page_bytes = options_.page_rows * c.MlaLatentDim() *
                             static_cast<int64_t>(DTypeSize(options_.latent_dtype));
  for (int64_t i = 0; i < c.NumMlaLayers(); ++i) {
    void* p = nullptr;
    KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, m.latent_pages * page_bytes));
    m.mla_pool.push_back(p);
  }
  m.block_table_host.assign(S * m.max_pages_per_seq, 0);
  KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&m.block_table, m.block_table_host.size() * sizeof(int32_t)));
  KL_CUDA_RETURN_IF_ERROR(
      cudaMemset(m.block_table, 0, m.block_table_host.size() * sizeof(int32_t)));
  for (int64_t s = S - 1; s >= 0; --s) m.free_slots.push_back(static_cast<int32_t>(s));
  for (int64_t p = m.latent_pages - 1; p >= 0; --p) m.free_pages.push_back(static_cast<int32_t>(p));
  m.slot_pages.assign(S, {});
  return absl::OkStatus();
}

CudaBackend::~CudaBackend() {
  Impl& m = *impl_;
  if (m.stream != nullptr) cudaStreamSynchronize(m.stream);
  for (auto& ch : m.chunks) cudaFree(ch.base);
  for (auto& ch : m.host_chunks) cudaFreeHost(ch.base);
  for (auto& [k, g] : m.graphs) cudaGraphExecDestroy(g.exec);
  for (void* p : m.loose) cudaFree(p);
  for (void* p : m.weight_allocs) cudaFree(p);
  for (auto& [k, p] : m.f32_copies) cudaFree(p);
  for (auto& [k, t] : m.expert_tables) {
    for (void* p : t) cudaFree(p);
  }
  for (float* p : m.kda_state) cudaFree(p);
  for (auto& t : m.kda_tail) {
    for (float* p : t) cudaFree(p);
  }
  for (void* p : m.mla_pool) cudaFree(p);
  cudaFree(m.block_table);
  if (m.cublas != nullptr) cublasDestroy(m.cublas);
  cudaFree(m.cublas_workspace);
  if (m.stream != nullptr) cudaStreamDestroy(m.stream);
}

bool CudaBackend::Supports(Op) const { return true; }

std::string CudaBackend::DeviceDescription() const {
  const cudaDeviceProp& p = impl_->prop;
  return absl::StrFormat("%s (sm_%d%d, %d SMs, %.0f GiB)", p.name, p.major, p.minor,
                         p.multiProcessorCount, p.totalGlobalMem / double(1 << 30));
}

int64_t CudaBackend::free_slots() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return static_cast<int64_t>(impl_->free_slots.size());
}

int64_t CudaBackend::free_pages() const {
  std::lock_guard<std::mutex> l(impl_->mu);
  return static_cast<int64_t>(impl_->free_pages.size());
}

// ---------------------------------------------------------------- memory

absl::StatusOr<void*> CudaBackend::Scratch(int64_t bytes) {
  Impl& m = *impl_;
  bytes = AlignUp(std::max<int64_t>(bytes, 1));
  if (!m.in_forward) {
    void* p = nullptr;
    KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
    m.loose.push_back(p);
    return p;
  }
  size_t ci = m.chunk_index;
  int64_t off = m.chunk_offset;
  while (ci < m.chunks.size() && off + bytes > m.chunks[ci].size) {
    ++ci;
    off = 0;
  }
  if (ci == m.chunks.size()) {
    if (m.mode == Impl::Mode::kCapture || m.mode == Impl::Mode::kReplay) {
      return absl::InternalError("CUDA graph: activation arena grew after the warm-up run");
    }
    Impl::Chunk ch;
    ch.size = std::max(bytes, options_.arena_chunk_bytes);
    const cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&ch.base), ch.size);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the allocation error
      return absl::ResourceExhaustedError(absl::StrCat(
          "CUDA activation memory: cannot allocate ", ch.size, " bytes: ", cudaGetErrorString(e)));
    }
    m.chunks.push_back(ch);
    ci = m.chunks.size() - 1;
    off = 0;
  }
  m.frames.push_back({m.chunk_index, m.chunk_offset, false});
  m.chunk_index = ci;
  m.chunk_offset = off + bytes;
  return static_cast<void*>(m.chunks[ci].base + off);
}

void CudaBackend::ReleaseFrames(size_t first) {
  Impl& m = *impl_;
  for (size_t i = first; i < m.frames.size(); ++i) m.frames[i].freed = true;
  while (!m.frames.empty() && m.frames.back().freed) {
    m.chunk_index = m.frames.back().chunk;
    m.chunk_offset = m.frames.back().offset;
    m.frames.pop_back();
  }
}

CudaBackend::ScratchScope::ScratchScope(CudaBackend* be)
    : be_(be), first_(be->impl_->frames.size()), active_(be->impl_->in_forward) {}

CudaBackend::ScratchScope::~ScratchScope() {
  if (active_ && be_->impl_->in_forward) be_->ReleaseFrames(first_);
}

bool CudaBackend::Replaying() const { return impl_->mode == Impl::Mode::kReplay; }

absl::StatusOr<void*> CudaBackend::HostScratch(int64_t bytes) {
  Impl& m = *impl_;
  bytes = AlignUp(std::max<int64_t>(bytes, 1));
  while (m.host_index < m.host_chunks.size()) {
    Impl::Chunk& ch = m.host_chunks[m.host_index];
    if (m.host_offset + bytes <= ch.size) {
      void* p = ch.base + m.host_offset;
      m.host_offset += bytes;
      return p;
    }
    ++m.host_index;
    m.host_offset = 0;
  }
  if (m.mode == Impl::Mode::kCapture || m.mode == Impl::Mode::kReplay) {
    return absl::InternalError("CUDA graph: pinned staging grew after the warm-up run");
  }
  Impl::Chunk ch;
  ch.size = std::max<int64_t>(bytes, int64_t{16} << 20);
  KL_CUDA_RETURN_IF_ERROR(
      cudaHostAlloc(reinterpret_cast<void**>(&ch.base), ch.size, cudaHostAllocDefault));
  m.host_chunks.push_back(ch);
  m.host_index = m.host_chunks.size() - 1;
  m.host_offset = bytes;
  return static_cast<void*>(ch.base);
}

absl::StatusOr<void*> CudaBackend::Stage(const void* host, int64_t bytes) {
  Impl& m = *impl_;
  ASSIGN_OR_RETURN(void* d, Scratch(bytes));
  if (bytes <= 0) return d;
  if (!m.in_forward) {
    KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(d, host, bytes, cudaMemcpyHostToDevice, m.stream));
    return d;
  }
  ASSIGN_OR_RETURN(void* pinned, HostScratch(bytes));
  std::memcpy(pinned, host, bytes);
  m.staging.push_back(bytes);
  KL_CUDA_LAUNCH(cudaMemcpyAsync(d, pinned, bytes, cudaMemcpyHostToDevice, m.stream));
  return d;
}

absl::StatusOr<const int32_t*> CudaBackend::StageBlockTable(const std::vector<int32_t>& slots) {
  Impl& m = *impl_;
  std::vector<int32_t> table(slots.size() * m.max_pages_per_seq);
  {
    std::lock_guard<std::mutex> l(m.mu);
    for (size_t i = 0; i < slots.size(); ++i) {
      std::memcpy(table.data() + i * m.max_pages_per_seq,
                  m.block_table_host.data() + slots[i] * m.max_pages_per_seq,
                  m.max_pages_per_seq * sizeof(int32_t));
    }
  }
  ASSIGN_OR_RETURN(void* d, Stage(table.data(), table.size() * sizeof(int32_t)));
  return static_cast<const int32_t*>(d);
}

CudaGraphStats CudaBackend::graph_stats() const { return impl_->stats; }

absl::Status CudaBackend::UseDevice() const {
  KL_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
  return absl::OkStatus();
}

absl::Status CudaBackend::BeginForward(const ForwardShape& shape) {
  Impl& m = *impl_;
  if (m.in_forward) return absl::FailedPreconditionError("CudaBackend: nested forward");
  RETURN_IF_ERROR(UseDevice());
  if (!m.loose.empty()) {
    KL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(m.stream));
    for (void* p : m.loose) cudaFree(p);
    m.loose.clear();
  }
  m.in_forward = true;
  m.chunk_index = 0;
  m.chunk_offset = 0;
  m.frames.clear();
  ++m.generation;
  m.host_index = 0;
  m.host_offset = 0;
  m.pending.clear();
  m.staging.clear();
  m.context_hint = 0;
  m.mode = Impl::Mode::kEager;
  ++m.forwards;
  const bool decode =
      shape.num_seqs > 0 && shape.max_new_tokens == 1 && shape.num_tokens == shape.num_seqs;
  // Programmatic dependent launch for the kernels of small decode steps (pdl.h; the
  // thread's previous choice comes back in EndForward). Captured graphs keep it.
  m.pdl_prev = cuda::PdlThreadWants();
  cuda::PdlThreadWants() = decode && shape.num_seqs <= kPdlMaxBatch;
  if (!decode) {
    ++m.stats.eager_forwards;
    return absl::OkStatus();
  }
  // Contexts are bucketed to powers of two (>= 256) so a graph serves many
  // steps; the bucket is the MLA split hint of every run of that shape.
  int64_t bucket = 256;
  while (bucket < shape.max_context) bucket *= 2;
  m.context_hint = bucket;
  if (!options_.cuda_graphs) {
    ++m.stats.eager_forwards;
    return absl::OkStatus();
  }
  m.key = {shape.num_seqs, bucket, shape.logits_rows, shape.device_sampling ? 1 : 0};
  auto it = m.graphs.find(m.key);
  if (it != m.graphs.end()) {
    m.mode = Impl::Mode::kReplay;
    it->second.last_use = m.forwards;
    return absl::OkStatus();
  }
  if (m.seen[m.key]++ == 0) {  // first sight: eager, growing the arenas to this shape
    ++m.stats.eager_forwards;
    return absl::OkStatus();
  }
  m.mode = Impl::Mode::kCapture;
  if (const cudaError_t e = cudaStreamBeginCapture(m.stream, cudaStreamCaptureModeThreadLocal);
      e != cudaSuccess) {
    // No forward follows (the caller does not call EndForward after a failed begin):
    // undo what this call set.
    m.mode = Impl::Mode::kIdle;
    m.in_forward = false;
    cuda::PdlThreadWants() = m.pdl_prev;
    return cuda::CudaStatus(e, "cudaStreamBeginCapture");
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::EndForward(const absl::Status& forward_status) {
  Impl& m = *impl_;
  const Impl::Mode mode = m.mode;
  m.mode = Impl::Mode::kIdle;
  m.in_forward = false;
  cuda::PdlThreadWants() = m.pdl_prev;
  absl::Status st;
  if (mode == Impl::Mode::kCapture) {
    cudaGraph_t graph = nullptr;
    const cudaError_t e = cudaStreamEndCapture(m.stream, &graph);
    if (forward_status.ok() && e == cudaSuccess) {
      Impl::GraphEntry entry;
      st = cuda::CudaStatus(cudaGraphInstantiate(&entry.exec, graph, 0), "cudaGraphInstantiate");
      if (st.ok()) {
        entry.staging = m.staging;
        entry.last_use = m.forwards;
        if (static_cast<int64_t>(m.graphs.size()) >= options_.max_graphs) {
          auto oldest = m.graphs.begin();
          for (auto g = m.graphs.begin(); g != m.graphs.end(); ++g) {
            if (g->second.last_use < oldest->second.last_use) oldest = g;
          }
          cudaGraphExecDestroy(oldest->second.exec);
          m.graphs.erase(oldest);
        }
        st = cuda::CudaStatus(cudaGraphLaunch(entry.exec, m.stream), "cudaGraphLaunch");
        m.graphs[m.key] = entry;
        ++m.stats.captures;
      }
    } else if (e != cudaSuccess) {
      cudaGetLastError();
      st = cuda::CudaStatus(e, "cudaStreamEndCapture");
    }
    if (graph != nullptr) cudaGraphDestroy(graph);
  } else if (mode == Impl::Mode::kReplay && forward_status.ok()) {
    auto it = m.graphs.find(m.key);
    if (it == m.graphs.end() || it->second.staging != m.staging) {
      // The host side of this step differs from the captured one: a bug. Drop
      // the graph (the next step of this shape re-captures) and fail the step.
      if (it != m.graphs.end()) {
        cudaGraphExecDestroy(it->second.exec);
        m.graphs.erase(it);
      }
      st = absl::InternalError("CUDA graph replay: staged inputs differ from the capture");
    } else {
      st = cuda::CudaStatus(cudaGraphLaunch(it->second.exec, m.stream), "cudaGraphLaunch");
      ++m.stats.replays;
    }
  }
  const absl::Status sync = cuda::CudaStatus(cudaStreamSynchronize(m.stream), "forward");
  if (st.ok()) st = sync;
  if (st.ok()) st = cuda::CudaStatus(cudaGetLastError(), "forward");
  if (st.ok() && forward_status.ok()) {
    for (const auto& c : m.pending) std::memcpy(c.dst, c.src, c.bytes);
  }
  m.pending.clear();
  return st;
}

absl::StatusOr<Weight> CudaBackend::UploadWeight(const HostTensor& t) {
  if (t.rows < 0 || t.cols < 0 || (t.rows * t.cols > 0 && t.data == nullptr && !t.synthetic)) {
    return absl::InvalidArgumentError("UploadWeight: bad host tensor");
  }
  RETURN_IF_ERROR(UseDevice());
  const int64_t n = t.rows * t.cols;
  // GEMM matrices keep (or get) bf16; everything small or element-wise is fp32.
  const bool matrix = t.rows >= 2 && t.cols >= 64;
  DType dst = DType::kF32;
  if (matrix && (t.dtype == DType::kBF16 || options_.bf16_weights)) dst = DType::kBF16;
  if (t.synthetic) {  // filled on the device: no host copy of (possibly) 100 GB
    void* d = nullptr;
    const int64_t bytes = std::max<int64_t>(n, 1) * static_cast<int64_t>(DTypeSize(dst));
    const cudaError_t e = cudaMalloc(&d, bytes);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(absl::StrCat("weights: cannot allocate ", bytes,
                                                       " bytes on the GPU (", weight_bytes_,
                                                       " already): ", cudaGetErrorString(e)));
    }
    impl_->weight_allocs.push_back(d);
    RETURN_IF_ERROR(cuda::FillSynthetic(d, dst, n, t.synth_mean, t.synth_half_range, t.synth_seed,
                                        impl_->stream));
    KL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(impl_->stream));
    weight_bytes_ += bytes;
    return Weight{dst, d, t.rows, t.cols};
  }
  std::vector<char> host(static_cast<size_t>(std::max<int64_t>(n, 1)) * DTypeSize(dst));
  if (n > 0) {
    if (dst == DType::kF32) {
      if (!ToF32(t.dtype, t.data, reinterpret_cast<float*>(host.data()), n)) {
        return absl::InvalidArgumentError(
            absl::StrCat("UploadWeight: unsupported dtype ", std::string(DTypeName(t.dtype))));
      }
    } else if (t.dtype == DType::kBF16) {
      std::memcpy(host.data(), t.data, n * 2);
    } else {
      std::vector<float> f(n);
      if (!ToF32(t.dtype, t.data, f.data(), n)) {
        return absl::InvalidArgumentError(
            absl::StrCat("UploadWeight: unsupported dtype ", std::string(DTypeName(t.dtype))));
      }
      ::kl::F32ToBf16(f.data(), reinterpret_cast<uint16_t*>(host.data()), n);
    }
  }
  void* d = nullptr;
  KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&d, host.size()));
  impl_->weight_allocs.push_back(d);
  KL_CUDA_RETURN_IF_ERROR(cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice));
  weight_bytes_ += static_cast<int64_t>(host.size());
  Weight w;
  w.dtype = dst;
  w.data = d;
  w.rows = t.rows;
  w.cols = t.cols;
  return w;
}

absl::StatusOr<Buffer> CudaBackend::Alloc(int64_t elems) {
  if (elems < 0) return absl::InvalidArgumentError("Alloc: negative size");
  RETURN_IF_ERROR(UseDevice());
  if (impl_->in_forward) {
    ASSIGN_OR_RETURN(void* p, Scratch(elems * static_cast<int64_t>(sizeof(float))));
    // The Buffer's owner frees its frame (if still in the same forward).
    const size_t frame = impl_->frames.size() - 1;
    const int64_t gen = impl_->generation;
    std::shared_ptr<void> owner(p, [this, frame, gen](void*) {
      if (impl_->in_forward && impl_->generation == gen) {
        impl_->frames[frame].freed = true;
        ReleaseFrames(impl_->frames.size());
      }
    });
    return Buffer(static_cast<float*>(p), elems, std::move(owner));
  }
  void* p = nullptr;
  KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, std::max<int64_t>(elems, 1) * sizeof(float)));
  std::shared_ptr<void> owner(p, [](void* q) { cudaFree(q); });
  return Buffer(static_cast<float*>(p), elems, std::move(owner));
}

absl::Status CudaBackend::Upload(const float* host, int64_t elems, float* dst) {
  if (elems <= 0) return absl::OkStatus();
  RETURN_IF_ERROR(UseDevice());
  Impl& m = *impl_;
  if (!m.in_forward) {
    KL_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst, host, elems * sizeof(float), cudaMemcpyHostToDevice, m.stream));
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(void* pinned, HostScratch(elems * sizeof(float)));
  std::memcpy(pinned, host, elems * sizeof(float));
  m.staging.push_back(elems * static_cast<int64_t>(sizeof(float)));
  KL_CUDA_LAUNCH(
      cudaMemcpyAsync(dst, pinned, elems * sizeof(float), cudaMemcpyHostToDevice, m.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Download(const float* src, int64_t elems, float* host) {
  if (elems <= 0) return absl::OkStatus();
  RETURN_IF_ERROR(UseDevice());
  Impl& m = *impl_;
  if (!m.in_forward) {
    KL_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host, src, elems * sizeof(float), cudaMemcpyDeviceToHost, m.stream));
    KL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(m.stream));
    return absl::OkStatus();
  }
  // Inside a forward: into pinned staging now, into `host` at EndForward.
  ASSIGN_OR_RETURN(void* pinned, HostScratch(elems * sizeof(float)));
  m.staging.push_back(-elems * static_cast<int64_t>(sizeof(float)));
  KL_CUDA_LAUNCH(
      cudaMemcpyAsync(pinned, src, elems * sizeof(float), cudaMemcpyDeviceToHost, m.stream));
  m.pending.push_back({pinned, host, elems * static_cast<int64_t>(sizeof(float))});
  return absl::OkStatus();
}

absl::StatusOr<const float*> CudaBackend::F32Copy(const Weight& w) {
  if (w.dtype == DType::kF32) return static_cast<const float*>(w.data);
  auto it = impl_->f32_copies.find(w.data);
  if (it != impl_->f32_copies.end()) return it->second;
  float* p = nullptr;
  KL_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, std::max<int64_t>(1, w.rows * w.cols) * sizeof(float)));
  impl_->f32_copies[w.data] = p;
  RETURN_IF_ERROR(cuda::Bf16ToF32(w.data, w.rows * w.cols, p, impl_->stream));
  return static_cast<const float*>(p);
}

}  // namespace kl
