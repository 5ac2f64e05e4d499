#include "trainer/job_runner.h"

#include <ATen/Parallel.h>

#include <exception>

#include "absl/strings/str_cat.h"
#include "common/model.h"
#include "common/retrieval_tasks.h"
#include "common/status_macros.h"
#include "common/tokenizer.h"

namespace lychee {
namespace {

absl::StatusOr<HeadPartition> LoadAndCalibrate(const ModelOptions& options, int intra_op_threads,
                                               const CalibrationJobInputs& inputs, const ProgressCallback& on_progress,
                                               const std::atomic<bool>& cancelled) {
  // With OpenMP the thread count belongs to the calling thread: it is set on the worker that
  // runs the job.
  if (intra_op_threads > 0) at::set_num_threads(intra_op_threads);
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromFile(inputs.model_dir + "/tokenizer.json"));
  LYCHEE_ASSIGN_OR_RETURN(std::string corpus, ReadTextCorpus(inputs.corpus_path));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(inputs.model_dir, options));
  return RunCalibration(*model, *tokenizer, corpus, inputs.config, on_progress, cancelled);
}

}  // namespace

absl::StatusOr<CalibrationRunner> MakeCalibrationRunner(const std::string& device, int intra_op_threads) {
  if (intra_op_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--threads must be >= 0, got ", intra_op_threads));
  }
  LYCHEE_ASSIGN_OR_RETURN(ModelOptions options, ModelOptionsForDevice(device));
  return CalibrationRunner([options, intra_op_threads](const CalibrationJobInputs& inputs, const ProgressCallback& on_progress,
                                     const std::atomic<bool>& cancelled) -> absl::StatusOr<HeadPartition> {
    // LibTorch reports failures (out of memory, a device lost) by throwing; one job failing
    // must not take the trainer down with it.
    try {
      return LoadAndCalibrate(options, intra_op_threads, inputs, on_progress, cancelled);
    } catch (const std::exception& error) {
      return absl::InternalError(absl::StrCat("calibration on ", inputs.model_dir, " failed: ", error.what()));
    }
  });
}

}  // namespace lychee
