// Subcommands that talk to a running lychee-inference over gRPC (--server HOST:PORT, default
// 127.0.0.1:50062): generate --server (streaming), server-info, activate, rollback, hold.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace lychee::cli {

absl::Status RunRemoteGenerate(const std::vector<std::string>& argv);
absl::Status RunServerInfo(const std::vector<std::string>& argv);
absl::Status RunActivate(const std::vector<std::string>& argv);
absl::Status RunCanary(const std::vector<std::string>& argv);
absl::Status RunRollback(const std::vector<std::string>& argv);
absl::Status RunHold(const std::vector<std::string>& argv);

}  // namespace lychee::cli
