// What both services do to start their gRPC server: health checking and reflection on, one
// service, a cap on request size, a port of its own, and the request log when asked for.
// Header-only: each service links gRPC and its reflection library.
#pragma once

#include <grpc/grpc.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/service/server_logging.h"

namespace lychee {

// Serves `service` on `address`; *port gets the bound port. UNAVAILABLE when it cannot listen,
// also when another server holds the port. `log_requests`: one INFO line per call.
inline absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(
    const std::string& address, const std::shared_ptr<grpc::ServerCredentials>& credentials, grpc::Service* service,
    int max_request_bytes, bool log_requests, int* port) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, credentials, port);
  builder.RegisterService(service);
  builder.SetMaxReceiveMessageSize(max_request_bytes);
  // gRPC binds with SO_REUSEPORT by default: a second server started on a taken port would start
  // and silently take a share of the first one's connections.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  if (log_requests) {
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
    interceptors.push_back(MakeRequestLogInterceptorFactory());
    builder.experimental().SetInterceptorCreators(std::move(interceptors));
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || *port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address, ": the port is taken, or the address is not one of this machine's"));
  }
  return server;
}

}  // namespace lychee
