#include "common/model/tensor_parallel.h"

#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace lychee {

void TensorParallelGroup::Abort(const std::string& cause) const {
  {
    absl::MutexLock lock(&abort_mutex_);
    if (!abort_cause_.empty()) return;
    abort_cause_ = cause.empty() ? "aborted" : cause;
  }
  AbortCollectives();
}

void TensorParallelGroup::ThrowIfAborted() const {
  std::string cause;
  {
    absl::MutexLock lock(&abort_mutex_);
    cause = abort_cause_;
  }
  if (!cause.empty()) {
    throw CollectiveError(absl::StrCat("rank ", rank(), " of ", world_size(), ": the group was aborted: ", cause));
  }
}

absl::StatusOr<ModelConfig> ShardModelConfig(const ModelConfig& config, int world_size) {
  if (world_size < 1)
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism needs at least one rank, got ", world_size));
  if (config.num_kv_heads % world_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism over ", world_size,
                                                   " ranks: the rank count must divide the model's ",
                                                   config.num_kv_heads, " KV heads"));
  }
  if (config.intermediate_size % world_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor parallelism over ", world_size,
                                                   " ranks: the rank count must divide the model's intermediate size ",
                                                   config.intermediate_size));
  }
  ModelConfig shard = config;
  shard.num_attention_heads = config.num_attention_heads / world_size;
  shard.num_kv_heads = config.num_kv_heads / world_size;
  shard.intermediate_size = config.intermediate_size / world_size;
  return shard;
}

VocabSlice VocabSliceOf(int64_t vocab_size, int rank, int world_size) {
  const int64_t per_rank = (vocab_size + world_size - 1) / world_size;
  VocabSlice slice;
  slice.begin = std::min(vocab_size, rank * per_rank);
  slice.size = std::min(vocab_size, slice.begin + per_rank) - slice.begin;
  return slice;
}

absl::StatusOr<HeadPartition> ShardHeadPartition(const HeadPartition& partition, int rank, int world_size) {
  if (world_size < 1 || rank < 0 || rank >= world_size || partition.num_kv_heads() % world_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("head partition of ", partition.num_kv_heads(),
                                                   " KV heads: no shard for rank ", rank, " of ", world_size));
  }
  const int64_t local = partition.num_kv_heads() / world_size;
  std::vector<HeadRole> roles;
  roles.reserve(partition.num_layers() * local);
  for (int64_t layer = 0; layer < partition.num_layers(); ++layer) {
    for (int64_t head = 0; head < local; ++head) roles.push_back(partition.role(layer, rank * local + head));
  }
  return HeadPartition(partition.num_layers(), local, std::move(roles), partition.selection());
}

RankDevice RankDeviceNamed(absl::string_view device) {
  return absl::StartsWith(device, "cuda") ? RankDevice::kCuda : RankDevice::kCpu;
}

at::Tensor GatherFromRanks(const TensorParallelGroup& group, const at::Tensor& mine) {
  std::vector<int64_t> shape = {group.world_size()};
  shape.insert(shape.end(), mine.sizes().begin(), mine.sizes().end());
  at::Tensor table = at::zeros(shape, mine.options());
  table[group.rank()].copy_(mine);
  group.AllReduceSum(table);
  return table;
}

absl::StatusOr<std::shared_ptr<TensorParallelGroup>> JoinRankGroup(RankDevice device,
                                                                   const std::string& rendezvous_file, int rank,
                                                                   int world_size, std::chrono::milliseconds timeout) {
  return device == RankDevice::kCuda ? JoinNcclGroup(rendezvous_file, rank, world_size, timeout)
                                     : JoinGlooGroup(rendezvous_file, rank, world_size, timeout);
}

}  // namespace lychee
