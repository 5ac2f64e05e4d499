// A gRPC stub of one of the Lychee services with the CLI's conventions: unary calls get a
// deadline, every call carries the token of --token-file, the channel is TLS when --tls-ca,
// --tls-cert or --tls-key is given, and errors say which server answered while keeping the
// gRPC code.
#pragma once

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <chrono>
#include <memory>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "common/service/grpc_status.h"
#include "common/service/security.h"
#include "tools/lychee/args.h"

namespace lychee::cli {

// `flags` and the ones every command that talks to a server takes: --tls-ca FILE (CA
// certificates that verify the server), --tls-cert FILE and --tls-key FILE (a client
// certificate, for mutual TLS), --token-file FILE (sent as 'authorization: Bearer TOKEN').
std::set<std::string> WithConnectionFlags(std::set<std::string> flags);

// How to reach a server, from those flags: plaintext and no token when none is given.
struct Connection {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  std::string token;
};
absl::StatusOr<Connection> ConnectionFromArgs(const Args& args);

template <typename Service>
class ServiceClient {
 public:
  // `what` names the server in errors, e.g. "trainer".
  static absl::StatusOr<ServiceClient> Connect(std::string what, std::string address, const Args& args) {
    LYCHEE_ASSIGN_OR_RETURN(Connection connection, ConnectionFromArgs(args));
    return ServiceClient(std::move(what), std::move(address), std::move(connection));
  }

  typename Service::Stub& stub() { return *stub_; }

  // For unary calls: a deadline, and the token.
  std::unique_ptr<grpc::ClientContext> UnaryContext() const {
    auto context = StreamContext();
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return context;
  }

  // For streams, which last as long as they need: the token only.
  std::unique_ptr<grpc::ClientContext> StreamContext() const {
    auto context = std::make_unique<grpc::ClientContext>();
    AttachBearerToken(*context, token_);
    return context;
  }

  absl::Status Check(const grpc::Status& status) const {
    const absl::Status converted = FromGrpcStatus(status);
    if (converted.ok()) return converted;
    return absl::Status(converted.code(), absl::StrCat(what_, " at ", address_, ": ",
                                                       absl::StatusCodeToString(converted.code()), ": ",
                                                       std::string(converted.message())));
  }

 private:
  ServiceClient(std::string what, std::string address, Connection connection)
      : what_(std::move(what)),
        address_(std::move(address)),
        token_(std::move(connection.token)),
        stub_(Service::NewStub(grpc::CreateChannel(address_, connection.credentials))) {}

  std::string what_;
  std::string address_;
  std::string token_;
  std::unique_ptr<typename Service::Stub> stub_;
};

}  // namespace lychee::cli
