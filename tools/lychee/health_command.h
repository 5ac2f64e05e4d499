// `lychee health`: asks a server (lychee-trainer, lychee-inference) through the standard
// grpc.health.v1.Health/Check whether it serves, for scripts and container health checks.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace grpc {
class ChannelCredentials;
}

namespace lychee::cli {

// The serving status that the server at `target` (HOST:PORT) reports for `service` ("" asks
// about the server as a whole), by its grpc.health.v1 name: SERVING, NOT_SERVING, UNKNOWN. A
// failed call is its error, with the gRPC code (UNAVAILABLE: nothing answers there; NOT_FOUND:
// the server does not know `service`; DEADLINE_EXCEEDED: no answer within `timeout`).
// `credentials` null: plaintext.
absl::StatusOr<std::string> CheckHealth(const std::string& target, const std::string& service,
                                        std::chrono::milliseconds timeout,
                                        std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

// lychee health [--target HOST:PORT] [--service NAME] [--timeout SECONDS] and the connection
// flags of tools/lychee/grpc_client.h (the health service itself needs no token): prints the
// status and succeeds only when it is SERVING.
absl::Status RunHealth(const std::vector<std::string>& argv);

}  // namespace lychee::cli
