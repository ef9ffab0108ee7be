#include "services/common/server_util.h"

#include <pthread.h>
#include <signal.h>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/str_cat.h"

namespace kl {

void RunningServer::SetServing(bool serving) {
  if (server && server->GetHealthCheckService()) server->GetHealthCheckService()->SetServingStatus(serving);
}

absl::StatusOr<RunningServer> StartServer(const ServerOptions& options,
                                          const std::vector<grpc::Service*>& services) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder b;
  RunningServer rs;
  b.AddListeningPort(options.address,
                     options.credentials ? options.credentials : grpc::InsecureServerCredentials(),
                     &rs.port);
  // gRPC turns SO_REUSEPORT on by default: a second server on a port in use
  // would then bind too and silently take half its connections. Off, a taken
  // port is a start-up error.
  b.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  b.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  b.SetMaxSendMessageSize(options.max_send_message_bytes);
  for (grpc::Service* s : services) b.RegisterService(s);
  rs.server = b.BuildAndStart();
  if (!rs.server || rs.port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.address));
  }
  return rs;
}

namespace {
sigset_t StopSignalSet() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  return set;
}
}  // namespace

void BlockStopSignals() {
  const sigset_t set = StopSignalSet();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

int WaitForStopSignal() {
  const sigset_t set = StopSignalSet();
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

std::string RequestIdFromContext(const grpc::ServerContext& ctx) {
  const auto& md = ctx.client_metadata();
  auto it = md.find(kRequestIdKey);
  if (it == md.end()) return "";
  return std::string(it->second.data(), it->second.size());
}

}  // namespace kl
