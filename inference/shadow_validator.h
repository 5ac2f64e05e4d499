// Shadow validation: before a partition from the trainer becomes active, the service decodes a
// validation set with it and with dense attention (common/eval/partition_validation.h) and promotes it
// only when every task keeps its accuracy within a bound of dense and the audited mean dropped
// mass stays under another. Runs on a thread of its own with few intra-op threads, beside the
// engine's thread, so that serving goes on meanwhile. Free of LibTorch.
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

namespace lychee {

class HeadPartition;
class Model;
class Tokenizer;

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
};

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
  // Builds the validation set once with `tokenizer`; `model` must outlive the validator.
  static absl::StatusOr<std::unique_ptr<ShadowValidator>> Create(const ShadowValidationOptions& options,
                                                                 const Model& model, const Tokenizer& tokenizer);
  ~ShadowValidator();

  // Validates `partition` on the validator's thread and waits for it: OK to promote it;
  // FAILED_PRECONDITION with the accuracies and the dropped mass when it falls outside the bounds;
  // CANCELLED after Cancel(). Validations run one at a time.
  absl::Status Check(const HeadPartition& partition);
  // Ends a validation in progress before its next prompt, and every later one at once.
  void Cancel();

  bool running() const { return running_.load(); }
  uint64_t promoted_count() const { return promoted_.load(); }
  uint64_t rejected_count() const { return rejected_.load(); }
  std::optional<ShadowValidationRecord> last() const;

 private:
  ShadowValidator(ShadowValidationOptions options, const Model& model, ValidationSet set);
  // The validation thread: one for the validator's life, so that its intra-op thread count is set
  // once and its allocations stay in one heap arena (a thread per validation grew the resident
  // memory by hundreds of MiB under load_bench).
  void Work();
  // Runs `job` on the validation thread and waits for it.
  void RunOnWorker(std::function<void()> job);

  const ShadowValidationOptions options_;
  const Model& model_;
  const ValidationSet set_;
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

// The budget `partition` is validated with under `options` (see token_budget).
int64_t ShadowTokenBudget(const ShadowValidationOptions& options, const HeadPartition& partition);

// "passkey 0.75 (dense 1.00), multikey ..., mean dropped mass 0.031 (audited ...)".
std::string DescribeValidation(const PartitionValidation& validation);

}  // namespace lychee
