// Time and memory of calibration steps (trainer/calibration.cc, the core a trainer job runs) at fixed
// context lengths: for each context and each activation-checkpointing mode, a short calibration whose
// samples all have that many tokens; prints seconds per step (median after the first step, which
// warms the allocator), tokens per second and, on CUDA, the peak of tensor memory allocated at once.
// A configuration that does not fit prints the error (out of memory) and the next one runs.
// --data-parallel N splits each step's --samples-per-step samples across N ranks, Gloo on cpu or NCCL on
// cuda with a GPU each (rank 0 here, the others this binary re-executed as workers), all-reducing the
// gate gradients.
//
//   calibration_bench --model DIR [--tokenizer FILE] [--corpus FILE] [--device cuda|cpu]
//                     [--contexts 2048,8192] [--checkpointing on,off] [--steps 4]
//                     [--samples-per-step 1] [--data-parallel N]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/median.h"
#include "common/base/retrieval_tasks.h"
#include "common/base/status_macros.h"
#include "common/base/tokenizer.h"
#include "common/model/cuda_support.h"
#include "common/model/model.h"
#include "common/model/rank_workers.h"
#include "common/model/tensor_parallel.h"
#include "common/service/command_line.h"
#include "common/service/rank_flags.h"
#include "common/service/resource_paths.h"
#include "trainer/calibration.h"

ABSL_FLAG(std::string, model, "", "model directory (config.json and safetensors)");
ABSL_FLAG(std::string, tokenizer, "", "tokenizer.json (default: the model directory's)");
ABSL_FLAG(std::string, corpus, lychee::ResourcePathOrEmpty(absl::StrCat(lychee::kCorpusDir, "/calibration.txt.gz")),
          "text the samples are built from (default: the bundled calibration corpus)");
ABSL_FLAG(std::string, device, "cuda", "cuda or cpu");
ABSL_FLAG(std::vector<std::string>, contexts, std::vector<std::string>({"2048", "8192"}), "sample lengths in tokens");
ABSL_FLAG(std::vector<std::string>, checkpointing, std::vector<std::string>({"on", "off"}),
          "activation checkpointing modes to run: on, off, auto");
ABSL_FLAG(int64_t, steps, 4, "calibration steps per configuration (at least 2)");
ABSL_FLAG(int64_t, samples_per_step, 1, "samples whose gradients each step averages (a multiple of the ranks)");
ABSL_FLAG(int64_t, data_parallel, 1,
          "ranks (processes) that split each step's samples, over Gloo (cpu) or NCCL (cuda, a GPU each)");

namespace lychee {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

absl::StatusOr<CalibrationConfig::Checkpointing> ParseCheckpointing(const std::string& name) {
  if (name == "on") return CalibrationConfig::Checkpointing::kOn;
  if (name == "off") return CalibrationConfig::Checkpointing::kOff;
  if (name == "auto") return CalibrationConfig::Checkpointing::kAuto;
  return absl::InvalidArgumentError(absl::StrCat("--checkpointing takes on, off or auto, got '", name, "'"));
}

// One short calibration: its line of the table, or the reason it could not run.
std::string MeasureRow(const Model& model, const Tokenizer& tokenizer, const std::string& corpus, int64_t context,
                       const std::string& checkpointing_name, CalibrationConfig::Checkpointing checkpointing,
                       const TensorParallelGroup* data_parallel) {
  CalibrationConfig config;
  config.steps = absl::GetFlag(FLAGS_steps);
  config.samples_per_step = absl::GetFlag(FLAGS_samples_per_step);
  config.min_context_tokens = context;
  config.max_context_tokens = context;
  config.activation_checkpointing = checkpointing;
  const std::string label = absl::StrCat(context, "\t", checkpointing_name, "\t");
  (void)ResetPeakCudaMemory();  // UNIMPLEMENTED on the CPU, where no peak is shown
  std::vector<double> step_seconds;
  auto last = std::chrono::steady_clock::now();
  std::atomic<bool> cancelled{false};
  absl::StatusOr<HeadPartition> partition;
  try {
    partition = RunCalibration(
        model, tokenizer, corpus, config,
        [&](const CalibrationProgress&) {
          const auto now = std::chrono::steady_clock::now();
          step_seconds.push_back(std::chrono::duration<double>(now - last).count());
          last = now;
        },
        cancelled, data_parallel);
  } catch (const std::exception& error) {
    const std::string what = error.what();
    return absl::StrCat(label, "failed: ", what.substr(0, what.find('\n')));
  }
  if (!partition.ok()) return absl::StrCat(label, "failed: ", partition.status().ToString());
  const double seconds = bench::Median(std::vector<double>(step_seconds.begin() + 1, step_seconds.end()));
  const absl::StatusOr<int64_t> peak = PeakCudaMemoryBytes();
  const double tokens = static_cast<double>(context * config.samples_per_step);
  return absl::StrCat(label, absl::StrFormat("%.2f\t%.0f\t", seconds, tokens / seconds),
                      peak.ok() ? absl::StrFormat("%.1f", *peak / kGiB) : "-");
}

// One rank's run (`data_parallel` null: the only one); rank 0 prints the table.
absl::Status Run(const TensorParallelGroup* data_parallel) {
  const bool print = data_parallel == nullptr || data_parallel->rank() == 0;
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  if (model_dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  if (absl::GetFlag(FLAGS_steps) < 2) return absl::InvalidArgumentError("--steps must be at least 2");
  std::vector<int64_t> contexts;
  for (const std::string& text : absl::GetFlag(FLAGS_contexts)) {
    int64_t context = 0;
    if (!absl::SimpleAtoi(text, &context) || context < 64) {
      return absl::InvalidArgumentError(absl::StrCat("--contexts takes lengths of at least 64 tokens, got '", text, "'"));
    }
    contexts.push_back(context);
  }
  std::vector<std::pair<std::string, CalibrationConfig::Checkpointing>> modes;
  for (const std::string& name : absl::GetFlag(FLAGS_checkpointing)) {
    LYCHEE_ASSIGN_OR_RETURN(CalibrationConfig::Checkpointing mode, ParseCheckpointing(name));
    modes.emplace_back(name, mode);
  }
  LYCHEE_ASSIGN_OR_RETURN(ModelOptions options, ModelOptionsForDevice(absl::GetFlag(FLAGS_device)));
  const std::string tokenizer_path =
      absl::GetFlag(FLAGS_tokenizer).empty() ? model_dir + "/tokenizer.json" : absl::GetFlag(FLAGS_tokenizer);
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromFile(tokenizer_path));
  LYCHEE_ASSIGN_OR_RETURN(const std::string corpus_path, RequireFlagPath(absl::GetFlag(FLAGS_corpus), "--corpus"));
  LYCHEE_ASSIGN_OR_RETURN(std::string corpus, ReadTextCorpus(corpus_path));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(model_dir, options));
  const ModelConfig& shape = model->config();
  if (print) {
    std::printf("# %s on %s: %lld layers, %lld heads, %lld KV heads, hidden %lld; %lld steps per row\n",
                model_dir.c_str(), absl::GetFlag(FLAGS_device).c_str(), static_cast<long long>(shape.num_layers),
                static_cast<long long>(shape.num_attention_heads), static_cast<long long>(shape.num_kv_heads),
                static_cast<long long>(shape.hidden_size), static_cast<long long>(absl::GetFlag(FLAGS_steps)));
    std::printf("# %lld sample(s) per step over %d rank(s)\n",
                static_cast<long long>(absl::GetFlag(FLAGS_samples_per_step)),
                data_parallel == nullptr ? 1 : data_parallel->world_size());
    std::printf("context\tcheckpointing\ts/step\ttokens/s\tpeak GiB\n");
  }
  for (int64_t context : contexts) {
    for (const auto& [name, mode] : modes) {
      const std::string row = MeasureRow(*model, *tokenizer, corpus, context, name, mode, data_parallel);
      if (print) std::printf("%s\n", row.c_str());
      std::fflush(stdout);
    }
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace lychee

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Seconds per step and peak GPU memory of calibration at fixed contexts");
  if (const absl::Status parsed = lychee::ParseFlags(argc, argv, __FILE__); !parsed.ok()) {
    std::fprintf(stderr, "calibration_bench: %s\n", parsed.ToString().c_str());
    return 1;
  }
  const int64_t data_parallel = absl::GetFlag(FLAGS_data_parallel);
  absl::Status status;
  if (data_parallel < 1) {
    status =
        absl::InvalidArgumentError(absl::StrCat("--data-parallel must be a positive rank count, got ", data_parallel));
  } else {
    const lychee::WorkerRankFlags worker = lychee::WorkerRankFromFlags();
    status =
        lychee::RunAsRank(lychee::RankDeviceNamed(absl::GetFlag(FLAGS_device)), static_cast<int>(data_parallel),
                          worker.rank, worker.rendezvous_file, std::vector<std::string>(argv + 1, argv + argc),
                          [](std::shared_ptr<lychee::TensorParallelGroup> group) { return lychee::Run(group.get()); });
  }
  if (!status.ok()) {
    std::fprintf(stderr, "calibration_bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
