// absl::Status <-> grpc::Status. Both use the canonical google.rpc.Code numbering, so codes map
// one to one and messages pass through unchanged. Free of LibTorch; the services and the CLI
// share it.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace lychee {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace lychee
