#include "tests/common/tensor_parallel_generation.h"

#include "common/base/status_macros.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"

namespace lychee::testing {

absl::StatusOr<Generation> GreedyGenerate(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                          const std::vector<int32_t>& prompt, int steps) {
  auto sequence = model.NewSequence(std::move(attention));
  absl::StatusOr<at::Tensor> logits = model.Prefill(*sequence, prompt);
  Generation generation;
  std::vector<at::Tensor> rows;
  DecodeContext context;
  for (int step = 0; logits.ok(); ++step) {
    rows.push_back(logits->reshape({-1}).clone());
    generation.tokens.push_back(static_cast<int32_t>(rows.back().argmax().item<int64_t>()));
    if (step == steps) break;
    Sequence* batch[] = {sequence.get()};
    logits = model.Decode(batch, {generation.tokens.back()}, &context);
  }
  if (!logits.ok()) return logits.status();
  generation.logits = at::stack(rows);
  return generation;
}

absl::StatusOr<HeadPartition> PartitionWithBudget(const std::string& path, int64_t token_budget) {
  LYCHEE_ASSIGN_OR_RETURN(HeadPartition partition, LoadHeadPartitionJson(path));
  partition.mutable_selection().token_budget = token_budget;
  return partition;
}

absl::StatusOr<Generation> RankGenerate(const std::string& model_dir, std::shared_ptr<TensorParallelGroup> group,
                                        const std::optional<HeadPartition>& partition,
                                        const std::vector<int32_t>& prompt, int steps) {
  const int rank = group->rank(), world_size = group->world_size();
  ModelOptions options;
  options.tensor_parallel = std::move(group);
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(model_dir, options));
  if (!partition.has_value()) {
    return GreedyGenerate(*model, std::make_shared<DenseAttentionBackend>(), prompt, steps);
  }
  LYCHEE_ASSIGN_OR_RETURN(HeadPartition shard, ShardHeadPartition(*partition, rank, world_size));
  LYCHEE_ASSIGN_OR_RETURN(
      auto hybrid,
      HybridAttentionBackend::Create(std::make_shared<const HeadPartition>(std::move(shard)), model->shard_config()));
  return GreedyGenerate(*model, std::move(hybrid), prompt, steps);
}

}  // namespace lychee::testing
