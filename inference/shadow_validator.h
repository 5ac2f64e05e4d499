// Shadow validation: before a partition from the trainer becomes active, the service decodes a
// validation set with it and with dense attention (common/eval/partition_validation.h) and promotes it
// only when every task keeps its accuracy within a bound of dense and the audited mean dropped
// mass stays under another. Runs on a thread of its own with few intra-op threads, beside the
// engine's thread, so that serving goes on meanwhile. Under tensor parallelism every rank decodes
// its shard of the validation: rank 0's validator sends each validation to the followers on a
// group of its own (serving's group carries the steps and their rank commands, which validation
// must not fall between), and each follower runs it on a ShadowValidationFollower thread. Free
// of LibTorch.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/eval/partition_validation.h"
#include "common/model/tensor_parallel.h"

namespace lychee {

class HeadPartition;
class Model;
class Tokenizer;
struct ValidationCommand;

struct ShadowValidationOptions {
  // Off unless asked for: lychee-inference turns it on by default (--shadow-validation).
  bool enabled = false;
  // Pass-key and multi-key prompts are generated from this text unless `prompts_file` is given.
  std::string heldout_corpus;
  // An operator's JSON-lines prompts file (common/eval/partition_validation.h); empty: generated prompts.
  std::string prompts_file;
  // Small enough that the bundled model validates in seconds on the CPU.
  int64_t context_tokens = 1024;
  int64_t prompts_per_task = 4;
  uint64_t seed = 1;
  // The token budget sparse heads decode the prompts with; 0: the partition's own budget scaled
  // by context_tokens / served_context_tokens (at least the sink, the recent window and two blocks), so that a sparse
  // head keeps the share of a short validation prompt it keeps of a full served context.
  int64_t token_budget = 0;
  // The service's context limit (set by the service).
  int64_t served_context_tokens = 0;
  // Promote only when every task's accuracy >= dense's - max_accuracy_drop ...
  double max_accuracy_drop = 0.05;
  // ... and the audited mean dropped mass <= max_dropped_mass.
  double max_dropped_mass = 0.2;
  // Intra-op threads of the validation thread (CPU).
  int threads = 1;
  // On CUDA the validation launches on a stream of the device's least priority, below serving's;
  // false: at serving's priority (to measure what the priority buys).
  bool low_priority_stream = true;
  // Under tensor parallelism: a group of the model's ranks for validation alone, on which every
  // follower runs a ShadowValidationFollower (the validation's model shares the served weights).
  // Null: the model is whole in this process.
  std::shared_ptr<const TensorParallelGroup> tensor_parallel;
};

// Where the ranks meet for the validation group: beside serving's group's rendezvous file, so that
// each rank derives it from the file it was given and it goes with that file's directory.
std::string ShadowValidationRendezvousFile(const std::string& serving_rendezvous_file);

// What the last validation saw, for server info and metrics.
struct ShadowValidationRecord {
  uint64_t version = 0;
  bool promoted = false;
  PartitionValidation validation;
  std::string summary;
};

class ShadowValidator {
 public:
  // How far the validation thread's nice value is above that of the thread that starts it (serving's
  // threads keep theirs), capped at 19, the lowest priority.
  static constexpr int kValidationNiceIncrement = 10;
  // The nice value a validation thread started from a thread of nice value `serving_nice` takes.
  static int ValidationNiceValue(int serving_nice);

  // Checks the bounds and reads the prompts file (INVALID_ARGUMENT naming the flag) without a
  // model, so that a server can refuse bad flags before it loads anything.
  static absl::Status CheckOptions(const ShadowValidationOptions& options);
  // Builds the validation set once with `tokenizer`; `model` must outlive the validator. Under
  // tensor parallelism (options.tensor_parallel, of `model`'s rank and size) the followers must
  // run a ShadowValidationFollower each, and while no validation runs the validator sends them a
  // keep-alive every quarter of the group's timeout, so that their wait does not time out.
  static absl::StatusOr<std::unique_ptr<ShadowValidator>> Create(const ShadowValidationOptions& options,
                                                                 const Model& model, const Tokenizer& tokenizer);
  ~ShadowValidator();

  // Validates `partition` on the validator's thread and waits for it: OK to promote it;
  // FAILED_PRECONDITION with the accuracies and the dropped mass when it falls outside the bounds;
  // CANCELLED after Cancel(); UNAVAILABLE once a tensor-parallel rank is lost (then for every later
  // one too). Validations run one at a time.
  absl::Status Check(const HeadPartition& partition);
  // Ends a validation in progress before its next prompt, and every later one at once; under
  // tensor parallelism the followers' validation threads end too.
  void Cancel();

  bool running() const { return running_.load(); }
  uint64_t promoted_count() const { return promoted_.load(); }
  uint64_t rejected_count() const { return rejected_.load(); }
  std::optional<ShadowValidationRecord> last() const;

 private:
  ShadowValidator(ShadowValidationOptions options, const Model& model, std::unique_ptr<Model> validation_model,
                  ValidationSet set);
  // The validation thread: one for the validator's life, so that its intra-op thread count is set
  // once and its allocations stay in one heap arena (a thread per validation grew the resident
  // memory by hundreds of MiB under load_bench). Under tensor parallelism it sends the followers
  // their keep-alives, and their stop when it ends.
  void Work();
  // Runs `job` on the validation thread and waits for it; CANCELLED when the thread has ended.
  absl::Status RunOnWorker(std::function<void()> job);
  // The validation of `partition` on the validation thread (under tensor parallelism, sent to the
  // followers first).
  absl::StatusOr<PartitionValidation> Validate(const HeadPartition& partition, const ValidationOptions& options);
  // Sends the followers `command`; once a send or a validation lost the group, every later one
  // fails with what lost it. The validation thread only.
  absl::Status SendToFollowers(const ValidationCommand& command);

  const ShadowValidationOptions options_;
  // Under tensor parallelism: the served weights, with the validation's group.
  const std::unique_ptr<Model> validation_model_;
  const Model& model_;
  const ValidationSet set_;
  // What lost the validation group; the validation thread only.
  absl::Status lost_;
  absl::Mutex check_mutex_;  // one validation at a time
  std::atomic<bool> cancelled_{false};
  std::atomic<bool> running_{false};
  std::atomic<uint64_t> promoted_{0};
  std::atomic<uint64_t> rejected_{0};
  mutable absl::Mutex last_mutex_;
  std::optional<ShadowValidationRecord> last_ ABSL_GUARDED_BY(last_mutex_);
  absl::Mutex worker_mutex_;
  std::function<void()> job_ ABSL_GUARDED_BY(worker_mutex_);
  bool job_done_ ABSL_GUARDED_BY(worker_mutex_) = false;
  bool stopping_ ABSL_GUARDED_BY(worker_mutex_) = false;
  std::thread worker_;
};

// A follower rank's part in shadow validation under tensor parallelism: a thread, at the priority
// and intra-op thread count of rank 0's validation thread, that runs each validation rank 0's
// validator sends on options.tensor_parallel, on this rank's shard (a model sharing `model`'s
// weights on that group), until rank 0's stop or the group's loss (rank 0 gone, or silent past
// the group's timeout).
class ShadowValidationFollower {
 public:
  // `model` is this rank's served model; the follower keeps its own handle on the weights.
  static absl::StatusOr<std::unique_ptr<ShadowValidationFollower>> Start(const ShadowValidationOptions& options,
                                                                         const Model& model);
  // Ends the thread and waits for it: at rank 0's next command (a validation in progress is
  // finished first, its collectives paired with rank 0's; an idle rank 0 sends a keep-alive every
  // quarter of the group's timeout), or when the group is lost. A follower whose serving ended
  // (rank 0's shutdown, or serving's group lost) thus ends while rank 0's validator may live on.
  ~ShadowValidationFollower();

 private:
  ShadowValidationFollower(ShadowValidationOptions options, std::unique_ptr<Model> model);
  void Work();

  const ShadowValidationOptions options_;
  const std::unique_ptr<Model> model_;
  std::atomic<bool> stopping_{false};
  std::thread worker_;
};

// The budget `partition` is validated with under `options` (see token_budget).
int64_t ShadowTokenBudget(const ShadowValidationOptions& options, const HeadPartition& partition);

// "passkey 0.75 (dense 1.00), multikey ..., mean dropped mass 0.031 (audited ...)".
std::string DescribeValidation(const PartitionValidation& validation);

}  // namespace lychee
