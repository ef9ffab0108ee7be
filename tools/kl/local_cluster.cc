#include "tools/kl/local_cluster.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "proto/health.grpc.pb.h"
#include "proto/worker.grpc.pb.h"

namespace kl {
namespace fs = std::filesystem;

int PickFreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  int port = 0;
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
    socklen_t len = sizeof(a);
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
  }
  close(fd);
  return port;
}

std::string LocalCluster::Binary(const std::string& base) const {
  const bool gpu = base != "kl-router" && o_.worker_backend == "cuda";
  const std::string name = gpu ? base + "-cuda" : base;
  const std::string rel = (base == "kl-router"    ? std::string("services/router/")
                           : base == "kl-prefill" ? std::string("services/prefill/")
                                                  : std::string("services/decode/")) +
                          name;
  if (!o_.bin_dir.empty()) return (fs::path(o_.bin_dir) / name).string();
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  // 1) next to us in a bundle; 2) our runfiles (bazel run / tests); 3) bazel-bin layout.
  for (const fs::path& c :
       {exe.parent_path() / name, fs::path(exe.string() + ".runfiles/kimi_serve") / rel,
        exe.parent_path() / "../.." / rel}) {
    if (fs::exists(c, ec)) return c.string();
  }
  if (const char* srcdir = std::getenv("TEST_SRCDIR")) {
    return (fs::path(srcdir) / "kimi_serve" / rel).string();
  }
  return name;
}

absl::Status LocalCluster::Spawn(Proc& p) {
  std::vector<std::string> argv = {p.binary};
  argv.insert(argv.end(), p.args.begin(), p.args.end());
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    if (!o_.log_dir.empty()) {
      const std::string log = o_.log_dir + "/" + p.name + ".log";
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 2);
        close(fd);
      }
    }
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    execv(cargv[0], cargv.data());
    _exit(127);
  }
  p.pid = pid;
  return absl::OkStatus();
}

absl::Status LocalCluster::WaitServing(const Proc& p, double seconds) {
  const ChannelSecurity& security = &p == &router_ ? router_security_ : worker_security_;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < until) {
    int status;
    if (waitpid(p.pid, &status, WNOHANG) == p.pid) {
      return absl::InternalError(absl::StrCat(p.name, " exited during start-up (status ", status,
                                              "); see its log"));
    }
    // A fresh channel each attempt: one that failed to connect while the
    // process was still loading would wait out gRPC's reconnect backoff
    // (seconds, growing) after the process is up.
    auto stub = grpc::health::v1::Health::NewStub(security.Dial(Addr(p.port)));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
    grpc::health::v1::HealthCheckResponse resp;
    if (stub->Check(&ctx, grpc::health::v1::HealthCheckRequest(), &resp).ok() &&
        resp.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
      return absl::OkStatus();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return absl::DeadlineExceededError(absl::StrCat(p.name, " not serving after ", seconds, " s"));
}

std::shared_ptr<grpc::Channel> LocalCluster::WorkerChannel(ClusterRole role, int i) const {
  const Proc& p = role == ClusterRole::kPrefill ? prefill_.at(i) : decode_.at(i);
  return worker_security_.Dial(Addr(p.port));
}

absl::StatusOr<std::vector<std::pair<std::string, v1::WorkerStats>>> LocalCluster::WorkerStatsAll()
    const {
  std::vector<std::pair<std::string, v1::WorkerStats>> out;
  for (ClusterRole role : {ClusterRole::kPrefill, ClusterRole::kDecode}) {
    const bool prefill = role == ClusterRole::kPrefill;
    for (size_t i = 0; i < (prefill ? prefill_ : decode_).size(); ++i) {
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      v1::WorkerStats s;
      const auto channel = WorkerChannel(role, static_cast<int>(i));
      const grpc::Status st =
          prefill ? v1::Prefill::NewStub(channel)->Stats(&ctx, v1::WorkerStatsRequest(), &s)
                  : v1::Decode::NewStub(channel)->Stats(&ctx, v1::WorkerStatsRequest(), &s);
      const std::string name = absl::StrCat(prefill ? "prefill-" : "decode-", i);
      if (!st.ok()) {
        return absl::UnavailableError(absl::StrCat(name, " stats: ", st.error_message()));
      }
      out.emplace_back(name, std::move(s));
    }
  }
  return out;
}

std::string LocalCluster::RouterView(ClusterRole role, int i, const std::string& address) const {
  return o_.router_address_of ? o_.router_address_of(role, i, address) : address;
}

absl::Status LocalCluster::Start() {
  absl::StatusOr<ClusterTls> cluster = LoadClusterTls(o_.cluster_tls);
  if (!cluster.ok()) return cluster.status();
  worker_security_ = cluster->client;
  absl::StatusOr<ChannelSecurity> public_tls =
      LoadPublicClientTls(!o_.tls_cert.empty(), o_.tls_ca, "", "", "");
  if (!public_tls.ok()) return public_tls.status();
  router_security_ = *public_tls;
  std::vector<std::string> security_args;  // every process
  if (o_.cluster_tls.enabled()) {
    security_args = {"--cluster_cert=" + o_.cluster_tls.cert, "--cluster_key=" + o_.cluster_tls.key,
                     "--cluster_ca=" + o_.cluster_tls.ca,
                     "--cluster_server_name=" + o_.cluster_tls.server_name};
  }
  const std::string threads = absl::StrCat("--threads=", o_.threads_per_process);
  std::vector<std::string> paddrs, daddrs;
  for (int i = 0; i < o_.prefill_workers; ++i) {
    Proc p{absl::StrCat("prefill-", i), Binary("kl-prefill"), {}, PickFreePort()};
    p.metrics_port = PickFreePort();
    p.args = {"--model=" + o_.model_dir, "--listen=" + Addr(p.port), threads,
              "--metrics_listen=" + Addr(p.metrics_port)};
    p.args.insert(p.args.end(), security_args.begin(), security_args.end());
    if (!o_.worker_backend.empty()) {
      p.args.push_back("--backend=" + o_.worker_backend);
      p.args.push_back(absl::StrCat("--cuda_device=", i));
    }
    p.args.insert(p.args.end(), o_.prefill_args.begin(), o_.prefill_args.end());
    paddrs.push_back(RouterView(ClusterRole::kPrefill, i, Addr(p.port)));
    prefill_.push_back(p);
  }
  for (int i = 0; i < o_.decode_workers; ++i) {
    Proc p{absl::StrCat("decode-", i), Binary("kl-decode"), {}, PickFreePort()};
    p.metrics_port = PickFreePort();
    p.args = {"--model=" + o_.model_dir, "--listen=" + Addr(p.port), threads,
              absl::StrCat("--slots=", o_.decode_slots), "--metrics_listen=" + Addr(p.metrics_port)};
    p.args.insert(p.args.end(), security_args.begin(), security_args.end());
    if (!o_.worker_backend.empty()) {
      p.args.push_back("--backend=" + o_.worker_backend);
      p.args.push_back(absl::StrCat("--cuda_device=", o_.prefill_workers + i));
    }
    p.args.insert(p.args.end(), o_.decode_args.begin(), o_.decode_args.end());
    daddrs.push_back(RouterView(ClusterRole::kDecode, i, Addr(p.port)));
    decode_.push_back(p);
  }
  router_ = Proc{"router", Binary("kl-router"), {}, PickFreePort()};
  router_.metrics_port = PickFreePort();
  router_.args = {"--model=" + o_.model_dir, "--listen=" + Addr(router_.port),
                  "--prefill=" + absl::StrJoin(paddrs, ","), "--decode=" + absl::StrJoin(daddrs, ","),
                  "--metrics_listen=" + Addr(router_.metrics_port)};
  router_.args.insert(router_.args.end(), security_args.begin(), security_args.end());
  if (!o_.tls_cert.empty()) {
    router_.args.push_back("--tls_cert=" + o_.tls_cert);
    router_.args.push_back("--tls_key=" + o_.tls_key);
  }
  if (!o_.api_keys_file.empty()) router_.args.push_back("--api_keys_file=" + o_.api_keys_file);
  router_.args.insert(router_.args.end(), o_.router_args.begin(), o_.router_args.end());
  for (auto* group : {&prefill_, &decode_}) {
    for (auto& p : *group) {
      if (auto s = Spawn(p); !s.ok()) return s;
    }
  }
  for (auto* group : {&prefill_, &decode_}) {
    for (auto& p : *group) {
      if (auto s = WaitServing(p, o_.ready_timeout_seconds); !s.ok()) return s;
    }
  }
  // The router last, once every worker listens: its first health round (at
  // start-up) then finds them all ready instead of refused connections whose
  // reconnect backoff would keep them out of the pool for seconds.
  if (auto s = Spawn(router_); !s.ok()) return s;
  return WaitServing(router_, o_.ready_timeout_seconds);
}

std::string LocalCluster::metrics_address(ClusterRole role, int i) const {
  switch (role) {
    case ClusterRole::kRouter:
      return Addr(router_.metrics_port);
    case ClusterRole::kPrefill:
      return Addr(prefill_[i].metrics_port);
    case ClusterRole::kDecode:
      return Addr(decode_[i].metrics_port);
  }
  return "";
}

void LocalCluster::Signal(Proc& p, int sig) {
  if (p.pid > 0) kill(p.pid, sig);
  if (sig == SIGKILL && p.pid > 0) {
    waitpid(p.pid, nullptr, 0);
    p.pid = -1;
  }
}

absl::Status LocalCluster::RestartDecode(int i) {
  Signal(decode_[i], SIGKILL);
  if (auto s = Spawn(decode_[i]); !s.ok()) return s;
  return WaitServing(decode_[i], o_.ready_timeout_seconds);
}

absl::Status LocalCluster::RestartPrefill(int i) {
  Signal(prefill_[i], SIGKILL);
  if (auto s = Spawn(prefill_[i]); !s.ok()) return s;
  return WaitServing(prefill_[i], o_.ready_timeout_seconds);
}

void LocalCluster::Stop(double grace_seconds) {
  std::vector<Proc*> all = {&router_};
  for (auto& p : prefill_) all.push_back(&p);
  for (auto& p : decode_) all.push_back(&p);
  for (Proc* p : all) {
    if (p->pid > 0) kill(p->pid, SIGTERM);
  }
  const auto until =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_seconds);
  for (Proc* p : all) {
    while (p->pid > 0) {
      if (waitpid(p->pid, nullptr, WNOHANG) == p->pid) {
        p->pid = -1;
        break;
      }
      if (std::chrono::steady_clock::now() > until) {
        kill(p->pid, SIGKILL);
        waitpid(p->pid, nullptr, 0);
        p->pid = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
}

}  // namespace kl
