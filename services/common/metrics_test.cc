#include "services/common/metrics.h"

#include <atomic>
#include <chrono>
#include <thread>

#include "gtest/gtest.h"
#include "services/common/http_get.h"

namespace kl {
namespace {

TEST(Metrics, ServesRegisteredFamiliesOnAnEphemeralPort) {
  absl::StatusOr<std::unique_ptr<Metrics>> m = Metrics::Serve("127.0.0.1:0");
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_GT((*m)->port(), 0);
  prometheus::Counter& c =
      AddCounter((*m)->registry(), "kl_test_things_total", "Things counted.", {{"kind", "a"}});
  c.Increment(3);
  prometheus::Histogram& h = AddHistogram((*m)->registry(), "kl_test_latency_seconds",
                                          "A latency.", buckets::TokenLatency());
  h.Observe(0.0007);
  std::atomic<int> depth{5};
  (*m)->AddCallbackGauge("kl_test_depth", "A depth read at scrape time.", {{"stage", "x"}},
                         [&depth] { return depth.load(); });

  absl::StatusOr<HttpResponse> r = HttpGet("127.0.0.1", (*m)->port(), "/metrics");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->status, 200);
  const std::string& t = r->body;
  EXPECT_NE(t.find("# HELP kl_test_things_total Things counted."), std::string::npos) << t;
  EXPECT_NE(t.find("# TYPE kl_test_things_total counter"), std::string::npos) << t;
  EXPECT_NE(t.find("kl_test_things_total{kind=\"a\"} 3"), std::string::npos) << t;
  EXPECT_NE(t.find("# TYPE kl_test_latency_seconds histogram"), std::string::npos) << t;
  EXPECT_NE(t.find("kl_test_latency_seconds_bucket{le=\"0.0005\"} 0"), std::string::npos) << t;
  EXPECT_NE(t.find("kl_test_latency_seconds_bucket{le=\"0.001\"} 1"), std::string::npos) << t;
  EXPECT_NE(t.find("kl_test_latency_seconds_count 1"), std::string::npos) << t;
  EXPECT_NE(t.find("# TYPE kl_test_depth gauge"), std::string::npos) << t;
  EXPECT_NE(t.find("kl_test_depth{stage=\"x\"} 5"), std::string::npos) << t;

  depth = 0;
  (*m)->ClearCallbacks();
  EXPECT_EQ((*m)->Text().find("kl_test_depth"), std::string::npos);
  EXPECT_NE((*m)->Text().find("kl_test_things_total"), std::string::npos);
}

// civetweb's listener polls with a 2 s timeout; a process stopping (or failing
// to start) must not wait that out. Each case destroys a server right after
// it started, when the listener has just begun a poll.
TEST(Metrics, StoppingDoesNotWaitForTheListenersPoll) {
  for (const std::string listen : {"127.0.0.1:0", "0.0.0.0:0", "localhost:0"}) {
    absl::StatusOr<std::unique_ptr<Metrics>> m = Metrics::Serve(listen);
    ASSERT_TRUE(m.ok()) << listen << ": " << m.status();
    const int port = (*m)->port();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the poll has begun
    const auto t0 = std::chrono::steady_clock::now();
    m->reset();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_LT(s, 1.0) << listen;
    // Stopped: nothing serves the port any more.
    EXPECT_FALSE(HttpGet(absl::StrCat("127.0.0.1:", port), "/metrics").ok()) << listen;
  }
}

TEST(Metrics, BadAddressesAreRefused) {
  EXPECT_EQ(Metrics::Serve("nonsense").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Metrics::Serve("127.0.0.1:x").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Metrics, BucketSetsCoverTheRangesAsked) {
  EXPECT_EQ(buckets::Ttft().front(), 0.001);
  EXPECT_GE(buckets::Ttft().back(), 600);
  EXPECT_EQ(buckets::TokenLatency().front(), 0.0005);
  int below_10ms = 0;
  for (double b : buckets::TokenLatency()) below_10ms += b < 0.01;
  EXPECT_GE(below_10ms, 5);
  EXPECT_EQ(buckets::Transfer().front(), 0.0005);
  EXPECT_EQ(buckets::Transfer().back(), 5.0);
  EXPECT_EQ(buckets::PowersOfTwo(3), (std::vector<double>{1, 2, 4, 8}));
}

}  // namespace
}  // namespace kl
