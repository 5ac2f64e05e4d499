// Validating a head partition against dense attention before it is served: a fixed set of
// retrieval prompts, decoded greedily with dense attention and with hybrid decoding over the
// partition at a token budget, gives per task the accuracy of each (greedy decoding must produce
// every answer token), the KV bytes read per decoded token, and with an audit the attention mass
// the partition drops against dense. The trainer's sweep jobs use it to choose a partition; the
// inference service can use it to check a partition before activating it (shadow validation).
// Free of LibTorch and of gRPC: the model comes in by reference, and common/eval/evaluation.h runs it.
//
// A validation set is either generated (pass-key and multi-key prompts of common/base/retrieval_tasks.h
// built from held-out text, at one context length, seeded), or an operator's prompts file in JSON
// lines, one object per line (blank lines ignored):
//   {"task": "passkey", "prompt": "... What is the pass key? The pass key is", "answer": " 12345."}
// `task` is any non-empty label the results are grouped by; `prompt` is tokenized without special
// tokens; `answer` is the exact text that must follow it (its leading space included).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/retrieval_tasks.h"

namespace lychee {

class HeadPartition;
class Model;
class Tokenizer;

struct GeneratedValidationSpec {
  // Task names as ParseRetrievalTask takes them.
  std::vector<std::string> tasks = {"passkey", "multikey"};
  int64_t context_tokens = 2048;
  int64_t samples_per_task = 20;
  uint64_t seed = 1;
};

struct ValidationPrompt {
  std::string task;
  std::string prompt;
  std::string answer;
};

// The prompts of a JSON-lines prompts file (the format above); INVALID_ARGUMENT naming the line
// (`source`:N) and what is wrong with it.
absl::StatusOr<std::vector<ValidationPrompt>> ParseValidationPrompts(const std::string& json_lines,
                                                                     const std::string& source);

// A fixed list of prompts with their expected answers, grouped by task; built once, validated
// against any number of partitions.
class ValidationSet {
 public:
  // `heldout_text` must hold context_tokens + 64 tokens at least (FAILED_PRECONDITION otherwise).
  static absl::StatusOr<ValidationSet> Generate(const Tokenizer& tokenizer, std::string heldout_text,
                                                const GeneratedValidationSpec& spec);
  static absl::StatusOr<ValidationSet> FromPrompts(const Tokenizer& tokenizer,
                                                   const std::vector<ValidationPrompt>& prompts);
  // A prompts file (plain, or gzip-compressed as .gz).
  static absl::StatusOr<ValidationSet> LoadPromptsFile(const Tokenizer& tokenizer, const std::string& path);

  struct Task {
    std::string name;
    int64_t longest_prompt_tokens = 0;
    std::vector<RetrievalSample> samples;
  };
  const std::vector<Task>& tasks() const { return tasks_; }
  // The set of another's tasks (a tensor-parallel rank validates the prompts rank 0 sends it).
  static ValidationSet FromTasks(std::vector<Task> tasks) { return ValidationSet(std::move(tasks)); }

 private:
  explicit ValidationSet(std::vector<Task> tasks) : tasks_(std::move(tasks)) {}
  std::vector<Task> tasks_;
};

struct ValidationOptions {
  // The most tokens a sparse head attends to; 0: the partition's own token_budget.
  int64_t token_budget = 0;
  // Computes dense scores at every step to measure the attention mass the partition drops (slow;
  // on CUDA it also moves decoding off the fused kernels onto the reference).
  bool audit = false;
};

struct TaskAccuracy {
  std::string task;
  int64_t samples = 0;
  int64_t correct = 0;
  double accuracy = 0;
};

struct ValidationResult {
  std::vector<TaskAccuracy> tasks;  // in the set's task order
  // KV bytes read per decoded token over every sample. Measured by the attention backend where it
  // keeps telemetry (the CPU reference, or any audited run); else (CUDA kernels) computed from the
  // roles: every retrieval head reads the whole prompt, every sparse head min(prompt, budget)
  // positions, at each task's longest prompt.
  double kv_bytes_per_token = 0;
  bool kv_bytes_measured = false;
  bool audited = false;
  double mean_dropped_mass = 0;  // over every audited (step, layer, query head)
  double max_dropped_mass = 0;
  double seconds = 0;  // decoding, the dense prefill both share left out
};

struct PartitionValidation {
  ValidationResult dense;
  ValidationResult partition;
  int64_t token_budget = 0;  // the budget the partition decoded with
};

// Runs every prompt of `set` densely and with hybrid decoding over `partition` (both from one dense
// prefill per prompt), on the model's device. The partition is checked against the model's shape
// first (INVALID_ARGUMENT). Returns CANCELLED before the next prompt once `cancelled` is true.
// Under tensor parallelism every rank calls it with the same set, partition and options, each
// decoding its shard (the partition whole: each rank takes its KV heads' roles); rank 0's
// `cancelled` decides for every rank (a broadcast before each prompt), and a lost rank is
// UNAVAILABLE.
absl::StatusOr<PartitionValidation> ValidatePartition(const Model& model, const ValidationSet& set,
                                                      const HeadPartition& partition, const ValidationOptions& options,
                                                      const std::atomic<bool>* cancelled = nullptr);

// Whether `candidate` keeps the accuracy of every task of `reference` within `max_accuracy_drop`
// (candidate >= reference - max_accuracy_drop); when not, `why` names the first task that fell
// further, with both accuracies.
bool WithinQualityBound(const ValidationResult& reference, const ValidationResult& candidate, double max_accuracy_drop,
                        std::string* why = nullptr);

}  // namespace lychee
