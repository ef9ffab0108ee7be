#include "services/common/metrics.h"

#include <netdb.h>
#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kl {

class CallbackCollectable : public prometheus::Collectable {
 public:
  void Add(const std::string& name, const std::string& help, prometheus::MetricType type,
           const Metrics::Labels& labels, std::function<double()> fn) {
    std::lock_guard<std::mutex> l(mu_);
    series_.push_back(Series{name, help, type, labels, std::move(fn)});
  }
  void Clear() {
    std::lock_guard<std::mutex> l(mu_);
    series_.clear();
  }
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::lock_guard<std::mutex> l(mu_);
    std::vector<prometheus::MetricFamily> out;
    for (const Series& s : series_) {
      prometheus::MetricFamily* f = nullptr;
      for (auto& existing : out) {
        if (existing.name == s.name) f = &existing;
      }
      if (f == nullptr) {
        out.emplace_back();
        f = &out.back();
        f->name = s.name;
        f->help = s.help;
        f->type = s.type;
      }
      prometheus::ClientMetric m;
      for (const auto& [k, v] : s.labels) m.label.push_back({k, v});
      const double value = s.fn();
      if (s.type == prometheus::MetricType::Counter) {
        m.counter.value = value;
      } else {
        m.gauge.value = value;
      }
      f->metric.push_back(std::move(m));
    }
    return out;
  }

 private:
  struct Series {
    std::string name, help;
    prometheus::MetricType type;
    Metrics::Labels labels;
    std::function<double()> fn;
  };
  mutable std::mutex mu_;
  std::vector<Series> series_;
};

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      callbacks_(std::make_shared<CallbackCollectable>()) {}

namespace {

// Opens and closes one TCP connection to host:port (best effort).
void Knock(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) return;
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const bool ok = connect(fd, a->ai_addr, a->ai_addrlen) == 0;
    close(fd);
    if (ok) break;
  }
  freeaddrinfo(res);
}

}  // namespace

Metrics::~Metrics() {
  if (exposer_ == nullptr) return;
  // Stop serving before the collectables go. civetweb's listener thread
  // polls with a 2 s timeout and looks at the stop flag only between polls,
  // so stopping would take up to 2 s (every process's shutdown, every failed
  // start). A connection wakes the poll: knock until the server is gone.
  std::string host = host_;
  if (host.empty() || host == "0.0.0.0" || host == "*") host = "127.0.0.1";
  if (host == "[::]" || host == "::") host = "::1";
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  std::atomic<bool> stopped{false};
  std::thread knocker([&] {
    while (!stopped.load()) {
      Knock(host, port_);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  exposer_.reset();
  stopped = true;
  knocker.join();
}

std::unique_ptr<Metrics> Metrics::Unserved() { return std::unique_ptr<Metrics>(new Metrics()); }

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Serve(const std::string& listen) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == listen.size() ||
      listen.find_first_not_of("0123456789", colon + 1) != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics_listen must be host:port, got \"", listen, "\""));
  }
  std::unique_ptr<Metrics> m(new Metrics());
  try {
    m->exposer_ = std::make_unique<prometheus::Exposer>(listen, /*num_threads=*/1);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("metrics on ", listen, ": ", e.what()));
  }
  m->exposer_->RegisterCollectable(m->registry_);
  m->exposer_->RegisterCollectable(m->callbacks_);
  const std::vector<int> ports = m->exposer_->GetListeningPorts();
  if (ports.empty()) return absl::UnavailableError(absl::StrCat("metrics on ", listen, ": no port"));
  m->port_ = ports[0];
  m->host_ = listen.substr(0, colon);
  return m;
}

void Metrics::AddCallbackGauge(const std::string& name, const std::string& help,
                               const Labels& labels, std::function<double()> fn) {
  callbacks_->Add(name, help, prometheus::MetricType::Gauge, labels, std::move(fn));
}

void Metrics::AddCallbackCounter(const std::string& name, const std::string& help,
                                 const Labels& labels, std::function<double()> fn) {
  callbacks_->Add(name, help, prometheus::MetricType::Counter, labels, std::move(fn));
}

void Metrics::ClearCallbacks() { callbacks_->Clear(); }

std::string Metrics::Text() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  std::vector<prometheus::MetricFamily> more = callbacks_->Collect();
  families.insert(families.end(), more.begin(), more.end());
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families);
  return out.str();
}

namespace buckets {

const std::vector<double>& Ttft() {
  static const auto* b = new std::vector<double>{
      0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
      1.0,   2.5,   5.0,   7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
  return *b;
}

const std::vector<double>& TokenLatency() {
  static const auto* b = new std::vector<double>{
      0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03,
      0.04,   0.05,  0.075,  0.1,   0.15,   0.2,  0.3,   0.4,  0.5,   0.75,
      1.0,    2.5,   5.0,    7.5,   10.0,   20.0, 40.0,  80.0};
  return *b;
}

const std::vector<double>& Request() {
  static const auto* b = new std::vector<double>{
      0.001, 0.005, 0.01, 0.025, 0.05, 0.1,  0.25,  0.5,   1.0,   2.5,    5.0,   10.0,
      15.0,  20.0,  30.0, 40.0,  50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
  return *b;
}

const std::vector<double>& Transfer() {
  static const auto* b = new std::vector<double>{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                 0.1,    0.25,  0.5,    1.0,   2.5,  5.0};
  return *b;
}

const std::vector<double>& PowersOfTwo(int max_exponent) {
  static std::mutex mu;
  static auto* cache = new std::map<int, std::vector<double>>();
  std::lock_guard<std::mutex> l(mu);
  std::vector<double>& b = (*cache)[max_exponent];
  if (b.empty()) {
    for (int e = 0; e <= max_exponent; ++e) b.push_back(static_cast<double>(int64_t{1} << e));
  }
  return b;
}

}  // namespace buckets

prometheus::Histogram& AddHistogram(prometheus::Registry& registry, const std::string& name,
                                    const std::string& help, const std::vector<double>& bounds,
                                    const Metrics::Labels& labels) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(registry).Add(
      labels, prometheus::Histogram::BucketBoundaries(bounds));
}

prometheus::Counter& AddCounter(prometheus::Registry& registry, const std::string& name,
                                const std::string& help, const Metrics::Labels& labels) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(registry).Add(labels);
}

prometheus::Gauge& AddGauge(prometheus::Registry& registry, const std::string& name,
                            const std::string& help, const Metrics::Labels& labels) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(registry).Add(labels);
}

}  // namespace kl
