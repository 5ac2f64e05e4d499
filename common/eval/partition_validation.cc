#include "common/eval/partition_validation.h"

#include <algorithm>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/base/head_partition.h"
#include "common/base/json_parse.h"
#include "common/base/status_macros.h"
#include "common/base/tokenizer.h"
#include "common/eval/evaluation.h"
#include "common/model/model.h"
#include "common/model/tensor_parallel.h"
#include "common/model/torch_errors.h"
#include "kernels/policy_backend.h"

namespace lychee {
namespace {

// The prompts file's text: up to this many prompts, so that a mistaken file (a corpus given for a
// prompts file) fails fast instead of being tokenized for minutes.
constexpr size_t kMaxPrompts = 100000;

absl::StatusOr<std::string> StringField(const nlohmann::json& object, const char* name, const std::string& where) {
  const auto it = object.find(name);
  if (it == object.end() || !it->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": \"", name, "\" must be a string"));
  }
  return it->get<std::string>();
}

ValidationSet::Task& TaskNamed(std::vector<ValidationSet::Task>& tasks, const std::string& name) {
  const auto it =
      std::find_if(tasks.begin(), tasks.end(), [&](const ValidationSet::Task& t) { return t.name == name; });
  if (it != tasks.end()) return *it;
  tasks.push_back({name, 0, {}});
  return tasks.back();
}

// KV bytes a decode step reads at a cache of `length` positions when retrieval heads read it all
// and sparse heads min(length, budget) positions (no partition: dense, every head reads it all).
double ComputedKvBytesPerToken(const Model& model, const HeadPartition* partition, int64_t budget, int64_t length) {
  const ModelConfig& config = model.config();
  int64_t positions = 0;
  for (int64_t layer = 0; layer < config.num_layers; ++layer) {
    for (int64_t head = 0; head < config.num_kv_heads; ++head) {
      const bool sparse = partition != nullptr && partition->role(layer, head) == HeadRole::kSparse;
      positions += sparse ? std::min(length, budget) : length;
    }
  }
  const int64_t bytes_per_position =
      2 * config.head_dim * static_cast<int64_t>(c10::elementSize(model.options().dtype));
  return static_cast<double>(positions * bytes_per_position);
}

// One policy's cells (one per task, in order) summed up.
ValidationResult Summarize(const Model& model, const ValidationSet& set, const std::vector<const EvalCell*>& cells,
                           const HeadPartition* partition, int64_t budget) {
  ValidationResult result;
  int64_t decode_steps = 0;
  double bytes = 0, dropped = 0;
  bool measured = true;
  for (const EvalCell* cell : cells) {
    result.tasks.push_back({cell->task, cell->samples, cell->correct, cell->accuracy});
    result.seconds += cell->seconds;
    measured = measured && cell->has_telemetry;
    decode_steps += cell->decode_steps;
    bytes += cell->kv_bytes_per_token * static_cast<double>(cell->decode_steps);
    if (cell->audited) {
      result.audited = true;
      // Every step audits the same (layer, query head) pairs, so steps weigh the per-cell means.
      dropped += cell->mean_dropped_mass * static_cast<double>(cell->decode_steps);
      result.max_dropped_mass = std::max(result.max_dropped_mass, cell->max_dropped_mass);
    }
  }
  if (measured && decode_steps > 0) {
    result.kv_bytes_measured = true;
    result.kv_bytes_per_token = bytes / static_cast<double>(decode_steps);
  } else {
    double samples = 0;
    for (const ValidationSet::Task& task : set.tasks()) {
      result.kv_bytes_per_token += static_cast<double>(task.samples.size()) *
                                   ComputedKvBytesPerToken(model, partition, budget, task.longest_prompt_tokens);
      samples += static_cast<double>(task.samples.size());
    }
    result.kv_bytes_per_token /= samples;
  }
  if (result.audited && decode_steps > 0) result.mean_dropped_mass = dropped / static_cast<double>(decode_steps);
  return result;
}

// Whether the validation is cancelled: under tensor parallelism rank 0's flag, broadcast, so that
// every rank stops before the same prompt and their collectives stay paired.
absl::StatusOr<bool> Cancelled(const Model& model, const std::atomic<bool>* cancelled) {
  const bool own = cancelled != nullptr && cancelled->load();
  const TensorParallelGroup* group = model.options().tensor_parallel.get();
  if (group == nullptr) return own;
  at::Tensor flag = at::full({1}, own ? 1 : 0, at::kByte);
  try {
    group->Broadcast(flag, /*root=*/0);
  } catch (const std::exception& error) {
    return StatusFromException(error, "validation: learning whether rank 0 cancelled it");
  }
  return flag.item<uint8_t>() != 0;
}

}  // namespace

absl::StatusOr<std::vector<ValidationPrompt>> ParseValidationPrompts(const std::string& json_lines,
                                                                     const std::string& source) {
  std::vector<ValidationPrompt> prompts;
  int line_number = 0;
  for (const std::string& line : std::vector<std::string>(absl::StrSplit(json_lines, '\n'))) {
    ++line_number;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = absl::StrCat(source, ":", line_number);
    if (prompts.size() == kMaxPrompts) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": more than ", kMaxPrompts, " prompts"));
    }
    absl::StatusOr<nlohmann::json> object = ParseJson(line);
    if (!object.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", object.status().message()));
    if (!object->is_object()) return absl::InvalidArgumentError(absl::StrCat(where, ": not a JSON object"));
    ValidationPrompt prompt;
    LYCHEE_ASSIGN_OR_RETURN(prompt.task, StringField(*object, "task", where));
    LYCHEE_ASSIGN_OR_RETURN(prompt.prompt, StringField(*object, "prompt", where));
    LYCHEE_ASSIGN_OR_RETURN(prompt.answer, StringField(*object, "answer", where));
    if (prompt.task.empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": \"task\" is empty"));
    if (prompt.prompt.empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": \"prompt\" is empty"));
    if (prompt.answer.empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": \"answer\" is empty"));
    prompts.push_back(std::move(prompt));
  }
  if (prompts.empty()) return absl::InvalidArgumentError(absl::StrCat(source, ": no prompts"));
  return prompts;
}

absl::StatusOr<ValidationSet> ValidationSet::Generate(const Tokenizer& tokenizer, std::string heldout_text,
                                                      const GeneratedValidationSpec& spec) {
  if (spec.tasks.empty()) return absl::InvalidArgumentError("validation tasks: at least one is needed");
  if (spec.samples_per_task <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("validation samples: must be > 0, got ", spec.samples_per_task));
  }
  std::vector<RetrievalTask> kinds;
  for (const std::string& name : spec.tasks) {
    absl::StatusOr<RetrievalTask> kind = ParseRetrievalTask(name);
    if (!kind.ok()) return absl::InvalidArgumentError(absl::StrCat("validation tasks: ", kind.status().message()));
    kinds.push_back(*kind);
  }
  LYCHEE_ASSIGN_OR_RETURN(const HaystackBuilder builder, HaystackBuilder::Create(tokenizer, std::move(heldout_text)));
  std::vector<Task> tasks;
  for (RetrievalTask kind : kinds) {
    Task& task = TaskNamed(tasks, RetrievalTaskName(kind));
    // Seeds as `lychee eval` takes them, so that its figures and a validation's agree.
    for (int64_t i = 0; i < spec.samples_per_task; ++i) {
      LYCHEE_ASSIGN_OR_RETURN(RetrievalSample sample,
                              builder.Build(kind, spec.context_tokens, spec.seed * 1000003 + static_cast<uint64_t>(i)));
      task.longest_prompt_tokens = std::max<int64_t>(task.longest_prompt_tokens, sample.prompt_ids.size());
      task.samples.push_back(std::move(sample));
    }
  }
  return ValidationSet(std::move(tasks));
}

absl::StatusOr<ValidationSet> ValidationSet::FromPrompts(const Tokenizer& tokenizer,
                                                         const std::vector<ValidationPrompt>& prompts) {
  if (prompts.empty()) return absl::InvalidArgumentError("validation prompts: none given");
  std::vector<Task> tasks;
  for (size_t i = 0; i < prompts.size(); ++i) {
    RetrievalSample sample;
    sample.prompt_text = prompts[i].prompt;
    sample.answer_text = prompts[i].answer;
    LYCHEE_ASSIGN_OR_RETURN(sample.prompt_ids, tokenizer.Encode(sample.prompt_text, /*add_special_tokens=*/false));
    absl::StatusOr<std::vector<int32_t>> answer =
        ContinuationIds(tokenizer, sample.prompt_text, sample.prompt_ids, sample.answer_text);
    if (!answer.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("validation prompt ", i + 1, ": ", answer.status().message()));
    }
    sample.answer_ids = *std::move(answer);
    Task& task = TaskNamed(tasks, prompts[i].task);
    task.longest_prompt_tokens = std::max<int64_t>(task.longest_prompt_tokens, sample.prompt_ids.size());
    task.samples.push_back(std::move(sample));
  }
  return ValidationSet(std::move(tasks));
}

absl::StatusOr<ValidationSet> ValidationSet::LoadPromptsFile(const Tokenizer& tokenizer, const std::string& path) {
  LYCHEE_ASSIGN_OR_RETURN(const std::string text, ReadTextCorpus(path));
  LYCHEE_ASSIGN_OR_RETURN(const std::vector<ValidationPrompt> prompts, ParseValidationPrompts(text, path));
  return FromPrompts(tokenizer, prompts);
}

absl::StatusOr<PartitionValidation> ValidatePartition(const Model& model, const ValidationSet& set,
                                                      const HeadPartition& partition, const ValidationOptions& options,
                                                      const std::atomic<bool>* cancelled) {
  const ModelConfig& config = model.config();
  LYCHEE_RETURN_IF_ERROR(partition.ValidateFor(config));
  if (options.token_budget < 0) {
    return absl::InvalidArgumentError(absl::StrCat("token_budget: must be >= 0, got ", options.token_budget));
  }
  const at::Device device = model.options().device;
  PolicySpec dense_spec = PolicySpec::Defaults(PolicyKind::kDense);
  dense_spec.audit = options.audit;
  PolicySpec hybrid_spec = PolicySpec::Defaults(PolicyKind::kLychee);
  const SelectionParams& selection = partition.selection();
  hybrid_spec.token_budget = options.token_budget > 0 ? options.token_budget : selection.token_budget;
  hybrid_spec.block_size = selection.block_size;
  hybrid_spec.sink_tokens = selection.sink_tokens;
  hybrid_spec.recent_tokens = selection.recent_tokens;
  hybrid_spec.audit = options.audit;
  LYCHEE_RETURN_IF_ERROR(hybrid_spec.Validate(config));
  // A rank's backends are of its shard, over its KV heads' roles.
  std::shared_ptr<const HeadPartition> shard = std::make_shared<const HeadPartition>(partition);
  if (const TensorParallelGroup* group = model.options().tensor_parallel.get(); group != nullptr) {
    LYCHEE_ASSIGN_OR_RETURN(HeadPartition rank_partition,
                            ShardHeadPartition(partition, group->rank(), group->world_size()));
    shard = std::make_shared<const HeadPartition>(std::move(rank_partition));
  }
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const AttentionBackend> dense,
                          MakePolicyBackend(dense_spec, model.shard_config(), nullptr, device));
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const AttentionBackend> hybrid,
                          MakePolicyBackend(hybrid_spec, model.shard_config(), shard, device));
  const std::vector<EvalPolicy> policies = {{"dense", dense_spec.Describe(), dense, true},
                                            {"partition", hybrid_spec.Describe(), hybrid, true}};
  std::vector<EvalGroup> groups;
  for (const ValidationSet::Task& task : set.tasks()) {
    groups.push_back({task.name, task.longest_prompt_tokens, static_cast<int64_t>(task.samples.size()),
                      [&task, &model, cancelled](int64_t i) -> absl::StatusOr<RetrievalSample> {
                        LYCHEE_ASSIGN_OR_RETURN(const bool stop, Cancelled(model, cancelled));
                        if (stop) {
                          return absl::CancelledError(
                              absl::StrCat("validation cancelled at ", task.name, " prompt ", i));
                        }
                        return task.samples[i];
                      }});
  }
  LYCHEE_ASSIGN_OR_RETURN(const std::vector<EvalCell> cells, EvaluateGroups(model, policies, groups, dense));
  std::vector<const EvalCell*> dense_cells, partition_cells;
  for (const EvalCell& cell : cells) (cell.policy == "dense" ? dense_cells : partition_cells).push_back(&cell);
  PartitionValidation validation;
  validation.token_budget = hybrid_spec.token_budget;
  validation.dense = Summarize(model, set, dense_cells, nullptr, hybrid_spec.token_budget);
  validation.partition = Summarize(model, set, partition_cells, &partition, hybrid_spec.token_budget);
  return validation;
}

bool WithinQualityBound(const ValidationResult& reference, const ValidationResult& candidate, double max_accuracy_drop,
                        std::string* why) {
  for (const TaskAccuracy& expected : reference.tasks) {
    const auto found = std::find_if(candidate.tasks.begin(), candidate.tasks.end(),
                                    [&](const TaskAccuracy& t) { return t.task == expected.task; });
    // Accuracies are ratios of small counts: 0.95 - 0.05 must admit 0.9.
    constexpr double kRounding = 1e-9;
    if (found == candidate.tasks.end() || found->accuracy < expected.accuracy - max_accuracy_drop - kRounding) {
      if (why != nullptr) {
        *why = found == candidate.tasks.end()
                   ? absl::StrCat(expected.task, ": not validated")
                   : absl::StrFormat("%s: accuracy %.3f against dense %.3f, more than %.3f below", expected.task,
                                     found->accuracy, expected.accuracy, max_accuracy_drop);
      }
      return false;
    }
  }
  return true;
}

}  // namespace lychee
