#include "services/common/tls.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kl {

absl::StatusOr<std::string> ReadPemFile(absl::string_view flag, const std::string& path) {
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    const std::string why = absl::StrCat("--", flag, "=", path, ": cannot read (",
                                         err != 0 ? std::strerror(err) : "open failed", ")");
    if (err == ENOENT) return absl::NotFoundError(why);
    if (err == EACCES) return absl::PermissionDeniedError(why);
    return absl::FailedPreconditionError(why);
  }
  std::stringstream ss;
  ss << in.rdbuf();
  std::string pem = ss.str();
  // gRPC would only fail at the first handshake, with a vague message; a file
  // that is not PEM at all is caught here, at start-up.
  if (!absl::StrContains(pem, "-----BEGIN ")) {
    return absl::FailedPreconditionError(
        absl::StrCat("--", flag, "=", path, ": not a PEM file (no -----BEGIN line)"));
  }
  return pem;
}

std::shared_ptr<grpc::Channel> ChannelSecurity::Dial(const std::string& address,
                                                     grpc::ChannelArguments args) const {
  if (credentials == nullptr) {
    return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  }
  if (!server_name.empty()) args.SetSslTargetNameOverride(server_name);
  return grpc::CreateCustomChannel(address, credentials, args);
}

namespace {

// Every one of `flags` that has an empty value, for "give all or none".
absl::Status AllOrNone(const std::vector<std::pair<const char*, const std::string*>>& flags) {
  std::vector<std::string> given, missing;
  for (const auto& [name, value] : flags) (value->empty() ? missing : given).push_back(name);
  if (given.empty() || missing.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("--", absl::StrJoin(given, ", --"),
                                                 " given without --",
                                                 absl::StrJoin(missing, ", --")));
}

}  // namespace

absl::StatusOr<ClusterTls> LoadClusterTls(const ClusterTlsFiles& files) {
  ClusterTls out;
  if (!files.enabled()) return out;
  if (absl::Status s = AllOrNone({{"cluster_cert", &files.cert},
                                  {"cluster_key", &files.key},
                                  {"cluster_ca", &files.ca}});
      !s.ok()) {
    return s;
  }
  absl::StatusOr<std::string> cert = ReadPemFile("cluster_cert", files.cert);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPemFile("cluster_key", files.key);
  if (!key.ok()) return key.status();
  absl::StatusOr<std::string> ca = ReadPemFile("cluster_ca", files.ca);
  if (!ca.ok()) return ca.status();

  grpc::SslServerCredentialsOptions so(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  so.pem_root_certs = *ca;
  so.pem_key_cert_pairs.push_back({*key, *cert});
  out.server = grpc::SslServerCredentials(so);

  grpc::SslCredentialsOptions co;
  co.pem_root_certs = *ca;  // only the cluster CA: a worker with a public cert is refused too
  co.pem_private_key = *key;
  co.pem_cert_chain = *cert;
  out.client.credentials = grpc::SslCredentials(co);
  out.client.server_name = files.server_name;
  return out;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> LoadPublicServerTls(
    const std::string& cert, const std::string& key, const std::string& client_ca) {
  if (cert.empty() && key.empty()) {
    if (!client_ca.empty()) {
      return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (absl::Status s = AllOrNone({{"tls_cert", &cert}, {"tls_key", &key}}); !s.ok()) return s;
  absl::StatusOr<std::string> cert_pem = ReadPemFile("tls_cert", cert);
  if (!cert_pem.ok()) return cert_pem.status();
  absl::StatusOr<std::string> key_pem = ReadPemFile("tls_key", key);
  if (!key_pem.ok()) return key_pem.status();
  grpc::SslServerCredentialsOptions so(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  if (!client_ca.empty()) {
    absl::StatusOr<std::string> ca_pem = ReadPemFile("tls_client_ca", client_ca);
    if (!ca_pem.ok()) return ca_pem.status();
    so.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    so.pem_root_certs = *ca_pem;
  }
  so.pem_key_cert_pairs.push_back({*key_pem, *cert_pem});
  return grpc::SslServerCredentials(so);
}

absl::StatusOr<ChannelSecurity> LoadPublicClientTls(bool use_tls, const std::string& ca,
                                                    const std::string& cert,
                                                    const std::string& key,
                                                    const std::string& server_name) {
  ChannelSecurity out;
  if (!use_tls) return out;
  grpc::SslCredentialsOptions co;
  if (!ca.empty()) {
    absl::StatusOr<std::string> pem = ReadPemFile("tls_ca", ca);
    if (!pem.ok()) return pem.status();
    co.pem_root_certs = *pem;
  }
  if (absl::Status s = AllOrNone({{"tls_client_cert", &cert}, {"tls_client_key", &key}});
      !s.ok()) {
    return s;
  }
  if (!cert.empty()) {
    absl::StatusOr<std::string> c = ReadPemFile("tls_client_cert", cert);
    if (!c.ok()) return c.status();
    absl::StatusOr<std::string> k = ReadPemFile("tls_client_key", key);
    if (!k.ok()) return k.status();
    co.pem_cert_chain = *c;
    co.pem_private_key = *k;
  }
  out.credentials = grpc::SslCredentials(co);
  out.server_name = server_name;
  return out;
}

}  // namespace kl
