// An attention backend for a policy spec (kernels/policy.h): the spec is validated against the
// model first, so a bad request fails here with INVALID_ARGUMENT naming the parameter.
#pragma once

#include <c10/core/Device.h>

#include <memory>

#include "absl/status/statusor.h"
#include "common/base/head_partition.h"
#include "common/base/model_config.h"
#include "common/model/attention.h"
#include "kernels/policy.h"

namespace lychee {

// lychee and streaming need `partition` (its roles; lychee takes its selection from the spec:
// token_budget, block_size, sink_tokens, recent_tokens). On a CUDA device, dense, lychee,
// double-p, prhs and quest (with a power-of-two page size) decode on the CUDA kernels where this
// build has them; dense and lychee audit there too (sampled, on the device), while audited
// double-p, prhs and quest requests run their references; streaming and tidal run their CPU
// reference through ATen on the device.
absl::StatusOr<std::shared_ptr<const AttentionBackend>> MakePolicyBackend(
    const PolicySpec& spec, const ModelConfig& config, std::shared_ptr<const HeadPartition> partition,
    c10::Device device = c10::Device(c10::kCPU));

}  // namespace lychee
