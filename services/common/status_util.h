// The one place that maps absl::Status (engine, services) to grpc::Status (wire)
// and back. Codes map one to one; messages are kept.
#ifndef KL_SERVICES_COMMON_STATUS_UTIL_H_
#define KL_SERVICES_COMMON_STATUS_UTIL_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace kl {

grpc::Status ToGrpcStatus(const absl::Status& s);
absl::Status FromGrpcStatus(const grpc::Status& s);

}  // namespace kl

#endif  // KL_SERVICES_COMMON_STATUS_UTIL_H_
