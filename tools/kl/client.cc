#include "tools/kl/client.h"

namespace kl {

using Clock = std::chrono::steady_clock;

GenerationClient::GenerationClient(const std::string& address, ClientSecurity security)
    : security_(std::move(security)) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  channel_ = security_.channel.Dial(address, args);
  stub_ = kl::v1::Generation::NewStub(channel_);
}

bool GenerationClient::WaitReady(double seconds) {
  return channel_->WaitForConnected(std::chrono::system_clock::now() +
                                    std::chrono::milliseconds(static_cast<int64_t>(seconds * 1e3)));
}

StreamResult GenerationClient::Generate(
    const kl::v1::GenerateRequest& req, double deadline_seconds,
    const std::function<void(const kl::v1::GenerateResponse&)>& on_chunk) {
  StreamResult r;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(deadline_seconds * 1e3)));
  security_.Authorize(&ctx);
  const auto t0 = Clock::now();
  auto last = t0;
  bool first = true;
  auto reader = stub_->Generate(&ctx, req);
  kl::v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    const auto now = Clock::now();
    if (resp.token_ids_size() > 0) {
      if (first) {
        r.ttft_seconds = std::chrono::duration<double>(now - t0).count();
        first = false;
      } else {
        r.chunk_gaps.push_back(std::chrono::duration<double>(now - last).count());
      }
      last = now;
    }
    for (int i = 0; i < resp.token_ids_size(); ++i) {
      r.tokens.push_back(resp.token_ids(i));
      r.indices.push_back(resp.index() + i);
    }
    r.text += resp.text();
    if (resp.finish_reason() != kl::v1::FINISH_REASON_UNSPECIFIED) r.finish = resp.finish_reason();
    if (resp.has_usage()) r.usage = resp.usage();
    if (on_chunk) on_chunk(resp);
  }
  r.status = reader->Finish();
  r.e2e_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

}  // namespace kl
