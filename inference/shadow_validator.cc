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
#include "absl/time/time.h"
#include "common/base/head_partition.h"
#include "common/base/retrieval_tasks.h"
#include "common/base/status_macros.h"
#include "common/model/cuda_support.h"
#include "common/model/model.h"
#include "inference/rank_mirror.h"

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

// Makes the calling thread a validation thread: below serving on the CPU (when the validation and
// the engine both want a core, the kernel's scheduler favours the engine; Linux keeps a nice value
// per thread, and the threads this one starts, OpenMP's, inherit it, as this one inherited
// serving's, so a server started under nice keeps the difference; raising one's own nice value
// needs no privilege), with its own intra-op thread count (with OpenMP the count belongs to the
// calling thread: the engine's stays as it is), and on CUDA on a stream of its own. The stream is
// the thread's while the result lives.
std::unique_ptr<ThreadCudaStream> EnterValidationThread(const ShadowValidationOptions& options, const Model& model) {
  const auto tid = static_cast<id_t>(syscall(SYS_gettid));
  errno = 0;
  const int serving_nice = getpriority(PRIO_PROCESS, tid);  // -1 is a valid nice value: errno tells
  if ((serving_nice == -1 && errno != 0) ||
      setpriority(PRIO_PROCESS, tid, ShadowValidator::ValidationNiceValue(serving_nice)) != 0) {
    LOG(WARNING) << "shadow validation runs at serving's CPU priority: setpriority: " << std::strerror(errno);
  }
  at::set_num_threads(options.threads);
  const at::Device device = model.options().device;
  if (!device.is_cuda()) return nullptr;
  absl::StatusOr<std::unique_ptr<ThreadCudaStream>> own = UseCudaStreamOnThisThread(
      options.low_priority_stream ? CudaStreamPriority::kBackground : CudaStreamPriority::kServing,
      device.index() < 0 ? 0 : device.index());
  if (own.ok()) return *std::move(own);
  LOG(WARNING) << "shadow validation launches on the default CUDA stream: " << own.status();
  return nullptr;
}

// The served model's weights on the validation's group; null without tensor parallelism.
absl::StatusOr<std::unique_ptr<Model>> ValidationModel(const ShadowValidationOptions& options, const Model& model) {
  if (options.tensor_parallel == nullptr && model.options().tensor_parallel == nullptr) return nullptr;
  if (options.tensor_parallel == nullptr) {
    return absl::InvalidArgumentError(
        "shadow validation of a tensor-parallel model needs a group of its own "
        "(ShadowValidationOptions::tensor_parallel)");
  }
  return model.SharingWeights(options.tensor_parallel);
}

ValidationOptions ValidationOptionsWithBudget(int64_t token_budget) {
  ValidationOptions options;
  options.audit = true;  // the dropped mass is one of the bounds
  options.token_budget = token_budget;
  return options;
}

}  // namespace

std::string ShadowValidationRendezvousFile(const std::string& serving_rendezvous_file) {
  return serving_rendezvous_file + ".shadow-validation";
}

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
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> validation_model, ValidationModel(options, model));
  return std::unique_ptr<ShadowValidator>(
      new ShadowValidator(options, model, std::move(validation_model), *std::move(set)));
}

ShadowValidator::ShadowValidator(ShadowValidationOptions options, const Model& model,
                                 std::unique_ptr<Model> validation_model, ValidationSet set)
    : options_(std::move(options)),
      validation_model_(std::move(validation_model)),
      model_(validation_model_ != nullptr ? *validation_model_ : model),
      set_(std::move(set)),
      worker_([this] { Work(); }) {}

ShadowValidator::~ShadowValidator() {
  // A validation in progress ends at its next prompt; later ones return at once.
  Cancel();
  absl::MutexLock no_validation(&check_mutex_);
  worker_.join();
}

void ShadowValidator::Work() {
  const std::unique_ptr<ThreadCudaStream> stream = EnterValidationThread(options_, model_);
  const TensorParallelGroup* group = options_.tensor_parallel.get();
  const auto has_job = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(worker_mutex_) { return stopping_ || job_ != nullptr; };
  worker_mutex_.Lock();
  while (true) {
    if (group == nullptr) {
      worker_mutex_.Await(absl::Condition(&has_job));
    } else if (!worker_mutex_.AwaitWithTimeout(absl::Condition(&has_job), absl::FromChrono(group->timeout() / 4))) {
      worker_mutex_.Unlock();
      SendToFollowers({ValidationOp::kKeepAlive}).IgnoreError();
      worker_mutex_.Lock();
      continue;
    }
    // A job given before the stop still runs (cancelled, it ends at its first prompt), so that its
    // caller gets its answer.
    if (job_ == nullptr) break;
    std::function<void()> job = std::move(job_);
    job_ = nullptr;
    worker_mutex_.Unlock();
    job();
    worker_mutex_.Lock();
    job_done_ = true;
  }
  worker_mutex_.Unlock();
  if (group != nullptr) SendToFollowers({ValidationOp::kStop}).IgnoreError();
}

absl::Status ShadowValidator::RunOnWorker(std::function<void()> job) {
  absl::MutexLock lock(&worker_mutex_);
  if (stopping_) return absl::CancelledError("shadow validation is shut down");
  job_ = std::move(job);
  job_done_ = false;
  worker_mutex_.Await(absl::Condition(&job_done_));
  return absl::OkStatus();
}

absl::Status ShadowValidator::SendToFollowers(const ValidationCommand& command) {
  if (!lost_.ok()) return lost_;
  std::string bytes = EncodeValidationCommand(command);
  const absl::Status sent =
      BroadcastBytes(*options_.tensor_parallel, bytes, "sending shadow validation to the tensor-parallel ranks");
  if (!sent.ok()) {
    lost_ = sent;
    LOG(ERROR) << "shadow validation lost a tensor-parallel rank: " << sent.message();
  }
  return sent;
}

absl::StatusOr<PartitionValidation> ShadowValidator::Validate(const HeadPartition& partition,
                                                              const ValidationOptions& options) {
  if (options_.tensor_parallel != nullptr) {
    ValidationCommand command{ValidationOp::kValidate, PartitionBytes(partition), options.token_budget, set_.tasks()};
    LYCHEE_RETURN_IF_ERROR(SendToFollowers(command));
  }
  absl::StatusOr<PartitionValidation> validation = ValidatePartition(model_, set_, partition, options, &cancelled_);
  if (options_.tensor_parallel != nullptr && absl::IsUnavailable(validation.status())) {
    lost_ = validation.status();
    LOG(ERROR) << "shadow validation lost a tensor-parallel rank: " << lost_.message();
  }
  return validation;
}

void ShadowValidator::Cancel() {
  cancelled_ = true;
  absl::MutexLock lock(&worker_mutex_);
  stopping_ = true;
}

std::optional<ShadowValidationRecord> ShadowValidator::last() const {
  absl::MutexLock lock(&last_mutex_);
  return last_;
}

absl::Status ShadowValidator::Check(const HeadPartition& partition) {
  absl::MutexLock one_at_a_time(&check_mutex_);
  if (cancelled_) return absl::CancelledError("shadow validation is shut down");
  running_ = true;
  const ValidationOptions validation_options = ValidationOptionsWithBudget(ShadowTokenBudget(options_, partition));
  absl::StatusOr<PartitionValidation> validation = absl::UnknownError("the validation did not run");
  const absl::Status ran = RunOnWorker([&] { validation = Validate(partition, validation_options); });
  running_ = false;
  LYCHEE_RETURN_IF_ERROR(ran);
  if (absl::IsUnavailable(validation.status())) {
    return absl::UnavailableError(
        absl::StrCat("shadow validation of partition ", partition.version, ": ", validation.status().message()));
  }
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

absl::StatusOr<std::unique_ptr<ShadowValidationFollower>> ShadowValidationFollower::Start(
    const ShadowValidationOptions& options, const Model& model) {
  if (options.tensor_parallel == nullptr || options.tensor_parallel->rank() == 0) {
    return absl::InvalidArgumentError(
        "a shadow validation follower needs the validation group, as a rank other than 0");
  }
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> validation_model, ValidationModel(options, model));
  return std::unique_ptr<ShadowValidationFollower>(new ShadowValidationFollower(options, std::move(validation_model)));
}

ShadowValidationFollower::ShadowValidationFollower(ShadowValidationOptions options, std::unique_ptr<Model> model)
    : options_(std::move(options)), model_(std::move(model)), worker_([this] { Work(); }) {}

ShadowValidationFollower::~ShadowValidationFollower() {
  stopping_ = true;
  worker_.join();
}

void ShadowValidationFollower::Work() {
  const std::unique_ptr<ThreadCudaStream> stream = EnterValidationThread(options_, *model_);
  const TensorParallelGroup& group = *options_.tensor_parallel;
  const std::string rank = absl::StrCat("tensor-parallel rank ", group.rank(), ": shadow validation");
  while (true) {
    std::string bytes;
    if (absl::Status received = BroadcastBytes(group, bytes, "waiting for rank 0's shadow validation");
        !received.ok()) {
      LOG(WARNING) << rank << " ends: " << received.message();
      return;
    }
    // Rank 0 cannot send what does not decode; a rank that could not follow ends, and rank 0's next
    // send fails.
    absl::StatusOr<ValidationCommand> command = DecodeValidationCommand(bytes);
    if (!command.ok()) {
      LOG(ERROR) << rank << " ends: " << command.status();
      return;
    }
    if (command->op == ValidationOp::kStop || stopping_) return;
    if (command->op == ValidationOp::kKeepAlive) continue;
    const absl::StatusOr<HeadPartition> partition = PartitionFromBytes(command->partition);
    if (!partition.ok()) {
      LOG(ERROR) << rank << " ends: " << partition.status();
      return;
    }
    // Rank 0's flag decides whether it is cancelled (ValidatePartition).
    const absl::StatusOr<PartitionValidation> validation =
        ValidatePartition(*model_, ValidationSet::FromTasks(std::move(command->tasks)), *partition,
                          ValidationOptionsWithBudget(command->token_budget));
    if (validation.ok()) {
      LOG(INFO) << rank << " of partition " << partition->version << ": " << DescribeValidation(*validation);
    } else {
      LOG(WARNING) << rank << " of partition " << partition->version << ": " << validation.status();
      if (absl::IsUnavailable(validation.status())) return;
    }
  }
}

}  // namespace lychee
