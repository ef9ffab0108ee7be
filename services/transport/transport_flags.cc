#include "services/transport/transport_flags.h"

#include <string>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "engine/common/log.h"

ABSL_FLAG(std::string, transport, "auto",
          "state transfer between prefill and decode workers: auto (GPU to GPU over NCCL "
          "where both ends can, gRPC otherwise) or grpc");
ABSL_FLAG(int, nccl_links_per_peer, 4,
          "prefill: concurrent NCCL transfers to one decode worker (more go over gRPC)");
ABSL_FLAG(double, nccl_init_timeout_s, 20, "NCCL communicator set-up timeout, seconds");
ABSL_FLAG(double, nccl_transfer_timeout_s, 10,
          "a device transfer's sends / receives must end within this (+1 s per GB)");
ABSL_FLAG(bool, nccl_sync_open, false,
          "prefill: the first transfer to a decode worker waits for the NCCL link instead of "
          "going over gRPC while it comes up");
ABSL_FLAG(bool, nccl_ship_at_end, false,
          "prefill: send every layer after the forward, not as each layer finishes (benchmarks)");
ABSL_FLAG(bool, nccl_pipeline, false,
          "overlap packing / scattering of one group of a device transfer with the NCCL "
          "transfer of the next (a second stream per link, twice the staging)");
ABSL_FLAG(double, nccl_message_mb, 16,
          "prefill: the largest message of a device transfer, MiB (an MLA layer's latent rows "
          "beyond it move as several messages; each side stages one, two when pipelined)");
ABSL_FLAG(double, nccl_link_idle_s, 600,
          "close an NCCL link that carried nothing for this long, seconds (at least 1; the "
          "decode side waits twice the longer of its own and the peer's); 0 = never");
ABSL_FLAG(bool, nccl_cross_host, false,
          "allow NCCL links to workers on other hosts (needs a network NCCL can use)");

namespace kl {

absl::StatusOr<DeviceTransportOptions> DeviceTransportOptionsFromFlags() {
  const std::string mode = absl::GetFlag(FLAGS_transport);
  if (mode != "auto" && mode != "grpc") {
    return absl::InvalidArgumentError(
        absl::StrCat("--transport must be auto or grpc, not '", mode, "'"));
  }
  DeviceTransportOptions o;
  o.enabled = mode == "auto";
  o.links_per_peer = absl::GetFlag(FLAGS_nccl_links_per_peer);
  const double init = absl::GetFlag(FLAGS_nccl_init_timeout_s);
  const double xfer = absl::GetFlag(FLAGS_nccl_transfer_timeout_s);
  if (o.links_per_peer < 1 || !(init > 0) || !(xfer > 0)) {
    return absl::InvalidArgumentError(
        "--nccl_links_per_peer must be >= 1 and the --nccl_*_timeout_s values > 0");
  }
  o.init_timeout = absl::Seconds(init);
  o.transfer_timeout = absl::Seconds(xfer);
  o.sync_open = absl::GetFlag(FLAGS_nccl_sync_open);
  o.ship_at_end = absl::GetFlag(FLAGS_nccl_ship_at_end);
  o.cross_host = absl::GetFlag(FLAGS_nccl_cross_host);
  o.pipeline = absl::GetFlag(FLAGS_nccl_pipeline);
  // At least 4 KiB (a bound that rounds to nothing would mean none), at most
  // what a receiver accepts.
  const double message_mb = absl::GetFlag(FLAGS_nccl_message_mb);
  const double message_bytes = message_mb * (1 << 20);
  if (!(message_bytes >= kMinMessageBytes && message_bytes <= kMaxMlaMessageBytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--nccl_message_mb must be in [", kMinMessageBytes / double{1 << 20}, ", ",
                     kMaxMlaMessageBytes >> 20, "], not ", message_mb));
  }
  o.message_bytes = static_cast<int64_t>(message_bytes);
  const double idle = absl::GetFlag(FLAGS_nccl_link_idle_s);
  // At least a second: a link must outlive the rendezvous and a push's first
  // message, or it would be closed between being picked and being used.
  if (!(idle == 0 || (idle >= 1 && idle <= 1e9))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--nccl_link_idle_s must be 0 (never close idle links) or in [1, 1e9], not ", idle));
  }
  o.link_idle_timeout = absl::Seconds(idle);
  return o;
}

absl::StatusOr<std::unique_ptr<DeviceTransport>> DeviceTransportFromFlags(Model& model) {
  absl::StatusOr<DeviceTransportOptions> opts = DeviceTransportOptionsFromFlags();
  if (!opts.ok()) return opts.status();
  const DeviceTransportOptions& o = *opts;
  absl::StatusOr<std::unique_ptr<DeviceTransport>> t =
      MakeDeviceTransport(model.config(), model.backend()->device_state(), o);
  if (t.ok() && *t == nullptr && o.enabled) {
    KL_LOG(INFO) << "state transfers go over gRPC (no device transport in this build or backend)";
  }
  return t;
}

}  // namespace kl
