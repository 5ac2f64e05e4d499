// lychee eval: retrieval accuracy (pass key, multi-key needles) of dense or hybrid decoding on
// held-out text, so that partitions and budgets can be compared on the same samples.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace lychee::cli {

absl::Status RunEval(const std::vector<std::string>& argv);

}  // namespace lychee::cli
