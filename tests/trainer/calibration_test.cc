// The calibration core on the bundled model: the gated student, a short run, the density held at its
// target and the deployed partition rounded down to whole heads, cancellation and bad configurations.
#include "tests/torch_catch.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/base/retrieval_tasks.h"
#include "common/base/tokenizer.h"
#include "common/model/model.h"
#include "kernels/dense_attention.h"
#include "lychee/v1/head_partition.pb.h"
#include "tests/trainer/tiny_calibration.h"
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

// The roles the trainer gives: the round-down of target x (gated heads) heads with the highest gate
// means are retrieval heads, every other gated head sparse.
void CheckRolesFollowMeans(const HeadPartition& partition, double target_density) {
  const size_t gated_heads = partition.gates.size();
  std::vector<double> retrieval_means, sparse_means;
  for (const HeadGateRecord& gate : partition.gates) {
    (partition.role(gate.layer, gate.kv_head) == HeadRole::kRetrieval ? retrieval_means : sparse_means)
        .push_back(gate.kuma_mean);
  }
  CHECK(retrieval_means.size() == static_cast<size_t>(std::floor(target_density * gated_heads + 1e-9)));
  if (!retrieval_means.empty() && !sparse_means.empty()) {
    CHECK(*std::min_element(retrieval_means.begin(), retrieval_means.end()) >=
          *std::max_element(sparse_means.begin(), sparse_means.end()));
  }
  CHECK(partition.training.deployed_density == partition.RetrievalDensity());
  CHECK(partition.training.deployed_density <= target_density);
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
    CalibrationConfig config = testing::TinyCalibration();
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
  auto partition = RunCalibration(
      *Shared().model, *Shared().tokenizer, Shared().corpus, testing::TinyCalibration(),
      [&](const CalibrationProgress& p) { seen.push_back(p); }, cancelled);
  REQUIRE(partition.ok());
  CHECK(partition->ValidateFor(Shared().model->config()).ok());
  CHECK(partition->selection().token_budget == 512);
  const ModelConfig& c = Shared().model->config();
  CHECK(partition->gates.size() == static_cast<size_t>((c.num_layers - 1) * c.num_kv_heads));
  for (const HeadGateRecord& gate : partition->gates) CHECK(gate.a != 1.0);  // every gate moved
  CheckRolesFollowMeans(*partition, testing::TinyCalibration().target_density);
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
  CHECK(partition->training.target_density == testing::TinyCalibration().target_density);
  // Even three steps end on the target: the last half of any job holds it.
  CHECK(partition->training.expected_density == Approx(testing::TinyCalibration().target_density).margin(1e-6));
  CHECK(HeadPartitionFromProto(HeadPartitionToProto(*partition))->training.deployed_density ==
        partition->training.deployed_density);
}

TEST_CASE("a target between reachable densities is rounded down to whole heads") {
  // Ten gated heads (five layers of two KV heads): the reachable densities are the multiples of 0.1.
  for (auto [target, deployed] : {std::pair{0.25, 0.2}, std::pair{0.05, 0.0}, std::pair{1.0, 1.0}}) {
    CAPTURE(target);
    CalibrationConfig config = testing::TinyCalibration();
    config.target_density = target;
    std::atomic<bool> cancelled{false};
    auto partition = RunCalibration(*Shared().model, *Shared().tokenizer, Shared().corpus, config,
                                    [](const CalibrationProgress&) {}, cancelled);
    REQUIRE(partition.ok());
    CHECK(partition->ValidateFor(Shared().model->config()).ok());
    CHECK(partition->training.deployed_density == Approx(deployed));
    CheckRolesFollowMeans(*partition, target);
  }
}

TEST_CASE("the expected density comes down to the target and stays there; the deployed one is at most it",
          "[convergence]") {
  for (double target : {0.1, 0.2, 0.3}) {
    CAPTURE(target);
    CalibrationConfig config = testing::TinyCalibration();
    config.target_density = target;
    // Few steps, at a learning rate high enough for them to tell the retrieval head apart.
    config.steps = 30;
    config.learning_rate = 0.05;
    // Sink and recent windows shorter than the context, so that a sparse head differs from a dense
    // one at these lengths and the distillation has something to choose.
    config.sparse_sink_tokens = 16;
    config.sparse_recent_tokens = 32;
    std::vector<CalibrationProgress> seen;
    std::atomic<bool> cancelled{false};
    HeadPartition partition = RunCalibration(*Shared().model, *Shared().tokenizer, Shared().corpus, config,
                                             [&](const CalibrationProgress& p) { seen.push_back(p); }, cancelled)
                                  .value();
    REQUIRE(seen.size() == 30);
    CHECK(seen.front().expected_density > target + 0.5);  // it starts with every head nearly open
    for (size_t i = seen.size() / 2; i < seen.size(); ++i) {
      CHECK(std::abs(seen[i].expected_density - target) <= 0.01);
      CHECK(std::isfinite(seen[i].lambda));
    }
    CHECK(std::abs(partition.training.expected_density - target) <= 0.01);
    CHECK(partition.training.deployed_density == Approx(target));  // a multiple of 0.1: reachable
    CheckRolesFollowMeans(partition, target);
    // The head the bundled model retrieves with (README: layer 3, KV head 0) is kept at every target.
    CHECK(partition.role(3, 0) == HeadRole::kRetrieval);
  }
}

TEST_CASE("cancellation takes effect within one step") {
  std::atomic<bool> cancelled{false};
  int steps = 0;
  CalibrationConfig config = testing::TinyCalibration();
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
  CalibrationConfig config = testing::TinyCalibration();
  config.target_density = 0;
  CHECK_THAT(std::string(error(config).message()), Catch::Contains("target_density"));
  config = testing::TinyCalibration();
  config.target_density = 1.5;
  CHECK(error(config).code() == absl::StatusCode::kInvalidArgument);
  config = testing::TinyCalibration();
  config.steps = 0;
  CHECK_THAT(std::string(error(config).message()), Catch::Contains("steps"));
  config = testing::TinyCalibration();
  config.selection.token_budget = 32;
  CHECK_THAT(std::string(error(config).message()), Catch::Contains("below one block"));
  config = testing::TinyCalibration();
  config.max_context_tokens = 100;
  CHECK_THAT(std::string(error(config).message()), Catch::Contains("max_context_tokens"));

  std::atomic<bool> cancelled{false};
  auto short_corpus = RunCalibration(
      *Shared().model, *Shared().tokenizer, "Too short a corpus.", testing::TinyCalibration(),
      [](const CalibrationProgress&) {}, cancelled);
  CHECK(short_corpus.status().code() == absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace lychee
