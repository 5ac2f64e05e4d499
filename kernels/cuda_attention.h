// Attention backends on the CUDA kernels (kernels/cuda), for bf16 models on the GPU. Dense and
// hybrid decode read the KV pool through the page tables in one batched launch per layer, planned
// once per step into the caller's workspace, and can be captured in CUDA graphs; the other
// policies run one sequence at a time, eagerly. Prefill stays the exact matmul attention of
// DenseAttention. Built only with a CUDA LibTorch (LYCHEE_TORCH_CUDA).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "common/base/head_partition.h"
#include "common/base/model_config.h"
#include "common/model/attention.h"
#include "kernels/policy.h"

namespace lychee {

// Dense split-KV flash-decode of every head. audit_every: as AccountedState's (a dense step drops
// nothing, so its audit only counts).
std::shared_ptr<const AttentionBackend> MakeCudaDenseAttention(const ModelConfig& config, int64_t audit_every = 0);

// Hybrid-head decoding with `partition`: the same function as HybridAttentionBackend. With
// audit_every N > 0, each sequence's decode steps 1, N + 1, ... are audited on the device: every
// layer with sparse heads runs a dense twin of the audited rows, and the mass each sparse head's
// selection drops accumulates in the sequence's state on the device, copied when its telemetry is
// read (PagedHybridDecode).
absl::StatusOr<std::shared_ptr<const AttentionBackend>> MakeCudaHybridAttention(
    std::shared_ptr<const HeadPartition> partition, const ModelConfig& config, int64_t audit_every = 0);

// Quest, PrHS and Double-P (kernels/cuda_policies.cc): the same functions as their references in
// kernels/policies/policies.h, for validated specs. Quest needs a power-of-two page size
// (MakePolicyBackend checks). Every CUDA backend keeps its sequences' telemetry as the references
// count it; these three do not audit (audited requests of theirs run on the references).
std::shared_ptr<const AttentionBackend> MakeCudaQuestAttention(const PolicySpec& spec);
std::shared_ptr<const AttentionBackend> MakeCudaPrhsAttention(const PolicySpec& spec);
std::shared_ptr<const AttentionBackend> MakeCudaDoublePAttention(const PolicySpec& spec);

}  // namespace lychee
