// Test helper: a fresh throwaway PKI (gen_test_certs.sh) under a directory,
// and the paths of its files. The test must list
// //tools/certs:gen_test_certs.sh in its data (the test_certs library does).
#ifndef KL_TOOLS_CERTS_TEST_CERTS_H_
#define KL_TOOLS_CERTS_TEST_CERTS_H_

#include <string>

#include "absl/status/statusor.h"

namespace kl {

struct TestCerts {
  std::string dir;
  std::string ca, ca_key;          // the cluster / public CA
  std::string node, node_key;      // serverAuth+clientAuth, SANs localhost, kl-worker, 127.0.0.1
  std::string client, client_key;  // clientAuth
  std::string other_ca;            // an unrelated CA
  std::string other, other_key;    // signed by other_ca, same SANs as node

  // Runs the script into `dir` (created); INTERNAL with the exit status on failure.
  static absl::StatusOr<TestCerts> Make(const std::string& dir);
};

// The contents of a file ("" if unreadable).
std::string ReadTextFile(const std::string& path);

}  // namespace kl

#endif  // KL_TOOLS_CERTS_TEST_CERTS_H_
