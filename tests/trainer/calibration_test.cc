// The calibration core on the bundled model: the gated student, a short run, cancellation and
// bad configurations.
#include "tests/torch_catch.h"

#include <atomic>

#include "common/model.h"
#include "common/retrieval_tasks.h"
#include "common/tokenizer.h"
#include "kernels/dense_attention.h"
#include "trainer/calibration.h"
#include "trainer/gated_attention.h"

namespace lychee {
namespace {

const std::string kModelDir = "models/tiny-llama-retrieval";

struct Fixture {
  std::unique_ptr<Model> model = Model::Load(kModelDir).value();
  std::unique_ptr<Tokenizer> tokenizer = Tokenizer::FromFile(kModelDir + "/tokenizer.json").value();
  std::string corpus = ReadTextCorpus("data/corpus/calibration.txt.gz").value();
};

Fixture& Shared() {
  static Fixture fixture;
  return fixture;
}

CalibrationConfig Tiny() {
  CalibrationConfig config;
  config.steps = 3;
  config.min_context_tokens = 256;
  config.max_context_tokens = 384;
  config.passkeys_per_sample = 2;
  config.selection.token_budget = 512;
  config.seed = 5;
  return config;
}

TEST_CASE("the gated student equals the dense teacher when every gate is 1, or when sparse keeps all") {
  const Model& model = *Shared().model;
  std::vector<int32_t> ids(300);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(50 + (i * 91) % 5000);
  const DenseAttentionBackend dense;
  at::Tensor expected = model.HiddenStates(ids, dense, nullptr).value();
  const ModelConfig& c = model.config();
  for (auto [keep_ratio, gate] : {std::pair{0.3, 1.0}, std::pair{1.0, 0.0}}) {
    const GatedTrainingAttention student(SparseTrainingParams{keep_ratio, 16, 16});
    auto state = student.NewSequenceState();
    static_cast<GatedSequenceState&>(*state).gates = at::full({c.num_layers, c.num_kv_heads}, gate);
    at::Tensor actual = model.HiddenStates(ids, student, state.get()).value();
    CHECK((actual - expected).abs().max().item<double>() < 1e-4);
  }
  // Gates at 0 with a real sparse side do change the result.
  const GatedTrainingAttention student(SparseTrainingParams{0.1, 4, 4});
  auto state = student.NewSequenceState();
  static_cast<GatedSequenceState&>(*state).gates = at::zeros({c.num_layers, c.num_kv_heads});
  CHECK((model.HiddenStates(ids, student, state.get()).value() - expected).abs().max().item<double>() > 1e-3);
}

TEST_CASE("the student attends in chunks of query rows exactly as in one block") {
  const Model& model = *Shared().model;
  std::vector<int32_t> ids(200);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(70 + (i * 37) % 4000);
  const ModelConfig& c = model.config();
  const auto hidden = [&](int64_t chunk_score_elements) {
    const GatedTrainingAttention student(SparseTrainingParams{0.2, 8, 8, chunk_score_elements});
    auto state = student.NewSequenceState();
    static_cast<GatedSequenceState&>(*state).gates = at::full({c.num_layers, c.num_kv_heads}, 0.3);
    return model.HiddenStates(ids, student, state.get()).value();
  };
  // 7 query rows per chunk: chunks that do not divide the sequence, the last one short.
  at::Tensor chunked = hidden(c.num_attention_heads * 200 * 7);
  CHECK((chunked - hidden(int64_t{1} << 40)).abs().max().item<double>() < 1e-4);
}

TEST_CASE("recomputing each layer in the backward trains the same gates as keeping every layer") {
  const auto run = [](CalibrationConfig::Checkpointing checkpointing) {
    CalibrationConfig config = Tiny();
    config.activation_checkpointing = checkpointing;
    std::vector<double> losses;
    std::atomic<bool> cancelled{false};
    HeadPartition partition = RunCalibration(*Shared().model, *Shared().tokenizer, Shared().corpus, config,
                                             [&](const CalibrationProgress& p) { losses.push_back(p.loss); }, cancelled)
                                  .value();
    return std::pair{partition, losses};
  };
  const auto [kept, kept_losses] = run(CalibrationConfig::Checkpointing::kOff);
  const auto [recomputed, recomputed_losses] = run(CalibrationConfig::Checkpointing::kOn);
  REQUIRE(kept_losses.size() == recomputed_losses.size());
  for (size_t i = 0; i < kept_losses.size(); ++i) CHECK(recomputed_losses[i] == Approx(kept_losses[i]).epsilon(1e-5));
  REQUIRE(kept.gates.size() == recomputed.gates.size());
  for (size_t i = 0; i < kept.gates.size(); ++i) {
    CHECK(recomputed.gates[i].a == Approx(kept.gates[i].a).epsilon(1e-4));
    CHECK(recomputed.gates[i].b == Approx(kept.gates[i].b).epsilon(1e-4));
  }
}

TEST_CASE("a short calibration reports every step and exports a partition that fits the model") {
  std::vector<CalibrationProgress> seen;
  std::atomic<bool> cancelled{false};
  auto partition = RunCalibration(*Shared().model, *Shared().tokenizer, Shared().corpus, Tiny(),
                                  [&](const CalibrationProgress& p) { seen.push_back(p); }, cancelled);
  REQUIRE(partition.ok());
  CHECK(partition->ValidateFor(Shared().model->config()).ok());
  CHECK(partition->selection().token_budget == 512);
  const ModelConfig& c = Shared().model->config();
  CHECK(partition->gates.size() == static_cast<size_t>((c.num_layers - 1) * c.num_kv_heads));
  for (const HeadGateRecord& gate : partition->gates) {
    CHECK(partition->role(gate.layer, gate.kv_head) == (gate.kuma_mean > 0.5 ? HeadRole::kRetrieval : HeadRole::kSparse));
    CHECK(gate.a != 1.0);  // the optimizer moved every gate
  }
  REQUIRE(seen.size() == 3);
  for (size_t i = 0; i < seen.size(); ++i) {
    CHECK(seen[i].step == static_cast<int64_t>(i) + 1);
    CHECK(seen[i].total_steps == 3);
    CHECK(std::isfinite(seen[i].loss));
    CHECK(seen[i].expected_density > 0);
    CHECK(seen[i].tokens_per_second > 0);
  }
  CHECK(seen.back().eta_seconds == 0);
  CHECK(partition->training.steps == 3);
  CHECK(partition->training.target_density == Tiny().target_density);
}

TEST_CASE("cancellation takes effect within one step") {
  std::atomic<bool> cancelled{false};
  int steps = 0;
  CalibrationConfig config = Tiny();
  config.steps = 50;
  auto result = RunCalibration(*Shared().model, *Shared().tokenizer, Shared().corpus, config,
                               [&](const CalibrationProgress&) {
                                 if (++steps == 2) cancelled = true;
                               },
                               cancelled);
  CHECK(result.status().code() == absl::StatusCode::kCancelled);
  CHECK(steps == 2);
}

TEST_CASE("bad configurations name the field; a short corpus is a failed precondition") {
  const auto error = [](CalibrationConfig config) {
    std::atomic<bool> cancelled{false};
    return RunCalibration(*Shared().model, *Shared().tokenizer, Shared().corpus, config,
                          [](const CalibrationProgress&) {}, cancelled)
        .status();
  };
  CalibrationConfig config = Tiny();
  config.target_density = 0;
  CHECK_THAT(std::string(error(config).message()), Catch::Contains("target_density"));
  config = Tiny();
  config.target_density = 1.5;
  CHECK(error(config).code() == absl::StatusCode::kInvalidArgument);
  config = Tiny();
  config.steps = 0;
  CHECK_THAT(std::string(error(config).message()), Catch::Contains("steps"));
  config = Tiny();
  config.selection.token_budget = 32;
  CHECK_THAT(std::string(error(config).message()), Catch::Contains("below one block"));
  config = Tiny();
  config.max_context_tokens = 100;
  CHECK_THAT(std::string(error(config).message()), Catch::Contains("max_context_tokens"));

  std::atomic<bool> cancelled{false};
  auto short_corpus = RunCalibration(*Shared().model, *Shared().tokenizer, "Too short a corpus.", Tiny(),
                                     [](const CalibrationProgress&) {}, cancelled);
  CHECK(short_corpus.status().code() == absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace lychee
