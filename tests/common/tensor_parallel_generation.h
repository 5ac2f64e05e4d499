// Greedy decoding for the tensor-parallel tests, shared by the test (rank 0, and the single-process
// reference) and tensor_parallel_worker (ranks 1..N-1), so that every rank makes the same steps.
#pragma once

#include <ATen/ATen.h>

#include "absl/status/status.h"

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
  at::Tensor logits;  // [steps + 1, vocab] float32 on the CPU: the prefill's, then each decode step's
  DecodeStats stats;  // how the decode steps ran (CUDA graphs or eagerly)
};

// Greedy decoding of `steps` tokens after `prompt`: the prefill, then paged decode steps (from a
// pool of just enough pages), with CUDA graphs where `decode_options` and the device allow.
absl::StatusOr<Generation> GreedyGenerate(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                          const std::vector<int32_t>& prompt, int steps,
                                          const DecodeOptions& decode_options = {});

// The attention a generation decodes with on `model`'s device: dense, or hybrid with `partition`
// (the whole model's, sharded here for a rank of a tensor-parallel model).
absl::StatusOr<std::shared_ptr<const AttentionBackend>> GenerationAttention(
    const Model& model, const std::optional<HeadPartition>& partition);

// The head partition at `path` with its token budget set to `token_budget`.
absl::StatusOr<HeadPartition> PartitionWithBudget(const std::string& path, int64_t token_budget);

// What the ranks decode: a model on a device, a prompt, a step count, and for hybrid attention a
// partition file with the token budget set.
struct Decoding {
  std::string model_dir;
  std::vector<int32_t> prompt;
  int steps = 0;
  std::optional<std::string> partition_file;
  int64_t token_budget = 0;
  std::string device = "cpu";

  absl::StatusOr<std::optional<HeadPartition>> Partition() const;
  // tensor_parallel_worker's flags for this decoding over `world_size` ranks.
  std::vector<std::string> WorkerArgs(int world_size) const;
};

// The single process's decoding.
absl::StatusOr<Generation> SingleProcess(const Decoding& decoding);

// Rank 0's decoding in this process, with the other ranks as `worker` processes (RankWorkers, each
// given WorkerArgs) on the decoding's device; the workers' ends in `workers_status`.
absl::StatusOr<Generation> RunRanks(int world_size, const Decoding& decoding, const std::string& worker,
                                    absl::Status& workers_status);

// One rank's greedy decoding: its shard of the model at `model_dir` on `options`' device and dtype,
// dense attention, or hybrid with its shard of `partition`.
absl::StatusOr<Generation> RankGenerate(const std::string& model_dir, ModelOptions options,
                                        std::shared_ptr<TensorParallelGroup> group,
                                        const std::optional<HeadPartition>& partition,
                                        const std::vector<int32_t>& prompt, int steps);

}  // namespace lychee::testing
