// Calibration jobs: checked on submission, queued, run a configurable number at a time,
// journaled at every state change, and published to the partition registry when they succeed.
// After a crash no job is silently gone: on start, a job the journal shows RUNNING becomes
// INTERRUPTED and QUEUED ones are queued again. Free of LibTorch and of gRPC: the calibration
// itself comes in as a CalibrationRunner (trainer/job_runner.h), so that tests drive the
// manager directly.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/base/head_partition.h"
#include "common/base/model_config.h"
#include "common/base/partition_store.h"
#include "common/eval/partition_validation.h"
#include "common/service/metrics.h"
#include "lychee/v1/trainer.pb.h"
#include "trainer/calibration.h"
#include "trainer/job_journal.h"

namespace lychee {

// How a sweep validates its partitions, resolved inside the trainer's roots.
struct SweepInputs {
  std::vector<double> target_densities;
  double max_accuracy_drop = 0.05;
  // Prompts from a prompts file when `prompts_path` is set, else generated from `heldout_corpus_path`.
  std::string prompts_path;
  std::string heldout_corpus_path;
  GeneratedValidationSpec generated;
  ValidationOptions validation;
};

// What a job runs on, resolved inside the trainer's roots.
struct CalibrationJobInputs {
  std::string model_dir;
  std::string corpus_path;
  CalibrationConfig config;
  std::optional<SweepInputs> sweep;
  // Ranks each calibration runs on (JobManagerOptions::data_parallel).
  int data_parallel = 1;
};

using ProgressCallback = std::function<void(const CalibrationProgress&)>;

// One job's model, loaded once for every target of a sweep.
class CalibrationSession {
 public:
  virtual ~CalibrationSession() = default;
  // Runs one calibration; returns CANCELLED within one step of `cancelled` becoming true.
  virtual absl::StatusOr<HeadPartition> Calibrate(const CalibrationConfig& config, const ProgressCallback& on_progress,
                                                  const std::atomic<bool>& cancelled) = 0;
  // Validates a partition against dense on the job's validation prompts (sweeps only); returns
  // CANCELLED within one prompt of `cancelled` becoming true.
  virtual absl::StatusOr<PartitionValidation> Validate(const HeadPartition& partition,
                                                       const std::atomic<bool>& cancelled) = 0;
};

// Opens a job's session: loads its model, tokenizer and corpus.
using CalibrationRunner =
    std::function<absl::StatusOr<std::unique_ptr<CalibrationSession>>(const CalibrationJobInputs& inputs)>;

struct JobManagerOptions {
  // Models are directories under it, named by clients.
  std::string model_root;
  // Corpora clients name are paths under it; empty: clients cannot name one.
  std::string data_root;
  // The corpus of a job that names none; chosen by the operator, so not confined to data_root.
  std::string default_corpus;
  // The held-out text of a sweep's validation prompts when the job names none (likewise).
  std::string default_heldout_corpus;
  std::string journal_dir;
  int max_concurrent_jobs = 1;
  // Ranks each calibration runs on, splitting every step's samples (trainer/job_runner.h); a job's
  // samples_per_step must be a multiple of it.
  int data_parallel = 1;
  // Submissions beyond this many waiting jobs are RESOURCE_EXHAUSTED.
  int max_queued_jobs = 64;
  // Where the manager exports its metrics (jobs by state, step time, last loss); none when null.
  // The registry must outlive the manager, and be rendered no more once the manager is gone.
  MetricsRegistry* metrics = nullptr;
};

bool IsFinal(v1::JobState state);

class JobManager {
 public:
  // Recovers the journal and starts the workers; `store` must outlive the manager.
  static absl::StatusOr<std::unique_ptr<JobManager>> Create(JobManagerOptions options, PartitionStore& store,
                                                            CalibrationRunner runner);
  // Jobs still running stop within one step and end INTERRUPTED; queued ones stay queued in the
  // journal for the next start.
  ~JobManager();
  JobManager(const JobManager&) = delete;
  JobManager& operator=(const JobManager&) = delete;

  // Checks the request (model, corpus, config, and a sweep's targets and validation:
  // INVALID_ARGUMENT or FAILED_PRECONDITION naming the field; a full queue is RESOURCE_EXHAUSTED)
  // and queues a job; returns it as queued.
  absl::StatusOr<v1::Job> Submit(const v1::SubmitCalibrationJobRequest& request);
  absl::StatusOr<v1::Job> Get(const std::string& name) const;
  // Every job, oldest first.
  std::vector<v1::Job> List() const;
  // A queued job ends CANCELLED at once; a running one is asked to stop and is returned still
  // RUNNING (it ends CANCELLED within one step). A final job is FAILED_PRECONDITION.
  absl::StatusOr<v1::Job> Cancel(const std::string& name);

  struct Update {
    v1::Job job;
    uint64_t revision = 0;  // grows with every change of the job
  };
  // The job once its revision is above `after_revision` (at once for 0), or as it is when
  // `timeout` passes first.
  absl::StatusOr<Update> WaitForUpdate(const std::string& name, uint64_t after_revision,
                                       std::chrono::milliseconds timeout) const;

  // What recovering the journal found wrong (also written to stderr).
  const std::vector<std::string>& recovery_problems() const { return recovery_problems_; }

 private:
  // Its fields but `stop` are read and written under mutex_ (the name of the job only changes
  // before it is shared).
  struct Entry {
    v1::Job job;
    uint64_t revision = 1;
    std::atomic<bool> stop{false};  // the runner's cancellation flag
    bool cancelled_by_client = false;
    std::chrono::steady_clock::time_point journaled_at;
  };

  JobManager(JobManagerOptions options, PartitionStore& store, CalibrationRunner runner, JobJournal journal)
      : options_(std::move(options)), store_(store), runner_(std::move(runner)), journal_(std::move(journal)) {}

  void Recover() ABSL_LOCKS_EXCLUDED(mutex_);
  void ExportMetrics(MetricsRegistry& registry);
  absl::StatusOr<CalibrationJobInputs> ResolveInputs(const v1::SubmitCalibrationJobRequest& request) const;
  absl::StatusOr<SweepInputs> ResolveSweep(const v1::SubmitCalibrationJobRequest& request,
                                           const CalibrationConfig& config, const ModelConfig& model_config) const;
  absl::StatusOr<Entry*> Find(const std::string& name) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void WorkerLoop();
  // Runs a job taken off the queue (mutex_ not held) and records how it ended.
  void RunJob(Entry& entry);
  // A sweep's targets one after the other in `session`, each row added to the job as it is done;
  // publishes the sparsest partition within the bound.
  absl::StatusOr<v1::JobResult> RunSweep(Entry& entry, const CalibrationJobInputs& inputs, CalibrationSession& session,
                                         const std::string& fingerprint, const ProgressCallback& on_progress);
  // Stores `partition` as the next version of its model, made by job `name`.
  absl::StatusOr<uint64_t> Publish(HeadPartition partition, const std::string& fingerprint, const std::string& name);
  // Marks a change of `entry`: bumps the revision (which wakes watchers) and, when `persist`
  // (state changes, and progress now and then), rewrites the journal.
  void Changed(Entry& entry, bool persist) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  const JobManagerOptions options_;
  PartitionStore& store_;
  const CalibrationRunner runner_;
  const JobJournal journal_;
  std::vector<std::string> recovery_problems_;  // written by Recover only, before the workers start

  mutable absl::Mutex mutex_;
  std::map<uint64_t, std::unique_ptr<Entry>> jobs_ ABSL_GUARDED_BY(mutex_);  // by job number; never erased
  std::deque<uint64_t> queue_ ABSL_GUARDED_BY(mutex_);
  uint64_t last_number_ ABSL_GUARDED_BY(mutex_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  // The loss of the latest calibration step of any job; NaN before the first.
  double last_loss_ ABSL_GUARDED_BY(mutex_) = std::numeric_limits<double>::quiet_NaN();
  Histogram* step_seconds_ = nullptr;  // set before the workers start; null without metrics
  std::vector<std::thread> workers_;
};

}  // namespace lychee
