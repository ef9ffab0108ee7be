#include "tools/certs/test_certs.h"

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace kl {

absl::StatusOr<TestCerts> TestCerts::Make(const std::string& dir) {
  // Tests run in their runfiles tree (the workspace root), where the script is.
  const std::string script = "tools/certs/gen_test_certs.sh";
  const std::string cmd = absl::StrCat("bash ", script, " '", dir, "'");
  const int rc = std::system(cmd.c_str());
  if (rc != 0) {
    return absl::InternalError(
        absl::StrCat(cmd, " failed (status ", rc, "); is openssl installed?"));
  }
  TestCerts c;
  c.dir = dir;
  auto f = [&](const char* name) { return absl::StrCat(dir, "/", name); };
  c.ca = f("ca.pem");
  c.ca_key = f("ca.key");
  c.node = f("node.pem");
  c.node_key = f("node.key");
  c.client = f("client.pem");
  c.client_key = f("client.key");
  c.other_ca = f("other-ca.pem");
  c.other = f("other.pem");
  c.other_key = f("other.key");
  return c;
}

std::string ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace kl
