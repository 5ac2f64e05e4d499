// Greedy decoding for the tensor-parallel tests, shared by the test (rank 0, and the single-process
// reference) and tensor_parallel_worker (ranks 1..N-1), so that every rank makes the same steps.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/attention.h"
#include "common/model/model.h"
#include "common/model/tensor_parallel.h"

namespace lychee::testing {

struct Generation {
  std::vector<int32_t> tokens;
  at::Tensor logits;  // [steps + 1, vocab]: the prefill's, then each decode step's
};

// Greedy decoding of `steps` tokens after `prompt`: the prefill, then paged decode steps.
absl::StatusOr<Generation> GreedyGenerate(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                          const std::vector<int32_t>& prompt, int steps);

// The head partition at `path` with its token budget set to `token_budget`.
absl::StatusOr<HeadPartition> PartitionWithBudget(const std::string& path, int64_t token_budget);

// One rank's greedy decoding: its shard of the model at `model_dir`, dense attention, or hybrid with
// its shard of `partition`.
absl::StatusOr<Generation> RankGenerate(const std::string& model_dir, std::shared_ptr<TensorParallelGroup> group,
                                        const std::optional<HeadPartition>& partition,
                                        const std::vector<int32_t>& prompt, int steps);

}  // namespace lychee::testing
