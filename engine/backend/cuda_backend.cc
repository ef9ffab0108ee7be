// CudaBackend: lifecycle, device memory (arena, pinned staging), CUDA graphs of
// decode steps, and sequence-state residency. The model ops: cuda_backend_ops.cc.
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
#include "kernels/cuda/kda_state_layout.h"
#include "kernels/cuda/mla.h"
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

absl::Status CudaBackend::BeginForward(const ForwardShape& shape) {
  Impl& m = *impl_;
  if (m.in_forward) return absl::FailedPreconditionError("CudaBackend: nested forward");
  KL_CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
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

// ---------------------------------------------------------------- states

absl::StatusOr<int32_t> CudaBackend::SlotOf(const SequenceState* s) const {
  if (s->device == nullptr || s->device->owner != this) {
    return absl::FailedPreconditionError("state is not bound to this CUDA backend");
  }
  return static_cast<const CudaResidency*>(s->device.get())->slot;
}

void CudaBackend::FreeResidency(int32_t slot, const std::vector<int32_t>&) {
  std::lock_guard<std::mutex> l(impl_->mu);
  auto& pages = impl_->slot_pages[slot];
  impl_->free_pages.insert(impl_->free_pages.end(), pages.begin(), pages.end());
  pages.clear();
  impl_->free_slots.push_back(slot);
}

absl::Status CudaBackend::EnsurePages(int32_t slot, int64_t rows) {
  Impl& m = *impl_;
  const int64_t need = (rows + options_.page_rows - 1) / options_.page_rows;
  if (need > m.max_pages_per_seq) {
    return absl::ResourceExhaustedError(absl::StrCat("MLA latent cache: a sequence of ", rows,
                                                     " tokens needs ", need, " pages, at most ",
                                                     m.max_pages_per_seq, " per sequence"));
  }
  int64_t have;
  {
    std::lock_guard<std::mutex> l(m.mu);
    auto& pages = m.slot_pages[slot];
    have = static_cast<int64_t>(pages.size());
    if (need <= have) return absl::OkStatus();
    if (static_cast<int64_t>(m.free_pages.size()) < need - have) {
      return absl::ResourceExhaustedError(absl::StrCat("MLA latent cache full: ", need - have,
                                                       " more pages needed, ", m.free_pages.size(),
                                                       " free"));
    }
    for (int64_t i = have; i < need; ++i) {
      pages.push_back(m.free_pages.back());
      m.free_pages.pop_back();
      m.block_table_host[slot * m.max_pages_per_seq + i] = pages.back();
    }
  }
  // The device sees block tables only through StageBlockTable (per batch).
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<CudaResidency>> CudaBackend::TakeSlot() {
  Impl& m = *impl_;
  int32_t slot;
  {
    std::lock_guard<std::mutex> l(m.mu);
    if (m.free_slots.empty()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("CUDA backend: all ", options_.max_seqs, " state slots are in use"));
    }
    slot = m.free_slots.back();
    m.free_slots.pop_back();
  }
  auto res = std::make_shared<CudaResidency>();
  res->owner = this;
  res->backend = this;
  res->slot = slot;  // from here on the destructor gives the slot (and pages) back
  return res;
}

absl::Status CudaBackend::BindStates(const std::vector<SequenceState*>& states) {
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  const int64_t lat = c.MlaLatentDim(), HKV = c.KdaStateElems(), tail = c.ConvTailElems();
  void* staged = nullptr;  // one layer's canonical state on the device (see below)
  for (SequenceState* s : states) {
    if (s->device != nullptr) {
      if (s->device->owner != this) {
        return absl::FailedPreconditionError("state is held by another backend");
      }
      continue;
    }
    // Adopt: host vectors (zeros of a new sequence or an imported bundle) → slot.
    if (static_cast<int64_t>(s->kda.size()) != c.NumKdaLayers() ||
        static_cast<int64_t>(s->mla.size()) != c.NumMlaLayers()) {
      return absl::InvalidArgumentError("state does not match the model's layers");
    }
    ASSIGN_OR_RETURN(std::shared_ptr<CudaResidency> res, TakeSlot());
    const int32_t slot = res->slot;
    for (int64_t i = 0; i < c.NumKdaLayers(); ++i) {
      const KdaLayerState& ks = s->kda[i];
      if (static_cast<int64_t>(ks.recurrent.size()) != HKV ||
          static_cast<int64_t>(ks.conv_q.size()) != tail ||
          static_cast<int64_t>(ks.conv_k.size()) != tail ||
          static_cast<int64_t>(ks.conv_v.size()) != tail) {
        return absl::InvalidArgumentError("KDA state of wrong size");
      }
      // Canonical host [H][K][V] -> device scratch -> the slot's pool layout
      // (kda_state_layout.h). Outside a forward one scratch buffer serves every layer of
      // every adopted state (stream order makes the reuse safe); inside one, Stage.
      if (m.in_forward) {
        ASSIGN_OR_RETURN(staged, Stage(ks.recurrent.data(), HKV * sizeof(float)));
      } else {
        if (staged == nullptr) {
          ASSIGN_OR_RETURN(staged, Scratch(HKV * sizeof(float)));
        }
        KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staged, ks.recurrent.data(), HKV * sizeof(float),
                                                cudaMemcpyHostToDevice, m.stream));
      }
      RETURN_IF_ERROR(cuda::KdaStateToPool(static_cast<const float*>(staged), c.kda_num_heads,
                                           c.kda_head_dim, c.kda_head_dim,
                                           m.kda_state[i] + slot * HKV, m.stream));
      const std::vector<float>* tails[3] = {&ks.conv_q, &ks.conv_k, &ks.conv_v};
      for (int j = 0; j < 3; ++j) {
        if (tail == 0) continue;
        KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.kda_tail[i][j] + slot * tail, tails[j]->data(),
                                                tail * sizeof(float), cudaMemcpyHostToDevice,
                                                m.stream));
      }
    }
    const int64_t n = s->num_tokens;
    if (c.NumMlaLayers() > 0 && n > 0) {
      RETURN_IF_ERROR(EnsurePages(slot, n));
      std::vector<int64_t> cu = {0, n};
      std::vector<int32_t> start = {0};
      ASSIGN_OR_RETURN(void* d_cu, Stage(cu.data(), 2 * sizeof(int64_t)));
      ASSIGN_OR_RETURN(void* d_start, Stage(start.data(), sizeof(int32_t)));
      ASSIGN_OR_RETURN(const int32_t* table, StageBlockTable({slot}));
      for (int64_t i = 0; i < c.NumMlaLayers(); ++i) {
        if (static_cast<int64_t>(s->mla[i].latent.size()) < n * lat) {
          return absl::InvalidArgumentError("MLA cache shorter than the sequence");
        }
        ASSIGN_OR_RETURN(void* rows, Stage(s->mla[i].latent.data(), n * lat * sizeof(float)));
        cuda::MlaCacheWriteParams p;
        p.num_seqs = 1;
        p.num_tokens = n;
        p.cache = {m.mla_pool[i],  options_.latent_dtype, m.latent_pages, options_.page_rows,
                   c.kv_lora_rank, c.qk_rope_head_dim,    table,          m.max_pages_per_seq};
        p.rows = static_cast<const float*>(rows);
        p.cu_seqlens = static_cast<const int64_t*>(d_cu);
        p.start_pos = static_cast<const int32_t*>(d_start);
        RETURN_IF_ERROR(cuda::MlaCacheWrite(p, m.stream));
      }
    }
    s->device = std::move(res);
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::KdaStateToHost(int64_t kda_index, int32_t slot, float* host,
                                         void* canonical) {
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  const int64_t HKV = c.KdaStateElems();
  // Pool layout -> canonical [H][K][V] in scratch -> host (stream-ordered; the caller syncs).
  RETURN_IF_ERROR(cuda::KdaStateFromPool(m.kda_state[kda_index] + slot * HKV, c.kda_num_heads,
                                         c.kda_head_dim, c.kda_head_dim,
                                         static_cast<float*>(canonical), m.stream));
  KL_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(host, canonical, HKV * sizeof(float), cudaMemcpyDeviceToHost, m.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::SyncStateToHost(SequenceState* s) {
  if (s->device == nullptr) return absl::OkStatus();
  ASSIGN_OR_RETURN(int32_t slot, SlotOf(s));
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  const int64_t lat = c.MlaLatentDim(), HKV = c.KdaStateElems(), tail = c.ConvTailElems();
  s->kda.resize(c.NumKdaLayers());
  s->mla.resize(c.NumMlaLayers());
  void* canonical = nullptr;  // one layer's state in the canonical layout, reused per layer
  if (c.NumKdaLayers() > 0) {
    ASSIGN_OR_RETURN(canonical, Scratch(HKV * sizeof(float)));
  }
  for (int64_t i = 0; i < c.NumKdaLayers(); ++i) {
    KdaLayerState& ks = s->kda[i];
    ks.recurrent.resize(HKV);
    RETURN_IF_ERROR(KdaStateToHost(i, slot, ks.recurrent.data(), canonical));
    std::vector<float>* tails[3] = {&ks.conv_q, &ks.conv_k, &ks.conv_v};
    for (int j = 0; j < 3; ++j) {
      tails[j]->resize(tail);
      if (tail == 0) continue;
      KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tails[j]->data(), m.kda_tail[i][j] + slot * tail,
                                              tail * sizeof(float), cudaMemcpyDeviceToHost,
                                              m.stream));
    }
  }
  const int64_t n = s->num_tokens;
  for (int64_t i = 0; i < c.NumMlaLayers(); ++i) {
    s->mla[i].latent.resize(n * lat);
    if (n == 0) continue;
    std::vector<int64_t> cu = {0, n};
    ASSIGN_OR_RETURN(void* d_cu, Stage(cu.data(), 2 * sizeof(int64_t)));
    ASSIGN_OR_RETURN(void* out, Scratch(n * lat * sizeof(float)));
    ASSIGN_OR_RETURN(const int32_t* table, StageBlockTable({slot}));
    cuda::MlaCacheGatherParams p;
    p.num_seqs = 1;
    p.num_rows = n;
    p.cache = {m.mla_pool[i],  options_.latent_dtype, m.latent_pages, options_.page_rows,
               c.kv_lora_rank, c.qk_rope_head_dim,    table,          m.max_pages_per_seq};
    p.kv_cu_seqlens = static_cast<const int64_t*>(d_cu);
    p.out = static_cast<float*>(out);
    RETURN_IF_ERROR(cuda::MlaCacheGather(p, m.stream));
    KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(s->mla[i].latent.data(), out, n * lat * sizeof(float),
                                            cudaMemcpyDeviceToHost, m.stream));
  }
  KL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(m.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::SyncLayerToHost(SequenceState* s, bool kda, int64_t index,
                                          int64_t row_begin, int64_t row_end) {
  if (s->device == nullptr) return absl::OkStatus();
  ASSIGN_OR_RETURN(int32_t slot, SlotOf(s));
  Impl& m = *impl_;
  if (m.mode == Impl::Mode::kCapture || m.mode == Impl::Mode::kReplay) {
    return absl::FailedPreconditionError("SyncLayerToHost inside a CUDA graph");
  }
  const ModelConfig& c = config_;
  ScratchScope scope(this);
  if (kda) {
    if (index < 0 || index >= c.NumKdaLayers()) return absl::InvalidArgumentError("KDA layer");
    const int64_t HKV = c.KdaStateElems(), tail = c.ConvTailElems();
    s->kda.resize(c.NumKdaLayers());
    KdaLayerState& ks = s->kda[index];
    ks.recurrent.resize(HKV);
    ASSIGN_OR_RETURN(void* canonical, Scratch(HKV * sizeof(float)));
    RETURN_IF_ERROR(KdaStateToHost(index, slot, ks.recurrent.data(), canonical));
    std::vector<float>* tails[3] = {&ks.conv_q, &ks.conv_k, &ks.conv_v};
    for (int j = 0; j < 3; ++j) {
      tails[j]->resize(tail);
      if (tail == 0) continue;
      KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tails[j]->data(), m.kda_tail[index][j] + slot * tail,
                                              tail * sizeof(float), cudaMemcpyDeviceToHost,
                                              m.stream));
    }
  } else {
    if (index < 0 || index >= c.NumMlaLayers() || row_begin < 0 || row_end < row_begin) {
      return absl::InvalidArgumentError("MLA layer or rows");
    }
    const int64_t lat = c.MlaLatentDim();
    s->mla.resize(c.NumMlaLayers());
    std::vector<float>& host = s->mla[index].latent;
    if (static_cast<int64_t>(host.size()) < row_end * lat) host.resize(row_end * lat);
    if (row_end > row_begin) {
      std::vector<int64_t> cu = {0, row_end};
      ASSIGN_OR_RETURN(void* d_cu, Stage(cu.data(), 2 * sizeof(int64_t)));
      ASSIGN_OR_RETURN(const int32_t* table, StageBlockTable({slot}));
      ASSIGN_OR_RETURN(void* out, Scratch(row_end * lat * sizeof(float)));
      cuda::MlaCacheGatherParams p;
      p.num_seqs = 1;
      p.num_rows = row_end;
      p.cache = {m.mla_pool[index], options_.latent_dtype, m.latent_pages, options_.page_rows,
                 c.kv_lora_rank, c.qk_rope_head_dim, table, m.max_pages_per_seq};
      p.kv_cu_seqlens = static_cast<const int64_t*>(d_cu);
      p.out = static_cast<float*>(out);
      RETURN_IF_ERROR(cuda::MlaCacheGather(p, m.stream));
      KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
          host.data() + row_begin * lat, static_cast<float*>(out) + row_begin * lat,
          (row_end - row_begin) * lat * sizeof(float), cudaMemcpyDeviceToHost, m.stream));
    }
  }
  KL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(m.stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::ReleaseState(SequenceState* s) {
  if (s->device == nullptr) return absl::OkStatus();
  RETURN_IF_ERROR(SlotOf(s).status());
  // Work queued on the slot must finish before another sequence can take it.
  KL_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(impl_->stream));
  s->device.reset();
  return absl::OkStatus();
}

absl::Status CudaBackend::KdaRefs(const std::vector<SequenceState*>& states, int64_t kda_index,
                                  std::vector<KdaStateRef>* refs) {
  Impl& m = *impl_;
  if (kda_index < 0 || kda_index >= static_cast<int64_t>(m.kda_state.size())) {
    return absl::InvalidArgumentError("KdaRefs: layer out of range");
  }
  refs->resize(states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    ASSIGN_OR_RETURN(int32_t slot, SlotOf(states[i]));
    (*refs)[i] = {m.kda_state[kda_index], m.kda_tail[kda_index][0], m.kda_tail[kda_index][1],
                  m.kda_tail[kda_index][2], slot};
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::MlaRefs(const std::vector<SequenceState*>& states, int64_t mla_index,
                                  const std::vector<SeqSlice>& seqs, int64_t row_elems,
                                  std::vector<MlaCacheRef>* refs) {
  Impl& m = *impl_;
  if (mla_index < 0 || mla_index >= static_cast<int64_t>(m.mla_pool.size()) ||
      row_elems != config_.MlaLatentDim() || seqs.size() != states.size()) {
    return absl::InvalidArgumentError("MlaRefs: bad arguments");
  }
  refs->resize(states.size());
  for (size_t i = 0; i < states.size(); ++i) {
    ASSIGN_OR_RETURN(int32_t slot, SlotOf(states[i]));
    RETURN_IF_ERROR(EnsurePages(slot, seqs[i].pos + seqs[i].rows));
    (*refs)[i].rows = static_cast<float*>(m.mla_pool[mla_index]);
    (*refs)[i].slot = slot;
  }
  return absl::OkStatus();
}

}  // namespace kl
