// The cluster mutual-TLS flags, shared by kl-router, kl-prefill and kl-decode
// (tls.h, docs/security.md):
//   --cluster_cert, --cluster_key, --cluster_ca   PEM files; all or none
//   --cluster_server_name                         name in the workers' certificates
#ifndef KL_SERVICES_COMMON_TLS_FLAGS_H_
#define KL_SERVICES_COMMON_TLS_FLAGS_H_

#include "absl/status/statusor.h"
#include "services/common/tls.h"

namespace kl {

// Loads the files the flags name (plaintext when none is given).
absl::StatusOr<ClusterTls> ClusterTlsFromFlags();

}  // namespace kl

#endif  // KL_SERVICES_COMMON_TLS_FLAGS_H_
