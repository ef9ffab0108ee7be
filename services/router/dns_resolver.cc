#include "services/router/dns_resolver.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kl {
namespace {

// "ip:port" for IPv4, "[ip]:port" for IPv6; empty for other families.
std::string FormatAddress(const struct addrinfo* ai, const std::string& port) {
  char buf[INET6_ADDRSTRLEN] = {};
  if (ai->ai_family == AF_INET) {
    auto* sa = reinterpret_cast<const struct sockaddr_in*>(ai->ai_addr);
    if (inet_ntop(AF_INET, &sa->sin_addr, buf, sizeof(buf)) == nullptr) return "";
    return absl::StrCat(buf, ":", port);
  }
  if (ai->ai_family == AF_INET6) {
    auto* sa = reinterpret_cast<const struct sockaddr_in6*>(ai->ai_addr);
    if (inet_ntop(AF_INET6, &sa->sin6_addr, buf, sizeof(buf)) == nullptr) return "";
    return absl::StrCat("[", buf, "]:", port);
  }
  return "";
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ResolveHostPort(const std::string& target) {
  const size_t colon = target.rfind(':');
  int port_number = 0;
  if (colon == std::string::npos || colon == 0 ||
      !absl::SimpleAtoi(target.substr(colon + 1), &port_number) || port_number <= 0 ||
      port_number > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("DNS target \"", target, "\" is not name:port"));
  }
  std::string host = target.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  const std::string port = target.substr(colon + 1);
  struct addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  struct addrinfo* result = nullptr;
  const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &result);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve \"", host, "\": ", gai_strerror(rc)));
  }
  std::vector<std::string> out;
  for (const struct addrinfo* ai = result; ai != nullptr; ai = ai->ai_next) {
    std::string a = FormatAddress(ai, port);
    if (!a.empty()) out.push_back(std::move(a));
  }
  freeaddrinfo(result);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::vector<std::string> SplitAddressList(const std::string& list) {
  std::vector<std::string> out;
  for (absl::string_view part : absl::StrSplit(list, ',')) {
    part = absl::StripAsciiWhitespace(part);
    if (!part.empty()) out.emplace_back(part);
  }
  return out;
}

}  // namespace kl
