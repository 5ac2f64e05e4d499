// Attention backends on the CUDA kernels (kernels/cuda), for bf16 models on the GPU: decode steps
// run as one batched launch per layer; prefill stays the exact matmul attention of
// DenseAttention. Built only with a CUDA LibTorch (LYCHEE_TORCH_CUDA).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "common/attention.h"
#include "common/head_partition.h"
#include "common/model_config.h"

namespace lychee {

// Dense split-KV flash-decode of every head.
std::shared_ptr<const AttentionBackend> MakeCudaDenseAttention();

// Hybrid-head decoding with `partition`: the same function as HybridAttentionBackend.
absl::StatusOr<std::shared_ptr<const AttentionBackend>> MakeCudaHybridAttention(
    std::shared_ptr<const HeadPartition> partition, const ModelConfig& config);

}  // namespace lychee
