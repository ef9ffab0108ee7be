#include "tools/kl/local_cluster.h"

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "proto/health.grpc.pb.h"
#include "proto/worker.grpc.pb.h"

namespace kl {
namespace fs = std::filesystem;

int PickFreePort() {
  // Never the same port twice in one process: a port handed out is not bound
  // until its child starts, so the kernel could offer it again meanwhile.
  static absl::Mutex mu(absl::kConstInit);
  static auto* given = new absl::flat_hash_set<int>();
  for (int tries = 0; tries < 64; ++tries) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return 0;
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
    if (port == 0) return 0;
    absl::MutexLock lock(&mu);
    if (given->insert(port).second) return port;
  }
  return 0;
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
  // Everything the child needs is made before fork: between fork and exec a
  // child of a threaded process may only make async-signal-safe calls (no
  // allocation: another thread may have held the allocator's lock).
  std::vector<std::string> argv = {p.binary};
  argv.insert(argv.end(), p.args.begin(), p.args.end());
  std::vector<char*> cargv;
  for (auto& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  const std::string log = o_.log_dir.empty() ? "" : o_.log_dir + "/" + p.name + ".log";
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    if (!log.empty()) {
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 2);
        close(fd);
      }
    }
    execv(cargv[0], cargv.data());
    _exit(127);
  }
  p.pid = pid;
  return absl::OkStatus();
}

absl::Status LocalCluster::WaitServing(Proc& p, double seconds) {
  const ChannelSecurity& security = &p == &router_ ? router_security_ : worker_security_;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < until) {
    int status;
    if (waitpid(p.pid, &status, WNOHANG) == p.pid) {
      p.pid = -1;  // reaped: Stop must not signal the number again
      return absl::AbortedError(
          absl::StrCat(p.name, " exited during start-up (status ", status, "); see its log"));
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
  const std::function<int()> pick = o_.pick_port ? o_.pick_port : PickFreePort;
  // Each process's flags from its ports (picked again when a start fails).
  const auto worker_args = [&](Proc& p, bool prefill, int i) {
    p.args = {"--model=" + o_.model_dir, "--listen=" + Addr(p.port), threads,
              "--metrics_listen=" + Addr(p.metrics_port)};
    if (!prefill) p.args.push_back(absl::StrCat("--slots=", o_.decode_slots));
    p.args.insert(p.args.end(), security_args.begin(), security_args.end());
    if (!o_.worker_backend.empty()) {
      p.args.push_back("--backend=" + o_.worker_backend);
      p.args.push_back(absl::StrCat("--cuda_device=", prefill ? i : o_.prefill_workers + i));
    }
    const auto& extra = prefill ? o_.prefill_args : o_.decode_args;
    p.args.insert(p.args.end(), extra.begin(), extra.end());
  };
  const auto router_args = [&](Proc& p) {
    std::vector<std::string> paddrs, daddrs;
    for (int i = 0; i < o_.prefill_workers; ++i) {
      paddrs.push_back(RouterView(ClusterRole::kPrefill, i, Addr(prefill_[i].port)));
    }
    for (int i = 0; i < o_.decode_workers; ++i) {
      daddrs.push_back(RouterView(ClusterRole::kDecode, i, Addr(decode_[i].port)));
    }
    p.args = {"--model=" + o_.model_dir, "--listen=" + Addr(p.port),
              "--prefill=" + absl::StrJoin(paddrs, ","), "--decode=" + absl::StrJoin(daddrs, ","),
              "--metrics_listen=" + Addr(p.metrics_port)};
    p.args.insert(p.args.end(), security_args.begin(), security_args.end());
    if (!o_.tls_cert.empty()) {
      p.args.push_back("--tls_cert=" + o_.tls_cert);
      p.args.push_back("--tls_key=" + o_.tls_key);
    }
    if (!o_.api_keys_file.empty()) p.args.push_back("--api_keys_file=" + o_.api_keys_file);
    p.args.insert(p.args.end(), o_.router_args.begin(), o_.router_args.end());
  };
  for (int i = 0; i < o_.prefill_workers; ++i) {
    prefill_.push_back(Proc{absl::StrCat("prefill-", i), Binary("kl-prefill"), {}, pick()});
    prefill_.back().metrics_port = pick();
    worker_args(prefill_.back(), true, i);
  }
  for (int i = 0; i < o_.decode_workers; ++i) {
    decode_.push_back(Proc{absl::StrCat("decode-", i), Binary("kl-decode"), {}, pick()});
    decode_.back().metrics_port = pick();
    worker_args(decode_.back(), false, i);
  }
  router_ = Proc{"router", Binary("kl-router"), {}, pick(), -1, pick()};
  // A picked port is only free when picked: another process (a parallel test,
  // an outgoing connection) may bind it before the child does. A child that
  // cannot listen exits during start-up; it is started again on fresh ports,
  // a few times, before Start gives up. (Servers refuse ports already bound,
  // SO_REUSEPORT off, so a taken port always shows up this way.)
  constexpr int kStartAttempts = 4;
  // Starts `p` (unless `running`, already spawned) and waits until it serves;
  // a child that exits during start-up is started again on fresh ports.
  const auto start = [&](Proc& p, const std::function<void(Proc&)>& args,
                         bool running) -> absl::Status {
    absl::Status s;
    for (int attempt = 0; attempt < kStartAttempts; ++attempt) {
      if (attempt > 0) {
        p.pid = -1;
        p.port = pick();
        p.metrics_port = pick();
        args(p);
      }
      if (attempt > 0 || !running) {
        if (s = Spawn(p); !s.ok()) return s;
      }
      s = WaitServing(p, o_.ready_timeout_seconds);
      if (!absl::IsAborted(s)) return s;  // Aborted: the child exited
    }
    return s;
  };
  // Workers start loading side by side, then each is waited for in turn.
  for (auto* group : {&prefill_, &decode_}) {
    for (auto& p : *group) {
      if (auto s = Spawn(p); !s.ok()) return s;
    }
  }
  for (int i = 0; i < o_.prefill_workers + o_.decode_workers; ++i) {
    const bool prefill = i < o_.prefill_workers;
    const int index = prefill ? i : i - o_.prefill_workers;
    Proc& p = prefill ? prefill_[index] : decode_[index];
    const auto args = [&](Proc& q) { worker_args(q, prefill, index); };
    if (auto s = start(p, args, /*running=*/true); !s.ok()) return s;
  }
  // The router last, once every worker listens: its first health round (at
  // start-up) then finds them all ready instead of refused connections whose
  // reconnect backoff would keep them out of the pool for seconds.
  router_args(router_);
  return start(router_, router_args, /*running=*/false);
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
