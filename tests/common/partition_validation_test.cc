// The partition validator on the bundled model: a partition that attends like dense scores like
// dense, one without its retrieval heads scores lower; operator prompts files; the quality bound.
#include "tests/torch_catch.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "common/base/head_partition.h"
#include "common/base/tokenizer.h"
#include "common/eval/partition_validation.h"
#include "common/model/model.h"
#include "harness/temp_dir.h"

namespace lychee {
namespace {

constexpr int64_t kContext = 512;
// Far below the context, so that a sparse head attends to a small share of it.
constexpr int64_t kBudget = 128;

struct Fixture {
  std::unique_ptr<Model> model = Model::Load("models/tiny-llama-retrieval").value();
  std::unique_ptr<Tokenizer> tokenizer = Tokenizer::FromFile("models/tiny-llama-retrieval/tokenizer.json").value();
  // The head of the held-out text: enough windows for these contexts, quick to tokenize.
  std::string heldout = ReadTextCorpus("data/corpus/kjv-heldout.txt.gz").value().substr(0, 120000);

  ValidationSet Generated(int64_t samples, int64_t context = kContext) const {
    GeneratedValidationSpec spec;
    spec.context_tokens = context;
    spec.samples_per_task = samples;
    spec.seed = 3;
    return ValidationSet::Generate(*tokenizer, heldout, spec).value();
  }
  HeadPartition Partition(const std::vector<std::pair<int, int>>& retrieval_outside_layer0) const {
    SelectionParams selection;
    selection.block_size = 16;
    selection.token_budget = kBudget;
    selection.sink_tokens = 16;
    selection.recent_tokens = 32;
    HeadPartition partition = HeadPartition::AllRetrieval(6, 2, selection);
    for (int layer = 1; layer < 6; ++layer) {
      for (int head = 0; head < 2; ++head) partition.set_role(layer, head, HeadRole::kSparse);
    }
    for (const auto& [layer, head] : retrieval_outside_layer0) partition.set_role(layer, head, HeadRole::kRetrieval);
    return partition;
  }
};

double AccuracyOf(const ValidationResult& result, const std::string& task) {
  for (const TaskAccuracy& accuracy : result.tasks) {
    if (accuracy.task == task) return accuracy.accuracy;
  }
  FAIL("no task " << task);
  return -1;
}

TEST_CASE("a partition that attends like dense scores like dense; one without retrieval heads scores lower") {
  Fixture f;
  const ValidationSet set = f.Generated(6);
  REQUIRE(set.tasks().size() == 2);
  CHECK(set.tasks()[0].name == "passkey");
  CHECK(set.tasks()[1].name == "multikey");

  // Every head a retrieval head and a budget over the whole context: hybrid decoding is dense.
  HeadPartition whole = HeadPartition::AllRetrieval(6, 2, SelectionParams{});
  ValidationOptions options;
  options.token_budget = 2048;
  const PartitionValidation same = ValidatePartition(*f.model, set, whole, options).value();
  CHECK(same.token_budget == 2048);
  for (const char* task : {"passkey", "multikey"}) {
    INFO(task);
    CHECK(AccuracyOf(same.partition, task) == AccuracyOf(same.dense, task));
  }
  CHECK(AccuracyOf(same.dense, "passkey") >= 0.75);  // the model retrieves at this length
  CHECK(same.dense.kv_bytes_measured);
  CHECK(same.partition.kv_bytes_per_token == Approx(same.dense.kv_bytes_per_token).epsilon(0.01));
  CHECK(WithinQualityBound(same.dense, same.partition, 0.0));

  // No retrieval head outside layer 0: every sparse head reuses layer 0's selection of 128 tokens.
  const PartitionValidation broken = ValidatePartition(*f.model, set, f.Partition({}), {}).value();
  CHECK(broken.token_budget == kBudget);
  CHECK(broken.dense.tasks[0].correct == same.dense.tasks[0].correct);  // the same prompts
  const double dense_total = AccuracyOf(broken.dense, "passkey") + AccuracyOf(broken.dense, "multikey");
  const double broken_total = AccuracyOf(broken.partition, "passkey") + AccuracyOf(broken.partition, "multikey");
  CHECK(broken_total <= dense_total - 0.5);
  CHECK(broken.partition.kv_bytes_per_token < 0.5 * broken.dense.kv_bytes_per_token);
  std::string why;
  CHECK_FALSE(WithinQualityBound(broken.dense, broken.partition, 0.05, &why));
  CHECK_THAT(why, Catch::Contains("against dense"));

  // The learned partition's retrieval head (layer 3, KV head 0) alone brings most of it back.
  const PartitionValidation learned = ValidatePartition(*f.model, set, f.Partition({{3, 0}}), {}).value();
  const double learned_total = AccuracyOf(learned.partition, "passkey") + AccuracyOf(learned.partition, "multikey");
  CHECK(learned_total > broken_total);
}

TEST_CASE("an audit measures the attention mass a partition drops") {
  Fixture f;
  const ValidationSet set = f.Generated(2, 512);
  ValidationOptions options;
  options.audit = true;
  const PartitionValidation broken = ValidatePartition(*f.model, set, f.Partition({}), options).value();
  CHECK(broken.dense.audited);
  CHECK(broken.dense.max_dropped_mass == 0);
  CHECK(broken.partition.audited);
  CHECK(broken.partition.mean_dropped_mass > 0);
  CHECK(broken.partition.max_dropped_mass >= broken.partition.mean_dropped_mass);
  CHECK(broken.partition.max_dropped_mass <= 1);
  const PartitionValidation unaudited = ValidatePartition(*f.model, set, f.Partition({}), {}).value();
  CHECK_FALSE(unaudited.partition.audited);
}

TEST_CASE("an operator's prompts file validates like the prompts it was written from") {
  Fixture f;
  const ValidationSet generated = f.Generated(3, 512);
  testing::TempDir dir;
  const std::string path = (dir.path / "prompts.jsonl").string();
  {
    std::ofstream out(path);
    for (const ValidationSet::Task& task : generated.tasks()) {
      for (const RetrievalSample& sample : task.samples) {
        out << nlohmann::json{{"task", task.name}, {"prompt", sample.prompt_text}, {"answer", sample.answer_text}}
                   .dump()
            << "\n\n";
      }
    }
  }
  const ValidationSet loaded = ValidationSet::LoadPromptsFile(*f.tokenizer, path).value();
  REQUIRE(loaded.tasks().size() == 2);
  for (size_t t = 0; t < 2; ++t) {
    REQUIRE(loaded.tasks()[t].samples.size() == 3);
    CHECK(loaded.tasks()[t].longest_prompt_tokens == generated.tasks()[t].longest_prompt_tokens);
    for (size_t i = 0; i < 3; ++i) {
      CHECK(loaded.tasks()[t].samples[i].prompt_ids == generated.tasks()[t].samples[i].prompt_ids);
      CHECK(loaded.tasks()[t].samples[i].answer_ids == generated.tasks()[t].samples[i].answer_ids);
    }
  }
  const HeadPartition partition = f.Partition({{3, 0}});
  const PartitionValidation from_file = ValidatePartition(*f.model, loaded, partition, {}).value();
  const PartitionValidation from_spec = ValidatePartition(*f.model, generated, partition, {}).value();
  for (size_t t = 0; t < 2; ++t) {
    CHECK(from_file.partition.tasks[t].correct == from_spec.partition.tasks[t].correct);
    CHECK(from_file.dense.tasks[t].correct == from_spec.dense.tasks[t].correct);
  }
}

TEST_CASE("a prompts file with a bad line is INVALID_ARGUMENT naming the line") {
  const struct {
    std::string text;
    std::string message;
  } cases[] = {
      {"{\"task\": \"t\", \"prompt\": \"p\", \"answer\": \" a\"}\n{\"task\": \"t\"", "f.jsonl:2: "},
      {"\n[1, 2]", "f.jsonl:2: not a JSON object"},
      {"{\"task\": \"t\", \"prompt\": 3, \"answer\": \" a\"}", "f.jsonl:1: \"prompt\" must be a string"},
      {"{\"prompt\": \"p\", \"answer\": \" a\"}", "f.jsonl:1: \"task\" must be a string"},
      {"{\"task\": \"t\", \"prompt\": \"p\", \"answer\": \"\"}", "f.jsonl:1: \"answer\" is empty"},
      {"\n \n", "f.jsonl: no prompts"},
  };
  for (const auto& c : cases) {
    INFO(c.text);
    const absl::Status status = ParseValidationPrompts(c.text, "f.jsonl").status();
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(status.message()), Catch::Contains(c.message));
  }
  const auto prompts =
      ParseValidationPrompts("{\"task\": \"t\", \"prompt\": \"p\", \"answer\": \" a\"}\r\n", "f").value();
  REQUIRE(prompts.size() == 1);
  CHECK(prompts[0].answer == " a");
}

TEST_CASE("the quality bound holds every task to dense minus the bound") {
  ValidationResult dense, candidate;
  dense.tasks = {{"passkey", 20, 19, 0.95}, {"multikey", 20, 18, 0.9}};
  candidate.tasks = {{"passkey", 20, 18, 0.9}, {"multikey", 20, 18, 0.9}};
  CHECK(WithinQualityBound(dense, candidate, 0.05));
  std::string why;
  CHECK_FALSE(WithinQualityBound(dense, candidate, 0.04, &why));
  CHECK(why == "passkey: accuracy 0.900 against dense 0.950, more than 0.040 below");
  candidate.tasks.pop_back();
  CHECK_FALSE(WithinQualityBound(dense, candidate, 1, &why));
  CHECK(why == "multikey: not validated");
  // Better than dense always passes.
  candidate.tasks = {{"passkey", 20, 20, 1.0}, {"multikey", 20, 20, 1.0}};
  CHECK(WithinQualityBound(dense, candidate, 0));
}

}  // namespace
}  // namespace lychee
