// How the servers log: through glog to stderr (where the containers' and scripts' logs are read),
// and, with --log-requests, one INFO line per gRPC call: the method, the peer, the status it ended
// with and how long it took. glog itself stays out of this header (its CHECK would replace
// Catch2's in a test that includes it). Free of LibTorch.
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include <memory>
#include <string_view>

namespace lychee {

// Once, first thing in a server's main: glog to stderr only, its lines prefixed with `program`'s
// severity, time, thread and source location.
void InitServerLogging(const char* program);

// An ERROR line, for common/service/service_main.h: a header, which must not include glog.
void LogServerError(std::string_view message);

// For grpc::ServerBuilder::experimental().SetInterceptorCreators: logs every call the server ends.
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeRequestLogInterceptorFactory();

}  // namespace lychee
