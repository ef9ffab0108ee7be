// DNS discovery: name:port parsing and getaddrinfo results (loopback only:
// tests run without network).
#include "services/router/dns_resolver.h"

#include <algorithm>

#include "gtest/gtest.h"

namespace kl {
namespace {

TEST(DnsResolverTest, LocalhostResolvesToLoopback) {
  absl::StatusOr<std::vector<std::string>> r = ResolveHostPort("localhost:4242");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(std::find(r->begin(), r->end(), "127.0.0.1:4242") != r->end() ||
              std::find(r->begin(), r->end(), "[::1]:4242") != r->end());
  EXPECT_TRUE(std::is_sorted(r->begin(), r->end()));
}

TEST(DnsResolverTest, LiteralAddresses) {
  absl::StatusOr<std::vector<std::string>> v4 = ResolveHostPort("127.0.0.1:80");
  ASSERT_TRUE(v4.ok()) << v4.status();
  EXPECT_EQ(*v4, std::vector<std::string>{"127.0.0.1:80"});
  absl::StatusOr<std::vector<std::string>> v6 = ResolveHostPort("[::1]:81");
  ASSERT_TRUE(v6.ok()) << v6.status();
  EXPECT_EQ(*v6, std::vector<std::string>{"[::1]:81"});
}

TEST(DnsResolverTest, MalformedTargets) {
  for (const char* bad : {"localhost", ":80", "localhost:0", "localhost:x", "localhost:70000"}) {
    EXPECT_EQ(ResolveHostPort(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(DnsResolverTest, SplitAddressList) {
  EXPECT_EQ(SplitAddressList(" a:1, ,b:2,"), (std::vector<std::string>{"a:1", "b:2"}));
  EXPECT_TRUE(SplitAddressList("").empty());
}

}  // namespace
}  // namespace kl
