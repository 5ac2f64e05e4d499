// Subcommands that run in-process on a local model: tokenize and generate.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace lychee::cli {

absl::Status RunTokenize(const std::vector<std::string>& argv);
absl::Status RunGenerate(const std::vector<std::string>& argv);

}  // namespace lychee::cli
