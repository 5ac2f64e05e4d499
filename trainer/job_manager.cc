#include "trainer/job_manager.h"

#include <glog/logging.h>
#include <zlib.h>

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/base/model_config.h"
#include "common/base/model_fingerprint.h"
#include "common/base/retrieval_tasks.h"
#include "common/base/status_macros.h"
#include "trainer/calibration_config_proto.h"
#include "trainer/paths.h"

namespace lychee {
namespace {

// Progress is journaled at most this often: after a crash the journal tells roughly how far a
// job got, without an fsync per step.
constexpr std::chrono::seconds kProgressJournalInterval(10);

int64_t UnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Bytes of text in `path` (decompressed when it is gzip), counting no further than `limit`.
// Every token of a byte-level BPE covers at least one byte, so a corpus with fewer bytes than
// the longest context cannot fill it; the exact check needs the tokenizer and happens in the job.
absl::StatusOr<int64_t> CountTextBytesUpTo(const std::string& path, int64_t limit) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) return absl::InvalidArgumentError(absl::StrCat("corpus: cannot open ", path));
  char buffer[1 << 16];
  int64_t total = 0;
  while (total < limit) {
    const int read = gzread(file, buffer, sizeof buffer);
    if (read < 0) {
      int error = 0;
      const std::string message = gzerror(file, &error);
      gzclose(file);
      return absl::InvalidArgumentError(absl::StrCat("corpus: ", path, " is unreadable: ", message));
    }
    if (read == 0) break;
    total += read;
  }
  gzclose(file);
  return total;
}

// "CANCELLED" rather than "JOB_STATE_CANCELLED", as people read it.
std::string StateName(v1::JobState state) {
  const std::string name = v1::JobState_Name(state);
  const std::string prefix = "JOB_STATE_";
  return name.compare(0, prefix.size(), prefix) == 0 ? name.substr(prefix.size()) : name;
}

void SetError(v1::Job& job, const absl::Status& status) {
  job.mutable_error()->set_code(static_cast<int32_t>(status.code()));
  job.mutable_error()->set_message(std::string(status.message()));
}

constexpr int kMaxSweepTargets = 16;
// A sweep's validation defaults (documented in trainer.proto's SweepConfig).
constexpr double kDefaultMaxAccuracyDrop = 0.05;
constexpr int64_t kDefaultValidationContext = 2048;
constexpr int64_t kDefaultValidationSamples = 20;
constexpr int64_t kMaxValidationSamples = 10000;

absl::Status SweepFieldError(const std::string& field, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", problem));
}

// The request's sweep settings with every default filled in.
v1::SweepConfig CompleteSweepConfig(const v1::SweepConfig& given) {
  v1::SweepConfig config = given;
  if (!config.has_max_accuracy_drop()) config.set_max_accuracy_drop(kDefaultMaxAccuracyDrop);
  if (!config.has_validation_context_tokens()) config.set_validation_context_tokens(kDefaultValidationContext);
  if (!config.has_validation_samples()) config.set_validation_samples(kDefaultValidationSamples);
  if (!config.has_validation_seed()) config.set_validation_seed(1);
  if (!config.has_validation_corpus()) config.set_validation_corpus("");
  if (!config.has_validation_prompts()) config.set_validation_prompts("");
  if (!config.has_validation_token_budget()) config.set_validation_token_budget(0);
  if (!config.has_audit()) config.set_audit(false);
  return config;
}

v1::ValidationSummary SummaryToProto(const ValidationResult& result) {
  v1::ValidationSummary summary;
  for (const TaskAccuracy& task : result.tasks) {
    v1::TaskAccuracy* out = summary.add_tasks();
    out->set_task(task.task);
    out->set_samples(task.samples);
    out->set_correct(task.correct);
    out->set_accuracy(task.accuracy);
  }
  summary.set_kv_bytes_per_token(result.kv_bytes_per_token);
  summary.set_kv_bytes_measured(result.kv_bytes_measured);
  summary.set_audited(result.audited);
  summary.set_mean_dropped_mass(result.mean_dropped_mass);
  summary.set_max_dropped_mass(result.max_dropped_mass);
  summary.set_seconds(result.seconds);
  return summary;
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// "0.05, 0.1" for the targets of `rows`.
std::string TargetsOf(const google::protobuf::RepeatedPtrField<v1::SweepRow>& rows) {
  std::vector<std::string> targets;
  for (const v1::SweepRow& row : rows) targets.push_back(absl::StrCat(row.target_density()));
  return absl::StrJoin(targets, ", ");
}

// What a sweep that stopped early keeps: its finished rows, unpublished.
std::string KeptPartitions(const v1::SweepResult& sweep) {
  if (sweep.rows_size() == 0) return "no target was finished, so no partition is kept";
  return absl::StrCat("the partitions of targets ", TargetsOf(sweep.rows()),
                      " are kept with the job (sweep.rows), unpublished");
}

}  // namespace

bool IsFinal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED || state == v1::JOB_STATE_CANCELLED ||
         state == v1::JOB_STATE_INTERRUPTED;
}

absl::StatusOr<std::unique_ptr<JobManager>> JobManager::Create(JobManagerOptions options, PartitionStore& store,
                                                               CalibrationRunner runner) {
  if (options.max_concurrent_jobs < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_concurrent_jobs must be >= 1, got ", options.max_concurrent_jobs));
  }
  if (options.data_parallel < 1) {
    return absl::InvalidArgumentError(absl::StrCat("data_parallel must be >= 1, got ", options.data_parallel));
  }
  if (options.max_queued_jobs < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_queued_jobs must be >= 1, got ", options.max_queued_jobs));
  }
  LYCHEE_ASSIGN_OR_RETURN(JobJournal journal, JobJournal::Open(options.journal_dir));
  std::unique_ptr<JobManager> manager(new JobManager(std::move(options), store, std::move(runner), std::move(journal)));
  manager->Recover();
  if (manager->options_.metrics != nullptr) manager->ExportMetrics(*manager->options_.metrics);
  for (int i = 0; i < manager->options_.max_concurrent_jobs; ++i) {
    manager->workers_.emplace_back([m = manager.get()] { m->WorkerLoop(); });
  }
  return manager;
}

JobManager::~JobManager() {
  {
    absl::MutexLock lock(&mutex_);
    stopping_ = true;
    for (auto& [number, entry] : jobs_) entry->stop = true;
  }
  for (std::thread& worker : workers_) worker.join();
}

void JobManager::Recover() {
  JobJournal::Contents contents = journal_.Load();
  absl::MutexLock lock(&mutex_);
  last_number_ = contents.last_number;
  for (v1::Job& job : contents.jobs) {
    auto entry = std::make_unique<Entry>();
    entry->job = std::move(job);
    const uint64_t number = ParseJobName(entry->job.name()).value();
    if (entry->job.state() == v1::JOB_STATE_RUNNING) {
      entry->job.set_state(v1::JOB_STATE_INTERRUPTED);
      entry->job.set_end_unix_seconds(UnixSeconds());
      const v1::JobProgress& progress = entry->job.progress();
      std::string where = absl::StrCat("last journaled at step ", progress.step(), " of ", progress.total_steps());
      if (entry->job.has_sweep()) {
        absl::StrAppend(&where, " of target ", progress.target_index(), " of ", progress.target_count(), "; ",
                        KeptPartitions(entry->job.sweep()));
        entry->job.mutable_sweep()->set_summary(absl::StrCat("interrupted: ", KeptPartitions(entry->job.sweep())));
      }
      SetError(entry->job,
               absl::AbortedError(absl::StrCat("the trainer stopped while this job was running (", where, ")")));
      Changed(*entry, /*persist=*/true);
    } else if (entry->job.state() == v1::JOB_STATE_QUEUED) {
      queue_.push_back(number);
    }
    jobs_[number] = std::move(entry);
  }
  // A job whose journal is damaged still shows up, so that it is not silently gone; its file is
  // left as it is for whoever investigates.
  for (const auto& [number, problem] : contents.damaged) {
    auto entry = std::make_unique<Entry>();
    entry->job.set_name(JobName(number));
    entry->job.set_state(v1::JOB_STATE_INTERRUPTED);
    SetError(entry->job, absl::DataLossError(absl::StrCat("the journal of this job is damaged, its request is lost: ",
                                                          problem)));
    jobs_[number] = std::move(entry);
    recovery_problems_.push_back(absl::StrCat(JobName(number), ": ", problem));
  }
  for (const std::string& stray : contents.stray_entries) {
    recovery_problems_.push_back(absl::StrCat(stray, ": not a job journal, ignored"));
  }
  for (const std::string& problem : recovery_problems_) LOG(WARNING) << "trainer: job journal: " << problem;
}

void JobManager::ExportMetrics(MetricsRegistry& registry) {
  for (int state = v1::JobState_MIN + 1; state <= v1::JobState_MAX; ++state) {
    const auto job_state = static_cast<v1::JobState>(state);
    registry.AddGauge("lychee_trainer_jobs",
                      "Jobs the trainer holds (those recovered from the journal included), by state",
                      [this, job_state] {
                        absl::MutexLock lock(&mutex_);
                        return static_cast<double>(std::count_if(jobs_.begin(), jobs_.end(), [&](const auto& numbered) {
                          return numbered.second->job.state() == job_state;
                        }));
                      },
                      {{"state", absl::AsciiStrToLower(StateName(job_state))}});
  }
  step_seconds_ = &registry.AddHistogram("lychee_trainer_step_seconds", "Wall time of one calibration step",
                                         {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300});
  registry.AddGauge("lychee_trainer_last_loss",
                    "Loss (distillation plus density penalty) of the latest calibration step of any job; NaN "
                    "before the first",
                    [this] {
                      absl::MutexLock lock(&mutex_);
                      return last_loss_;
                    });
}

absl::StatusOr<CalibrationJobInputs> JobManager::ResolveInputs(const v1::SubmitCalibrationJobRequest& request) const {
  CalibrationJobInputs inputs;
  LYCHEE_ASSIGN_OR_RETURN(inputs.model_dir, ResolveModelDir(options_.model_root, request.model()));
  if (request.corpus().empty()) {
    inputs.corpus_path = options_.default_corpus;
  } else {
    LYCHEE_ASSIGN_OR_RETURN(inputs.corpus_path, ResolveCorpusPath(options_.data_root, request.corpus()));
  }
  inputs.config = CalibrationConfigFromProto(request.config());
  LYCHEE_RETURN_IF_ERROR(inputs.config.Validate());
  // Refused here rather than on every rank once the job runs.
  if (inputs.config.samples_per_step % options_.data_parallel != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibration config: samples_per_step must be a multiple of the ", options_.data_parallel,
                     " data-parallel ranks of this trainer (--data-parallel), got ", inputs.config.samples_per_step));
  }
  inputs.data_parallel = options_.data_parallel;
  LYCHEE_ASSIGN_OR_RETURN(const ModelConfig model_config, ModelConfig::FromFile(inputs.model_dir + "/config.json"));
  if (model_config.max_position_embeddings > 0 &&
      inputs.config.max_context_tokens > model_config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("config.max_context_tokens ", inputs.config.max_context_tokens,
                                                   " exceeds the max_position_embeddings ",
                                                   model_config.max_position_embeddings, " of model ", request.model()));
  }
  LYCHEE_ASSIGN_OR_RETURN(const int64_t corpus_bytes,
                          CountTextBytesUpTo(inputs.corpus_path, inputs.config.max_context_tokens));
  if (corpus_bytes < inputs.config.max_context_tokens) {
    return absl::FailedPreconditionError(
        absl::StrCat("corpus: '", request.corpus().empty() ? inputs.corpus_path : request.corpus(), "' holds ",
                     corpus_bytes, " bytes of text, too short for config.max_context_tokens ",
                     inputs.config.max_context_tokens));
  }
  if (request.has_sweep() || request.target_densities_size() > 0) {
    LYCHEE_ASSIGN_OR_RETURN(inputs.sweep, ResolveSweep(request, inputs.config, model_config));
  }
  return inputs;
}

absl::StatusOr<SweepInputs> JobManager::ResolveSweep(const v1::SubmitCalibrationJobRequest& request,
                                                     const CalibrationConfig& config,
                                                     const ModelConfig& model_config) const {
  SweepInputs sweep;
  if (request.target_densities_size() == 0) {
    return SweepFieldError("target_densities", "empty; a sweep needs 1 to 16 target densities");
  }
  if (request.target_densities_size() > kMaxSweepTargets) {
    return SweepFieldError("target_densities", absl::StrCat("at most ", kMaxSweepTargets, " targets, got ",
                                                            request.target_densities_size()));
  }
  for (int i = 0; i < request.target_densities_size(); ++i) {
    const double target = request.target_densities(i);
    if (!(target > 0 && target <= 1)) {
      return SweepFieldError(absl::StrCat("target_densities[", i, "]"),
                             absl::StrCat("must be in (0, 1], got ", target));
    }
    sweep.target_densities.push_back(target);
  }
  const v1::SweepConfig given = CompleteSweepConfig(request.sweep());
  if (!(given.max_accuracy_drop() >= 0 && given.max_accuracy_drop() <= 1)) {
    return SweepFieldError("sweep.max_accuracy_drop",
                           absl::StrCat("must be in [0, 1], got ", given.max_accuracy_drop()));
  }
  sweep.max_accuracy_drop = given.max_accuracy_drop();
  if (given.validation_samples() < 1 || given.validation_samples() > kMaxValidationSamples) {
    return SweepFieldError("sweep.validation_samples", absl::StrCat("must be in [1, ", kMaxValidationSamples, "], got ",
                                                                    given.validation_samples()));
  }
  sweep.generated.samples_per_task = given.validation_samples();
  sweep.generated.seed = given.validation_seed();
  const int64_t context = given.validation_context_tokens();
  if (context < 128 || (model_config.max_position_embeddings > 0 && context > model_config.max_position_embeddings)) {
    return SweepFieldError("sweep.validation_context_tokens",
                           absl::StrCat("must be in [128, ", model_config.max_position_embeddings,
                                        "] (the model's max_position_embeddings), got ", context));
  }
  sweep.generated.context_tokens = context;
  if (given.validation_token_budget() < 0) {
    return SweepFieldError("sweep.validation_token_budget", absl::StrCat("must be >= 0 (0: config.token_budget), got ",
                                                                         given.validation_token_budget()));
  }
  if (given.validation_token_budget() > 0) {
    SelectionParams selection = config.selection;
    selection.token_budget = given.validation_token_budget();
    if (absl::Status valid = HeadPartition::AllRetrieval(1, 1, selection).Validate(); !valid.ok()) {
      return SweepFieldError("sweep.validation_token_budget", std::string(valid.message()));
    }
  }
  sweep.validation.token_budget = given.validation_token_budget();
  sweep.validation.audit = given.audit();
  if (!given.validation_prompts().empty()) {
    if (!given.validation_corpus().empty()) {
      return SweepFieldError("sweep.validation_prompts", "give validation_prompts or validation_corpus, not both");
    }
    LYCHEE_ASSIGN_OR_RETURN(sweep.prompts_path, ResolveCorpusPath(options_.data_root, given.validation_prompts(),
                                                                  "sweep.validation_prompts"));
    // A malformed file is refused here rather than after the first target's training.
    LYCHEE_ASSIGN_OR_RETURN(const std::string prompts, ReadTextCorpus(sweep.prompts_path));
    if (absl::Status parsed = ParseValidationPrompts(prompts, given.validation_prompts()).status(); !parsed.ok()) {
      return SweepFieldError("sweep.validation_prompts", std::string(parsed.message()));
    }
    return sweep;
  }
  if (given.validation_corpus().empty()) {
    sweep.heldout_corpus_path = options_.default_heldout_corpus;
  } else {
    LYCHEE_ASSIGN_OR_RETURN(sweep.heldout_corpus_path, ResolveCorpusPath(options_.data_root, given.validation_corpus(),
                                                                         "sweep.validation_corpus"));
  }
  LYCHEE_ASSIGN_OR_RETURN(const int64_t heldout_bytes, CountTextBytesUpTo(sweep.heldout_corpus_path, context));
  if (heldout_bytes < context) {
    return absl::FailedPreconditionError(
        absl::StrCat("sweep.validation_corpus: '", sweep.heldout_corpus_path, "' holds ", heldout_bytes,
                     " bytes of text, too short for validation_context_tokens ", context));
  }
  return sweep;
}

absl::StatusOr<v1::Job> JobManager::Submit(const v1::SubmitCalibrationJobRequest& request) {
  LYCHEE_ASSIGN_OR_RETURN(const CalibrationJobInputs inputs, ResolveInputs(request));
  v1::Job job;
  job.set_state(v1::JOB_STATE_QUEUED);
  *job.mutable_request() = request;
  *job.mutable_request()->mutable_config() = CalibrationConfigToProto(inputs.config);
  if (inputs.sweep) *job.mutable_request()->mutable_sweep() = CompleteSweepConfig(request.sweep());
  job.mutable_progress()->set_total_steps(inputs.config.steps);
  job.set_create_unix_seconds(UnixSeconds());

  absl::MutexLock lock(&mutex_);
  if (stopping_) return absl::UnavailableError("the trainer is shutting down");
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queued_jobs) {
    return absl::ResourceExhaustedError(absl::StrCat("the queue already holds ", queue_.size(),
                                                     " jobs (the trainer's --max-queued-jobs); submit again later"));
  }
  const uint64_t number = ++last_number_;
  job.set_name(JobName(number));
  // Journaled before it is queued: a job the client was told about survives a crash.
  LYCHEE_RETURN_IF_ERROR(journal_.Write(job));
  auto entry = std::make_unique<Entry>();
  entry->job = job;
  jobs_[number] = std::move(entry);
  queue_.push_back(number);
  return job;
}

absl::StatusOr<JobManager::Entry*> JobManager::Find(const std::string& name) const {
  LYCHEE_ASSIGN_OR_RETURN(const uint64_t number, ParseJobName(name));
  const auto it = jobs_.find(number);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", name));
  return it->second.get();
}

absl::StatusOr<v1::Job> JobManager::Get(const std::string& name) const {
  absl::MutexLock lock(&mutex_);
  LYCHEE_ASSIGN_OR_RETURN(const Entry* entry, Find(name));
  return entry->job;
}

std::vector<v1::Job> JobManager::List() const {
  absl::MutexLock lock(&mutex_);
  std::vector<v1::Job> jobs;
  for (const auto& [number, entry] : jobs_) jobs.push_back(entry->job);
  return jobs;
}

absl::StatusOr<v1::Job> JobManager::Cancel(const std::string& name) {
  absl::MutexLock lock(&mutex_);
  LYCHEE_ASSIGN_OR_RETURN(Entry* entry, Find(name));
  v1::Job& job = entry->job;
  if (IsFinal(job.state())) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", name, " is already ", StateName(job.state()), "; only queued or running jobs can be cancelled"));
  }
  entry->cancelled_by_client = true;
  if (job.state() == v1::JOB_STATE_QUEUED) {
    queue_.erase(std::find(queue_.begin(), queue_.end(), ParseJobName(name).value()));
    job.set_state(v1::JOB_STATE_CANCELLED);
    job.set_end_unix_seconds(UnixSeconds());
    SetError(job, absl::CancelledError("cancelled before it started"));
    Changed(*entry, /*persist=*/true);
  } else {
    entry->stop = true;
  }
  return job;
}

absl::StatusOr<JobManager::Update> JobManager::WaitForUpdate(const std::string& name, uint64_t after_revision,
                                                             std::chrono::milliseconds timeout) const {
  absl::MutexLock lock(&mutex_);
  LYCHEE_ASSIGN_OR_RETURN(const Entry* entry, Find(name));
  const auto changed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    return entry->revision > after_revision || stopping_;
  };
  mutex_.AwaitWithTimeout(absl::Condition(&changed), absl::FromChrono(timeout));
  return Update{entry->job, entry->revision};
}

void JobManager::Changed(Entry& entry, bool persist) {
  ++entry.revision;
  if (!persist) return;
  entry.journaled_at = std::chrono::steady_clock::now();
  // No client waits on this write; the in-memory state stays authoritative, and the operator
  // learns that the journal lags behind.
  if (const absl::Status written = journal_.Write(entry.job); !written.ok()) {
    LOG(ERROR) << "trainer: journal of " << entry.job.name() << " not written: " << written.message();
  }
}

void JobManager::WorkerLoop() {
  const auto has_work = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return stopping_ || !queue_.empty(); };
  mutex_.Lock();
  while (true) {
    mutex_.Await(absl::Condition(&has_work));
    if (stopping_) break;
    Entry& entry = *jobs_.at(queue_.front());
    queue_.pop_front();
    entry.job.set_state(v1::JOB_STATE_RUNNING);
    entry.job.set_start_unix_seconds(UnixSeconds());
    Changed(entry, /*persist=*/true);
    mutex_.Unlock();
    RunJob(entry);
    mutex_.Lock();
  }
  mutex_.Unlock();
}

void JobManager::RunJob(Entry& entry) {
  v1::SubmitCalibrationJobRequest request;
  std::string name;
  {
    absl::MutexLock lock(&mutex_);
    request = entry.job.request();
    name = entry.job.name();
  }
  const ProgressCallback on_progress = [&](const CalibrationProgress& progress) {
    absl::MutexLock lock(&mutex_);
    v1::JobProgress* out = entry.job.mutable_progress();
    out->set_step(progress.step);
    out->set_total_steps(progress.total_steps);
    out->set_loss(progress.loss);
    out->set_distillation_loss(progress.distillation_loss);
    out->set_density_penalty(progress.density_penalty);
    out->set_expected_density(progress.expected_density);
    out->set_lambda(progress.lambda);
    out->set_tokens_per_second(progress.tokens_per_second);
    out->set_eta_seconds(progress.eta_seconds);
    last_loss_ = progress.loss;
    if (step_seconds_ != nullptr) step_seconds_->Observe(progress.step_seconds);
    Changed(entry, /*persist=*/std::chrono::steady_clock::now() - entry.journaled_at >= kProgressJournalInterval);
  };
  // The inputs are resolved again: the model or corpus may have changed since submission.
  const auto run_and_publish = [&]() -> absl::StatusOr<v1::JobResult> {
    LYCHEE_ASSIGN_OR_RETURN(const CalibrationJobInputs inputs, ResolveInputs(request));
    LYCHEE_ASSIGN_OR_RETURN(const std::string fingerprint, ModelFingerprint(inputs.model_dir));
    LYCHEE_ASSIGN_OR_RETURN(const std::unique_ptr<CalibrationSession> session, runner_(inputs));
    if (inputs.sweep) return RunSweep(entry, inputs, *session, fingerprint, on_progress);
    LYCHEE_ASSIGN_OR_RETURN(HeadPartition partition, session->Calibrate(inputs.config, on_progress, entry.stop));
    v1::JobResult result;
    result.set_model_fingerprint(fingerprint);
    LYCHEE_ASSIGN_OR_RETURN(const uint64_t version, Publish(std::move(partition), fingerprint, name));
    result.set_partition_version(version);
    return result;
  };
  const absl::StatusOr<v1::JobResult> result = run_and_publish();

  absl::MutexLock lock(&mutex_);
  v1::Job& job = entry.job;
  job.set_end_unix_seconds(UnixSeconds());
  if (result.ok()) {
    job.set_state(v1::JOB_STATE_SUCCEEDED);
    *job.mutable_result() = *result;
  } else if (result.status().code() == absl::StatusCode::kCancelled && entry.cancelled_by_client) {
    job.set_state(v1::JOB_STATE_CANCELLED);
    SetError(job, result.status());
  } else if (result.status().code() == absl::StatusCode::kCancelled && stopping_) {
    job.set_state(v1::JOB_STATE_INTERRUPTED);
    std::string message = absl::StrCat("the trainer shut down while this job was running (after step ",
                                       job.progress().step(), " of ", job.progress().total_steps(), ")");
    if (job.has_sweep()) absl::StrAppend(&message, "; ", KeptPartitions(job.sweep()));
    SetError(job, absl::AbortedError(message));
  } else {
    job.set_state(v1::JOB_STATE_FAILED);
    SetError(job, result.status());
  }
  Changed(entry, /*persist=*/true);
}

absl::StatusOr<uint64_t> JobManager::Publish(HeadPartition partition, const std::string& fingerprint,
                                             const std::string& name) {
  partition.model_fingerprint = fingerprint;
  partition.source = absl::StrCat("trainer job ", name);
  partition.created_unix_seconds = UnixSeconds();
  partition.training.job_name = name;
  return store_.Publish(std::move(partition));
}

absl::StatusOr<v1::JobResult> JobManager::RunSweep(Entry& entry, const CalibrationJobInputs& inputs,
                                                   CalibrationSession& session, const std::string& fingerprint,
                                                   const ProgressCallback& on_progress) {
  const SweepInputs& sweep = *inputs.sweep;
  const int count = static_cast<int>(sweep.target_densities.size());
  std::vector<HeadPartition> partitions;
  // Marks where the sweep is, for watchers.
  const auto enter = [&](int index, const char* phase) {
    absl::MutexLock lock(&mutex_);
    v1::JobProgress* progress = entry.job.mutable_progress();
    progress->set_target_index(index + 1);
    progress->set_target_count(count);
    progress->set_phase(phase);
    if (index == 0 && std::string(phase) == "training") {
      v1::SweepResult* result = entry.job.mutable_sweep();
      result->set_validation_context_tokens(sweep.prompts_path.empty() ? sweep.generated.context_tokens : 0);
      result->set_summary("running");
    }
    Changed(entry, /*persist=*/true);
  };
  // A sweep that stops early keeps its finished rows and says so, in its summary and its error.
  const auto stopped = [&](int index, const char* phase, const absl::Status& status) {
    absl::MutexLock lock(&mutex_);
    v1::SweepResult* result = entry.job.mutable_sweep();
    const std::string what =
        absl::StrCat("stopped ", phase, " target ", index + 1, " of ", count, " (", sweep.target_densities[index],
                     "): ", status.message(), "; ", KeptPartitions(*result));
    result->set_summary(what);
    Changed(entry, /*persist=*/true);
    return absl::Status(status.code(), absl::StrCat("sweep ", what));
  };

  for (int i = 0; i < count; ++i) {
    CalibrationConfig config = inputs.config;
    config.target_density = sweep.target_densities[i];
    enter(i, "training");
    const auto training_start = std::chrono::steady_clock::now();
    absl::StatusOr<HeadPartition> partition = session.Calibrate(config, on_progress, entry.stop);
    if (!partition.ok()) return stopped(i, "training", partition.status());
    const double training_seconds = SecondsSince(training_start);
    partition->model_fingerprint = fingerprint;
    partition->source = absl::StrCat("trainer job ", entry.job.name(), ", sweep target ", config.target_density);
    partition->training.job_name = entry.job.name();
    enter(i, "validating");
    const auto validation_start = std::chrono::steady_clock::now();
    absl::StatusOr<PartitionValidation> validation = session.Validate(*partition, entry.stop);
    if (!validation.ok()) return stopped(i, "validating", validation.status());

    v1::SweepRow row;
    row.set_target_density(config.target_density);
    row.set_expected_density(partition->training.expected_density);
    row.set_deployed_density(partition->RetrievalDensity());
    *row.mutable_validation() = SummaryToProto(validation->partition);
    std::string why;
    row.set_within_bound(WithinQualityBound(validation->dense, validation->partition, sweep.max_accuracy_drop, &why));
    row.set_verdict(row.within_bound() ? "within the bound" : why);
    row.set_training_seconds(training_seconds);
    row.set_validation_seconds(SecondsSince(validation_start));
    *row.mutable_partition() = HeadPartitionToProto(*partition);
    partitions.push_back(*std::move(partition));
    absl::MutexLock lock(&mutex_);
    v1::SweepResult* result = entry.job.mutable_sweep();
    // Dense is the same on every validation; the first one is kept.
    if (i == 0) {
      *result->mutable_dense() = SummaryToProto(validation->dense);
      result->set_validation_token_budget(validation->token_budget);
    }
    *result->add_rows() = std::move(row);
    Changed(entry, /*persist=*/true);
  }

  // The sparsest as served: the fewest retrieval heads, then the fewest KV bytes read, then the
  // target given first.
  std::optional<int> chosen;
  v1::SweepResult table;
  {
    absl::MutexLock lock(&mutex_);
    table = entry.job.sweep();
  }
  for (int i = 0; i < table.rows_size(); ++i) {
    const v1::SweepRow& row = table.rows(i);
    if (!row.within_bound()) continue;
    if (!chosen) {
      chosen = i;
      continue;
    }
    const v1::SweepRow& best = table.rows(*chosen);
    if (row.deployed_density() < best.deployed_density() ||
        (row.deployed_density() == best.deployed_density() &&
         row.validation().kv_bytes_per_token() < best.validation().kv_bytes_per_token())) {
      chosen = i;
    }
  }
  if (!chosen) {
    absl::MutexLock lock(&mutex_);
    const std::string what = absl::StrCat("no target kept every task's accuracy within ", sweep.max_accuracy_drop,
                                          " of dense, so nothing was published; the partitions of targets ",
                                          TargetsOf(table.rows()), " are kept with the job (sweep.rows)");
    entry.job.mutable_sweep()->set_summary(what);
    return absl::FailedPreconditionError(what);
  }
  LYCHEE_ASSIGN_OR_RETURN(const uint64_t version, Publish(partitions[*chosen], fingerprint, entry.job.name()));
  absl::MutexLock lock(&mutex_);
  v1::SweepResult* result = entry.job.mutable_sweep();
  v1::SweepRow* row = result->mutable_rows(*chosen);
  row->set_partition_version(version);
  row->mutable_partition()->set_version(version);
  result->set_chosen(*chosen);
  result->set_summary(absl::StrCat("published the partition of target ", row->target_density(), " (deployed density ",
                                   row->deployed_density(), ") as version ", version,
                                   ": the sparsest whose accuracy stayed within ", sweep.max_accuracy_drop,
                                   " of dense on every task"));
  v1::JobResult job_result;
  job_result.set_model_fingerprint(fingerprint);
  job_result.set_partition_version(version);
  return job_result;
}

}  // namespace lychee
