#include "services/common/request_context.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kl {

absl::Status CheckRequestId(absl::string_view id) {
  if (id.size() > kRequestIdMaxBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("is ", id.size(), " bytes, at most ", kRequestIdMaxBytes, " allowed"));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(id[i]);
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "has a non-printable byte 0x%02x at offset %d (printable ASCII only)", c, i));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> RequestIdFromMetadata(const grpc::ServerContextBase& ctx) {
  const auto& md = ctx.client_metadata();
  const auto it = md.find(kRequestIdKey);
  if (it == md.end()) return std::string();
  std::string id(it->second.data(), it->second.size());
  if (absl::Status s = CheckRequestId(id); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(kRequestIdKey, " metadata ", s.message()));
  }
  return id;
}

std::string RequestIdOf(const grpc::ServerContextBase& ctx) {
  absl::StatusOr<std::string> id = RequestIdFromMetadata(ctx);
  return id.ok() ? *std::move(id) : std::string();
}

void AttachRequestId(grpc::ClientContext* ctx, absl::string_view id) {
  if (!id.empty()) ctx->AddMetadata(kRequestIdKey, std::string(id));
}

}  // namespace kl
