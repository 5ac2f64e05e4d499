// Subcommands that talk to a running lychee-trainer over gRPC (--trainer HOST:PORT, default
// 127.0.0.1:50061): submit, watch, jobs, cancel, partitions, partition, publish. partitions and
// partition take --server HOST:PORT instead to show what an inference server holds.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace lychee::cli {

absl::Status RunSubmit(const std::vector<std::string>& argv);
absl::Status RunWatch(const std::vector<std::string>& argv);
absl::Status RunJobs(const std::vector<std::string>& argv);
absl::Status RunCancel(const std::vector<std::string>& argv);
absl::Status RunPartitions(const std::vector<std::string>& argv);
absl::Status RunPartition(const std::vector<std::string>& argv);
absl::Status RunPublish(const std::vector<std::string>& argv);

}  // namespace lychee::cli
