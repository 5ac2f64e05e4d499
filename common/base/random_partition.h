// A baseline head partition: layer 0 dense (all retrieval), round(density * heads) of the other
// KV heads retrieval, chosen by `seed`, the rest sparse. What a learned partition is compared with
// (`lychee eval --random-partition`, the shadow-validation tests).
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "common/base/head_partition.h"
#include "common/base/model_config.h"

namespace lychee {

// INVALID_ARGUMENT naming --random-partition when `density` is outside [0, 1].
absl::StatusOr<HeadPartition> RandomHeadPartition(const ModelConfig& config, double density, uint64_t seed);

}  // namespace lychee
