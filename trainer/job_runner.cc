#include "trainer/job_runner.h"

#include <ATen/Parallel.h>

#include <exception>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/base/retrieval_tasks.h"
#include "common/base/status_macros.h"
#include "common/base/tokenizer.h"
#include "common/model/model.h"

namespace lychee {
namespace {

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

class TorchSession final : public CalibrationSession {
 public:
  static absl::StatusOr<std::unique_ptr<CalibrationSession>> Open(const ModelOptions& options,
                                                                  const CalibrationJobInputs& inputs) {
    auto session = std::unique_ptr<TorchSession>(new TorchSession(inputs));
    LYCHEE_ASSIGN_OR_RETURN(session->tokenizer_, Tokenizer::FromFile(inputs.model_dir + "/tokenizer.json"));
    LYCHEE_ASSIGN_OR_RETURN(session->corpus_, ReadTextCorpus(inputs.corpus_path));
    LYCHEE_ASSIGN_OR_RETURN(session->model_, Model::Load(inputs.model_dir, options));
    return std::unique_ptr<CalibrationSession>(std::move(session));
  }

  absl::StatusOr<HeadPartition> Calibrate(const CalibrationConfig& config, const ProgressCallback& on_progress,
                                          const std::atomic<bool>& cancelled) override {
    return Guarded("calibration", inputs_.model_dir,
                   [&] { return RunCalibration(*model_, *tokenizer_, corpus_, config, on_progress, cancelled); });
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
  explicit TorchSession(CalibrationJobInputs inputs) : inputs_(std::move(inputs)) {}

  const CalibrationJobInputs inputs_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::string corpus_;
  std::unique_ptr<Model> model_;
  std::optional<ValidationSet> validation_set_;
};

}  // namespace

absl::StatusOr<CalibrationRunner> MakeCalibrationRunner(const std::string& device, int intra_op_threads) {
  if (intra_op_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--threads must be >= 0, got ", intra_op_threads));
  }
  LYCHEE_ASSIGN_OR_RETURN(ModelOptions options, ModelOptionsForDevice(device));
  return CalibrationRunner(
      [options,
       intra_op_threads](const CalibrationJobInputs& inputs) -> absl::StatusOr<std::unique_ptr<CalibrationSession>> {
        // With OpenMP the thread count belongs to the calling thread: it is set on the worker
        // that runs the job, which is the one that opens its session and runs it.
        if (intra_op_threads > 0) at::set_num_threads(intra_op_threads);
        return Guarded("loading the model", inputs.model_dir, [&] { return TorchSession::Open(options, inputs); });
      });
}

}  // namespace lychee
