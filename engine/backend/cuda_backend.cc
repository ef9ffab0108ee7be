#include "engine/backend/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/common/status_macros.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kda_chunk.h"
#include "kernels/cuda/kda_decode.h"
#include "kernels/cuda/mla.h"
#include "kernels/cuda/moe.h"
#include "kernels/cuda/ops.h"

namespace kl {
namespace {

constexpr int64_t kAlign = 256;

absl::Status CublasStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(s)));
}

#define KL_CUBLAS(expr) RETURN_IF_ERROR(CublasStatus((expr), #expr))

// Device work of an op. While a captured graph is being replayed the op's host
// side runs (it stages this step's inputs into the pinned buffers the graph
// reads) but its launches are skipped: the graph holds them.
#define KL_LAUNCH(expr)                      \
  do {                                       \
    if (!Replaying()) RETURN_IF_ERROR(expr); \
  } while (0)
#define KL_CUBLAS_LAUNCH(expr)         \
  do {                                 \
    if (!Replaying()) KL_CUBLAS(expr); \
  } while (0)
#define KL_CUDA_LAUNCH(expr)                         \
  do {                                               \
    if (!Replaying()) KL_CUDA_RETURN_IF_ERROR(expr); \
  } while (0)

int64_t AlignUp(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

struct CudaBackend::Impl {
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  void* cublas_workspace = nullptr;
  cudaDeviceProp prop{};

  // Activation arena: chunks kept across forwards, rewound at BeginForward.
  struct Chunk {
    char* base = nullptr;
    int64_t size = 0;
  };
  std::vector<Chunk> chunks;
  size_t chunk_index = 0;
  int64_t chunk_offset = 0;
  // Stack discipline: every allocation records the top before it; a freed
  // allocation rewinds the top once everything above it is freed too. Reuse
  // within a forward is safe because all work is ordered on one stream.
  struct Frame {
    size_t chunk;
    int64_t offset;
    bool freed;
  };
  std::vector<Frame> frames;
  int64_t generation = 0;  // bumps every forward (stale Buffer owners do nothing)
  bool in_forward = false;
  std::vector<void*> loose;  // scratch made outside a forward; freed at the next sync point

  // Pinned host staging of a forward (same bump scheme; chunks are never freed
  // while the backend lives, since graphs bake their addresses).
  std::vector<Chunk> host_chunks;
  size_t host_index = 0;
  int64_t host_offset = 0;
  struct PendingCopy {
    const void* src;  // pinned
    void* dst;        // caller's host memory
    int64_t bytes;
  };
  std::vector<PendingCopy> pending;  // Download()s completed at EndForward

  // CUDA graphs of decode shapes.
  enum class Mode { kIdle, kEager, kCapture, kReplay };
  Mode mode = Mode::kIdle;
  using GraphKey = std::tuple<int64_t, int64_t, int64_t>;  // seqs, context bucket, logit rows
  struct GraphEntry {
    cudaGraphExec_t exec = nullptr;
    std::vector<int64_t> staging;  // sizes staged during capture (+ upload, - download)
    int64_t last_use = 0;
  };
  std::map<GraphKey, GraphEntry> graphs;
  std::map<GraphKey, int64_t> seen;
  GraphKey key{};
  std::vector<int64_t> staging;  // this forward's staging log
  int64_t context_hint = 0;      // MLA decode split hint of this forward (0: none)
  int64_t forwards = 0;
  CudaGraphStats stats;

  std::vector<void*> weight_allocs;
  std::map<const void*, float*> f32_copies;                   // bf16 weight → fp32 copy
  std::map<const void*, std::array<void*, 3>> expert_tables;  // MoE w1 vector → pointer arrays

  // State pools.
  std::vector<float*> kda_state;                // per KDA layer: [slots][H][K][V]
  std::vector<std::array<float*, 3>> kda_tail;  // per KDA layer: q, k, v [slots][W-1][KD]
  std::vector<void*> mla_pool;                  // per MLA layer: [pages][page_rows][lat]
  int32_t* block_table = nullptr;               // [slots][max_pages_per_seq]
  std::vector<int32_t> block_table_host;
  int64_t max_pages_per_seq = 0;
  int64_t latent_pages = 0;

  mutable std::mutex mu;  // guards the free lists and slot_pages
  std::vector<int32_t> free_slots;
  std::vector<int32_t> free_pages;
  std::vector<std::vector<int32_t>> slot_pages;
};

// A sequence's claim on a slot (and the pages recorded for it in slot_pages).
struct CudaResidency final : StateResidency {
  CudaBackend* backend = nullptr;
  int32_t slot = -1;
  ~CudaResidency() override { backend->FreeResidency(slot, {}); }
};

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
  m.key = {shape.num_seqs, bucket, shape.logits_rows};
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
  KL_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(m.stream, cudaStreamCaptureModeThreadLocal));
  return absl::OkStatus();
}

absl::Status CudaBackend::EndForward(const absl::Status& forward_status) {
  Impl& m = *impl_;
  const Impl::Mode mode = m.mode;
  m.mode = Impl::Mode::kIdle;
  m.in_forward = false;
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

absl::Status CudaBackend::BindStates(const std::vector<SequenceState*>& states) {
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  const int64_t lat = c.MlaLatentDim(), HKV = c.KdaStateElems(), tail = c.ConvTailElems();
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
    for (int64_t i = 0; i < c.NumKdaLayers(); ++i) {
      const KdaLayerState& ks = s->kda[i];
      if (static_cast<int64_t>(ks.recurrent.size()) != HKV ||
          static_cast<int64_t>(ks.conv_q.size()) != tail ||
          static_cast<int64_t>(ks.conv_k.size()) != tail ||
          static_cast<int64_t>(ks.conv_v.size()) != tail) {
        return absl::InvalidArgumentError("KDA state of wrong size");
      }
      KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.kda_state[i] + slot * HKV, ks.recurrent.data(),
                                              HKV * sizeof(float), cudaMemcpyHostToDevice,
                                              m.stream));
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

absl::Status CudaBackend::SyncStateToHost(SequenceState* s) {
  if (s->device == nullptr) return absl::OkStatus();
  ASSIGN_OR_RETURN(int32_t slot, SlotOf(s));
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  const int64_t lat = c.MlaLatentDim(), HKV = c.KdaStateElems(), tail = c.ConvTailElems();
  s->kda.resize(c.NumKdaLayers());
  s->mla.resize(c.NumMlaLayers());
  for (int64_t i = 0; i < c.NumKdaLayers(); ++i) {
    KdaLayerState& ks = s->kda[i];
    ks.recurrent.resize(HKV);
    KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ks.recurrent.data(), m.kda_state[i] + slot * HKV,
                                            HKV * sizeof(float), cudaMemcpyDeviceToHost, m.stream));
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
    KL_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ks.recurrent.data(), m.kda_state[index] + slot * HKV,
                                            HKV * sizeof(float), cudaMemcpyDeviceToHost,
                                            m.stream));
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

absl::Status CudaBackend::RmsNorm(const float* x, int64_t rows, int64_t dim, int64_t stride,
                                  const Weight& w, double eps, float* y) {
  if (w.rows * w.cols != dim || w.dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("RmsNorm: weight has ", w.rows * w.cols, " elements, expected ", dim));
  }
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
  const cuda::MlaPagedCache cache{
      caches[0].rows, options_.latent_dtype, m.latent_pages, options_.page_rows, lora, rope,
      d_table,        m.max_pages_per_seq};
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
  const size_t ws_bytes = cuda::MoeWorkspaceBytes(ep);
  void* ws = nullptr;
  if (ws_bytes > 0) {
    ASSIGN_OR_RETURN(ws, Scratch(static_cast<int64_t>(ws_bytes)));
  }
  KL_LAUNCH(cuda::MoeExperts(ep, ws, ws_bytes, m.stream));
  return absl::OkStatus();
}

}  // namespace kl
