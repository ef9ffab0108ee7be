// Transport security of every process (docs/security.md):
//  * the router's public API: server TLS from --tls_cert/--tls_key, optionally
//    requiring client certificates signed by --tls_client_ca;
//  * the internal plane (router -> prefill/decode, prefill -> decode): mutual
//    TLS from --cluster_cert/--cluster_key/--cluster_ca. A worker given
//    cluster certificates requires and verifies a client certificate signed by
//    the cluster CA on every call (health and reflection included) and never
//    falls back to plaintext; the dialing side presents its own certificate
//    and verifies the worker's against the same CA.
// Certificates are PEM files read once at start-up; a missing or unreadable
// file is an error naming the flag and the path (the process exits). With no
// flags everything stays plaintext (the local dev cluster, tests).
#ifndef KL_SERVICES_COMMON_TLS_H_
#define KL_SERVICES_COMMON_TLS_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kl {

// The contents of the file `path`, given by flag `flag` (for the message).
// NOT_FOUND / PERMISSION_DENIED / FAILED_PRECONDITION (empty, not PEM) name both.
absl::StatusOr<std::string> ReadPemFile(absl::string_view flag, const std::string& path);

// How to dial one plane: credentials (null = plaintext) and, for TLS, the name
// the peer's certificate must carry when it differs from the dialed host
// (workers are dialed by IP, so their certificates share one DNS name).
struct ChannelSecurity {
  std::shared_ptr<grpc::ChannelCredentials> credentials;  // null: insecure
  std::string server_name;                                // "" : the dialed host
  bool tls() const { return credentials != nullptr; }
  // A channel to `address` with `args` plus the name override.
  std::shared_ptr<grpc::Channel> Dial(const std::string& address,
                                      grpc::ChannelArguments args = {}) const;
};

// The cluster's mutual-TLS material, loaded from files.
struct ClusterTlsFiles {
  std::string cert;         // this process's certificate chain (PEM path)
  std::string key;          // its private key
  std::string ca;           // the cluster CA: peers must chain to it
  std::string server_name;  // see ChannelSecurity::server_name
  bool enabled() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

struct ClusterTls {
  // Null when the files are not given (plaintext): insecure server
  // credentials / plaintext channels.
  std::shared_ptr<grpc::ServerCredentials> server;  // requires + verifies client certs
  ChannelSecurity client;                           // presents our cert, verifies the peer
  bool enabled() const { return server != nullptr; }
};

// All of cert/key/ca or none (INVALID_ARGUMENT names what is missing);
// unreadable files as ReadPemFile.
absl::StatusOr<ClusterTls> LoadClusterTls(const ClusterTlsFiles& files);

// The public API's server credentials: TLS with `cert`/`key`; with
// `client_ca`, clients must also present a certificate signed by it.
// Empty cert and key: insecure. Errors as LoadClusterTls.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> LoadPublicServerTls(
    const std::string& cert, const std::string& key, const std::string& client_ca);

// A client of the public API: TLS trusting `ca` (empty: the system roots) and
// presenting `cert`/`key` when given; `use_tls` false = plaintext.
absl::StatusOr<ChannelSecurity> LoadPublicClientTls(bool use_tls, const std::string& ca,
                                                    const std::string& cert,
                                                    const std::string& key,
                                                    const std::string& server_name);

}  // namespace kl

#endif  // KL_SERVICES_COMMON_TLS_H_
