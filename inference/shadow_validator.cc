#include "inference/shadow_validator.h"

#include <ATen/Parallel.h>

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include <glog/logging.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/base/head_partition.h"
#include "common/base/retrieval_tasks.h"
#include "common/base/status_macros.h"
#include "common/model/cuda_support.h"
#include "common/model/model.h"

namespace lychee {
namespace {

absl::Status CheckFraction(const char* flag, double value) {
  if (!(value >= 0 && value <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, " must be in [0, 1], got ", value));
  }
  return absl::OkStatus();
}

absl::Status NamingFlag(const char* flag, const absl::Status& status) {
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", status.message()));
}

// Pass-key windows are drawn from the head of the text: tokenizing a whole book at startup would
// cost seconds, and this many bytes hold far more windows than the prompts need.
constexpr int64_t kHeldoutBytesPerContextToken = 64;

}  // namespace

std::string DescribeValidation(const PartitionValidation& validation) {
  std::string text;
  for (size_t i = 0; i < validation.partition.tasks.size(); ++i) {
    const TaskAccuracy& task = validation.partition.tasks[i];
    const double dense = i < validation.dense.tasks.size() ? validation.dense.tasks[i].accuracy : 0;
    absl::StrAppend(&text, i == 0 ? "" : ", ",
                    absl::StrFormat("%s %.3f (dense %.3f, %d prompts)", task.task, task.accuracy, dense, task.samples));
  }
  absl::StrAppend(&text,
                  absl::StrFormat(", mean dropped mass %.4f (max %.4f), token budget %d, %.1f s",
                                  validation.partition.mean_dropped_mass, validation.partition.max_dropped_mass,
                                  validation.token_budget, validation.partition.seconds + validation.dense.seconds));
  return text;
}

int64_t ShadowTokenBudget(const ShadowValidationOptions& options, const HeadPartition& partition) {
  if (options.token_budget > 0) return options.token_budget;
  const SelectionParams& selection = partition.selection();
  if (options.served_context_tokens <= options.context_tokens) return selection.token_budget;
  const int64_t scaled = selection.token_budget * options.context_tokens / options.served_context_tokens;
  // The selection always keeps the sink, the recent window and the current partial block; a budget
  // must leave room for one selected block beyond them.
  const int64_t smallest = selection.sink_tokens + selection.recent_tokens + 2 * selection.block_size;
  return std::max(smallest, scaled / selection.block_size * selection.block_size);
}

int ShadowValidator::ValidationNiceValue(int serving_nice) {
  return std::min(19, serving_nice + kValidationNiceIncrement);
}

absl::Status ShadowValidator::CheckOptions(const ShadowValidationOptions& options) {
  if (!options.enabled) return absl::OkStatus();
  LYCHEE_RETURN_IF_ERROR(CheckFraction("shadow-max-accuracy-drop", options.max_accuracy_drop));
  LYCHEE_RETURN_IF_ERROR(CheckFraction("shadow-max-dropped-mass", options.max_dropped_mass));
  if (options.context_tokens < 64) {
    return absl::InvalidArgumentError(absl::StrCat("--shadow-context must be >= 64, got ", options.context_tokens));
  }
  if (options.prompts_per_task < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--shadow-prompts must be >= 1, got ", options.prompts_per_task));
  }
  if (options.token_budget < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--shadow-budget must be >= 0, got ", options.token_budget));
  }
  if (options.threads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("--shadow-threads must be >= 1, got ", options.threads));
  }
  if (!options.prompts_file.empty()) {
    std::ifstream file(options.prompts_file, std::ios::binary);
    if (!file)
      return absl::InvalidArgumentError(
          absl::StrCat("--shadow-prompts-file: cannot read '", options.prompts_file, "'"));
    std::stringstream text;
    text << file.rdbuf();
    absl::StatusOr<std::vector<ValidationPrompt>> prompts = ParseValidationPrompts(text.str(), options.prompts_file);
    if (!prompts.ok()) return NamingFlag("shadow-prompts-file", prompts.status());
    if (prompts->empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--shadow-prompts-file: '", options.prompts_file, "' holds no prompts"));
    }
  } else {
    absl::StatusOr<std::string> text = ReadTextCorpus(options.heldout_corpus);
    if (!text.ok()) return NamingFlag("shadow-heldout-corpus", text.status());
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ShadowValidator>> ShadowValidator::Create(const ShadowValidationOptions& options,
                                                                         const Model& model,
                                                                         const Tokenizer& tokenizer) {
  LYCHEE_RETURN_IF_ERROR(CheckOptions(options));
  absl::StatusOr<ValidationSet> set = [&]() -> absl::StatusOr<ValidationSet> {
    if (!options.prompts_file.empty()) {
      absl::StatusOr<ValidationSet> loaded = ValidationSet::LoadPromptsFile(tokenizer, options.prompts_file);
      if (!loaded.ok()) return NamingFlag("shadow-prompts-file", loaded.status());
      return loaded;
    }
    LYCHEE_ASSIGN_OR_RETURN(std::string heldout, ReadTextCorpus(options.heldout_corpus));
    heldout.resize(std::min<size_t>(heldout.size(), options.context_tokens * kHeldoutBytesPerContextToken));
    GeneratedValidationSpec spec;
    spec.context_tokens = options.context_tokens;
    spec.samples_per_task = options.prompts_per_task;
    spec.seed = options.seed;
    absl::StatusOr<ValidationSet> generated = ValidationSet::Generate(tokenizer, std::move(heldout), spec);
    if (!generated.ok()) return NamingFlag("shadow-heldout-corpus", generated.status());
    return generated;
  }();
  if (!set.ok()) return set.status();
  return std::unique_ptr<ShadowValidator>(new ShadowValidator(options, model, *std::move(set)));
}

ShadowValidator::ShadowValidator(ShadowValidationOptions options, const Model& model, ValidationSet set)
    : options_(std::move(options)), model_(model), set_(std::move(set)), worker_([this] { Work(); }) {}

ShadowValidator::~ShadowValidator() {
  Cancel();
  // A validation in progress ends at its next prompt; later ones return at once.
  absl::MutexLock no_validation(&check_mutex_);
  {
    absl::MutexLock lock(&worker_mutex_);
    stopping_ = true;
  }
  worker_.join();
}

void ShadowValidator::Work() {
  // Below serving on the CPU: when the validation and the engine both want a core, the kernel's
  // scheduler favours the engine. Linux keeps a nice value per thread, and the threads this one
  // starts (OpenMP's) inherit it, as this one inherited serving's (a server started under nice
  // keeps the difference). Raising one's own nice value needs no privilege.
  const auto tid = static_cast<id_t>(syscall(SYS_gettid));
  errno = 0;
  const int serving_nice = getpriority(PRIO_PROCESS, tid);  // -1 is a valid nice value: errno tells
  if ((serving_nice == -1 && errno != 0) || setpriority(PRIO_PROCESS, tid, ValidationNiceValue(serving_nice)) != 0) {
    LOG(WARNING) << "shadow validation runs at serving's CPU priority: setpriority: " << std::strerror(errno);
  }
  // With OpenMP the intra-op thread count belongs to the calling thread: the validation's few
  // threads leave the engine's own count alone.
  at::set_num_threads(options_.threads);
  std::unique_ptr<ThreadCudaStream> stream;
  if (const at::Device device = model_.options().device; device.is_cuda()) {
    absl::StatusOr<std::unique_ptr<ThreadCudaStream>> own = UseCudaStreamOnThisThread(
        options_.low_priority_stream ? CudaStreamPriority::kBackground : CudaStreamPriority::kServing,
        device.index() < 0 ? 0 : device.index());
    if (own.ok()) {
      stream = *std::move(own);
    } else {
      LOG(WARNING) << "shadow validation launches on the default CUDA stream: " << own.status();
    }
  }
  const auto has_job = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mutex_) { return stopping_ || job_ != nullptr; };
  worker_mutex_.Lock();
  while (true) {
    worker_mutex_.Await(absl::Condition(&has_job));
    if (stopping_) break;
    std::function<void()> job = std::move(job_);
    job_ = nullptr;
    worker_mutex_.Unlock();
    job();
    worker_mutex_.Lock();
    job_done_ = true;
  }
  worker_mutex_.Unlock();
}

void ShadowValidator::RunOnWorker(std::function<void()> job) {
  absl::MutexLock lock(&worker_mutex_);
  job_ = std::move(job);
  job_done_ = false;
  worker_mutex_.Await(absl::Condition(&job_done_));
}

void ShadowValidator::Cancel() { cancelled_ = true; }

std::optional<ShadowValidationRecord> ShadowValidator::last() const {
  absl::MutexLock lock(&last_mutex_);
  return last_;
}

absl::Status ShadowValidator::Check(const HeadPartition& partition) {
  absl::MutexLock one_at_a_time(&check_mutex_);
  if (cancelled_) return absl::CancelledError("shadow validation is shut down");
  running_ = true;
  ValidationOptions validation_options;
  validation_options.audit = true;  // the dropped mass is one of the bounds
  validation_options.token_budget = ShadowTokenBudget(options_, partition);
  absl::StatusOr<PartitionValidation> validation = absl::UnknownError("the validation did not run");
  RunOnWorker([&] { validation = ValidatePartition(model_, set_, partition, validation_options, &cancelled_); });
  running_ = false;
  if (!validation.ok()) return validation.status();

  std::string why;
  bool promoted = WithinQualityBound(validation->dense, validation->partition, options_.max_accuracy_drop, &why);
  if (promoted && validation->partition.mean_dropped_mass > options_.max_dropped_mass) {
    promoted = false;
    why = absl::StrFormat("mean dropped mass %.4f > %.4f", validation->partition.mean_dropped_mass,
                          options_.max_dropped_mass);
  }
  ShadowValidationRecord record{partition.version, promoted, *validation, DescribeValidation(*validation)};
  LOG(INFO) << "shadow validation of partition " << partition.version << ": " << record.summary << " -> "
            << (promoted ? "promoted" : "rejected: " + why);
  {
    absl::MutexLock lock(&last_mutex_);
    last_ = record;
  }
  if (!promoted) {
    ++rejected_;
    return absl::FailedPreconditionError(absl::StrCat("shadow validation: ", why, "; saw ", record.summary));
  }
  ++promoted_;
  return absl::OkStatus();
}

}  // namespace lychee
