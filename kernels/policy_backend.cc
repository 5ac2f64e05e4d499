#include "kernels/policy_backend.h"

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#include "kernels/policies/policies.h"
#ifdef LYCHEE_CUDA_ATTENTION
#include "kernels/cuda_attention.h"
#endif

namespace lychee {

absl::StatusOr<std::shared_ptr<const AttentionBackend>> MakePolicyBackend(
    const PolicySpec& spec, const ModelConfig& config, std::shared_ptr<const HeadPartition> partition,
    [[maybe_unused]] c10::Device device) {
  LYCHEE_RETURN_IF_ERROR(spec.Validate(config));
  if (PolicyNeedsPartition(spec.kind)) {
    if (partition == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("policy ", PolicyName(spec.kind), ": partition: a head partition is required"));
    }
    LYCHEE_RETURN_IF_ERROR(partition->ValidateFor(config));
  }
#ifdef LYCHEE_CUDA_ATTENTION
  const bool on_cuda_kernels = device.is_cuda();
#else
  const bool on_cuda_kernels = false;
#endif
  // The Quest, PrHS and Double-P kernels compute no audit: audited requests run their references.
  [[maybe_unused]] const bool on_unaudited_cuda_kernels = on_cuda_kernels && !spec.audit;
  switch (spec.kind) {
    case PolicyKind::kDense:
#ifdef LYCHEE_CUDA_ATTENTION
      if (on_cuda_kernels) return MakeCudaDenseAttention(config, spec.AuditPeriod());
#endif
      return std::shared_ptr<const AttentionBackend>(std::make_shared<DenseAttentionBackend>(spec.AuditPeriod()));
    case PolicyKind::kLychee: {
      auto selecting = std::make_shared<HeadPartition>(*partition);
      SelectionParams& selection = selecting->mutable_selection();
      selection.token_budget = spec.token_budget;
      selection.block_size = spec.block_size;
      selection.sink_tokens = spec.sink_tokens;
      selection.recent_tokens = spec.recent_tokens;
#ifdef LYCHEE_CUDA_ATTENTION
      if (on_cuda_kernels) return MakeCudaHybridAttention(std::move(selecting), config, spec.AuditPeriod());
#endif
      LYCHEE_ASSIGN_OR_RETURN(auto hybrid,
                              HybridAttentionBackend::Create(std::move(selecting), config, spec.AuditPeriod()));
      return std::shared_ptr<const AttentionBackend>(std::move(hybrid));
    }
    case PolicyKind::kDoubleP:
#ifdef LYCHEE_CUDA_ATTENTION
      if (on_unaudited_cuda_kernels) return MakeCudaDoublePAttention(spec);
#endif
      return MakeDoublePBackend(spec);
    case PolicyKind::kPrhs:
#ifdef LYCHEE_CUDA_ATTENTION
      if (on_unaudited_cuda_kernels) return MakeCudaPrhsAttention(spec);
#endif
      return MakePrhsBackend(spec);
    case PolicyKind::kStreaming:
      return MakeStreamingBackend(spec, std::move(partition));
    case PolicyKind::kTidal:
      return MakeTidalBackend(spec, config.num_layers);
    case PolicyKind::kQuest:
#ifdef LYCHEE_CUDA_ATTENTION
      if (on_unaudited_cuda_kernels && IsPowerOfTwo(spec.page_size)) return MakeCudaQuestAttention(spec);
#endif
      return MakeQuestBackend(spec);
  }
  return absl::InvalidArgumentError("policy: unknown kind");
}

}  // namespace lychee
