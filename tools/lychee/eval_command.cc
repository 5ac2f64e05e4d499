#include "tools/lychee/eval_command.h"

#include <chrono>
#include <cstdio>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/model.h"
#include "common/retrieval_tasks.h"
#include "common/status_macros.h"
#include "common/tokenizer.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#include "tools/lychee/args.h"
#include "tools/lychee/attention_args.h"

namespace lychee::cli {
namespace {

absl::StatusOr<RetrievalTask> ParseTask(const std::string& name) {
  if (name == "passkey") return RetrievalTask::kPasskey;
  if (name == "multikey") return RetrievalTask::kMultiKey;
  return absl::InvalidArgumentError(absl::StrCat("--tasks: unknown task '", name, "' (passkey, multikey)"));
}

// Greedy decoding of as many tokens as the answer has: the model answers right when they equal
// the answer's tokens.
absl::StatusOr<std::vector<int32_t>> GreedyAnswer(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                                  const RetrievalSample& sample) {
  auto sequence = model.NewSequence(std::move(attention));
  LYCHEE_ASSIGN_OR_RETURN(at::Tensor logits, model.Prefill(*sequence, sample.prompt_ids));
  Sequence* const batch[] = {sequence.get()};
  std::vector<int32_t> answer;
  while (true) {
    answer.push_back(static_cast<int32_t>(logits.argmax().item<int64_t>()));
    if (answer.size() == sample.answer_ids.size()) return answer;
    const int32_t next[] = {answer.back()};
    LYCHEE_ASSIGN_OR_RETURN(at::Tensor step, model.Decode(batch, next));
    logits = step[0];
  }
}

}  // namespace

absl::Status RunEval(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(Args args, Args::Parse(argv,
                                                 {"model", "corpus", "tasks", "context", "samples", "seed", "attention",
                                                  "partition", "budget", "random-partition", "partition-seed", "device"},
                                                 {"print-failures"}));
  const std::string model_dir = args.GetOr("model", LYCHEE_DEFAULT_MODEL_DIR);
  LYCHEE_ASSIGN_OR_RETURN(int64_t context, args.GetInt("context", 4096));
  LYCHEE_ASSIGN_OR_RETURN(int64_t samples, args.GetInt("samples", 40));
  LYCHEE_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 1));
  if (samples <= 0) return absl::InvalidArgumentError(absl::StrCat("--samples must be > 0, got ", samples));
  std::vector<RetrievalTask> tasks;
  std::vector<std::string> task_names = absl::StrSplit(args.GetOr("tasks", "passkey,multikey"), ',');
  for (const std::string& name : task_names) {
    LYCHEE_ASSIGN_OR_RETURN(RetrievalTask task, ParseTask(name));
    tasks.push_back(task);
  }
  LYCHEE_ASSIGN_OR_RETURN(ModelOptions model_options, ModelOptionsForDevice(args.GetOr("device", "cpu")));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromFile(model_dir + "/tokenizer.json"));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(model_dir, model_options));
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const AttentionBackend> attention, AttentionFromArgs(args, model->config(), model->options().device));
  LYCHEE_ASSIGN_OR_RETURN(std::string corpus,
                          ReadTextCorpus(args.GetOr("corpus", std::string(LYCHEE_SOURCE_DIR) + "/data/corpus/persuasion.txt.gz")));
  LYCHEE_ASSIGN_OR_RETURN(HaystackBuilder builder, HaystackBuilder::Create(*tokenizer, std::move(corpus)));

  std::printf("%-10s %8s %8s %9s %8s\n", "task", "context", "samples", "accuracy", "seconds");
  for (size_t t = 0; t < tasks.size(); ++t) {
    const auto start = std::chrono::steady_clock::now();
    int64_t correct = 0;
    for (int64_t i = 0; i < samples; ++i) {
      LYCHEE_ASSIGN_OR_RETURN(RetrievalSample sample,
                              builder.Build(tasks[t], context, static_cast<uint64_t>(seed * 1000003 + i)));
      LYCHEE_ASSIGN_OR_RETURN(std::vector<int32_t> answer, GreedyAnswer(*model, attention, sample));
      const bool right = answer == sample.answer_ids;
      correct += right;
      if (!right && args.Has("print-failures")) {
        LYCHEE_ASSIGN_OR_RETURN(std::string said, tokenizer->Decode(answer));
        std::fprintf(stderr, "%s sample %lld: expected '%s', got '%s'\n", task_names[t].c_str(),
                     static_cast<long long>(i), sample.answer_text.c_str(), said.c_str());
      }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%-10s %8lld %8lld %9.3f %8.1f\n", task_names[t].c_str(), static_cast<long long>(context),
                static_cast<long long>(samples), static_cast<double>(correct) / samples, seconds);
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

}  // namespace lychee::cli
