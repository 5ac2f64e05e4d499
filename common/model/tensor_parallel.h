// Tensor parallelism (Megatron-style) over a process group: what a rank's shard of the model is, and
// the collectives the decoder calls. Free of LibTorch, so that service layers can name a group.
//
// A rank r of N holds KV heads [r * kv/N, (r + 1) * kv/N) with their GQA query groups, the same
// slice of the intermediate size, and a slice of the vocabulary: QKV and gate/up are
// column-parallel, O and down row-parallel with one all-reduce each, the embedding and the LM head
// split by vocabulary (each rank looks up or scores its slice; one all-reduce joins them).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/base/head_partition.h"
#include "common/base/model_config.h"

namespace at {
class Tensor;
}

namespace lychee {

// What a collective throws when it fails (a rank gone, a timeout); StatusFromException
// (common/model/torch_errors.h) makes it UNAVAILABLE.
class CollectiveError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One rank's handle on its group. The collectives throw CollectiveError on failure, and the model
// turns that into the status of the step.
class TensorParallelGroup {
 public:
  virtual ~TensorParallelGroup() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // Sums a contiguous tensor across the ranks, in place.
  virtual void AllReduceSum(at::Tensor& tensor) const = 0;
  // Copies rank `root`'s contiguous tensor into every other rank's (same shape and dtype), in place.
  virtual void Broadcast(at::Tensor& tensor, int root) const = 0;
  // How long a collective waits for the other ranks before it fails.
  virtual std::chrono::milliseconds timeout() const = 0;
  // Whether the collectives run on the device's current stream without the host, so that a CUDA
  // graph can capture them (NCCL); Gloo's run on the host.
  virtual bool capturable_in_cuda_graphs() const { return false; }

  // Ends the group for good, from any thread, when a rank is known to be gone (the launcher sees its
  // process end: RankWorkers::WatchForLoss): the collectives in flight fail (NCCL's are aborted on
  // the device, where a lost peer would leave them, or a graph replaying them, waiting for ever),
  // and every later one throws a CollectiveError with `cause`.
  void Abort(const std::string& cause) const;
  // Throws the aborted group's CollectiveError, naming the cause; each collective calls it first.
  void ThrowIfAborted() const;

 protected:
  // What a group does on Abort beyond refusing later collectives.
  virtual void AbortCollectives() const {}

 private:
  mutable absl::Mutex abort_mutex_;
  mutable std::string abort_cause_ ABSL_GUARDED_BY(abort_mutex_);
};

// Where a group's ranks compute: on CPUs they meet over Gloo, on GPUs over NCCL, one GPU per rank.
enum class RankDevice { kCpu, kCuda };
// kCuda for a device named "cuda" or "cuda:N" (a --device flag, at::Device::str()), kCpu otherwise.
RankDevice RankDeviceNamed(absl::string_view device);

// The shape of one rank's shard of `config`: heads, KV heads and intermediate size divided by
// `world_size`. INVALID_ARGUMENT naming both numbers when the rank count does not divide the
// KV-head count (or the intermediate size).
absl::StatusOr<ModelConfig> ShardModelConfig(const ModelConfig& config, int world_size);

// The first vocabulary row of `rank` and its row count: ceil(vocab / world_size) rows per rank, the
// last rank's fewer.
struct VocabSlice {
  int64_t begin = 0;
  int64_t size = 0;
};
VocabSlice VocabSliceOf(int64_t vocab_size, int rank, int world_size);

// The roles of `rank`'s KV heads in every layer: its local head i is global head
// rank * (kv / world_size) + i. A sparse head's selection comes from a retrieval head of the same
// KV-head index, so no selection crosses ranks.
absl::StatusOr<HeadPartition> ShardHeadPartition(const HeadPartition& partition, int rank, int world_size);

// Joins rank `rank` of `world_size` into a Gloo group on the loopback, meeting the others through a
// c10d FileStore at `rendezvous_file` (a path every rank shares; fresh for each group). A
// collective that a rank does not join within `timeout` (it died) fails instead of hanging.
// UNIMPLEMENTED in a build whose LibTorch has no Gloo.
absl::StatusOr<std::shared_ptr<TensorParallelGroup>> JoinGlooGroup(
    const std::string& rendezvous_file, int rank, int world_size,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

// Joins rank `rank` of `world_size` into an NCCL group on this process's first visible GPU (cuda:0;
// RankWorkers gives each worker its own GPU through CUDA_VISIBLE_DEVICES, and rank 0 keeps the first),
// meeting the others through a c10d FileStore at `rendezvous_file`. FAILED_PRECONDITION when rank 0
// sees fewer GPUs than ranks (NCCL refuses two ranks on one GPU); UNIMPLEMENTED in a build whose
// LibTorch has no NCCL.
absl::StatusOr<std::shared_ptr<TensorParallelGroup>> JoinNcclGroup(
    const std::string& rendezvous_file, int rank, int world_size,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

// Every rank's `mine` (the same shape and dtype on each rank), stacked: [world_size, mine's shape].
// An all-gather made of one all-reduce of a zeroed table in which each rank fills its own row, so
// the rows are exact. Throws what the group's collectives throw.
at::Tensor GatherFromRanks(const TensorParallelGroup& group, const at::Tensor& mine);

// JoinGlooGroup for kCpu, JoinNcclGroup for kCuda.
absl::StatusOr<std::shared_ptr<TensorParallelGroup>> JoinRankGroup(
    RankDevice device, const std::string& rendezvous_file, int rank, int world_size,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

}  // namespace lychee
