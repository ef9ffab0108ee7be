#include "services/common/tls_flags.h"

#include <string>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, cluster_cert, "",
          "PEM certificate chain this process presents on the internal plane (mutual TLS); "
          "with --cluster_key and --cluster_ca. Empty: plaintext");
ABSL_FLAG(std::string, cluster_key, "", "PEM private key of --cluster_cert");
ABSL_FLAG(std::string, cluster_ca, "",
          "PEM CA bundle: internal peers (callers of this worker, workers this process dials) "
          "must present a certificate signed by it");
ABSL_FLAG(std::string, cluster_server_name, "",
          "DNS name the workers' certificates carry, checked when dialing a worker "
          "(workers are dialed by IP); empty: the dialed host");

namespace kl {

absl::StatusOr<ClusterTls> ClusterTlsFromFlags() {
  ClusterTlsFiles f;
  f.cert = absl::GetFlag(FLAGS_cluster_cert);
  f.key = absl::GetFlag(FLAGS_cluster_key);
  f.ca = absl::GetFlag(FLAGS_cluster_ca);
  f.server_name = absl::GetFlag(FLAGS_cluster_server_name);
  return LoadClusterTls(f);
}

}  // namespace kl
