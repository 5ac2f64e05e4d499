// Attention backends on the CUDA kernels (kernels/cuda), for bf16 models on the GPU. Dense and
// hybrid decode read the KV pool through the page tables in one batched launch per layer, planned
// once per step into the caller's workspace, and can be captured in CUDA graphs; the other
// policies run one sequence at a time, eagerly. Prefill stays the exact matmul attention of
// DenseAttention. Built only with a CUDA LibTorch (LYCHEE_TORCH_CUDA).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "common/attention.h"
#include "common/head_partition.h"
#include "common/model_config.h"
#include "kernels/policy.h"

namespace lychee {

// Dense split-KV flash-decode of every head.
std::shared_ptr<const AttentionBackend> MakeCudaDenseAttention(const ModelConfig& config);

// Hybrid-head decoding with `partition`: the same function as HybridAttentionBackend.
absl::StatusOr<std::shared_ptr<const AttentionBackend>> MakeCudaHybridAttention(
    std::shared_ptr<const HeadPartition> partition, const ModelConfig& config);

// Quest, PrHS and Double-P (kernels/cuda_policies.cc): the same functions as their references in
// kernels/policies/policies.h, for validated specs. Quest needs a power-of-two page size
// (MakePolicyBackend checks). Every CUDA backend keeps its sequences' telemetry as the references
// count it (audits run on the references).
std::shared_ptr<const AttentionBackend> MakeCudaQuestAttention(const PolicySpec& spec);
std::shared_ptr<const AttentionBackend> MakeCudaPrhsAttention(const PolicySpec& spec);
std::shared_ptr<const AttentionBackend> MakeCudaDoublePAttention(const PolicySpec& spec);

}  // namespace lychee
