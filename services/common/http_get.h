// A minimal blocking HTTP/1.0 GET over a TCP socket, for tests that scrape
// /metrics (no curl dependency). Not for production use.
#ifndef KL_SERVICES_COMMON_HTTP_GET_H_
#define KL_SERVICES_COMMON_HTTP_GET_H_

#include <string>

#include "absl/status/statusor.h"

namespace kl {

struct HttpResponse {
  int status = 0;
  std::string headers;
  std::string body;
};

// GET http://<host>:<port><path>; `host` is a numeric IPv4 address.
absl::StatusOr<HttpResponse> HttpGet(const std::string& host, int port, const std::string& path,
                                     double timeout_seconds = 10);
// "host:port" form.
absl::StatusOr<HttpResponse> HttpGet(const std::string& address, const std::string& path);

}  // namespace kl

#endif  // KL_SERVICES_COMMON_HTTP_GET_H_
