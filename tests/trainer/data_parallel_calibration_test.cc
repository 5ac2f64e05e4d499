// Data-parallel calibration over Gloo: two ranks (threads here, each with its own model and group)
// that split each step's samples learn the gates that one process learns over the whole batch.
#include <atomic>
#include <filesystem>
#include <thread>

#include "common/base/retrieval_tasks.h"
#include "common/base/tokenizer.h"
#include "common/model/model.h"
#include "common/model/tensor_parallel.h"
#include "harness/temp_dir.h"
#include "tests/torch_catch.h"
#include "tests/trainer/tiny_calibration.h"
#include "trainer/calibration.h"

namespace lychee {
namespace {

const std::string kModelDir = "models/tiny-llama-retrieval";

CalibrationConfig TwoSamplesPerStep() {
  CalibrationConfig config = testing::TinyCalibration();
  config.samples_per_step = 2;
  return config;
}

// One rank's calibration: its own model, tokenizer and corpus; `group` null for a single process.
absl::StatusOr<HeadPartition> Calibrate(const CalibrationConfig& config, const TensorParallelGroup* group) {
  auto model = Model::Load(kModelDir);
  if (!model.ok()) return model.status();
  auto tokenizer = Tokenizer::FromFile(kModelDir + "/tokenizer.json");
  if (!tokenizer.ok()) return tokenizer.status();
  auto corpus = ReadTextCorpus("data/corpus/calibration.txt.gz");
  if (!corpus.ok()) return corpus.status();
  const std::atomic<bool> cancelled{false};
  return RunCalibration(
      **model, **tokenizer, *corpus, config, [](const CalibrationProgress&) {}, cancelled, group);
}

// Each rank's calibration over `world_size` ranks on threads of this process.
std::vector<absl::StatusOr<HeadPartition>> CalibrateOnRanks(const CalibrationConfig& config, int world_size) {
  testing::TempDir dir;
  const std::string rendezvous = (dir.path / "rendezvous").string();
  std::vector<absl::StatusOr<HeadPartition>> partitions(world_size, absl::UnknownError("rank did not run"));
  std::vector<std::thread> ranks;
  for (int rank = 0; rank < world_size; ++rank) {
    ranks.emplace_back([&, rank] {
      auto group = JoinGlooGroup(rendezvous, rank, world_size, std::chrono::seconds(60));
      partitions[rank] = group.ok() ? Calibrate(config, group->get()) : group.status();
    });
  }
  for (std::thread& rank : ranks) rank.join();
  return partitions;
}

TEST_CASE("two data-parallel ranks learn the gates of one process over the whole batch", "[data_parallel]") {
  const CalibrationConfig config = TwoSamplesPerStep();
  const absl::StatusOr<HeadPartition> single = Calibrate(config, nullptr);
  REQUIRE(single.ok());
  const std::vector<absl::StatusOr<HeadPartition>> ranks = CalibrateOnRanks(config, 2);
  for (size_t rank = 0; rank < ranks.size(); ++rank) {
    INFO("rank " << rank << ": " << ranks[rank].status());
    REQUIRE(ranks[rank].ok());
    REQUIRE(ranks[rank]->gates.size() == single->gates.size());
    for (size_t i = 0; i < single->gates.size(); ++i) {
      const HeadGateRecord& mine = ranks[rank]->gates[i];
      const HeadGateRecord& reference = single->gates[i];
      INFO("layer " << reference.layer << " KV head " << reference.kv_head);
      CHECK(mine.a == Approx(reference.a).epsilon(1e-4));
      CHECK(mine.b == Approx(reference.b).epsilon(1e-4));
      // Every rank applies the same all-reduced gradients, so holds the same gates.
      CHECK(mine.a == ranks[0]->gates[i].a);
      CHECK(mine.b == ranks[0]->gates[i].b);
    }
    CHECK(ranks[rank]->training.final_distillation_loss ==
          Approx(single->training.final_distillation_loss).epsilon(1e-4));
    for (int layer = 0; layer < single->num_layers(); ++layer) {
      for (int head = 0; head < single->num_kv_heads(); ++head) {
        CHECK(ranks[rank]->role(layer, head) == single->role(layer, head));
      }
    }
  }
}

TEST_CASE("samples per step that the data-parallel ranks cannot split are an error naming both", "[data_parallel]") {
  CalibrationConfig config = TwoSamplesPerStep();
  config.samples_per_step = 3;
  const std::vector<absl::StatusOr<HeadPartition>> ranks = CalibrateOnRanks(config, 2);
  for (const absl::StatusOr<HeadPartition>& rank : ranks) {
    REQUIRE_FALSE(rank.ok());
    CHECK(rank.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(rank.status().message()), Catch::Contains("samples_per_step"));
    CHECK_THAT(std::string(rank.status().message()), Catch::Contains("2 data-parallel ranks"));
    CHECK_THAT(std::string(rank.status().message()), Catch::Contains("got 3"));
  }
}

}  // namespace
}  // namespace lychee
