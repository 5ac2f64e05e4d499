// What the trainer tests submit and run jobs against: the bundled model and corpora, and a
// calibration small enough for a test on two cores.
#pragma once

#include <cstdint>
#include <string>

#include "lychee/v1/trainer.pb.h"
#include "trainer/job_manager.h"

namespace lychee {
namespace testing {

// Job manager options over the bundled model (models/) and corpora (data/corpus/, from the source
// tree the tests run in), with `data_root` for the corpora a job names and the journal in
// `journal_dir`.
inline JobManagerOptions BundledJobOptions(const std::string& data_root, const std::string& journal_dir) {
  JobManagerOptions options;
  options.model_root = "models";
  options.data_root = data_root;
  options.default_corpus = "data/corpus/calibration.txt.gz";
  options.default_heldout_corpus = "data/corpus/persuasion.txt.gz";
  options.journal_dir = journal_dir;
  return options;
}

// A calibration of the bundled model of `steps` steps over samples of 256-384 tokens with 2
// pass keys each, target density 0.25, seed 5.
inline v1::SubmitCalibrationJobRequest SmallCalibrationJob(int64_t steps) {
  v1::SubmitCalibrationJobRequest request;
  request.set_model("tiny-llama-retrieval");
  v1::CalibrationConfig* config = request.mutable_config();
  config->set_steps(steps);
  config->set_target_density(0.25);
  config->set_min_context_tokens(256);
  config->set_max_context_tokens(384);
  config->set_passkeys_per_sample(2);
  config->set_token_budget(512);
  config->set_seed(5);
  return request;
}

}  // namespace testing
}  // namespace lychee
