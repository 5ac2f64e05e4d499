// Tensor-parallel serving: rank 0 is the server (engine, scheduler, gRPC and HTTP); ranks 1..N-1
// are follower processes that hold their shard of the weights and mirror every model call rank 0's
// ModelRunner makes, in the same order, so that every rank runs the same collectives. Rank 0
// describes each call as a RankCommand (which request, which tokens, which attention) and
// broadcasts it on the model's own group, between the steps' all-reduces; a follower runs it on its
// shard with its own KV pool, decode context and attention backends. Sampling happens on rank 0
// alone: a follower is fed the ids rank 0 chose. A follower waits for each command within the
// group's timeout, so an idle rank 0 sends keep-alive commands. Free of LibTorch.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "common/base/head_partition.h"
#include "common/eval/partition_validation.h"
#include "common/model/tensor_parallel.h"
#include "kernels/policy.h"

namespace lychee {

struct EngineOptions;
struct ShadowValidationOptions;
class AttentionBackend;
class Model;
class Sequence;

enum class RankOp : uint8_t {
  kStart = 1,      // a new sequence for the request, made with its attention on its first admission
  kPrefill,        // the next positions of the request's sequence
  kDecode,         // one token for each request of a group that shares a backend
  kPreempt,        // drop the request's sequence, keep its attention
  kRelease,        // forget the request
  kDenseFallback,  // decode the request densely from its next step on
  kKeepAlive,      // nothing to run: rank 0 is idle, and alive
  kShutdown,       // the service is stopping; the follower exits
};

struct RankCommand {
  RankOp op = RankOp::kShutdown;
  // One for every op but kKeepAlive and kShutdown; a decode group's rows for kDecode.
  std::vector<uint64_t> request_ids;
  // kPrefill: the chunk's ids; kDecode: each row's input token.
  std::vector<int32_t> token_ids;
  // kStart: the attention rank 0 resolved for the request (its partition's selection filled in).
  PolicySpec policy;
  // kStart: the version of the request's partition (0 for a policy without one), and its
  // lychee.v1.HeadPartition bytes the first time rank 0 sends that version (empty after).
  uint64_t partition_version = 0;
  std::string partition;
  // kDecode: a row is bounded by GenerationRequest::max_dropped_mass, so after the step every rank
  // joins LargestDroppedMassOverRanks.
  bool combine_dropped_mass = false;
};

std::string EncodeRankCommand(const RankCommand& command);
// INVALID_ARGUMENT for bytes EncodeRankCommand did not make (truncated, an unknown op).
absl::StatusOr<RankCommand> DecodeRankCommand(std::string_view bytes);

// Shadow validation under tensor parallelism (inference/shadow_validator.h) runs on a group of its
// own, beside serving's, so that its collectives never fall between the steps' and their commands.
// Rank 0's validator sends these; each follower's validation thread runs them on its shard.
enum class ValidationOp : uint8_t {
  kValidate = 1,  // validate a partition, as rank 0 is about to
  kKeepAlive,     // nothing to validate: rank 0 is alive
  kStop,          // the service is stopping; the validation thread ends
};

struct ValidationCommand {
  ValidationOp op = ValidationOp::kStop;
  // kValidate: the partition's lychee.v1.HeadPartition bytes, the token budget its sparse heads
  // decode with, and the validation set's prompts and answers (a follower validates what rank 0
  // does, whatever its own files and flags).
  std::string partition;
  int64_t token_budget = 0;
  std::vector<ValidationSet::Task> tasks;
};

std::string EncodeValidationCommand(const ValidationCommand& command);
// INVALID_ARGUMENT for bytes EncodeValidationCommand did not make.
absl::StatusOr<ValidationCommand> DecodeValidationCommand(std::string_view bytes);

// A head partition as the ranks' commands carry it (lychee.v1.HeadPartition bytes), and back:
// FAILED_PRECONDITION for bytes that are no partition.
std::string PartitionBytes(const HeadPartition& partition);
absl::StatusOr<HeadPartition> PartitionFromBytes(const std::string& bytes);

// Rank 0's `bytes` in every rank's (two broadcasts on `group`: the size, then the bytes), as each
// rank's error of the step named `what` (UNAVAILABLE once the group is lost).
absl::Status BroadcastBytes(const TensorParallelGroup& group, std::string& bytes, absl::string_view what);

// The largest attention mass each of `sequences` dropped so far over every rank's KV heads (a
// rank audits its own heads only; 0 for a sequence that is not audited): one all-reduce on `group`,
// which every rank makes after the same decode step. UNAVAILABLE once the group is lost.
absl::StatusOr<std::vector<double>> LargestDroppedMassOverRanks(const TensorParallelGroup& group,
                                                                absl::Span<Sequence* const> sequences);

// The attention backends of one rank's shard of the model, shared by every request with the same
// policy parameters and partition version so that they decode in one call. A partition is given
// whole; each rank's backend reads its own KV heads' roles (ShardHeadPartition). Every policy is
// served under tensor parallelism: each selects per KV head (a head's set comes from its own
// scores, its own earlier steps or layers, or its own role), so a rank's shard selects what the
// whole model selects for its heads, with no collective of its own.
class ShardBackends {
 public:
  // `model` must outlive the result.
  static absl::StatusOr<std::unique_ptr<ShardBackends>> Create(const Model& model);

  const std::shared_ptr<const AttentionBackend>& dense() const { return dense_; }
  // `partition` null for a policy without one.
  absl::StatusOr<std::shared_ptr<const AttentionBackend>> Get(const PolicySpec& spec,
                                                              const std::shared_ptr<const HeadPartition>& partition);

 private:
  ShardBackends(const Model& model, std::shared_ptr<const AttentionBackend> dense)
      : model_(model), dense_(std::move(dense)) {}

  const Model& model_;
  const std::shared_ptr<const AttentionBackend> dense_;
  // By the policy's description (every parameter it uses) and partition version.
  std::map<std::pair<std::string, uint64_t>, std::shared_ptr<const AttentionBackend>> backends_;
};

// Rank 0's side: sends each call to the followers before rank 0 runs it. A send completes once
// every follower takes it, so a follower that falls silent fails it within the group's timeout.
// Once a send or a step has lost the group, every send returns the error that lost it. The
// engine's thread only, but for status().
class RankLeader {
 public:
  // `on_lost` is called once, on the engine's thread, when the group is lost.
  RankLeader(std::shared_ptr<const TensorParallelGroup> group, std::function<void(const absl::Status&)> on_lost);

  absl::Status Start(uint64_t request_id, const PolicySpec& policy,
                     const std::shared_ptr<const HeadPartition>& partition);
  absl::Status Prefill(uint64_t request_id, absl::Span<const int32_t> ids);
  absl::Status Decode(absl::Span<const uint64_t> request_ids, absl::Span<const int32_t> ids, bool combine_dropped_mass);
  absl::Status Preempt(uint64_t request_id);
  absl::Status Release(uint64_t request_id);
  absl::Status DenseFallback(uint64_t request_id);
  // Sends kKeepAlive when nothing was sent for a quarter of the group's timeout, so that the
  // followers' wait for the next command does not time out while rank 0 is idle.
  absl::Status KeepAlive();
  absl::Status Shutdown();

  // A step that failed with UNAVAILABLE lost its group (a rank died or fell silent): from now on,
  // nothing is sent and status() is UNAVAILABLE naming `cause`. The first cause is kept.
  void Lose(const absl::Status& cause);
  // OK while the ranks are together; any thread.
  absl::Status status() const;

 private:
  absl::Status Send(const RankCommand& command);

  const std::shared_ptr<const TensorParallelGroup> group_;
  const std::function<void(const absl::Status&)> on_lost_;
  std::set<uint64_t> partitions_sent_;
  std::chrono::steady_clock::time_point last_sent_ = std::chrono::steady_clock::now();
  mutable absl::Mutex mutex_;
  absl::Status lost_ ABSL_GUARDED_BY(mutex_);
};

// A follower rank's whole life, as rank options.tensor_parallel->rank() of that group: loads its
// shard of `options.model_dir`, makes its KV pool as rank 0 makes its own (KvCacheManager, from the
// same options), then runs rank 0's commands until kShutdown (OK) or until the group is lost
// (UNAVAILABLE; also when no command comes within the group's timeout). A command it cannot follow
// (a request it does not hold) is an error that ends it, which rank 0 then sees as a lost rank,
// rather than collectives that no longer match. With shadow.tensor_parallel (rank 0's validator
// has its group) it runs the validations rank 0 sends there beside serving
// (ShadowValidationFollower), and its end waits for that thread's.
absl::Status RunRankFollower(const EngineOptions& options, const ShadowValidationOptions& shadow);

}  // namespace lychee
