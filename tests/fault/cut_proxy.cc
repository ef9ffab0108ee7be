#include "tests/fault/cut_proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

namespace kl {
namespace {

bool WriteAll(int fd, const char* p, ssize_t n) {
  while (n > 0) {
    const ssize_t w = send(fd, p, static_cast<size_t>(n), MSG_NOSIGNAL);
    if (w <= 0) return false;
    p += w;
    n -= w;
  }
  return true;
}

}  // namespace

CutProxy::CutProxy(const std::string& upstream) {
  upstream_port_ = std::atoi(upstream.substr(upstream.rfind(':') + 1).c_str());
  // CLOEXEC everywhere: LocalCluster forks and execs workers from this
  // process, and a worker that inherited a copy of a proxied connection would
  // keep it open after the proxy closed it (the peer would never see the close).
  listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int one = 1;
  setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
  port_ = ntohs(a.sin_port);
  listen(listen_fd_, 128);
  acceptor_ = std::thread([this] { AcceptLoop(); });
}

CutProxy::~CutProxy() {
  stop_ = true;
  acceptor_.join();
  close(listen_fd_);
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (auto& c : conns_) {
      if (!c->closed) {
        shutdown(c->client, SHUT_RDWR);
        shutdown(c->upstream, SHUT_RDWR);
      }
    }
    threads.swap(threads_);
  }
  for (auto& t : threads) t.join();
}

void CutProxy::Cut() { cut_ = true; }

void CutProxy::Heal() {
  std::lock_guard<std::mutex> l(mu_);
  for (auto& c : conns_) {
    if (!c->closed) {  // the pump closes the fds under mu_, so they are still ours
      shutdown(c->client, SHUT_RDWR);
      shutdown(c->upstream, SHUT_RDWR);
    }
  }
  cut_ = false;
}

void CutProxy::AcceptLoop() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    const int client = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    const int up = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(upstream_port_));
    if (connect(up, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      close(up);  // the worker is down: the peer sees the connection drop
      close(client);
      continue;
    }
    const int one = 1;
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(up, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto c = std::make_shared<Conn>();
    c->client = client;
    c->upstream = up;
    std::lock_guard<std::mutex> l(mu_);
    conns_.erase(std::remove_if(conns_.begin(), conns_.end(),
                                [](const auto& x) { return x->closed; }),
                 conns_.end());
    conns_.push_back(c);
    threads_.emplace_back([this, c] { Pump(c); });
  }
}

void CutProxy::Pump(std::shared_ptr<Conn> c) {
  char buf[65536];
  bool open = true;
  while (open && !stop_) {
    // While cut, nothing is read (events 0: only hang-ups are reported): the
    // bytes wait, as behind a partition. Heal's shutdown ends the connection.
    const short events = cut_ ? 0 : POLLIN;
    pollfd p[2] = {{c->client, events, 0}, {c->upstream, events, 0}};
    if (poll(p, 2, 50) <= 0) continue;
    for (int i = 0; i < 2 && open; ++i) {
      if (p[i].revents == 0) continue;
      if (p[i].revents & (POLLHUP | POLLERR | POLLNVAL)) {
        open = false;
        break;
      }
      const ssize_t n = recv(p[i].fd, buf, sizeof(buf), 0);
      if (n <= 0 || !WriteAll(p[1 - i].fd, buf, n)) open = false;
    }
  }
  std::lock_guard<std::mutex> l(mu_);
  close(c->client);
  close(c->upstream);
  c->closed = true;
}

}  // namespace kl
