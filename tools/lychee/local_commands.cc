#include "tools/lychee/local_commands.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/base/status_macros.h"
#include "common/base/tokenizer.h"
#include "common/model/model.h"
#include "common/model/rank_workers.h"
#include "common/model/sampling.h"
#include "common/model/tensor_parallel.h"
#include "common/service/resource_paths.h"
#include "tools/lychee/args.h"
#include "tools/lychee/attention_args.h"

namespace lychee::cli {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Streams the generated text to `out` (and the ids with `print_ids`); null `out`: generates
// silently (a tensor-parallel rank other than 0, which must take the same steps).
absl::Status GenerateAndPrint(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                              const Tokenizer& tokenizer, const std::vector<int32_t>& prompt_ids,
                              GenerationOptions options, std::ostream* out, bool print_ids) {
  for (int64_t eos : model.config().eos_token_ids) options.stop_ids.push_back(static_cast<int32_t>(eos));
  auto sequence = model.NewSequence(std::move(attention));
  IncrementalDecoder decoder(tokenizer, /*skip_special_tokens=*/true);
  std::vector<int32_t> generated;
  absl::Status stream_status;
  LYCHEE_ASSIGN_OR_RETURN(StopReason reason, Generate(model, *sequence, prompt_ids, options, [&](int32_t id) {
                            generated.push_back(id);
                            if (out == nullptr) return true;
                            auto text = decoder.Push(id);
                            if (!text.ok()) {
                              stream_status = text.status();
                              return false;
                            }
                            *out << *text << std::flush;
                            return true;
                          }));
  LYCHEE_RETURN_IF_ERROR(stream_status);
  (void)reason;
  if (out == nullptr) return absl::OkStatus();
  *out << decoder.Flush() << "\n";
  if (print_ids) *out << absl::StrJoin(generated, " ") << "\n";
  return absl::OkStatus();
}

}  // namespace

absl::Status RunTokenize(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(Args args, Args::Parse(argv, {"tokenizer"}, {"no-special-tokens"}));
  LYCHEE_ASSIGN_OR_RETURN(const std::string path,
                          args.GetOrResource("tokenizer", absl::StrCat(kBundledModelPath, "/tokenizer.json")));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromFile(path));
  const std::string text(std::istreambuf_iterator<char>(std::cin), {});
  LYCHEE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer->Encode(text, !args.Has("no-special-tokens")));
  std::cout << absl::StrJoin(ids, " ") << "\n";
  return absl::OkStatus();
}

absl::Status RunGenerate(const std::vector<std::string>& argv) {
  std::set<std::string> valued = {"model",
                                  "prompt",
                                  "prompt-file",
                                  "max-new-tokens",
                                  "temperature",
                                  "top-p",
                                  "seed",
                                  "device",
                                  "tensor-parallel",
                                  kTensorParallelRankFlag,
                                  kTensorParallelRendezvousFlag};
  valued.insert(PolicyValuedFlags().begin(), PolicyValuedFlags().end());
  // generate prints no telemetry, so an audit would measure what nobody sees.
  valued.erase("audit-every");
  LYCHEE_ASSIGN_OR_RETURN(Args args, Args::Parse(argv, valued, {"print-ids"}));
  LYCHEE_ASSIGN_OR_RETURN(const std::string model_dir, args.GetOrResource("model", kBundledModelPath));
  if (args.Has("prompt") == args.Has("prompt-file")) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT and --prompt-file FILE");
  }
  std::string prompt;
  if (args.Has("prompt")) {
    prompt = *args.Get("prompt");
  } else {
    LYCHEE_ASSIGN_OR_RETURN(prompt, ReadFile(*args.Get("prompt-file")));
  }
  GenerationOptions options;
  LYCHEE_ASSIGN_OR_RETURN(options.max_new_tokens, args.GetInt("max-new-tokens", 64));
  LYCHEE_ASSIGN_OR_RETURN(options.sampling.temperature, args.GetDouble("temperature", 0.0));
  LYCHEE_ASSIGN_OR_RETURN(options.sampling.top_p, args.GetDouble("top-p", 1.0));
  LYCHEE_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
  options.sampling.seed = static_cast<uint64_t>(seed);
  LYCHEE_RETURN_IF_ERROR(options.sampling.Validate());
  if (options.max_new_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("--max-new-tokens must be > 0, got ", options.max_new_tokens));
  }
  LYCHEE_ASSIGN_OR_RETURN(ModelOptions model_options, ModelOptionsForDevice(args.GetOr("device", "cpu")));
  LYCHEE_ASSIGN_OR_RETURN(int64_t tensor_parallel, args.GetInt("tensor-parallel", 1));

  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromFile(model_dir + "/tokenizer.json"));
  LYCHEE_ASSIGN_OR_RETURN(std::vector<int32_t> prompt_ids, tokenizer->Encode(prompt));
  if (prompt_ids.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  if (tensor_parallel == 1) {
    LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(model_dir, model_options));
    LYCHEE_ASSIGN_OR_RETURN(auto attention, AttentionFromArgs(args, model->config(), model->options().device));
    return GenerateAndPrint(*model, std::move(attention), *tokenizer, prompt_ids, options, &std::cout,
                            args.Has("print-ids"));
  }
  if (tensor_parallel < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tensor-parallel must be a positive rank count, got ", tensor_parallel));
  }
  // Checked before the ranks start, so that a bad count is one error rather than N.
  LYCHEE_ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::FromFile(model_dir + "/config.json"));
  LYCHEE_RETURN_IF_ERROR(ShardModelConfig(config, static_cast<int>(tensor_parallel)).status());
  const auto rank_work = [&](std::shared_ptr<TensorParallelGroup> group) -> absl::Status {
    const int rank = group->rank(), world_size = group->world_size();
    ModelOptions rank_options = model_options;
    rank_options.tensor_parallel = std::move(group);
    LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(model_dir, rank_options));
    LYCHEE_ASSIGN_OR_RETURN(auto attention, RankAttentionFromArgs(args, model->config(), model->shard_config(), rank,
                                                                  world_size, model->options().device));
    // Every rank decodes the same tokens (their logits are all-reduced); rank 0 prints them.
    return GenerateAndPrint(*model, std::move(attention), *tokenizer, prompt_ids, options,
                            rank == 0 ? &std::cout : nullptr, args.Has("print-ids"));
  };
  // A worker that rank 0 started with this command's flags carries its rank (RankWorkers).
  LYCHEE_ASSIGN_OR_RETURN(int64_t worker_rank, args.GetInt(kTensorParallelRankFlag, 0));
  std::vector<std::string> worker_args = {"generate"};
  worker_args.insert(worker_args.end(), argv.begin(), argv.end());
  return RunAsRank(RankDeviceNamed(model_options.device.str()), static_cast<int>(tensor_parallel),
                   static_cast<int>(worker_rank), args.GetOr(kTensorParallelRendezvousFlag, ""), worker_args,
                   rank_work);
}

}  // namespace lychee::cli
