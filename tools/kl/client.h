// A small synchronous client of kl.v1.Generation, shared by `kl generate`,
// `kl local` and `kl bench`.
#ifndef KL_TOOLS_KL_CLIENT_H_
#define KL_TOOLS_KL_CLIENT_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "proto/generation.grpc.pb.h"
#include "services/common/tls.h"

namespace kl {

// What one streamed request produced, timed at the client.
struct StreamResult {
  grpc::Status status;
  std::string text;
  std::vector<int32_t> tokens;
  kl::v1::FinishReason finish = kl::v1::FINISH_REASON_UNSPECIFIED;
  kl::v1::Usage usage;
  double ttft_seconds = 0;              // send -> first chunk with a token
  double e2e_seconds = 0;               // send -> stream end
  std::vector<double> chunk_gaps;       // seconds between successive token chunks (ITL)
  std::vector<int64_t> indices;         // index of every received token, in order
};

// How a client reaches a secured router (docs/security.md).
struct ClientSecurity {
  ChannelSecurity channel;  // TLS (trusting the router's CA), or plaintext
  std::string api_key;      // sent as `authorization: Bearer <key>`; empty: none
  // Adds the key's metadata to `ctx`.
  void Authorize(grpc::ClientContext* ctx) const {
    if (!api_key.empty()) ctx->AddMetadata("authorization", "Bearer " + api_key);
  }
};

class GenerationClient {
 public:
  explicit GenerationClient(const std::string& address, ClientSecurity security = {});
  // Streams one request; `on_chunk` (optional) sees every response as it arrives.
  StreamResult Generate(const kl::v1::GenerateRequest& req, double deadline_seconds,
                        const std::function<void(const kl::v1::GenerateResponse&)>& on_chunk = {});
  bool WaitReady(double seconds);

 private:
  ClientSecurity security_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<kl::v1::Generation::Stub> stub_;
};

}  // namespace kl

#endif  // KL_TOOLS_KL_CLIENT_H_
