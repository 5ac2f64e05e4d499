// Prefill and decode throughput of the whole model at given context lengths (dense attention), in
// one process or across --tensor-parallel N ranks, Gloo on cpu or NCCL on cuda (rank 0 here, the others this binary
// re-executed as workers; every rank feeds the same tokens, rank 0 prints).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/base/heap_tuning.h"
#include "common/base/status_macros.h"
#include "common/model/model.h"
#include "common/model/rank_workers.h"
#include "common/model/tensor_parallel.h"
#include "common/service/command_line.h"
#include "common/service/rank_flags.h"
#include "common/service/resource_paths.h"
#include "kernels/dense_attention.h"

ABSL_FLAG(std::string, model, lychee::ResourcePathOrEmpty(lychee::kBundledModelPath),
          "the model directory (default the bundled one)");
ABSL_FLAG(std::string, device, "cpu", "cpu or cuda");
ABSL_FLAG(std::vector<std::string>, contexts, std::vector<std::string>({"2048", "8192"}),
          "prompt lengths in tokens, comma-separated");
ABSL_FLAG(int64_t, decode_tokens, 32, "tokens decoded after each prompt");
ABSL_FLAG(int64_t, threads, 0, "LibTorch intra-op threads (0: LibTorch's own default; BLAS threads are its own)");
ABSL_FLAG(int64_t, tensor_parallel, 1,
          "ranks (processes, each its shard of the weights) over Gloo (cpu) or NCCL (cuda, a GPU each)");

namespace {

constexpr char kUsage[] = "usage: model_bench [flags]";

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "model_bench: %s\n", message.c_str());
  return 1;
}

// Runs the benchmark on one rank (`group` null: the whole model in this process); rank 0 prints the
// table.
absl::Status Bench(const std::string& model_dir, const std::string& device, const std::vector<int64_t>& contexts,
                   int64_t decode_tokens, std::shared_ptr<lychee::TensorParallelGroup> group) {
  const bool print = group == nullptr || group->rank() == 0;
  lychee::ModelOptions options;
  if (device == "cuda") options = {at::Device(at::kCUDA, 0), at::kBFloat16};
  options.tensor_parallel = std::move(group);
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<lychee::Model> model, lychee::Model::Load(model_dir, options));
  auto attention = std::make_shared<lychee::DenseAttentionBackend>();
  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> token(3, static_cast<int32_t>(model->config().vocab_size) - 1);

  const int ranks = options.tensor_parallel == nullptr ? 1 : options.tensor_parallel->world_size();
  if (print) {
    std::printf("model %s, device %s, %d threads, %d rank(s)\n", model_dir.c_str(), device.c_str(),
                at::get_num_threads(), ranks);
    std::printf("%8s  %14s  %14s  %12s\n", "context", "prefill tok/s", "decode tok/s", "ms/token");
  }
  for (int64_t context : contexts) {
    std::vector<int32_t> prompt(context);
    for (int32_t& id : prompt) id = token(rng);
    auto sequence = model->NewSequence(attention);
    auto start = std::chrono::steady_clock::now();
    LYCHEE_ASSIGN_OR_RETURN(const at::Tensor logits, model->Prefill(*sequence, prompt));
    logits.max().item<float>();  // waits for the device
    const double prefill_seconds = Seconds(start);
    lychee::Sequence* const batch[] = {sequence.get()};
    start = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < decode_tokens; ++i) {
      const int32_t next[] = {token(rng)};
      LYCHEE_ASSIGN_OR_RETURN(const at::Tensor step, model->Decode(batch, next));
      step.max().item<float>();
    }
    const double decode_seconds = Seconds(start);
    if (print) {
      std::printf("%8lld  %14.0f  %14.1f  %12.2f\n", static_cast<long long>(context), context / prefill_seconds,
                  decode_tokens / decode_seconds, 1e3 * decode_seconds / decode_tokens);
    }
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  lychee::KeepFreedMemoryInHeap();
  absl::SetProgramUsageMessage(kUsage);
  if (const absl::Status parsed = lychee::ParseFlags(argc, argv, __FILE__); !parsed.ok()) {
    return Fail(std::string(parsed.message()));
  }
  const absl::StatusOr<std::string> model_dir = lychee::RequireFlagPath(absl::GetFlag(FLAGS_model), "--model");
  if (!model_dir.ok()) return Fail(std::string(model_dir.status().message()));
  const std::string device = absl::GetFlag(FLAGS_device);
  const int64_t decode_tokens = absl::GetFlag(FLAGS_decode_tokens);
  const int64_t threads = absl::GetFlag(FLAGS_threads);
  if (decode_tokens <= 0) return Fail(absl::StrCat("--decode-tokens must be positive, got ", decode_tokens));
  if (threads < 0) return Fail(absl::StrCat("--threads must not be negative, got ", threads));
  if (threads > 0) at::set_num_threads(static_cast<int>(threads));
  std::vector<int64_t> contexts;
  for (const std::string& text : absl::GetFlag(FLAGS_contexts)) {
    int64_t context;
    if (!absl::SimpleAtoi(text, &context) || context <= 0) return Fail("bad --contexts element '" + text + "'");
    contexts.push_back(context);
  }
  const int64_t tensor_parallel = absl::GetFlag(FLAGS_tensor_parallel);
  if (tensor_parallel < 1)
    return Fail(absl::StrCat("--tensor-parallel must be a positive rank count, got ", tensor_parallel));
  const lychee::WorkerRankFlags worker = lychee::WorkerRankFromFlags();
  const absl::Status status = lychee::RunAsRank(
      lychee::RankDeviceNamed(device), static_cast<int>(tensor_parallel), worker.rank, worker.rendezvous_file,
      std::vector<std::string>(argv + 1, argv + argc), [&](std::shared_ptr<lychee::TensorParallelGroup> group) {
        return Bench(*model_dir, device, contexts, decode_tokens, std::move(group));
      });
  if (!status.ok()) return Fail(status.ToString());
  return 0;
}
