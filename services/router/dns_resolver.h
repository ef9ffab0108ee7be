// Worker discovery by DNS, Kubernetes headless-service style: a name resolves
// to one A/AAAA record per pod, and the pool re-resolves it periodically.
#ifndef KL_SERVICES_ROUTER_DNS_RESOLVER_H_
#define KL_SERVICES_ROUTER_DNS_RESOLVER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kl {

// Resolves "name:port" with getaddrinfo (blocking: call it from a background
// thread) to every distinct address, sorted: "10.0.0.7:9000", "[fd00::7]:9000".
// INVALID_ARGUMENT for a malformed target, UNAVAILABLE if resolution fails.
absl::StatusOr<std::vector<std::string>> ResolveHostPort(const std::string& target);

// Splits "a:1,b:2" into its non-empty, whitespace-trimmed entries.
std::vector<std::string> SplitAddressList(const std::string& list);

}  // namespace kl

#endif  // KL_SERVICES_ROUTER_DNS_RESOLVER_H_
