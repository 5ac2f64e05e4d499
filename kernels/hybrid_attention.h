// Hybrid-head sparse decode attention (LycheeDecode), the exact and readable CPU reference.
// Retrieval KV heads attend densely and select the best blocks of the cache; sparse KV heads
// attend only to the latest selection made at the same KV-head index in an earlier layer of the
// same step. Prefill is dense. The CUDA kernels compute the same function.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/head_partition.h"
#include "common/model/attention.h"
#include "kernels/policies/accounting.h"

namespace lychee {

// Blocks every selection keeps for a context of `length` tokens: the sink blocks and the blocks
// holding the last recent_tokens positions (always the current partial block). Ascending.
std::vector<int64_t> MandatoryBlocks(int64_t length, const SelectionParams& params);

// Max over each block of keys · pooled_query: keys [L, D], pooled_query [D]; float32 [ceil(L / bs)].
at::Tensor BlockScores(const at::Tensor& keys, const at::Tensor& pooled_query, int64_t block_size);

// The mandatory blocks plus the best-scoring others, up to the budget (ties: lower index first);
// every block when the budget covers the context. Ascending.
std::vector<int64_t> SelectBlocks(const at::Tensor& block_scores, int64_t length, const SelectionParams& params);

// INVALID_ARGUMENT or FAILED_PRECONDITION when hybrid decoding with `partition` cannot run on
// a model of `config`'s shape.
absl::Status CheckHybridFits(const HeadPartition& partition, const ModelConfig& config);

// What one sequence carries between layers: the latest selection per KV-head index.
struct HybridSequenceState : AccountedState {
  using AccountedState::AccountedState;
  std::vector<std::vector<int64_t>> selected_blocks;  // empty: none made yet in this step
};

class HybridAttentionBackend : public AttentionBackend {
 public:
  // FAILED_PRECONDITION or INVALID_ARGUMENT when the partition does not fit the model. With
  // `audit_every` N > 0, every Nth decode step of a sequence also computes the dense scores of the
  // sparse heads and records the attention mass their selection drops.
  static absl::StatusOr<std::shared_ptr<const HybridAttentionBackend>> Create(
      std::shared_ptr<const HeadPartition> partition, const ModelConfig& config, int64_t audit_every = 0);

  const HeadPartition& partition() const { return *partition_; }
  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override;
  at::Tensor Attend(const AttentionInput& input) const override;

 private:
  HybridAttentionBackend(std::shared_ptr<const HeadPartition> partition, int64_t audit_every)
      : partition_(std::move(partition)), audit_every_(audit_every) {}

  std::shared_ptr<const HeadPartition> partition_;
  int64_t audit_every_;
};

}  // namespace lychee
