// Starting a gRPC server the same way in every process: the given services,
// grpc.health.v1 (built in) and server reflection, message size limits, and the
// port actually bound (tests bind port 0).
#ifndef KL_SERVICES_COMMON_SERVER_UTIL_H_
#define KL_SERVICES_COMMON_SERVER_UTIL_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kl {

struct ServerOptions {
  std::string address = "127.0.0.1:0";  // host:port; port 0 = any free port
  // Largest request message accepted (RESOURCE_EXHAUSTED beyond it, before
  // any handler runs) and largest response sent.
  int max_receive_message_bytes = 64 << 20;
  int max_send_message_bytes = 64 << 20;
  // Transport security (tls.h); null: plaintext.
  std::shared_ptr<grpc::ServerCredentials> credentials;
};

struct RunningServer {
  std::unique_ptr<grpc::Server> server;
  int port = 0;
  // Sets the health status of "" and every registered service name.
  void SetServing(bool serving);
};

absl::StatusOr<RunningServer> StartServer(const ServerOptions& options,
                                          const std::vector<grpc::Service*>& services);

// Stop signals (SIGTERM, SIGINT) of a server process. BlockStopSignals() must
// run first in main, before any thread exists, so every thread inherits the
// mask; WaitForStopSignal() then blocks the caller until one arrives and
// returns its number (the process drains instead of dying mid-stream).
void BlockStopSignals();
int WaitForStopSignal();

// Metadata key carrying the request id through router, prefill and decode.
inline constexpr char kRequestIdKey[] = "x-request-id";

// The request id from a server context's client metadata ("" if none).
std::string RequestIdFromContext(const grpc::ServerContext& ctx);

}  // namespace kl

#endif  // KL_SERVICES_COMMON_SERVER_UTIL_H_
