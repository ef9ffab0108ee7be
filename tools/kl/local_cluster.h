// LocalCluster: router + N prefill + M decode workers as child processes on
// loopback — `kl local` and the integration tests. Children die with the parent
// (PR_SET_PDEATHSIG) and are stopped with SIGTERM, then SIGKILL after a grace.
#ifndef KL_TOOLS_KL_LOCAL_CLUSTER_H_
#define KL_TOOLS_KL_LOCAL_CLUSTER_H_

#include <sys/types.h>

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/worker.pb.h"
#include "services/common/tls.h"

namespace kl {

enum class ClusterRole { kRouter, kPrefill, kDecode };

struct LocalClusterOptions {
  std::string model_dir;
  int prefill_workers = 1;
  int decode_workers = 1;
  int decode_slots = 16;
  int threads_per_process = 1;
  std::string bin_dir;        // folder holding kl-router, kl-prefill, kl-decode; empty = find
  std::string log_dir;        // each child's stderr goes to <log_dir>/<name>.log; empty = inherit
  std::vector<std::string> router_args;   // extra flags
  std::vector<std::string> prefill_args;
  std::vector<std::string> decode_args;
  // Workers' compute backend: "" or "cpu", or "cuda" (runs kl-prefill-cuda /
  // kl-decode-cuda with --backend=cuda; each GPU worker takes GPU <index>
  // modulo the visible GPUs, prefill workers first).
  std::string worker_backend;
  double ready_timeout_seconds = 60;
  // Security (docs/security.md). Cluster mutual TLS: every process gets
  // --cluster_cert/key/ca/server_name (workers then require the cluster
  // certificate, and Start's health checks present it).
  ClusterTlsFiles cluster_tls;
  // The router's public API: TLS with tls_cert/tls_key (Start checks its
  // health trusting tls_ca), API keys from api_keys_file.
  std::string tls_cert, tls_key, tls_ca;
  std::string api_keys_file;
  // The address the router is given for worker `index` of `role` (which
  // listens on `address`); empty = `address`. Fault tests put a proxy that can
  // cut the worker off in between (tests/fault).
  std::function<std::string(ClusterRole role, int index, const std::string& address)>
      router_address_of;
  // Where Start gets each loopback port; empty = PickFreePort. Tests hand out
  // a taken port to check that Start moves the process to another one.
  std::function<int()> pick_port;
};

class LocalCluster {
 public:
  explicit LocalCluster(LocalClusterOptions options) : o_(std::move(options)) {}
  ~LocalCluster() { Stop(); }
  LocalCluster(const LocalCluster&) = delete;
  LocalCluster& operator=(const LocalCluster&) = delete;

  // Picks free loopback ports, starts every process, waits until each reports
  // SERVING on grpc.health.v1. A process that exits during start-up (a port
  // taken in between, by anyone) is started again on fresh ports, up to 4
  // times in all.
  absl::Status Start();
  // SIGTERM to every child, SIGKILL after `grace_seconds`; waits for them.
  void Stop(double grace_seconds = 5);

  std::string router_address() const { return Addr(router_.port); }
  std::string prefill_address(int i) const { return Addr(prefill_[i].port); }
  std::string decode_address(int i) const { return Addr(decode_[i].port); }
  // host:port of a process's Prometheus /metrics (each child gets
  // --metrics_listen=127.0.0.1:<free port>); `i` is ignored for the router.
  std::string metrics_address(ClusterRole role, int i = 0) const;
  // A channel to prefill / decode worker `i`, secured as the cluster's
  // workers expect (mTLS when the cluster has TLS).
  std::shared_ptr<grpc::Channel> WorkerChannel(ClusterRole role, int i) const;
  // Every worker's WorkerStats ("prefill-0", ..., "decode-0", ...), over
  // WorkerChannel; the first failing call's status.
  absl::StatusOr<std::vector<std::pair<std::string, v1::WorkerStats>>> WorkerStatsAll() const;

  // Fault injection for tests.
  void KillDecode(int i, int sig = 9) { Signal(decode_[i], sig); }
  void KillPrefill(int i, int sig = 9) { Signal(prefill_[i], sig); }
  absl::Status RestartDecode(int i);
  absl::Status RestartPrefill(int i);

 private:
  struct Proc {
    std::string name;
    std::string binary;
    std::vector<std::string> args;
    int port = 0;
    pid_t pid = -1;
    int metrics_port = 0;
  };
  static std::string Addr(int port) { return "127.0.0.1:" + std::to_string(port); }
  absl::Status Spawn(Proc& p);
  absl::Status WaitServing(Proc& p, double seconds);  // pid = -1 if it exited
  void Signal(Proc& p, int sig);
  std::string Binary(const std::string& name) const;
  std::string RouterView(ClusterRole role, int i, const std::string& address) const;

  // How Start reaches each process (plaintext unless the options say TLS).
  ChannelSecurity router_security_, worker_security_;
  LocalClusterOptions o_;
  Proc router_;
  std::vector<Proc> prefill_, decode_;
};

// A free TCP port on 127.0.0.1 (bound and released, so free only when picked),
// never one this process was given before; 0 if none.
int PickFreePort();

}  // namespace kl

#endif  // KL_TOOLS_KL_LOCAL_CLUSTER_H_
