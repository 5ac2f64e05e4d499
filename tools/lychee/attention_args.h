// The attention flags shared by the subcommands that run a model in-process
// (--attention dense|hybrid with --partition FILE or --random-partition DENSITY [--partition-seed S],
// --budget N).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "common/attention.h"
#include "common/model.h"
#include "tools/lychee/args.h"

namespace lychee::cli {

// On a CUDA device, decoding runs on the CUDA kernels where this build has them.
absl::StatusOr<std::shared_ptr<const AttentionBackend>> AttentionFromArgs(const Args& args, const ModelConfig& config,
                                                                          at::Device device);

}  // namespace lychee::cli
