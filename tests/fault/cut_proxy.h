// CutProxy: a TCP proxy on 127.0.0.1 in front of one worker, for the fault
// suite's "cut a worker off from the others" injection without network
// namespaces (which Bazel's sandbox does not offer). The router (and, for decode
// workers, every prefill worker pushing state) is given the proxy's address.
//
// Cut() black-holes the worker: bytes in both directions stay in the socket
// buffers, new connections are accepted but go nowhere, so peers see what a
// network partition looks like (no reset, calls hang until their deadlines or
// health checks time out). Heal() resets every connection that lived through
// the cut — as a real partition's TCP connections eventually time out — and
// forwards again.
#ifndef KL_TESTS_FAULT_CUT_PROXY_H_
#define KL_TESTS_FAULT_CUT_PROXY_H_

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace kl {

class CutProxy {
 public:
  // Listens on 127.0.0.1:<free port>, forwards to `upstream` (host:port).
  explicit CutProxy(const std::string& upstream);
  ~CutProxy();
  CutProxy(const CutProxy&) = delete;
  CutProxy& operator=(const CutProxy&) = delete;

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  void Cut();
  void Heal();

 private:
  struct Conn {
    int client = -1, upstream = -1;
    bool closed = false;
  };
  void AcceptLoop();
  void Pump(std::shared_ptr<Conn> c);

  int upstream_port_ = 0;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> cut_{false};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::vector<std::shared_ptr<Conn>> conns_;  // guarded by mu_
  std::vector<std::thread> threads_;          // guarded by mu_
  std::thread acceptor_;
};

}  // namespace kl

#endif  // KL_TESTS_FAULT_CUT_PROXY_H_
