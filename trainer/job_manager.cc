#include "trainer/job_manager.h"

#include <zlib.h>

#include <algorithm>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "common/model_config.h"
#include "common/model_fingerprint.h"
#include "common/status_macros.h"
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
  if (options.max_queued_jobs < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_queued_jobs must be >= 1, got ", options.max_queued_jobs));
  }
  LYCHEE_ASSIGN_OR_RETURN(JobJournal journal, JobJournal::Open(options.journal_dir));
  std::unique_ptr<JobManager> manager(new JobManager(std::move(options), store, std::move(runner), std::move(journal)));
  manager->Recover();
  for (int i = 0; i < manager->options_.max_concurrent_jobs; ++i) {
    manager->workers_.emplace_back([m = manager.get()] { m->WorkerLoop(); });
  }
  return manager;
}

JobManager::~JobManager() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    for (auto& [number, entry] : jobs_) entry->stop = true;
  }
  work_available_.notify_all();
  job_changed_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void JobManager::Recover() {
  JobJournal::Contents contents = journal_.Load();
  std::lock_guard<std::mutex> lock(mutex_);
  last_number_ = contents.last_number;
  for (v1::Job& job : contents.jobs) {
    auto entry = std::make_unique<Entry>();
    entry->job = std::move(job);
    const uint64_t number = ParseJobName(entry->job.name()).value();
    if (entry->job.state() == v1::JOB_STATE_RUNNING) {
      entry->job.set_state(v1::JOB_STATE_INTERRUPTED);
      entry->job.set_end_unix_seconds(UnixSeconds());
      SetError(entry->job,
               absl::AbortedError(absl::StrCat("the trainer stopped while this job was running (last journaled at step ",
                                               entry->job.progress().step(), " of ",
                                               entry->job.progress().total_steps(), ")")));
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
  for (const std::string& problem : recovery_problems_) std::cerr << "trainer: job journal: " << problem << "\n";
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
  return inputs;
}

absl::StatusOr<v1::Job> JobManager::Submit(const v1::SubmitCalibrationJobRequest& request) {
  LYCHEE_ASSIGN_OR_RETURN(const CalibrationJobInputs inputs, ResolveInputs(request));
  v1::Job job;
  job.set_state(v1::JOB_STATE_QUEUED);
  *job.mutable_request() = request;
  *job.mutable_request()->mutable_config() = CalibrationConfigToProto(inputs.config);
  job.mutable_progress()->set_total_steps(inputs.config.steps);
  job.set_create_unix_seconds(UnixSeconds());

  std::lock_guard<std::mutex> lock(mutex_);
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
  work_available_.notify_one();
  return job;
}

absl::StatusOr<JobManager::Entry*> JobManager::Find(const std::string& name) const {
  LYCHEE_ASSIGN_OR_RETURN(const uint64_t number, ParseJobName(name));
  const auto it = jobs_.find(number);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job ", name));
  return it->second.get();
}

absl::StatusOr<v1::Job> JobManager::Get(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mutex_);
  LYCHEE_ASSIGN_OR_RETURN(const Entry* entry, Find(name));
  return entry->job;
}

std::vector<v1::Job> JobManager::List() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<v1::Job> jobs;
  for (const auto& [number, entry] : jobs_) jobs.push_back(entry->job);
  return jobs;
}

absl::StatusOr<v1::Job> JobManager::Cancel(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
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
  std::unique_lock<std::mutex> lock(mutex_);
  LYCHEE_ASSIGN_OR_RETURN(const Entry* entry, Find(name));
  job_changed_.wait_for(lock, timeout, [&] { return entry->revision > after_revision || stopping_; });
  return Update{entry->job, entry->revision};
}

void JobManager::Changed(Entry& entry, bool persist) {
  ++entry.revision;
  job_changed_.notify_all();
  if (!persist) return;
  entry.journaled_at = std::chrono::steady_clock::now();
  // No client waits on this write; the in-memory state stays authoritative, and the operator
  // learns that the journal lags behind.
  if (const absl::Status written = journal_.Write(entry.job); !written.ok()) {
    std::cerr << "trainer: journal of " << entry.job.name() << " not written: " << written.message() << "\n";
  }
}

void JobManager::WorkerLoop() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    work_available_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (stopping_) return;
    Entry& entry = *jobs_.at(queue_.front());
    queue_.pop_front();
    entry.job.set_state(v1::JOB_STATE_RUNNING);
    entry.job.set_start_unix_seconds(UnixSeconds());
    Changed(entry, /*persist=*/true);
    lock.unlock();
    RunJob(entry);
    lock.lock();
  }
}

void JobManager::RunJob(Entry& entry) {
  v1::SubmitCalibrationJobRequest request;
  std::string name;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    request = entry.job.request();
    name = entry.job.name();
  }
  const auto on_progress = [&](const CalibrationProgress& progress) {
    std::lock_guard<std::mutex> lock(mutex_);
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
    Changed(entry, /*persist=*/std::chrono::steady_clock::now() - entry.journaled_at >= kProgressJournalInterval);
  };
  // The inputs are resolved again: the model or corpus may have changed since submission.
  const auto run_and_publish = [&]() -> absl::StatusOr<v1::JobResult> {
    LYCHEE_ASSIGN_OR_RETURN(const CalibrationJobInputs inputs, ResolveInputs(request));
    LYCHEE_ASSIGN_OR_RETURN(const std::string fingerprint, ModelFingerprint(inputs.model_dir));
    LYCHEE_ASSIGN_OR_RETURN(HeadPartition partition, runner_(inputs, on_progress, entry.stop));
    partition.model_fingerprint = fingerprint;
    partition.source = absl::StrCat("trainer job ", name);
    partition.created_unix_seconds = UnixSeconds();
    partition.training.job_name = name;
    LYCHEE_ASSIGN_OR_RETURN(const uint64_t version, store_.Publish(std::move(partition)));
    v1::JobResult result;
    result.set_model_fingerprint(fingerprint);
    result.set_partition_version(version);
    return result;
  };
  const absl::StatusOr<v1::JobResult> result = run_and_publish();

  std::lock_guard<std::mutex> lock(mutex_);
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
    SetError(job, absl::AbortedError(absl::StrCat("the trainer shut down while this job was running (after step ",
                                                  job.progress().step(), " of ", job.progress().total_steps(), ")")));
  } else {
    job.set_state(v1::JOB_STATE_FAILED);
    SetError(job, result.status());
  }
  Changed(entry, /*persist=*/true);
}

}  // namespace lychee
