// The transport's flags to options: the message bound's range (nothing that
// rounds to no bound, nothing a receiver would refuse) and the other checks.
#include "services/transport/transport_flags.h"

#include <string>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "gtest/gtest.h"
#include "services/transport/transfer_plan.h"

ABSL_DECLARE_FLAG(std::string, transport);
ABSL_DECLARE_FLAG(double, nccl_message_mb);
ABSL_DECLARE_FLAG(int, nccl_links_per_peer);
ABSL_DECLARE_FLAG(bool, nccl_pipeline);
ABSL_DECLARE_FLAG(double, nccl_link_idle_s);

namespace kl {
namespace {

TEST(TransportFlags, DefaultsGiveTheDocumentedOptions) {
  absl::FlagSaver saver;
  absl::StatusOr<DeviceTransportOptions> o = DeviceTransportOptionsFromFlags();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->enabled);
  EXPECT_EQ(o->message_bytes, kDefaultMessageBytes);
  EXPECT_EQ(o->links_per_peer, 4);
  EXPECT_FALSE(o->pipeline);
  EXPECT_EQ(o->link_idle_timeout, absl::Minutes(10));
}

// Idle links: the prefill side closes after its timeout; the decode side after
// twice the longer of its own and the peer's (so it never closes a link the
// peer may still pick, whatever either was given); 0 = never, on either side.
TEST(TransportFlags, IdleLinkLimitsPerSide) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_nccl_link_idle_s, 1.5);
  absl::StatusOr<DeviceTransportOptions> o = DeviceTransportOptionsFromFlags();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(LinkIdleLimit(*o, /*decode_side=*/false), absl::Milliseconds(1500));
  EXPECT_EQ(LinkIdleLimit(*o, /*decode_side=*/true, absl::Seconds(1)), absl::Seconds(3));
  EXPECT_EQ(LinkIdleLimit(*o, /*decode_side=*/true, absl::Seconds(600)), absl::Seconds(1200));
  // A peer that never closes (or does not say): the decode side never closes.
  EXPECT_EQ(LinkIdleLimit(*o, /*decode_side=*/true), absl::InfiniteDuration());
  absl::SetFlag(&FLAGS_nccl_link_idle_s, 0.0);
  o = DeviceTransportOptionsFromFlags();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(LinkIdleLimit(*o, false), absl::InfiniteDuration());
  EXPECT_EQ(LinkIdleLimit(*o, true, absl::Seconds(5)), absl::InfiniteDuration());
  for (double bad : {-1.0, 0.5, 1e300}) {
    absl::SetFlag(&FLAGS_nccl_link_idle_s, bad);
    absl::StatusOr<DeviceTransportOptions> b = DeviceTransportOptionsFromFlags();
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(b.status().message().find("--nccl_link_idle_s"), std::string::npos) << bad;
  }
}

TEST(TransportFlags, MessageBoundIsBytesWithinTheReceiversLimits) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_nccl_message_mb, 0.5);
  absl::SetFlag(&FLAGS_nccl_pipeline, true);
  absl::StatusOr<DeviceTransportOptions> o = DeviceTransportOptionsFromFlags();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->message_bytes, int64_t{512} << 10);
  EXPECT_TRUE(o->pipeline);
  absl::SetFlag(&FLAGS_nccl_message_mb, 4.0 / 1024);  // exactly the 4 KiB floor
  o = DeviceTransportOptionsFromFlags();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->message_bytes, kMinMessageBytes);
  absl::SetFlag(&FLAGS_nccl_message_mb, 256.0);  // exactly the receivers' limit
  EXPECT_TRUE(DeviceTransportOptionsFromFlags().ok());
  for (double bad : {0.0, -1.0, 1e-7, 3.9 / 1024, 256.5, 1e300}) {
    absl::SetFlag(&FLAGS_nccl_message_mb, bad);
    absl::StatusOr<DeviceTransportOptions> b = DeviceTransportOptionsFromFlags();
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(b.status().message().find("--nccl_message_mb"), std::string::npos) << bad;
  }
}

TEST(TransportFlags, BadModeAndLinkCountAreRefused) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_transport, "grpc");
  absl::StatusOr<DeviceTransportOptions> o = DeviceTransportOptionsFromFlags();
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_FALSE(o->enabled);
  absl::SetFlag(&FLAGS_transport, "nccl");
  EXPECT_EQ(DeviceTransportOptionsFromFlags().status().code(), absl::StatusCode::kInvalidArgument);
  absl::SetFlag(&FLAGS_transport, "auto");
  absl::SetFlag(&FLAGS_nccl_links_per_peer, 0);
  EXPECT_EQ(DeviceTransportOptionsFromFlags().status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kl
