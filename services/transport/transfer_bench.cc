// Device state transfer benchmark (issue: NCCL transport), on a machine with two
// GPUs. One process: a decode worker (DecodeService + NCCL transport) on GPU 1
// and prefill workers on GPU 0 serving the same synthetic model, all over real
// gRPC on loopback, exactly as in the cluster.
//  0. on one GPU: the per-byte passes of an MLA message (pack + checksum, fused or not);
//  1. NCCL send/recv bandwidth GPU 0 -> GPU 1 (our own nccl-tests-style loop);
//  2. for prompts of 4K / 32K / 128K tokens, the Prefill call of the router
//     (prefill + state push until the decode worker has verified the state),
//     three ways: NCCL layer by layer (overlapped with the next layers'
//     compute), NCCL after the forward (ship-at-end), and the gRPC bundle.
//     "tail" = call time - queue - prefill compute = last layer -> decode-ready.
// Run: tools/gpu_run.sh --bundle //services/transport:transfer_bench, then on
// the GPU machine `NCCL_NVLS_ENABLE=0 .bundle/bin/transfer_bench`.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "engine/backend/cuda_backend.h"
#include "engine/config/model_config.h"
#include "engine/model/model.h"
#include "engine/model/random_source.h"
#include "kernels/cuda/transfer.h"
#include "proto/worker.grpc.pb.h"
#include "services/common/server_util.h"
#include "services/decode/decode_service.h"
#include "services/prefill/prefill_service.h"
#include "services/transport/device_transport.h"
#include "services/transport/transfer_plan.h"

ABSL_FLAG(int, layers, 8, "first layers of the 48B shape (keeps the 3:1 KDA:MLA pattern)");
ABSL_FLAG(std::string, prompts, "4096,32768,131072", "prompt lengths");
ABSL_FLAG(std::string, call_prompts, "",
          "prompt lengths of the Prefill-call table (default: --prompts)");
ABSL_FLAG(int, reps, 2, "timed calls per (mode, prompt); the best is reported");
ABSL_FLAG(int64_t, max_batch_tokens, 16384, "prefill chunk");
ABSL_FLAG(bool, pipeline, false,
          "both ends pipeline their transfers (DeviceTransportOptions::pipeline)");
ABSL_FLAG(std::string, message_mb, "0,16,64",
          "transport-alone table: bounds on an MLA message to compare, MiB (0: a layer's rows "
          "as one message)");
ABSL_FLAG(double, call_message_mb, 16, "Prefill-call table: the bound on an MLA message, MiB");
ABSL_FLAG(int64_t, plan_chunk, 0,
          "transport-alone table: MLA rows per plan message (0: the whole prompt, as one "
          "prefill chunk would ship them)");

namespace kl {
namespace {

using Clock = std::chrono::steady_clock;

// Raw NCCL time (ms) of a list of messages GPU 0 -> GPU 1 (set by NcclPeak),
// one call per message or all in one group.
std::function<double(const std::vector<int64_t>&, bool grouped)> g_raw;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

#define CHECK_NCCL(x)                                                              \
  do {                                                                             \
    ncclResult_t r_ = (x);                                                         \
    if (r_ != ncclSuccess) {                                                       \
      std::printf("NCCL error %s at %s\n", ncclGetErrorString(r_), #x);            \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

// Best-of-5 time of one ncclSend (GPU 0) / ncclRecv (GPU 1) of `bytes`.
void NcclPeak(const std::vector<int64_t>& sizes) {
  ncclUniqueId id;
  CHECK_NCCL(ncclGetUniqueId(&id));
  ncclComm_t comms[2];
  cudaStream_t streams[2];
  void* bufs[2];
  const int64_t max_bytes = *std::max_element(sizes.begin(), sizes.end());
  std::vector<std::thread> init;
  for (int r = 0; r < 2; ++r) {
    init.emplace_back([&, r] {
      cudaSetDevice(r);
      cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking);
      cudaMalloc(&bufs[r], max_bytes);
      cudaMemset(bufs[r], r, max_bytes);
      CHECK_NCCL(ncclCommInitRank(&comms[r], 2, id, r));
    });
  }
  for (auto& t : init) t.join();
  std::printf("\nNCCL send/recv GPU0 -> GPU1 (one message, best of 5)\n");
  std::printf("%12s | %10s | %8s\n", "bytes", "ms", "GB/s");
  for (int64_t bytes : sizes) {
    double best = 1e30;
    for (int it = 0; it < 6; ++it) {
      const auto t0 = Clock::now();
      std::vector<std::thread> th;
      for (int r = 0; r < 2; ++r) {
        th.emplace_back([&, r] {
          cudaSetDevice(r);
          if (r == 0) {
            CHECK_NCCL(ncclSend(bufs[0], bytes, ncclUint8, 1, comms[0], streams[0]));
          } else {
            CHECK_NCCL(ncclRecv(bufs[1], bytes, ncclUint8, 0, comms[1], streams[1]));
          }
          cudaStreamSynchronize(streams[r]);
        });
      }
      for (auto& t : th) t.join();
      const double ms = Ms(Clock::now() - t0);
      if (it > 0) best = std::min(best, ms);  // first: warm-up
    }
    std::printf("%12ld | %10.3f | %8.1f\n", static_cast<long>(bytes), best, bytes / (best * 1e6));
  }
  g_raw = [=](const std::vector<int64_t>& msgs, bool grouped) {
    // The same messages as a transfer, raw, in order.
    double best = 1e30;
    for (int it = 0; it < 4; ++it) {
      const auto t0 = Clock::now();
      std::vector<std::thread> th;
      for (int r = 0; r < 2; ++r) {
        th.emplace_back([&, r] {
          cudaSetDevice(r);
          if (grouped) CHECK_NCCL(ncclGroupStart());
          int64_t offset = 0;  // distinct places, as a grouped transfer has
          for (int64_t b : msgs) {
            char* p = static_cast<char*>(bufs[r]) + (grouped && offset + b <= max_bytes ? offset : 0);
            if (r == 0) {
              CHECK_NCCL(ncclSend(p, b, ncclUint8, 1, comms[0], streams[0]));
            } else {
              CHECK_NCCL(ncclRecv(p, b, ncclUint8, 0, comms[1], streams[1]));
            }
            offset += b;
          }
          if (grouped) CHECK_NCCL(ncclGroupEnd());
          cudaStreamSynchronize(streams[r]);
        });
      }
      for (auto& t : th) t.join();
      if (it > 0) best = std::min(best, Ms(Clock::now() - t0));
    }
    return best;
  };
}

// "4096,32768" -> {4096, 32768} (positive values only).
std::vector<int64_t> Lengths(const std::string& list) {
  std::vector<int64_t> out;
  for (absl::string_view p : absl::StrSplit(list, ',')) {
    int64_t v = 0;
    if (absl::SimpleAtoi(p, &v) && v > 0) out.push_back(v);
  }
  return out;
}

struct Worker {
  std::unique_ptr<CudaBackend> backend;
  std::unique_ptr<Model> model;
};

Worker MakeWorker(const ModelConfig& c, int device, int64_t max_seqs, int64_t max_rows) {
  CudaBackendOptions o;
  o.device = device;
  o.max_seqs = max_seqs;
  o.page_rows = 64;
  o.latent_pages = max_seqs * ((max_rows + 63) / 64 + 2);
  o.latent_dtype = DType::kBF16;
  o.bf16_weights = true;
  o.kda_tensor_cores = true;
  o.mla_tensor_cores = true;
  o.cuda_graphs = device == 1;
  Worker w;
  auto be = CudaBackend::Create(c, o);
  if (!be.ok()) {
    std::printf("backend: %s\n", be.status().ToString().c_str());
    std::exit(1);
  }
  w.backend = std::move(*be);
  auto m = Model::Create(c, SyntheticTensorSource(1), w.backend.get());
  if (!m.ok()) {
    std::printf("model: %s\n", m.status().ToString().c_str());
    std::exit(1);
  }
  w.model = std::move(*m);
  return w;
}

// One GPU: the per-byte passes of a transfer's MLA message — pack from the
// paged latent cache + checksum of the packed bytes (sender), checksum of the
// received bytes + scatter (receiver) — as two kernels and as one fused pass,
// against a device-to-device copy of the same bytes. CUDA events around ten
// back-to-back passes, best of 20. At 16.8 MB the bytes stay in the 50 MB L2
// between passes (L2-warm); a 151 MB message does not fit.
void KernelPasses() {
  cudaSetDevice(0);
  const int64_t row_bytes = 1152, page_rows = 64;  // a bf16 latent row of the 48B shape
  std::printf("\nPer-byte passes of an MLA message on GPU 0 (10 back to back, best of 20)\n");
  std::printf("%9s | %8s | %12s | %8s | %12s | %8s | %8s\n", "MB", "copy ms", "pack+sum ms",
              "fused", "sum+scatter", "fused", "copy/fused");
  for (int64_t rows : {int64_t{14563}, int64_t{131072}}) {  // 16 MiB bound; a 128K layer
    const int64_t npages = (rows + page_rows - 1) / page_rows, bytes = rows * row_bytes;
    std::vector<int32_t> pages(npages);
    for (int64_t i = 0; i < npages; ++i) pages[i] = static_cast<int32_t>((i * 7919) % npages);
    void *pool = nullptr, *flat = nullptr, *copy = nullptr;
    int32_t* d_pages = nullptr;
    uint64_t* sum = nullptr;
    if (cudaMalloc(&pool, npages * page_rows * row_bytes) != cudaSuccess ||
        cudaMalloc(&flat, bytes) != cudaSuccess || cudaMalloc(&copy, bytes) != cudaSuccess ||
        cudaMalloc(&d_pages, npages * sizeof(int32_t)) != cudaSuccess ||
        cudaMalloc(&sum, sizeof(uint64_t)) != cudaSuccess) {
      std::printf("cudaMalloc failed\n");
      return;
    }
    cudaMemset(pool, 1, npages * page_rows * row_bytes);
    cudaMemcpy(d_pages, pages.data(), npages * sizeof(int32_t), cudaMemcpyHostToDevice);
    const cuda::PagedRows paged{pool, d_pages, page_rows, row_bytes};
    const cuda::ChecksumSpan span{flat, bytes, sum, 0};
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    // Ten passes back to back between two events (the launches queue up, so
    // the host's launch path is off the clock), best of 20 such runs.
    auto time = [&](const std::function<void()>& f) {
      float best = 1e30f;
      for (int it = 0; it < 21; ++it) {
        f();  // queued ahead of e0: the GPU is busy when e0 is stamped
        cudaEventRecord(e0);
        for (int k = 0; k < 10; ++k) f();
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        if (it > 0) best = std::min(best, ms / 10);
      }
      return best;
    };
    const float t_copy = time([&] { cudaMemcpyAsync(copy, flat, bytes, cudaMemcpyDeviceToDevice); });
    const float t_pack2 = time([&] {
      cuda::PackRows(paged, 0, rows, flat, nullptr).IgnoreError();
      cuda::Checksum64Batch(&span, 1, nullptr).IgnoreError();
    });
    const float t_pack1 = time([&] { cuda::PackRows(paged, 0, rows, flat, nullptr, sum).IgnoreError(); });
    const float t_unpack2 = time([&] {
      cuda::Checksum64Batch(&span, 1, nullptr).IgnoreError();
      cuda::UnpackRows(flat, 0, rows, paged, nullptr).IgnoreError();
    });
    const float t_unpack1 =
        time([&] { cuda::UnpackRows(flat, 0, rows, paged, nullptr, sum).IgnoreError(); });
    std::printf("%9.1f | %8.3f | %12.3f | %8.3f | %12.3f | %8.3f | %7.0f%%\n", bytes / 1e6,
                t_copy, t_pack2, t_pack1, t_unpack2, t_unpack1,
                100.0 * t_copy / std::max(t_pack1, t_unpack1));
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(pool);
    cudaFree(flat);
    cudaFree(copy);
    cudaFree(d_pages);
    cudaFree(sum);
  }
}

int Main() {
  setvbuf(stdout, nullptr, _IOLBF, 0);  // a killed run still shows its tables
  int gpus = 0;
  cudaGetDeviceCount(&gpus);
  if (gpus >= 1) KernelPasses();
  if (gpus < 2) {
    std::printf("transfer_bench needs two GPUs (found %d)\n", gpus);
    return 0;
  }
  const std::vector<int64_t> prompts = Lengths(absl::GetFlag(FLAGS_prompts));
  const int64_t max_rows = *std::max_element(prompts.begin(), prompts.end()) + 16;
  ModelConfig c = Kimi48BConfig();
  c.num_hidden_layers = absl::GetFlag(FLAGS_layers);
  c.layer_kinds.resize(c.num_hidden_layers);
  for (int d = 0; d < 2; ++d) {
    cudaDeviceProp p{};
    cudaGetDeviceProperties(&p, d);
    std::printf("GPU %d: %s\n", d, p.name);
  }
  std::printf("model: 48B shape, first %ld layers (%ld KDA + %ld MLA), bf16 weights + latents\n",
              static_cast<long>(c.num_hidden_layers), static_cast<long>(c.NumKdaLayers()),
              static_cast<long>(c.NumMlaLayers()));
  NcclPeak({int64_t{2} << 20, int64_t{16} << 20, int64_t{64} << 20, int64_t{256} << 20,
            int64_t{1} << 30});

  Worker decode = MakeWorker(c, 1, 5, max_rows);
  Worker prefill = MakeWorker(c, 0, 9, max_rows);

  DeviceTransportOptions to;
  to.sync_open = true;
  to.pipeline = absl::GetFlag(FLAGS_pipeline);
  const double call_mb = absl::GetFlag(FLAGS_call_message_mb);
  if (!(call_mb * (1 << 20) >= kMinMessageBytes && call_mb * (1 << 20) <= kMaxMlaMessageBytes)) {
    std::printf("--call_message_mb must be in [%g, %ld]\n", kMinMessageBytes / double{1 << 20},
                static_cast<long>(kMaxMlaMessageBytes >> 20));
    return 2;
  }
  to.message_bytes = static_cast<int64_t>(call_mb * (1 << 20));
  std::printf("transfers: %s\n", to.pipeline ? "pipelined (two streams per link)" : "serial");
  auto decode_transport =
      MakeDeviceTransport(c, decode.backend->device_state(), to).value();
  if (decode_transport == nullptr) {
    std::printf("no device transport linked\n");
    return 1;
  }
  DecodeServiceOptions dso;
  dso.slots = 4;
  dso.transport = decode_transport.get();
  DecodeService decode_service(decode.model.get(), 0, dso);
  ServerOptions so;
  auto decode_server = StartServer(so, {&decode_service}).value();
  const std::string decode_addr = "127.0.0.1:" + std::to_string(decode_server.port);
  auto decode_stub = v1::Decode::NewStub(
      grpc::CreateChannel(decode_addr, grpc::InsecureChannelCredentials()));

  struct Mode {
    const char* name;
    std::unique_ptr<DeviceTransport> transport;
    std::unique_ptr<PrefillService> service;
    std::unique_ptr<RunningServer> server;
    std::unique_ptr<v1::Prefill::Stub> stub;
  };
  std::vector<Mode> modes(3);
  modes[0].name = "nccl, layer by layer";
  modes[1].name = "nccl, ship at end";
  modes[2].name = "grpc bundle (bf16)";
  for (int i = 0; i < 3; ++i) {
    DeviceTransportOptions po = to;
    po.ship_at_end = i == 1;
    if (i < 2) modes[i].transport = MakeDeviceTransport(c, prefill.backend->device_state(), po).value();
    PrefillServiceOptions pso;
    pso.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
    pso.bundle_dtype = DType::kBF16;
    pso.transport = modes[i].transport.get();
    modes[i].service = std::make_unique<PrefillService>(prefill.model.get(), 0, pso);
    modes[i].server = std::make_unique<RunningServer>(StartServer(so, {modes[i].service.get()}).value());
    modes[i].stub = v1::Prefill::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(modes[i].server->port), grpc::InsecureChannelCredentials()));
  }

  auto call = [&](Mode& m, int64_t tokens, v1::PrefillResponse* resp) -> double {
    grpc::ClientContext rc;
    v1::ReserveRequest rr;
    rr.set_request_id("bench");
    rr.set_max_total_tokens(tokens + 8);
    v1::ReserveResponse lease;
    if (!decode_stub->Reserve(&rc, rr, &lease).ok()) return -1;
    v1::PrefillRequest pr;
    pr.set_request_id("bench");
    for (int64_t t = 0; t < tokens; ++t) pr.add_token_ids(static_cast<int32_t>((t * 7919) % 50000 + 10));
    pr.mutable_sampling()->set_temperature(0);
    pr.mutable_target()->set_address(decode_addr);
    pr.mutable_target()->set_lease_id(lease.lease_id());
    grpc::ClientContext pc;
    pc.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(300));
    const auto t0 = Clock::now();
    const grpc::Status s = m.stub->Prefill(&pc, pr, resp);
    const double ms = Ms(Clock::now() - t0);
    grpc::ClientContext lc;
    v1::ReleaseRequest rel;
    rel.set_lease_id(lease.lease_id());
    v1::ReleaseResponse rr2;
    decode_stub->Release(&lc, rel, &rr2);
    if (!s.ok()) {
      std::printf("  %s T=%ld: %s\n", m.name, static_cast<long>(tokens), s.error_message().c_str());
      return -1;
    }
    return ms;
  };

  // The transport alone: a device state of T tokens sent over a link and
  // received into a fresh decode state (pack, checksums, announcements relayed
  // in-process, grouped sends and receives, scatter), for each bound on the
  // message size, against raw NCCL moving the unsplit plan's messages (one per
  // layer and plan chunk) one by one and as one group.
  {
    std::printf("\nDevice transfer of a whole state (no compute to overlap), best of 3\n");
    std::printf("%7s | %6s | %4s | %9s | %10s | %10s | %9s | %9s | %9s | %9s | %9s\n", "T",
                "msg MB", "msgs", "state MB", "sends ms", "verified", "raw NCCL", "raw group",
                "GB/s", "% of raw", "% of grp");
    std::vector<double> bounds;
    for (absl::string_view p : absl::StrSplit(absl::GetFlag(FLAGS_message_mb), ',')) {
      double v = 0;
      if (absl::SimpleAtod(p, &v) &&
          (v == 0 || (v * (1 << 20) >= kMinMessageBytes && v * (1 << 20) <= kMaxMlaMessageBytes))) {
        bounds.push_back(v);
      } else {
        std::printf("--message_mb: '%s' skipped (0, or a bound in [%g, %ld] MiB)\n",
                    std::string(p).c_str(), kMinMessageBytes / double{1 << 20},
                    static_cast<long>(kMaxMlaMessageBytes >> 20));
      }
    }
    DeviceStateAccess* pa = prefill.backend->device_state();
    auto channel = grpc::CreateChannel(decode_addr, grpc::InsecureChannelCredentials());
    for (int64_t t : prompts) {
      const int64_t chunk =
          absl::GetFlag(FLAGS_plan_chunk) > 0 ? absl::GetFlag(FLAGS_plan_chunk) : t;
      double raw = 0, raw_grouped = 0;  // the unsplit plan's messages
      {
        std::vector<int64_t> msgs;
        for (const auto& m :
             BuildTransferPlan(c, t, chunk, {KdaLayerBytes(c), pa->latent_row_bytes()})) {
          msgs.push_back(m.bytes());
        }
        raw = g_raw(msgs, false);
        raw_grouped = g_raw(msgs, true);
      }
      for (double mb : bounds) {
        double best_send = 1e30, best_all = 1e30;
        int64_t bytes = 0, count = 0;
        const PlanSizes sizes{KdaLayerBytes(c), pa->latent_row_bytes(),
                              static_cast<int64_t>(mb * (1 << 20))};
        for (int rep = 0; rep < 4; ++rep) {
          SequenceState st;
          if (!pa->AllocateState(&st, t).ok()) break;
          const auto plan = BuildTransferPlan(c, t, chunk, sizes);
          auto send = modes[0].transport->BeginSend(decode_addr, channel, plan);
          if (!send.ok()) {
            std::printf("BeginSend: %s\n", send.status().ToString().c_str());
            break;
          }
          v1::DeviceTransfer xfer;
          bytes = 0;
          count = static_cast<int64_t>(plan.size());
          for (const auto& m : plan) {
            *xfer.add_messages() = m;
            bytes += m.bytes();
          }
          auto recv = decode_transport->BeginReceive((*send)->link_id(), xfer, t);
          if (!recv.ok()) {
            std::printf("BeginReceive: %s\n", recv.status().ToString().c_str());
            break;
          }
          const auto t0 = Clock::now();
          // As the prefill engine reports a layer: all its rows at once.
          for (size_t i = 0; i < plan.size();) {
            const auto& m = plan[i];
            int64_t end = m.row_end();
            size_t j = i + 1;
            while (!m.kda() && j < plan.size() && !plan[j].kda() && plan[j].layer() == m.layer() &&
                   plan[j].row_begin() == end) {
              end = plan[j++].row_end();
            }
            if (!(*send)->OnLayer(st, m.layer(), m.row_begin(), end).ok()) break;
            i = j;
          }
          // What the PushState stream does: relay each announced group to the receiver.
          absl::Status relay;
          for (bool drained = false; relay.ok() && !drained;) {
            std::vector<MessageGroup> groups;
            relay = (*send)->TakeGroups(&groups, &drained);
            for (const MessageGroup& g : groups) {
              if (relay.ok()) relay = (*recv)->Receive(g);
            }
            if (!drained) std::this_thread::yield();
          }
          if (!relay.ok()) std::printf("relay: %s\n", relay.ToString().c_str());
          auto sums = (*send)->Complete([] { return true; });
          const double ms_send = Ms(Clock::now() - t0);
          auto got =
              sums.ok() ? (*recv)->Complete(*sums) : absl::StatusOr<SequenceState>(sums.status());
          const double ms_all = Ms(Clock::now() - t0);
          (*send)->End(got.ok());
          if (!got.ok()) {
            std::printf("transfer: %s\n", got.status().ToString().c_str());
            break;
          }
          if (rep == 0) continue;  // warm-up (link set-up, scratch)
          best_send = std::min(best_send, ms_send);
          best_all = std::min(best_all, ms_all);
        }
        if (best_all >= 1e30) {
          std::printf("%7ld | %6.3g | no timed transfer completed (see above)\n",
                      static_cast<long>(t), mb);
          continue;
        }
        std::printf(
            "%7ld | %6.3g | %4ld | %9.1f | %10.3f | %10.3f | %9.3f | %9.3f | %9.1f | %8.1f%% | "
            "%8.1f%%\n",
            static_cast<long>(t), mb, static_cast<long>(count), bytes / 1e6, best_send, best_all,
            raw, raw_grouped, bytes / (best_all * 1e6), 100.0 * raw / best_all,
            100.0 * raw_grouped / best_all);
      }
    }
  }

  // Warm-up: links, arenas, kernels.
  for (auto& m : modes) {
    v1::PrefillResponse r;
    call(m, 512, &r);
  }
  std::printf("\nPrefill call = prefill + state transfer until the decode worker verified it\n");
  std::printf("%-22s | %7s | %9s | %9s | %9s | %10s | %8s\n", "mode", "T", "call ms",
              "prefill", "tail ms", "state MB", "tail GB/s");
  const std::vector<int64_t> call_prompts = absl::GetFlag(FLAGS_call_prompts).empty()
                                                ? prompts
                                                : Lengths(absl::GetFlag(FLAGS_call_prompts));
  for (int64_t t : call_prompts) {
    for (auto& m : modes) {
      double best = 1e30, best_prefill = 0, best_tail = 0;
      int64_t bytes = 0;
      for (int rep = 0; rep < absl::GetFlag(FLAGS_reps); ++rep) {
        v1::PrefillResponse r;
        const double ms = call(m, t, &r);
        if (ms < 0) continue;
        if (ms < best) {
          best = ms;
          best_prefill = r.prefill_seconds() * 1e3;
          best_tail = ms - r.queue_seconds() * 1e3 - best_prefill;
          bytes = r.transfer_bytes();
        }
      }
      std::printf("%-22s | %7ld | %9.1f | %9.1f | %9.2f | %10.1f | %8.1f\n", m.name,
                  static_cast<long>(t), best, best_prefill, best_tail, bytes / 1e6,
                  best_tail > 0 ? bytes / (best_tail * 1e6) : 0.0);
    }
  }
  const DeviceTransportStats ds = decode_transport->Stats();
  std::printf(
      "\ndecode transport: %ld transfers ok, %ld failed, %.1f MB in %ld plan messages; %ld "
      "links set up (%.3f s in all, %.1f ms each on average), %ld set-ups failed\n",
      static_cast<long>(ds.transfers_ok), static_cast<long>(ds.transfers_failed), ds.bytes / 1e6,
      static_cast<long>(ds.messages), static_cast<long>(ds.link_inits), ds.link_init_seconds,
      ds.link_inits > 0 ? 1e3 * ds.link_init_seconds / static_cast<double>(ds.link_inits) : 0.0,
      static_cast<long>(ds.link_init_failures));
  for (auto& m : modes) {
    m.server->server->Shutdown();
    m.service.reset();
  }
  decode_server.server->Shutdown();
  return 0;
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kl::Main();
}
