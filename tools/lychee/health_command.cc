#include "tools/lychee/health_command.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/service/grpc_status.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tools/lychee/args.h"
#include "tools/lychee/grpc_client.h"

namespace lychee::cli {
namespace {

constexpr char kDefaultTarget[] = "127.0.0.1:50061";
constexpr double kDefaultTimeoutSeconds = 5;

std::string Subject(const std::string& target, const std::string& service) {
  return service.empty() ? target : absl::StrCat(target, " service ", service);
}

}  // namespace

absl::StatusOr<std::string> CheckHealth(const std::string& target, const std::string& service,
                                        std::chrono::milliseconds timeout,
                                        std::shared_ptr<grpc::ChannelCredentials> credentials) {
  if (credentials == nullptr) credentials = grpc::InsecureChannelCredentials();
  auto stub = grpc::health::v1::Health::NewStub(grpc::CreateChannel(target, credentials));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const absl::Status status = FromGrpcStatus(stub->Check(&context, request, &response));
  if (!status.ok()) {
    return absl::Status(status.code(), absl::StrCat("health check of ", Subject(target, service), ": ",
                                                    absl::StatusCodeToString(status.code()), ": ",
                                                    std::string(status.message())));
  }
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
}

absl::Status RunHealth(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(const Args args,
                          Args::Parse(argv, WithConnectionFlags({"target", "service", "timeout"}), {}));
  const std::string target = args.GetOr("target", kDefaultTarget);
  const std::string service = args.GetOr("service", "");
  LYCHEE_ASSIGN_OR_RETURN(const double timeout_seconds, args.GetDouble("timeout", kDefaultTimeoutSeconds));
  if (!(timeout_seconds > 0 && timeout_seconds <= 3600)) {
    return absl::InvalidArgumentError(absl::StrCat("--timeout must be in (0, 3600] seconds, got ", timeout_seconds));
  }
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  LYCHEE_ASSIGN_OR_RETURN(const Connection connection, ConnectionFromArgs(args));
  LYCHEE_ASSIGN_OR_RETURN(const std::string serving_status,
                          CheckHealth(target, service, timeout, connection.credentials));
  std::cout << Subject(target, service) << ": " << serving_status << "\n";
  if (serving_status != "SERVING") {
    return absl::UnavailableError(absl::StrCat(Subject(target, service), " is ", serving_status));
  }
  return absl::OkStatus();
}

}  // namespace lychee::cli
