#include "tests/common/tensor_parallel_generation.h"

#include "absl/strings/str_join.h"
#include "common/base/status_macros.h"
#include "common/model/rank_workers.h"
#include "kernels/policy_backend.h"

namespace lychee::testing {

absl::StatusOr<Generation> GreedyGenerate(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                          const std::vector<int32_t>& prompt, int steps,
                                          const DecodeOptions& decode_options) {
  const int64_t pages = (static_cast<int64_t>(prompt.size()) + steps + kDefaultPageSize - 1) / kDefaultPageSize + 1;
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<KvPool> pool, model.NewKvPool(pages));
  auto sequence = model.NewSequence(std::move(pool), std::move(attention));
  absl::StatusOr<at::Tensor> logits = model.Prefill(*sequence, prompt);
  Generation generation;
  std::vector<at::Tensor> rows;
  DecodeContext context(decode_options);
  for (int step = 0; logits.ok(); ++step) {
    rows.push_back(logits->reshape({-1}).to(at::kCPU, at::kFloat).clone());
    generation.tokens.push_back(static_cast<int32_t>(rows.back().argmax().item<int64_t>()));
    if (step == steps) break;
    Sequence* batch[] = {sequence.get()};
    logits = model.Decode(batch, {generation.tokens.back()}, &context);
  }
  if (!logits.ok()) return logits.status();
  generation.logits = at::stack(rows);
  generation.stats = context.stats();
  return generation;
}

absl::StatusOr<std::shared_ptr<const AttentionBackend>> GenerationAttention(
    const Model& model, const std::optional<HeadPartition>& partition) {
  const TensorParallelGroup* group = model.options().tensor_parallel.get();
  PolicySpec spec;
  std::shared_ptr<const HeadPartition> shard;
  if (partition.has_value()) {
    spec.kind = PolicyKind::kLychee;
    const SelectionParams& selection = partition->selection();
    spec.token_budget = selection.token_budget;
    spec.block_size = selection.block_size;
    spec.sink_tokens = selection.sink_tokens;
    spec.recent_tokens = selection.recent_tokens;
    if (group == nullptr) {
      shard = std::make_shared<const HeadPartition>(*partition);
    } else {
      LYCHEE_ASSIGN_OR_RETURN(HeadPartition sharded,
                              ShardHeadPartition(*partition, group->rank(), group->world_size()));
      shard = std::make_shared<const HeadPartition>(std::move(sharded));
    }
  }
  return MakePolicyBackend(spec, model.shard_config(), std::move(shard), model.options().device);
}

absl::StatusOr<HeadPartition> PartitionWithBudget(const std::string& path, int64_t token_budget) {
  LYCHEE_ASSIGN_OR_RETURN(HeadPartition partition, LoadHeadPartitionJson(path));
  partition.mutable_selection().token_budget = token_budget;
  return partition;
}

absl::StatusOr<Generation> RankGenerate(const std::string& model_dir, ModelOptions options,
                                        std::shared_ptr<TensorParallelGroup> group,
                                        const std::optional<HeadPartition>& partition,
                                        const std::vector<int32_t>& prompt, int steps) {
  options.tensor_parallel = std::move(group);
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(model_dir, options));
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const AttentionBackend> attention, GenerationAttention(*model, partition));
  return GreedyGenerate(*model, std::move(attention), prompt, steps);
}

absl::StatusOr<std::optional<HeadPartition>> Decoding::Partition() const {
  if (!partition_file.has_value()) return std::optional<HeadPartition>();
  LYCHEE_ASSIGN_OR_RETURN(HeadPartition partition, PartitionWithBudget(*partition_file, token_budget));
  return std::optional<HeadPartition>(std::move(partition));
}

std::vector<std::string> Decoding::WorkerArgs(int world_size) const {
  std::vector<std::string> args = {"--model",           model_dir,
                                   "--prompt-ids",      absl::StrJoin(prompt, ","),
                                   "--steps",           std::to_string(steps),
                                   "--tensor-parallel", std::to_string(world_size),
                                   "--device",          device};
  if (partition_file.has_value()) {
    for (std::string arg :
         {std::string("--partition"), *partition_file, std::string("--budget"), std::to_string(token_budget)}) {
      args.push_back(std::move(arg));
    }
  }
  return args;
}

absl::StatusOr<Generation> SingleProcess(const Decoding& decoding) {
  LYCHEE_ASSIGN_OR_RETURN(const ModelOptions options, ModelOptionsForDevice(decoding.device));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(decoding.model_dir, options));
  LYCHEE_ASSIGN_OR_RETURN(std::optional<HeadPartition> partition, decoding.Partition());
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const AttentionBackend> attention, GenerationAttention(*model, partition));
  return GreedyGenerate(*model, std::move(attention), decoding.prompt, decoding.steps);
}

absl::StatusOr<Generation> RunRanks(int world_size, const Decoding& decoding, const std::string& worker,
                                    absl::Status& workers_status) {
  LYCHEE_ASSIGN_OR_RETURN(std::optional<HeadPartition> partition, decoding.Partition());
  LYCHEE_ASSIGN_OR_RETURN(const ModelOptions options, ModelOptionsForDevice(decoding.device));
  const RankDevice device = RankDeviceNamed(decoding.device);
  LYCHEE_ASSIGN_OR_RETURN(
      std::unique_ptr<RankWorkers> workers,
      RankWorkers::Start(worker, decoding.WorkerArgs(world_size), world_size, "tensor-parallel", device));
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<TensorParallelGroup> group,
                          JoinRankGroup(device, workers->rendezvous_file(), 0, world_size));
  absl::StatusOr<Generation> generation =
      RankGenerate(decoding.model_dir, options, std::move(group), partition, decoding.prompt, decoding.steps);
  workers_status = workers->Wait();
  return generation;
}

}  // namespace lychee::testing
