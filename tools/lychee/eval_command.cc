#include "tools/lychee/eval_command.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/base/retrieval_tasks.h"
#include "common/base/status_macros.h"
#include "common/base/tokenizer.h"
#include "common/eval/evaluation.h"
#include "common/model/model.h"
#include "common/service/resource_paths.h"
#include "kernels/policy_backend.h"
#include "tools/lychee/args.h"
#include "tools/lychee/attention_args.h"

namespace lychee::cli {
namespace {

absl::Status WriteFile(const std::string& flag, const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  out.close();
  if (!out) return absl::UnavailableError(absl::StrCat("--", flag, ": cannot write ", path));
  return absl::OkStatus();
}

}  // namespace

absl::Status RunEval(const std::vector<std::string>& argv) {
  std::set<std::string> valued = {"model", "corpus", "tasks", "context", "samples", "seed", "device", "json", "plot"};
  valued.insert(PolicyValuedFlags().begin(), PolicyValuedFlags().end());
  std::set<std::string> switches = {"print-failures"};
  switches.insert(PolicySwitches().begin(), PolicySwitches().end());
  LYCHEE_ASSIGN_OR_RETURN(Args args, Args::Parse(argv, valued, switches));
  LYCHEE_ASSIGN_OR_RETURN(const std::string model_dir, args.GetOrResource("model", kBundledModelPath));
  LYCHEE_ASSIGN_OR_RETURN(int64_t samples, args.GetInt("samples", 40));
  LYCHEE_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 1));
  if (samples <= 0) return absl::InvalidArgumentError(absl::StrCat("--samples must be > 0, got ", samples));
  EvalOptions options;
  options.samples = samples;
  options.seed = static_cast<uint64_t>(seed);
  for (const std::string& name : std::vector<std::string>(absl::StrSplit(args.GetOr("tasks", "passkey,multikey"), ','))) {
    absl::StatusOr<RetrievalTask> task = ParseRetrievalTask(name);
    if (!task.ok()) return absl::InvalidArgumentError(absl::StrCat("--tasks: ", task.status().message()));
    options.tasks.push_back(*task);
  }
  for (const std::string& item : std::vector<std::string>(absl::StrSplit(args.GetOr("context", "4096"), ','))) {
    char* end = nullptr;
    const long long context = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || context <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("--context: '", item, "' is not a positive token count"));
    }
    options.contexts.push_back(context);
  }

  LYCHEE_ASSIGN_OR_RETURN(ModelOptions model_options, ModelOptionsForDevice(args.GetOr("device", "cpu")));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::FromFile(model_dir + "/tokenizer.json"));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(model_dir, model_options));
  const ModelConfig& config = model->config();
  const at::Device device = model->options().device;
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const HeadPartition> partition, PartitionFromArgs(args, config));
  LYCHEE_ASSIGN_OR_RETURN(std::vector<PolicySpec> specs, PolicySpecsFromArgs(args, config, partition.get()));
  std::vector<EvalPolicy> policies;
  for (const PolicySpec& spec : specs) {
    LYCHEE_ASSIGN_OR_RETURN(auto attention, MakePolicyBackend(spec, config, partition, device));
    policies.push_back({PolicyName(spec.kind), spec.Describe(), std::move(attention), !PolicyObservesPrefill(spec.kind)});
  }
  LYCHEE_ASSIGN_OR_RETURN(options.prefill_attention,
                          MakePolicyBackend(PolicySpec::Defaults(PolicyKind::kDense), config, nullptr, device));
  if (args.Has("print-failures")) {
    options.on_failure = [&](const std::string& policy, const std::string& task, int64_t index,
                             const RetrievalSample& sample, const std::vector<int32_t>& produced) {
      const std::string said = tokenizer->Decode(produced).value_or("<undecodable>");
      std::fprintf(stderr, "%s %s sample %lld: expected '%s', got '%s'\n", policy.c_str(), task.c_str(),
                   static_cast<long long>(index), sample.answer_text.c_str(), said.c_str());
    };
  }
  LYCHEE_ASSIGN_OR_RETURN(const std::string corpus_path,
                          args.GetOrResource("corpus", absl::StrCat(kCorpusDir, "/persuasion.txt.gz")));
  LYCHEE_ASSIGN_OR_RETURN(std::string corpus, ReadTextCorpus(corpus_path));
  LYCHEE_ASSIGN_OR_RETURN(HaystackBuilder builder, HaystackBuilder::Create(*tokenizer, std::move(corpus)));

  for (const EvalPolicy& policy : policies) std::printf("# %s\n", policy.description.c_str());
  std::printf("%s\n", EvalTableHeader().c_str());
  std::fflush(stdout);
  LYCHEE_ASSIGN_OR_RETURN(std::vector<EvalCell> cells,
                          RunEvaluation(*model, builder, policies, options, [](const EvalCell& cell) {
                            std::printf("%s\n", EvalTableRow(cell).c_str());
                            std::fflush(stdout);
                          }));
  if (args.Has("json")) {
    LYCHEE_RETURN_IF_ERROR(
        WriteFile("json", *args.Get("json"), EvalJson(cells, absl::StrCat("lychee eval ", absl::StrJoin(argv, " ")))));
  }
  if (args.Has("plot")) LYCHEE_RETURN_IF_ERROR(WriteFile("plot", *args.Get("plot"), EvalPlotSvg(cells)));
  return absl::OkStatus();
}

}  // namespace lychee::cli
