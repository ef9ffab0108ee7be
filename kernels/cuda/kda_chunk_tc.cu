// Tensor-core chunked KDA prefill (bf16 operands, fp32 accumulation, fp32 state),
// K = V = 128, C = 64, sm_90a: launcher. Three kernels (README.md has the picture and
// numbers):
//  1. ChunkOffsetsKernel: chunk_offsets[n] = sum_{m<n} ceil(len_m / 64) (one block).
//  2. the intra-chunk kernel (kda_chunk_tc_intra.cu): one 76 KB item per (chunk, head);
//  3. the state kernel (kda_chunk_tc_state.cu): the sequential pass over the chunks.
// Segmented pipeline (batches of <= kMaxOverlapSeqs sequences, more than one segment
// of chunks): the chunks are cut into segments of TcTuning::seg_chunks; the intra
// kernel of segment s runs on one of two low-priority streams, the state kernel of s
// on a high-priority stream after it, carrying the state between segments through
// the workspace. A state CTA fits beside an intra CTA, so the state pass of segment s
// overlaps the intra work of s + 1, s + 2 and reads items that are still in L2; the
// intra kernel runs at most max_ahead segments ahead of the state pass.
// Streamed mode (the default for B = 1 at H = 32 up to 1,024 chunks; TcTuning::stream
// lists the conditions): one intra and one state launch over all chunks, at the same time; the intra kernel flags each
// item when written and the state CTAs wait for the flags, so the chains trail the intra
// kernel by a few chunks and read items while they are still in L2.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>

#include "kernels/cuda/kda_chunk_internal.h"
#include "kernels/cuda/kda_chunk_tc.cuh"

namespace kl::cuda::internal {
namespace {

using tc::bf16;
using tc::kC;
using tc::TcArgs;

constexpr int kScanThreads = 1024;

__global__ void __launch_bounds__(kScanThreads)
    ChunkOffsetsKernel(const int64_t* __restrict__ cu, int N, int32_t* __restrict__ offs) {
  __shared__ int32_t s_sum[kScanThreads];
  const int tid = threadIdx.x;
  const int per = (N + kScanThreads - 1) / kScanThreads;
  const int n0 = min(N, tid * per), n1 = min(N, n0 + per);
  int32_t local = 0;
  for (int n = n0; n < n1; ++n) local += static_cast<int32_t>((cu[n + 1] - cu[n] + kC - 1) / kC);
  s_sum[tid] = local;
  __syncthreads();
  for (int off = 1; off < kScanThreads; off <<= 1) {  // Hillis-Steele inclusive scan
    const int32_t x = tid >= off ? s_sum[tid - off] : 0;
    __syncthreads();
    s_sum[tid] += x;
    __syncthreads();
  }
  int32_t run = s_sum[tid] - local;  // exclusive prefix
  for (int n = n0; n < n1; ++n) {
    offs[n] = run;
    run += static_cast<int32_t>((cu[n + 1] - cu[n] + kC - 1) / kC);
  }
  if (tid == kScanThreads - 1) offs[N] = s_sum[tid];
}

// Tests: holds the intra stream of a streamed call for `ns` nanoseconds, so the state
// CTAs start first and take the flag-waiting paths (TcTuning::intra_delay_ns).
__global__ void DelayKernel(int64_t ns) {
  uint64_t t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (static_cast<int64_t>(t - t0) < ns);
}

TcStateImpl g_state_impl = TcStateImpl::kWgmma;
std::atomic<TcPath> g_last_path{TcPath::kSequential};
TcTuning g_tuning;

// Internal streams and events of the segmented pipeline, one set per device, created
// on first use; `mu` serialises the enqueueing of one call.
constexpr int kEvents = 8;
constexpr int kIntraStreams = 4;
struct Pipeline {
  bool ready = false;
  int sms = 0;
  // An intra CTA fits on an SM beside a state CTA (registers and shared memory), so the
  // intra kernel keeps running while state CTAs wait on its flags: streamed mode is safe.
  bool co_resident = false;
  cudaStream_t intra[kIntraStreams] = {}, state = nullptr;
  cudaEvent_t fork = nullptr, join[kIntraStreams + 1] = {};
  cudaEvent_t ev_intra[kEvents] = {}, ev_state[kEvents] = {};
};
constexpr int kMaxDevices = 16;
std::mutex g_pipe_mu;
Pipeline g_pipes[kMaxDevices];

cudaError_t GetPipeline(Pipeline** out) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  Pipeline& p = g_pipes[dev];
  if (!p.ready) {
    int least = 0, greatest = 0;
    err = cudaDeviceGetAttribute(&p.sms, cudaDevAttrMultiProcessorCount, dev);
    if (err == cudaSuccess) err = cudaDeviceGetStreamPriorityRange(&least, &greatest);
    for (int i = 0; i < kIntraStreams && err == cudaSuccess; ++i) {
      err = cudaStreamCreateWithPriority(&p.intra[i], cudaStreamNonBlocking, least);
    }
    if (err == cudaSuccess) err = cudaStreamCreateWithPriority(&p.state, cudaStreamNonBlocking, greatest);
    auto ev = [&](cudaEvent_t* e) {
      if (err == cudaSuccess) err = cudaEventCreateWithFlags(e, cudaEventDisableTiming);
    };
    ev(&p.fork);
    for (cudaEvent_t& e : p.join) ev(&e);
    for (int i = 0; i < kEvents; ++i) {
      ev(&p.ev_intra[i]);
      ev(&p.ev_state[i]);
    }
    cudaFuncAttributes fi{}, fs{};
    int di = 0, ds = 0, ti = 0, ts = 0, regs = 0, smem = 0, per_block = 0;
    if (err == cudaSuccess) err = tc::IntraAttributes(&fi, &di, &ti);
    if (err == cudaSuccess) err = tc::StateAttributes(&fs, &ds, &ts);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&regs, cudaDevAttrMaxRegistersPerMultiprocessor, dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&per_block, cudaDevAttrReservedSharedMemoryPerBlock, dev);
    if (err != cudaSuccess) return err;
    // Registers are allocated per warp in units of 256 (8 per thread).
    auto warp_regs = [](const cudaFuncAttributes& f) { return (f.numRegs + 7) / 8 * 8 * 32; };
    const int64_t need_regs =
        static_cast<int64_t>(warp_regs(fi)) * (ti / 32) + static_cast<int64_t>(warp_regs(fs)) * (ts / 32);
    const int64_t need_smem =
        static_cast<int64_t>(fi.sharedSizeBytes) + di + fs.sharedSizeBytes + ds + 2 * static_cast<int64_t>(per_block);
    // A margin of one warp allocation on the registers (exactly 64K together was not
    // shown to co-reside; today 242 + 128 registers leave 1K free).
    p.co_resident = need_regs < regs && need_smem <= smem;
    p.ready = true;
  }
  *out = &p;
  return cudaSuccess;
}

cudaError_t LaunchIntraIf(const TcArgs& a, cudaStream_t s) {
  return g_tuning.skip_intra ? cudaSuccess : tc::LaunchIntra(a, s);
}
cudaError_t LaunchStateIf(const TcArgs& a, cudaStream_t s) {
  return g_tuning.skip_state
             ? cudaSuccess
             : tc::LaunchState(a, g_state_impl == TcStateImpl::kWgmma, g_tuning.state_alone, s);
}

// Segment boundaries over [0, total) chunks: an optional `head`-chunk first segment
// (the state pass starts earlier), `seg`-chunk segments, an optional `tail`-chunk last
// segment (less state work left once the last intra segment is done).
int BuildSegments(int total, int seg, int head, int tail, int* bounds, int max_bounds) {
  int n = 0, c = 0;
  bounds[n++] = 0;
  const int body_end = tail > 0 && total > tail + head ? total - tail : total;
  if (head > 0 && head < body_end) bounds[n++] = c = head;
  while (c < body_end && n < max_bounds - 2) bounds[n++] = c = c + seg < body_end ? c + seg : body_end;
  if (c < total) bounds[n++] = total;
  return n - 1;  // segments
}

#define KL_TRY(expr)                           \
  do {                                         \
    const cudaError_t e_ = (expr);             \
    if (e_ != cudaSuccess) return e_;          \
  } while (0)

}  // namespace

cudaError_t LaunchChunkTc(const KdaChunkParams& p, void* workspace, cudaStream_t stream,
                          cudaEvent_t after_intra) {
  const int N = static_cast<int>(p.num_seqs), H = static_cast<int>(p.num_heads);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  const int64_t max_chunks = MaxChunks(p.num_tokens, p.num_seqs);
  TcArgs a{};
  a.q = static_cast<const bf16*>(p.q);
  a.k = static_cast<const bf16*>(p.k);
  a.v = static_cast<const bf16*>(p.v);
  a.f = static_cast<const bf16*>(p.f);
  a.b = static_cast<const bf16*>(p.b);
  a.a_log = p.a_log;
  a.dt_bias = p.dt_bias;
  a.cu = p.cu_seqlens;
  a.offs = reinterpret_cast<const int32_t*>(ws);
  a.slots = p.slots;
  a.state_pool = p.state_pool;
  a.o = static_cast<bf16*>(p.o);
  a.items = ws + TcOffsetsBytes(p.num_seqs);
  unsigned char* items_end = a.items + static_cast<size_t>(max_chunks) * H * kItemBytes;
  a.carry = TcCarryBytes(p.num_seqs, p.num_heads) > 0 ? reinterpret_cast<float*>(items_end) : nullptr;
  int32_t* flags = reinterpret_cast<int32_t*>(items_end + TcCarryBytes(p.num_seqs, p.num_heads));
  a.N = N;
  a.H = H;
  a.num_slots = static_cast<int>(p.num_slots);
  a.scale = p.scale != 0.0f ? p.scale : 1.0f / sqrtf(static_cast<float>(tc::kK));
  a.stop_after = g_tuning.stop_after;

  ChunkOffsetsKernel<<<1, kScanThreads, 0, stream>>>(p.cu_seqlens, N, reinterpret_cast<int32_t*>(ws));
  KL_TRY(cudaGetLastError());

  // Chunks of the batch <= ceil(T / 64) + N - 1 (tighter than MaxChunks for N = 1).
  const int64_t chunks_ub_raw = (p.num_tokens + kC - 1) / kC + p.num_seqs - 1;
  const int chunks_ub = static_cast<int>(chunks_ub_raw < max_chunks ? chunks_ub_raw : max_chunks);
  // Streamed mode (TcTuning::stream): needs both whole kernels and the wgmma state pass.
  const bool can_stream = g_tuning.stream && p.allow_concurrent && g_state_impl == TcStateImpl::kWgmma &&
                          !g_tuning.skip_intra && !g_tuning.skip_state && g_tuning.stop_after == 7 &&
                          !g_tuning.state_alone && after_intra == nullptr && chunks_ub > N &&
                          (g_tuning.stream_max_chunks <= 0 || chunks_ub <= g_tuning.stream_max_chunks);
  // Not while the caller's stream is being captured into a CUDA graph: the two kernels
  // would become sibling nodes that the graph may run one after the other, state first.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (can_stream) KL_TRY(cudaStreamIsCapturing(stream, &capture));
  if (can_stream && capture == cudaStreamCaptureStatusNone) {
    std::lock_guard<std::mutex> lock(g_pipe_mu);
    Pipeline* pl = nullptr;
    KL_TRY(GetPipeline(&pl));
    // At most one state CTA on every other SM: with 128 state CTAs (N = 2, H = 32) on an
    // H100 the intra kernel kept one slot on most SMs and the streamed pass measured 3-5%
    // slower than the segmented pipeline (1.73-1.79 vs 1.67-1.69 ms at 2 x 16K).
    if (pl->co_resident && 2 * static_cast<int64_t>(N) * H * (tc::kV / 64) <= pl->sms) {
      // The intra kernel is enqueued first: if the two are ever serialised (a profiler,
      // CUDA_LAUNCH_BLOCKING) the flags are all set before the state pass starts.
      a.c0 = 0;
      a.c1 = chunks_ub;
      a.seg = 0;
      a.ready = flags;
      KL_TRY(cudaMemsetAsync(flags, 0, TcFlagsBytes(p.num_tokens, p.num_seqs, p.num_heads), stream));
      KL_TRY(cudaEventRecord(pl->fork, stream));
      KL_TRY(cudaStreamWaitEvent(pl->intra[0], pl->fork, 0));
      KL_TRY(cudaStreamWaitEvent(pl->state, pl->fork, 0));
      if (g_tuning.intra_delay_ns > 0) {
        DelayKernel<<<1, 32, 0, pl->intra[0]>>>(g_tuning.intra_delay_ns);
        KL_TRY(cudaGetLastError());
      }
      KL_TRY(tc::LaunchIntra(a, pl->intra[0]));
      // Joined back even if the state launch fails: the caller's stream must not run
      // ahead of an intra kernel that is still writing the workspace.
      const cudaError_t launched = tc::LaunchState(a, true, false, pl->state);
      KL_TRY(cudaEventRecord(pl->join[0], pl->intra[0]));
      KL_TRY(cudaEventRecord(pl->join[kIntraStreams], pl->state));
      KL_TRY(cudaStreamWaitEvent(stream, pl->join[0], 0));
      KL_TRY(cudaStreamWaitEvent(stream, pl->join[kIntraStreams], 0));
      if (launched == cudaSuccess) g_last_path = TcPath::kStreamed;
      return launched;
    }
  }

  // Segment length: as set, or (< 0) chunks / 16 clamped to [32, 128]: fewer launches
  // for long inputs, enough segments to overlap for short ones.
  int seg = g_tuning.seg_chunks;
  if (seg < 0) seg = chunks_ub / 16 < 32 ? 32 : chunks_ub / 16 > 128 ? 128 : chunks_ub / 16;
  const bool segmented = a.carry != nullptr && seg > 0 && chunks_ub > seg && after_intra == nullptr;
  g_last_path = segmented ? TcPath::kSegmented : TcPath::kSequential;
  if (!segmented) {
    a.c0 = 0;
    a.c1 = static_cast<int>(max_chunks);
    a.seg = 0;
    KL_TRY(LaunchIntraIf(a, stream));
    if (after_intra != nullptr) KL_TRY(cudaEventRecord(after_intra, stream));
    return LaunchStateIf(a, stream);
  }

  std::lock_guard<std::mutex> lock(g_pipe_mu);
  Pipeline* pl = nullptr;
  KL_TRY(GetPipeline(&pl));
  const int ahead = g_tuning.max_ahead < 0 ? 0 : g_tuning.max_ahead > kEvents - 2 ? kEvents - 2 : g_tuning.max_ahead;
  KL_TRY(cudaEventRecord(pl->fork, stream));
  for (cudaStream_t is : pl->intra) KL_TRY(cudaStreamWaitEvent(is, pl->fork, 0));
  KL_TRY(cudaStreamWaitEvent(pl->state, pl->fork, 0));
  static thread_local int bounds[65536 / 4 + 64];
  const int nseg = BuildSegments(chunks_ub, seg < 4 ? 4 : seg, g_tuning.head_chunks,
                                 g_tuning.tail_chunks, bounds, static_cast<int>(sizeof(bounds) / sizeof(bounds[0])));
  const int nstreams = g_tuning.intra_streams < 1 ? 1 : g_tuning.intra_streams > kIntraStreams ? kIntraStreams
                                                                                                 : g_tuning.intra_streams;
  for (int s = 0; s < nseg; ++s) {
    a.c0 = bounds[s];
    a.c1 = bounds[s + 1];
    a.seg = s;
    cudaStream_t is = pl->intra[s % nstreams];
    if (ahead > 0 && s >= ahead) KL_TRY(cudaStreamWaitEvent(is, pl->ev_state[(s - ahead) % kEvents], 0));
    KL_TRY(LaunchIntraIf(a, is));
    KL_TRY(cudaEventRecord(pl->ev_intra[s % kEvents], is));
    KL_TRY(cudaStreamWaitEvent(pl->state, pl->ev_intra[s % kEvents], 0));
    KL_TRY(LaunchStateIf(a, pl->state));
    KL_TRY(cudaEventRecord(pl->ev_state[s % kEvents], pl->state));
  }
  for (int i = 0; i < kIntraStreams; ++i) KL_TRY(cudaEventRecord(pl->join[i], pl->intra[i]));
  KL_TRY(cudaEventRecord(pl->join[kIntraStreams], pl->state));
  for (cudaEvent_t e : pl->join) KL_TRY(cudaStreamWaitEvent(stream, e, 0));
  return cudaSuccess;
}

void SetTcStateImpl(TcStateImpl impl) { g_state_impl = impl; }

cudaError_t TcStreamedModeFits(bool* fits) {
  std::lock_guard<std::mutex> lock(g_pipe_mu);
  Pipeline* pl = nullptr;
  KL_TRY(GetPipeline(&pl));
  *fits = pl->co_resident;
  return cudaSuccess;
}
void SetTcTuning(const TcTuning& t) { g_tuning = t; }
TcPath LastTcPath() { return g_last_path.load(); }
TcTuning GetTcTuning() { return g_tuning; }

}  // namespace kl::cuda::internal
