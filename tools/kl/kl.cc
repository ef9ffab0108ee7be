// kl: the command-line front end.
//   kl local    [--prefill_workers N --decode_workers M] [--serve] [--prompt TEXT]
//               start router + workers on loopback, stream a generation through them
//   kl generate --router HOST:PORT --prompt TEXT   stream through a running router
//   kl generate --prompt TEXT                      in process, no cluster
//   kl bench    --router HOST:PORT | --local  [load flags]   load generator, JSON report
// Without --model, the embedded tiny model is used (made on first use).
// Secured routers (docs/security.md): --tls_ca (or --tls) and --api_key /
// --api_key_file / $KL_API_KEY; `kl local` also takes --cluster_*, --tls_cert,
// --tls_key and --api_keys_file and passes them to its processes.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/runtime/generator.h"
#include "engine/runtime/local_engine.h"
#include "tools/kl/bench.h"
#include "tools/kl/client.h"
#include "tools/kl/embedded_model.h"
#include "tools/kl/local_cluster.h"

#include <csignal>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

ABSL_FLAG(std::string, model, "", "model folder (HF layout); empty = the embedded tiny model");
ABSL_FLAG(std::string, cache_dir, "", "where the embedded model is made (default: ~/.cache/kimi-serve)");
ABSL_FLAG(std::string, prompt, "Once upon a time", "prompt text");
ABSL_FLAG(bool, chat, false, "wrap the prompt as one user message in Kimi's chat format");
ABSL_FLAG(int64_t, max_tokens, 64, "tokens to generate");
ABSL_FLAG(double, temperature, 0.0, "0 = greedy");
ABSL_FLAG(double, top_p, 1.0, "nucleus mass in (0, 1]");
ABSL_FLAG(int64_t, top_k, 0, "0 = off");
ABSL_FLAG(int64_t, seed, -1, "sampling seed; -1 = random");
ABSL_FLAG(std::vector<std::string>, stop, {}, "stop strings (comma separated)");
ABSL_FLAG(bool, ignore_eos, false, "keep generating after the end-of-turn token");
ABSL_FLAG(int32_t, threads, 0, "CPU threads; 0 = all cores");
ABSL_FLAG(bool, quiet, false, "print only the generated text");
ABSL_FLAG(std::string, router, "", "router address host:port (generate, bench)");
ABSL_FLAG(double, deadline_seconds, 300, "request deadline");
ABSL_FLAG(int32_t, prefill_workers, 1, "local: prefill worker processes");
ABSL_FLAG(int32_t, decode_workers, 1, "local: decode worker processes");
ABSL_FLAG(int32_t, decode_slots, 16, "local: state slots per decode worker");
ABSL_FLAG(bool, serve, false, "local: keep the cluster running until Ctrl-C");
ABSL_FLAG(std::string, worker_backend, "",
          "local: workers' backend, cpu (default) or cuda (the kl-*-cuda builds)");
ABSL_FLAG(std::vector<std::string>, worker_flags, {},
          "local: extra flags for every prefill and decode worker (comma separated), "
          "e.g. --worker_flags=--cuda_fast=false");
ABSL_FLAG(std::string, log_dir, "", "local: each process's log goes to DIR/<name>.log (default: <cache>/logs)");
ABSL_FLAG(bool, local, false, "bench: start a local cluster and benchmark it");
ABSL_FLAG(double, rate, 0, "bench: requests/s (Poisson); 0 = fixed concurrency");
ABSL_FLAG(int32_t, concurrency, 4, "bench: concurrent clients (cap under Poisson)");
ABSL_FLAG(int32_t, num_requests, 64, "bench: measured requests");
ABSL_FLAG(int32_t, warmup, 4, "bench: warm-up requests");
ABSL_FLAG(std::string, prompt_len, "16:256", "bench: prompt tokens min:max");
ABSL_FLAG(std::string, output_len, "16:64", "bench: output tokens min:max");
ABSL_FLAG(double, slo_ttft, 1.0, "bench: TTFT SLO, seconds");
ABSL_FLAG(double, slo_tpot, 0.1, "bench: TPOT SLO, seconds");
ABSL_FLAG(std::string, json_out, "", "bench: also write the JSON report here");
// Security, client side (generate, bench, local).
ABSL_FLAG(bool, tls, false, "TLS to the router, trusting the system roots (implied by --tls_ca)");
ABSL_FLAG(std::string, tls_ca, "", "TLS to the router, trusting this PEM CA");
ABSL_FLAG(std::string, tls_server_name, "",
          "name the router's certificate must carry (default: the host)");
ABSL_FLAG(std::string, tls_client_cert, "",
          "PEM certificate to present (routers with --tls_client_ca)");
ABSL_FLAG(std::string, tls_client_key, "", "PEM key of --tls_client_cert");
ABSL_FLAG(std::string, api_key, "",
          "API key sent as 'authorization: Bearer' (default: $KL_API_KEY)");
ABSL_FLAG(std::string, api_key_file, "",
          "file whose first line is the API key (keeps it out of ps)");
// Security of `kl local`'s processes.
ABSL_FLAG(std::string, cluster_cert, "", "local: cluster mTLS certificate for every process");
ABSL_FLAG(std::string, cluster_key, "", "local: its key");
ABSL_FLAG(std::string, cluster_ca, "", "local: the cluster CA");
ABSL_FLAG(std::string, cluster_server_name, "", "local: name in the workers' certificates");
ABSL_FLAG(std::string, tls_cert, "", "local: the router's public TLS certificate");
ABSL_FLAG(std::string, tls_key, "", "local: its key");
ABSL_FLAG(std::string, api_keys_file, "", "local: the router's API keys file");

namespace kl {
namespace {

const char* GrpcCodeName(grpc::StatusCode c) {
  static const char* kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
                                 "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                                 "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                                 "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                 "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int i = static_cast<int>(c);
  return i >= 0 && i <= 16 ? kNames[i] : "?";
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "kl: %s\n", s.ToString().c_str());
  return 1;
}

// TLS and API key of the router from the client flags.
absl::StatusOr<ClientSecurity> ClientSecurityFromFlags() {
  ClientSecurity out;
  const std::string ca = absl::GetFlag(FLAGS_tls_ca);
  absl::StatusOr<ChannelSecurity> channel = LoadPublicClientTls(
      absl::GetFlag(FLAGS_tls) || !ca.empty(), ca, absl::GetFlag(FLAGS_tls_client_cert),
      absl::GetFlag(FLAGS_tls_client_key), absl::GetFlag(FLAGS_tls_server_name));
  if (!channel.ok()) return channel.status();
  out.channel = *std::move(channel);
  out.api_key = absl::GetFlag(FLAGS_api_key);
  const std::string key_file = absl::GetFlag(FLAGS_api_key_file);
  if (const std::string& path = key_file; out.api_key.empty() && !path.empty()) {
    std::ifstream in(path);
    if (!in || !std::getline(in, out.api_key)) {
      return absl::NotFoundError(absl::StrCat("--api_key_file=", path, ": cannot read"));
    }
    out.api_key = std::string(absl::StripAsciiWhitespace(out.api_key));
  }
  if (const char* env = std::getenv("KL_API_KEY"); out.api_key.empty() && env != nullptr) {
    out.api_key = env;
  }
  return out;
}

absl::StatusOr<std::string> ModelDir() {
  std::string dir = absl::GetFlag(FLAGS_model);
  if (!dir.empty()) return dir;
  std::string cache = absl::GetFlag(FLAGS_cache_dir);
  if (cache.empty()) cache = DefaultCacheDir();
  return EnsureEmbeddedModel(cache);
}

kl::v1::GenerateRequest RequestFromFlags() {
  kl::v1::GenerateRequest req;
  if (absl::GetFlag(FLAGS_chat)) {
    auto* m = req.mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(absl::GetFlag(FLAGS_prompt));
  } else {
    req.set_text(absl::GetFlag(FLAGS_prompt));
  }
  auto* s = req.mutable_sampling();
  s->set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  s->set_temperature(absl::GetFlag(FLAGS_temperature));
  s->set_top_p(absl::GetFlag(FLAGS_top_p));
  s->set_top_k(absl::GetFlag(FLAGS_top_k));
  if (absl::GetFlag(FLAGS_seed) >= 0) s->set_seed(static_cast<uint64_t>(absl::GetFlag(FLAGS_seed)));
  for (const auto& st : absl::GetFlag(FLAGS_stop)) s->add_stop(st);
  s->set_ignore_eos(absl::GetFlag(FLAGS_ignore_eos));
  return req;
}

// Streams one request through a router, printing text as it arrives.
int StreamThroughRouter(const std::string& address) {
  absl::StatusOr<ClientSecurity> security = ClientSecurityFromFlags();
  if (!security.ok()) return Fail(security.status());
  GenerationClient client(address, *std::move(security));
  const bool quiet = absl::GetFlag(FLAGS_quiet);
  if (!quiet) std::fprintf(stdout, "%s", absl::GetFlag(FLAGS_prompt).c_str());
  StreamResult r = client.Generate(RequestFromFlags(), absl::GetFlag(FLAGS_deadline_seconds),
                                   [](const kl::v1::GenerateResponse& c) {
                                     std::fwrite(c.text().data(), 1, c.text().size(), stdout);
                                     std::fflush(stdout);
                                   });
  std::fputc('\n', stdout);
  std::fflush(stdout);
  if (!r.status.ok()) {
    std::fprintf(stderr, "kl: %s: %s\n", GrpcCodeName(r.status.error_code()),
                 r.status.error_message().c_str());
    return 1;
  }
  if (!quiet) {
    const auto& u = r.usage;
    std::fprintf(stderr,
                 "[%lld prompt tokens, %lld generated, finish=%s, seed=%llu, TTFT %.1f ms at the "
                 "router (%.1f ms at the client), %.1f tokens/s, migrations %d]\n",
                 static_cast<long long>(u.prompt_tokens()),
                 static_cast<long long>(u.completion_tokens()),
                 kl::v1::FinishReason_Name(r.finish).c_str(),
                 static_cast<unsigned long long>(u.seed()), u.ttft_seconds() * 1e3,
                 r.ttft_seconds * 1e3,
                 r.tokens.size() > 1 ? (r.tokens.size() - 1) / (r.e2e_seconds - r.ttft_seconds) : 0.0,
                 u.migrations());
  }
  return 0;
}

absl::StatusOr<std::unique_ptr<LocalCluster>> StartLocal() {
  auto dir = ModelDir();
  if (!dir.ok()) return dir.status();
  LocalClusterOptions o;
  o.model_dir = *dir;
  o.prefill_workers = absl::GetFlag(FLAGS_prefill_workers);
  o.decode_workers = absl::GetFlag(FLAGS_decode_workers);
  o.decode_slots = absl::GetFlag(FLAGS_decode_slots);
  o.worker_backend = absl::GetFlag(FLAGS_worker_backend);
  o.prefill_args = absl::GetFlag(FLAGS_worker_flags);
  o.decode_args = absl::GetFlag(FLAGS_worker_flags);
  o.log_dir = absl::GetFlag(FLAGS_log_dir);
  o.cluster_tls = {absl::GetFlag(FLAGS_cluster_cert), absl::GetFlag(FLAGS_cluster_key),
                   absl::GetFlag(FLAGS_cluster_ca), absl::GetFlag(FLAGS_cluster_server_name)};
  o.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  o.tls_key = absl::GetFlag(FLAGS_tls_key);
  o.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  o.api_keys_file = absl::GetFlag(FLAGS_api_keys_file);
  if (o.log_dir.empty()) {  // keep the terminal for the generated text
    std::string cache = absl::GetFlag(FLAGS_cache_dir);
    o.log_dir = (cache.empty() ? DefaultCacheDir() : cache) + "/logs";
  }
  std::filesystem::create_directories(o.log_dir);
  std::fprintf(stderr, "[starting router + %d prefill + %d decode worker(s); logs in %s]\n",
               o.prefill_workers, o.decode_workers, o.log_dir.c_str());
  auto c = std::make_unique<LocalCluster>(o);
  if (auto s = c->Start(); !s.ok()) return s;
  return c;
}

std::atomic<bool> g_stop{false};

int RunLocal() {
  auto cluster = StartLocal();
  if (!cluster.ok()) return Fail(cluster.status());
  std::fprintf(stderr, "[cluster up: router %s, %d prefill, %d decode worker(s)]\n",
               (*cluster)->router_address().c_str(), absl::GetFlag(FLAGS_prefill_workers),
               absl::GetFlag(FLAGS_decode_workers));
  int rc = StreamThroughRouter((*cluster)->router_address());
  if (absl::GetFlag(FLAGS_serve)) {
    std::signal(SIGINT, [](int) { g_stop = true; });
    std::signal(SIGTERM, [](int) { g_stop = true; });
    std::fprintf(stderr, "[serving on %s; Ctrl-C stops]\n", (*cluster)->router_address().c_str());
    std::fprintf(stderr, "[metrics: router http://%s/metrics",
                 (*cluster)->metrics_address(ClusterRole::kRouter).c_str());
    for (int i = 0; i < absl::GetFlag(FLAGS_prefill_workers); ++i) {
      std::fprintf(stderr, ", prefill-%d http://%s/metrics", i,
                   (*cluster)->metrics_address(ClusterRole::kPrefill, i).c_str());
    }
    for (int i = 0; i < absl::GetFlag(FLAGS_decode_workers); ++i) {
      std::fprintf(stderr, ", decode-%d http://%s/metrics", i,
                   (*cluster)->metrics_address(ClusterRole::kDecode, i).c_str());
    }
    std::fprintf(stderr, "]\n");
    while (!g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  (*cluster)->Stop();
  return rc;
}

bool ParseRange(const std::string& s, int* lo, int* hi) {
  std::vector<std::string> parts = absl::StrSplit(s, ':');
  if (parts.size() != 2) return false;
  *lo = std::stoi(parts[0]);
  *hi = std::stoi(parts[1]);
  return *lo >= 1 && *hi >= *lo;
}

// Each local worker's state-transfer counters at the end of a bench run: how
// the states moved (device links or gRPC) and what the device links' set-up
// cost. Printed to stderr and added to the report.
nlohmann::json WorkerTransferReport(const LocalCluster& c) {
  nlohmann::json out = nlohmann::json::array();
  auto all = c.WorkerStatsAll();
  if (!all.ok()) {
    std::fprintf(stderr, "[no worker stats: %s]\n", std::string(all.status().message()).c_str());
    return out;
  }
  for (const auto& [name, s] : *all) {
    out.push_back({{"worker", name},
                   {"requests_completed", s.requests_completed()},
                   {"integrity_failures", s.integrity_failures()},
                   {"device_transfers", s.device_transfers()},
                   {"device_transfer_failures", s.device_transfer_failures()},
                   {"device_fallbacks", s.device_fallbacks()},
                   {"device_messages", s.device_messages()},
                   {"device_bytes", s.device_bytes()},
                   {"device_link_inits", s.device_link_inits()},
                   {"device_link_init_failures", s.device_link_init_failures()},
                   {"device_link_init_seconds", s.device_link_init_seconds()},
                   {"prefix_cache_queries", s.prefix_cache_queries()},
                   {"prefix_cache_hits", s.prefix_cache_hits()},
                   {"prefix_cache_hit_tokens", s.prefix_cache_hit_tokens()}});
    // Only a prefill worker chooses the transport (and counts its fallbacks).
    const std::string fallbacks =
        s.role() == "prefill" ? absl::StrCat(", ", s.device_fallbacks(), " sent over gRPC instead")
                              : "";
    const std::string cache =
        s.role() == "prefill"
            ? absl::StrCat("; prefix cache ", s.prefix_cache_hits(), " hits of ",
                           s.prefix_cache_queries(), " (", s.prefix_cache_hit_tokens(),
                           " prompt tokens not prefilled)")
            : "";
    std::fprintf(stderr,
                 "[%s: %lld requests; device transfers %lld ok, %lld failed%s; device links set "
                 "up %lld (%.3f s in all), %lld failed%s]\n",
                 name.c_str(), static_cast<long long>(s.requests_completed()),
                 static_cast<long long>(s.device_transfers()),
                 static_cast<long long>(s.device_transfer_failures()), fallbacks.c_str(),
                 static_cast<long long>(s.device_link_inits()), s.device_link_init_seconds(),
                 static_cast<long long>(s.device_link_init_failures()), cache.c_str());
  }
  return out;
}

int RunBenchCommand() {
  std::unique_ptr<LocalCluster> cluster;
  std::string address = absl::GetFlag(FLAGS_router);
  if (absl::GetFlag(FLAGS_local)) {
    auto c = StartLocal();
    if (!c.ok()) return Fail(c.status());
    cluster = std::move(*c);
    address = cluster->router_address();
  }
  if (address.empty()) return Fail(absl::InvalidArgumentError("bench needs --router or --local"));
  BenchOptions o;
  o.address = address;
  absl::StatusOr<ClientSecurity> security = ClientSecurityFromFlags();
  if (!security.ok()) return Fail(security.status());
  o.security = *std::move(security);
  o.request_rate = absl::GetFlag(FLAGS_rate);
  o.concurrency = absl::GetFlag(FLAGS_concurrency);
  o.num_requests = absl::GetFlag(FLAGS_num_requests);
  o.warmup_requests = absl::GetFlag(FLAGS_warmup);
  o.seed = absl::GetFlag(FLAGS_seed) >= 0 ? absl::GetFlag(FLAGS_seed) : 0;
  o.slo_ttft_seconds = absl::GetFlag(FLAGS_slo_ttft);
  o.slo_tpot_seconds = absl::GetFlag(FLAGS_slo_tpot);
  o.deadline_seconds = absl::GetFlag(FLAGS_deadline_seconds);
  if (!ParseRange(absl::GetFlag(FLAGS_prompt_len), &o.prompt_tokens_min, &o.prompt_tokens_max) ||
      !ParseRange(absl::GetFlag(FLAGS_output_len), &o.output_tokens_min, &o.output_tokens_max)) {
    return Fail(absl::InvalidArgumentError("--prompt_len / --output_len must be MIN:MAX"));
  }
  auto report = RunBench(o);
  if (report.ok() && cluster) {
    nlohmann::json j = nlohmann::json::parse(*report, nullptr, /*allow_exceptions=*/false);
    if (j.is_object()) {
      j["workers"] = WorkerTransferReport(*cluster);
      *report = j.dump(2);
    }
  }
  if (cluster) cluster->Stop();
  if (!report.ok()) return Fail(report.status());
  std::printf("%s\n", report->c_str());
  if (!absl::GetFlag(FLAGS_json_out).empty()) std::ofstream(absl::GetFlag(FLAGS_json_out)) << *report;
  return 0;
}

int RunGenerate() {
  if (!absl::GetFlag(FLAGS_router).empty()) return StreamThroughRouter(absl::GetFlag(FLAGS_router));
  auto dir_or = ModelDir();
  if (!dir_or.ok()) return Fail(dir_or.status());
  const std::string dir = *dir_or;
  LocalEngineOptions opts;
  opts.model_dir = dir;
  opts.threads = absl::GetFlag(FLAGS_threads);
  auto engine = LocalEngine::Open(opts);
  if (!engine.ok()) return Fail(engine.status());
  const Tokenizer& tok = (*engine)->tokenizer();
  std::vector<int32_t> prompt;
  if (absl::GetFlag(FLAGS_chat)) {
    auto ids = tok.EncodeChat({{"user", absl::GetFlag(FLAGS_prompt)}}, true);
    if (!ids.ok()) return Fail(ids.status());
    prompt = *ids;
  } else {
    prompt = tok.Encode(absl::GetFlag(FLAGS_prompt), /*allow_special=*/false);
  }
  SamplingParams p;
  p.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  p.temperature = absl::GetFlag(FLAGS_temperature);
  p.top_p = absl::GetFlag(FLAGS_top_p);
  p.top_k = absl::GetFlag(FLAGS_top_k);
  if (absl::GetFlag(FLAGS_seed) >= 0) p.seed = static_cast<uint64_t>(absl::GetFlag(FLAGS_seed));
  p.stop_strings = absl::GetFlag(FLAGS_stop);
  p.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  const bool quiet = absl::GetFlag(FLAGS_quiet);
  if (!quiet) std::fprintf(stdout, "%s", absl::GetFlag(FLAGS_prompt).c_str());
  auto res = Generate((*engine)->model(), tok, prompt, p, [](const TokenEvent& ev) {
    std::fwrite(ev.text.data(), 1, ev.text.size(), stdout);
    std::fflush(stdout);
    return true;
  });
  std::fputc('\n', stdout);
  std::fflush(stdout);
  if (!res.ok()) return Fail(res.status());
  if (!quiet) {
    const double decode_s = res->total_seconds - res->ttft_seconds;
    const int64_t n = static_cast<int64_t>(res->tokens.size());
    std::fprintf(stderr,
                 "[%lld prompt tokens, %lld generated, finish=%s, seed=%llu, TTFT %.1f ms, "
                 "%.1f tokens/s decode]\n",
                 static_cast<long long>(res->prompt_tokens), static_cast<long long>(n),
                 FinishReasonName(res->finish), static_cast<unsigned long long>(res->seed),
                 res->ttft_seconds * 1e3, n > 1 ? (n - 1) / decode_s : 0.0);
  }
  return 0;
}

}  // namespace
}  // namespace kl

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kl <command> [flags]\n"
      "  local      start router + workers on loopback and stream a generation through them\n"
      "  generate   stream a generation (through --router, or in process)\n"
      "  bench      load generator against --router or a --local cluster (JSON report)\n"
      "Run `kl --help` for the flags.");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  const std::string cmd = args.size() > 1 ? args[1] : "";
  if (cmd == "generate") return kl::RunGenerate();
  if (cmd == "local") return kl::RunLocal();
  if (cmd == "bench") return kl::RunBenchCommand();
  if (!cmd.empty()) std::fprintf(stderr, "kl: unknown command '%s'\n\n", cmd.c_str());
  std::fprintf(stderr, "%s\n", std::string(absl::ProgramUsageMessage()).c_str());
  return 2;
}
