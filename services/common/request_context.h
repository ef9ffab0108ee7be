// The request id across processes: the router puts it in the `x-request-id`
// gRPC metadata of every worker call (and the prefill worker on its state
// push); workers read it back here and wrap their work in a ScopedRequestId
// (engine/common/log.h), so every log line about the request carries
// `req=<id>` in every process. Clients may send their own id the same way.
#ifndef KL_SERVICES_COMMON_REQUEST_CONTEXT_H_
#define KL_SERVICES_COMMON_REQUEST_CONTEXT_H_

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "services/common/server_util.h"  // kRequestIdKey

namespace kl {

// Ids are bounded and printable so they can go into log lines, bundle headers
// and metadata as they are (no log injection through a client's id).
inline constexpr size_t kRequestIdMaxBytes = 128;

// OK for "" (none) and for 1..kRequestIdMaxBytes printable ASCII bytes;
// otherwise INVALID_ARGUMENT saying what is wrong ("is 300 bytes, ...").
absl::Status CheckRequestId(absl::string_view id);

// The x-request-id of a call's client metadata: "" when absent,
// INVALID_ARGUMENT when present but not a valid id (CheckRequestId).
absl::StatusOr<std::string> RequestIdFromMetadata(const grpc::ServerContextBase& ctx);

// The valid x-request-id of a call, or "" (absent or invalid): what a worker logs.
std::string RequestIdOf(const grpc::ServerContextBase& ctx);

// Adds x-request-id to an outgoing call; nothing for "".
void AttachRequestId(grpc::ClientContext* ctx, absl::string_view id);

}  // namespace kl

#endif  // KL_SERVICES_COMMON_REQUEST_CONTEXT_H_
