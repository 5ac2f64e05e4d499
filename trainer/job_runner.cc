#include "trainer/job_runner.h"

#include <ATen/Parallel.h>
#include <glog/logging.h>
#include <google/protobuf/text_format.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <exception>
#include <filesystem>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/base/durable_file.h"
#include "common/base/retrieval_tasks.h"
#include "common/base/status_macros.h"
#include "common/base/tokenizer.h"
#include "common/model/model.h"
#include "common/model/rank_workers.h"
#include "common/model/tensor_parallel.h"
#include "lychee/internal/calibration_worker.pb.h"
#include "trainer/calibration_config_proto.h"

namespace lychee {
namespace {

// How long rank 0, whose group broke, waits for the worker that broke it to be reaped and named.
constexpr std::chrono::seconds kLostRankPatience(2);

// A calibration worker's job, written for it in the temp dir and removed with this object.
class WorkerJobFile {
 public:
  static absl::StatusOr<std::unique_ptr<WorkerJobFile>> Write(const internal::CalibrationWorkerJob& job) {
    std::string path = (std::filesystem::temp_directory_path() / "lychee_calibration_worker_XXXXXX").string();
    const int fd = mkstemp(path.data());
    if (fd < 0) return absl::InternalError(absl::StrCat("cannot make a temp file like ", path));
    close(fd);
    auto file = std::unique_ptr<WorkerJobFile>(new WorkerJobFile(std::move(path)));
    std::string text;
    if (!google::protobuf::TextFormat::PrintToString(job, &text)) {
      return absl::InternalError("cannot print a calibration worker's job");
    }
    LYCHEE_RETURN_IF_ERROR(WriteDurableFile(file->path_, text));
    return file;
  }
  ~WorkerJobFile() {
    std::error_code ignored;
    std::filesystem::remove(path_, ignored);
  }
  WorkerJobFile(const WorkerJobFile&) = delete;
  WorkerJobFile& operator=(const WorkerJobFile&) = delete;

  const std::string& path() const { return path_; }

 private:
  explicit WorkerJobFile(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

// A worker that dies shows on rank 0 only as a collective that failed (UNAVAILABLE); this names the
// rank that was lost, and how it ended, when one was.
absl::Status NameLostRank(RankWorkers& workers, const absl::Status& rank0_status) {
  if (rank0_status.code() != absl::StatusCode::kUnavailable) return rank0_status;
  const absl::Status lost = workers.WaitForLost(kLostRankPatience);
  if (lost.ok()) return rank0_status;
  return absl::UnavailableError(absl::StrCat("data-parallel calibration lost a rank: ", lost.message(),
                                             " (on rank 0: ", rank0_status.message(), ")"));
}

// LibTorch reports failures (out of memory, a device lost) by throwing; one job failing must not
// take the trainer down with it.
template <typename Function>
auto Guarded(const std::string& what, const std::string& model_dir, Function&& function) -> decltype(function()) {
  try {
    return function();
  } catch (const std::exception& error) {
    return absl::InternalError(absl::StrCat(what, " on ", model_dir, " failed: ", error.what()));
  }
}

// Where a data-parallel session's workers come from.
struct WorkerLaunch {
  std::string program;  // empty: this process's own binary
  int intra_op_threads = 0;
};

class TorchSession final : public CalibrationSession {
 public:
  static absl::StatusOr<std::unique_ptr<CalibrationSession>> Open(const ModelOptions& options,
                                                                  const CalibrationJobInputs& inputs,
                                                                  WorkerLaunch launch) {
    auto session = std::unique_ptr<TorchSession>(new TorchSession(inputs, std::move(launch)));
    LYCHEE_ASSIGN_OR_RETURN(session->tokenizer_, Tokenizer::FromFile(inputs.model_dir + "/tokenizer.json"));
    LYCHEE_ASSIGN_OR_RETURN(session->corpus_, ReadTextCorpus(inputs.corpus_path));
    LYCHEE_ASSIGN_OR_RETURN(session->model_, Model::Load(inputs.model_dir, options));
    return std::unique_ptr<CalibrationSession>(std::move(session));
  }

  absl::StatusOr<HeadPartition> Calibrate(const CalibrationConfig& config, const ProgressCallback& on_progress,
                                          const std::atomic<bool>& cancelled) override {
    return Guarded("calibration", inputs_.model_dir, [&]() -> absl::StatusOr<HeadPartition> {
      if (inputs_.data_parallel == 1) {
        return RunCalibration(*model_, *tokenizer_, corpus_, config, on_progress, cancelled);
      }
      return CalibrateOnRanks(config, on_progress, cancelled);
    });
  }

  absl::StatusOr<PartitionValidation> Validate(const HeadPartition& partition,
                                               const std::atomic<bool>& cancelled) override {
    if (!inputs_.sweep) return absl::FailedPreconditionError("this job is no sweep: it has no validation prompts");
    return Guarded("validation", inputs_.model_dir, [&]() -> absl::StatusOr<PartitionValidation> {
      // Built on first use, then the same prompts for every target.
      if (!validation_set_) {
        const SweepInputs& sweep = *inputs_.sweep;
        if (!sweep.prompts_path.empty()) {
          LYCHEE_ASSIGN_OR_RETURN(validation_set_, ValidationSet::LoadPromptsFile(*tokenizer_, sweep.prompts_path));
        } else {
          LYCHEE_ASSIGN_OR_RETURN(std::string heldout, ReadTextCorpus(sweep.heldout_corpus_path));
          LYCHEE_ASSIGN_OR_RETURN(validation_set_,
                                  ValidationSet::Generate(*tokenizer_, std::move(heldout), sweep.generated));
        }
      }
      return ValidatePartition(*model_, *validation_set_, partition, inputs_.sweep->validation, &cancelled);
    });
  }

 private:
  TorchSession(CalibrationJobInputs inputs, WorkerLaunch launch)
      : inputs_(std::move(inputs)), launch_(std::move(launch)) {}

  // Rank 0 of inputs_.data_parallel, with the workers started for this calibration alone: between
  // a sweep's targets rank 0 validates by itself, longer than a worker would wait in a collective.
  // Progress, and whatever the job does with the partition, are rank 0's alone. Every rank starts
  // from the same gates (the config's seed decides them; a job always starts at step 0).
  absl::StatusOr<HeadPartition> CalibrateOnRanks(const CalibrationConfig& config, const ProgressCallback& on_progress,
                                                 const std::atomic<bool>& cancelled) {
    const int world_size = inputs_.data_parallel;
    internal::CalibrationWorkerJob job;
    job.set_model_dir(inputs_.model_dir);
    job.set_corpus_path(inputs_.corpus_path);
    *job.mutable_config() = CalibrationConfigToProto(config);
    job.set_intra_op_threads(launch_.intra_op_threads);
    job.set_world_size(world_size);
    job.set_device(model_->options().device.is_cuda() ? "cuda" : "cpu");
    const RankDevice device = RankDeviceNamed(job.device());
    LYCHEE_ASSIGN_OR_RETURN(const std::unique_ptr<WorkerJobFile> job_file, WorkerJobFile::Write(job));
    std::string program = launch_.program;
    if (program.empty()) {
      LYCHEE_ASSIGN_OR_RETURN(program, SelfExecutable());
    }
    LYCHEE_ASSIGN_OR_RETURN(const std::unique_ptr<RankWorkers> workers,
                            RankWorkers::Start(program, {absl::StrCat("--", kCalibrationWorkerFlag), job_file->path()},
                                               world_size, "data-parallel", device));
    std::vector<std::string> pids;
    for (int rank = 1; rank < world_size; ++rank) pids.push_back(std::to_string(workers->pid(rank)));
    LOG(INFO) << "trainer: data-parallel calibration on " << inputs_.model_dir << ", ranks 1.." << world_size - 1
              << " as processes " << absl::StrJoin(pids, ", ");
    absl::StatusOr<std::shared_ptr<TensorParallelGroup>> group =
        JoinRankGroup(device, workers->rendezvous_file(), /*rank=*/0, world_size);
    if (!group.ok()) return NameLostRank(*workers, group.status());
    absl::StatusOr<HeadPartition> partition =
        RunCalibration(*model_, *tokenizer_, corpus_, config, on_progress, cancelled, group->get());
    // Cancelled: rank 0 joins no more collectives, and `workers` kills the workers waiting in one.
    if (partition.status().code() == absl::StatusCode::kCancelled) return partition;
    if (!partition.ok()) return NameLostRank(*workers, partition.status());
    LYCHEE_RETURN_IF_ERROR(workers->Wait());
    return partition;
  }

  const CalibrationJobInputs inputs_;
  const WorkerLaunch launch_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::string corpus_;
  std::unique_ptr<Model> model_;
  std::optional<ValidationSet> validation_set_;
};

}  // namespace

absl::StatusOr<CalibrationRunner> MakeCalibrationRunner(const std::string& device, int intra_op_threads,
                                                        std::string worker_program) {
  if (intra_op_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--threads must be >= 0, got ", intra_op_threads));
  }
  LYCHEE_ASSIGN_OR_RETURN(ModelOptions options, ModelOptionsForDevice(device));
  const WorkerLaunch launch{std::move(worker_program), intra_op_threads};
  return CalibrationRunner(
      [options, launch](const CalibrationJobInputs& inputs) -> absl::StatusOr<std::unique_ptr<CalibrationSession>> {
        // With OpenMP the thread count belongs to the calling thread: it is set on the worker
        // that runs the job, which is the one that opens its session and runs it.
        if (launch.intra_op_threads > 0) at::set_num_threads(launch.intra_op_threads);
        return Guarded("loading the model", inputs.model_dir,
                       [&] { return TorchSession::Open(options, inputs, launch); });
      });
}

absl::Status RunCalibrationWorker(const std::string& job_file, int rank, const std::string& rendezvous_file) {
  LYCHEE_ASSIGN_OR_RETURN(const std::string text, ReadDurableFile(job_file));
  internal::CalibrationWorkerJob job;
  if (!google::protobuf::TextFormat::ParseFromString(text, &job)) {
    return absl::InvalidArgumentError(absl::StrCat("calibration worker: ", job_file, " is no calibration worker job"));
  }
  if (job.intra_op_threads() > 0) at::set_num_threads(job.intra_op_threads());
  // The group first: a worker that fails to load the model then ends at once a group that rank 0
  // waits on, instead of leaving rank 0 to wait for a rank that never comes.
  LYCHEE_ASSIGN_OR_RETURN(const ModelOptions options, ModelOptionsForDevice(job.device()));
  LYCHEE_ASSIGN_OR_RETURN(const std::shared_ptr<TensorParallelGroup> group,
                          JoinRankGroup(RankDeviceNamed(job.device()), rendezvous_file, rank, job.world_size()));
  // This rank's partition is rank 0's; only whether every step went through matters here.
  const absl::StatusOr<HeadPartition> partition =
      Guarded("data-parallel calibration worker", job.model_dir(), [&]() -> absl::StatusOr<HeadPartition> {
        LYCHEE_ASSIGN_OR_RETURN(const std::unique_ptr<Tokenizer> tokenizer,
                                Tokenizer::FromFile(job.model_dir() + "/tokenizer.json"));
        LYCHEE_ASSIGN_OR_RETURN(const std::string corpus, ReadTextCorpus(job.corpus_path()));
        LYCHEE_ASSIGN_OR_RETURN(const std::unique_ptr<Model> model, Model::Load(job.model_dir(), options));
        const std::atomic<bool> never_cancelled{false};
        return RunCalibration(
            *model, *tokenizer, corpus, CalibrationConfigFromProto(job.config()), [](const CalibrationProgress&) {},
            never_cancelled, group.get());
      });
  return partition.status();
}

}  // namespace lychee
