// The canary: its routing, the rule that decides it, and the partition manager's canary (operator
// decisions, automatic promotion and rollback, restart, bad input), driven with injected
// sequence outcomes so that no model runs.
#include "inference/canary.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>

#include "common/base/durable_file.h"
#include "harness/temp_dir.h"
#include "inference/partition_manager.h"

namespace lychee {
namespace {

constexpr char kFingerprint[] = "abc123";

HeadPartition Version(uint64_t version) {
  HeadPartition partition = HeadPartition::AllRetrieval(3, 2, SelectionParams{});
  partition.set_role(2, 1, HeadRole::kSparse);
  partition.model_fingerprint = kFingerprint;
  partition.version = version;
  return partition;
}

std::unique_ptr<PartitionManager> Open(const testing::TempDir& dir, double offer_canary_fraction = 0) {
  PartitionManager::Options options;
  options.state_dir = dir.str();
  options.model_fingerprint = kFingerprint;
  options.model_config.num_layers = 3;
  options.model_config.num_kv_heads = 2;
  options.model_config.num_attention_heads = 4;
  options.model_config.head_dim = 16;
  options.canary_bounds.sequences = 8;
  options.offer_canary_fraction = offer_canary_fraction;
  absl::StatusOr<std::unique_ptr<PartitionManager>> manager = PartitionManager::Open(options);
  REQUIRE(manager.ok());
  return *std::move(manager);
}

// Versions 1 (active) and 2 (held).
std::unique_ptr<PartitionManager> WithTwoVersions(const testing::TempDir& dir) {
  auto manager = Open(dir);
  REQUIRE(manager->Offer(Version(1)).ok());
  REQUIRE(manager->SetHold(true).ok());
  REQUIRE(manager->Offer(Version(2)).ok());
  REQUIRE(manager->SetHold(false).ok());
  REQUIRE(manager->Active().partition->version == 1);
  return manager;
}

CanarySequence Sequence(double mass, bool error = false, double latency = 0.01) {
  CanarySequence sequence;
  sequence.error = error;
  if (!error) sequence.mean_dropped_mass = mass;
  sequence.timed_tokens = 10;
  sequence.token_latency_sum = 10 * latency;
  return sequence;
}

// Finishes `count` sequences on each side, stable ones first.
void Finish(PartitionManager& manager, int count, const CanarySequence& canary, const CanarySequence& stable) {
  for (int i = 0; i < count; ++i) {
    manager.RecordCanarySequence(PartitionRoute::Arm::kStable, 1, stable);
    manager.RecordCanarySequence(PartitionRoute::Arm::kCanary, 2, canary);
  }
}

TEST_CASE("routing sends about the fraction of sequences to the canary, the same way each time") {
  for (const double fraction : {0.1, 0.25, 0.5}) {
    int canary = 0;
    for (uint64_t id = 1; id <= 20000; ++id) canary += RoutesToCanary(id, 7, fraction) ? 1 : 0;
    // Five standard deviations of a binomial count.
    const double expected = 20000 * fraction;
    CHECK(std::abs(canary - expected) < 5 * std::sqrt(expected * (1 - fraction)));
  }
  for (uint64_t id = 1; id <= 1000; ++id) {
    CHECK(RoutesToCanary(id, 7, 1.0));
    CHECK(RoutesToCanary(id, 7, 0.3) == RoutesToCanary(id, 7, 0.3));
  }

  testing::TempDir dir;
  auto manager = WithTwoVersions(dir);
  CHECK(manager->Route(1).arm == PartitionRoute::Arm::kNoCanary);
  REQUIRE(manager->StartCanary(2, 0.25, std::nullopt).ok());
  int canary = 0;
  for (uint64_t id = 1; id <= 4000; ++id) {
    const PartitionRoute route = manager->Route(id);
    const bool to_canary = route.arm == PartitionRoute::Arm::kCanary;
    CHECK(route.partition->version == (to_canary ? 2u : 1u));
    CHECK(to_canary == RoutesToCanary(id, 2, 0.25));
    canary += to_canary ? 1 : 0;
  }
  CHECK(canary > 800);
  CHECK(canary < 1200);
  // The active version is still the stable one.
  CHECK(manager->Active().partition->version == 1);
}

TEST_CASE("the decision rule: promote within bounds after the run, roll back outside, early when clear") {
  CanaryRecord record;
  record.version = 2;
  record.stable_version = 1;
  record.fraction = 0.5;
  record.bounds.sequences = 10;
  for (int i = 0; i < 9; ++i) AddSequence(Sequence(0.1), record.canary);
  AddSequence(Sequence(0.1, false, 0.01), record.stable);
  CHECK(DecideCanary(record).state == CanaryState::kRunning);
  AddSequence(Sequence(0.1), record.canary);
  CanaryVerdict verdict = DecideCanary(record);
  CHECK(verdict.state == CanaryState::kPromoted);
  CHECK(verdict.reason.find("mean dropped mass 0.1000 over 10 measured") != std::string::npos);

  SECTION("dropped mass above the bound at the end of the run") {
    CanaryRecord bad = record;
    bad.canary = {};
    // Alternating 0.1 and 0.32: mean 0.21, too noisy for an early rollback.
    for (int i = 0; i < 10; ++i) {
      AddSequence(Sequence(i % 2 == 0 ? 0.1 : 0.32), bad.canary);
      if (i < 9) CHECK(DecideCanary(bad).state == CanaryState::kRunning);
    }
    verdict = DecideCanary(bad);
    CHECK(verdict.state == CanaryState::kRolledBack);
    CHECK(verdict.reason.find("dropped mass above the bound") != std::string::npos);
  }
  SECTION("dropped mass far above the bound after half the run") {
    CanaryRecord bad = record;
    bad.canary = {};
    for (int i = 0; i < 4; ++i) AddSequence(Sequence(0.3 + 0.01 * i), bad.canary);
    CHECK(DecideCanary(bad).state == CanaryState::kRunning);
    AddSequence(Sequence(0.3), bad.canary);
    verdict = DecideCanary(bad);
    CHECK(verdict.state == CanaryState::kRolledBack);
    CHECK(verdict.reason.find("standard errors") != std::string::npos);
  }
  SECTION("more errors than the run allows roll back at once") {
    CanaryRecord bad = record;
    bad.canary = {};
    bad.bounds.max_error_rate = 0.1;
    AddSequence(Sequence(0, /*error=*/true), bad.canary);
    CHECK(DecideCanary(bad).state == CanaryState::kRunning);
    AddSequence(Sequence(0, /*error=*/true), bad.canary);
    verdict = DecideCanary(bad);
    CHECK(verdict.state == CanaryState::kRolledBack);
    CHECK(verdict.reason.find("error rate") == 0);
  }
  SECTION("per-token latency beyond the ratio to the stable version") {
    CanaryRecord slow = record;
    slow.canary = {};
    for (int i = 0; i < 10; ++i) AddSequence(Sequence(0.1, false, 0.016), slow.canary);
    CHECK(DecideCanary(slow).state == CanaryState::kRolledBack);
    slow.bounds.max_latency_ratio = 1.7;
    CHECK(DecideCanary(slow).state == CanaryState::kPromoted);
  }
  SECTION("sequences whose mass was not measured do not decide it") {
    CanaryRecord unmeasured = record;
    unmeasured.canary = {};
    CanarySequence sequence = Sequence(0);
    sequence.mean_dropped_mass.reset();
    for (int i = 0; i < 30; ++i) AddSequence(sequence, unmeasured.canary);
    CHECK(DecideCanary(unmeasured).state == CanaryState::kRunning);
    for (int i = 0; i < 10; ++i) AddSequence(Sequence(0.1), unmeasured.canary);
    CHECK(DecideCanary(unmeasured).state == CanaryState::kPromoted);
  }
}

TEST_CASE("a canary within bounds is promoted by itself after its run") {
  testing::TempDir dir;
  auto manager = WithTwoVersions(dir);
  REQUIRE(manager->StartCanary(2, 0.5, std::nullopt).ok());
  const uint64_t rollouts = manager->rollouts();
  Finish(*manager, 7, Sequence(0.05), Sequence(0.01));
  CHECK(manager->Canary()->state == CanaryState::kRunning);
  CHECK(manager->Active().partition->version == 1);
  Finish(*manager, 1, Sequence(0.05), Sequence(0.01));
  const std::optional<CanaryRecord> canary = manager->Canary();
  REQUIRE(canary.has_value());
  CHECK(canary->state == CanaryState::kPromoted);
  CHECK(canary->canary.sequences == 8);
  CHECK(canary->stable.sequences == 8);
  CHECK(canary->canary.mean_dropped_mass() == Approx(0.05));
  CHECK(manager->Active().partition->version == 2);
  CHECK(manager->Active().activated_by == "canary");
  CHECK(manager->rollouts() == rollouts + 1);
  CHECK(manager->Route(3).arm == PartitionRoute::Arm::kNoCanary);
  // The promoted version can be rolled back like any activation.
  REQUIRE(manager->Rollback().ok());
  CHECK(manager->Active().partition->version == 1);
  // Late sequences of the decided canary change nothing.
  Finish(*manager, 1, Sequence(0.9), Sequence(0.9));
  CHECK(manager->Canary()->canary.sequences == 8);
}

TEST_CASE("a canary that drops too much mass is rolled back by itself, and rejected with its numbers") {
  testing::TempDir dir;
  auto manager = WithTwoVersions(dir);
  REQUIRE(manager->StartCanary(2, 1.0, std::nullopt).ok());
  // 0.23, as a random partition of density 0.1 drops on the bundled model: rolled back after half the run.
  for (int i = 0; i < 4; ++i)
    manager->RecordCanarySequence(PartitionRoute::Arm::kCanary, 2, Sequence(i < 2 ? 0.23 : 0.24));
  CHECK(manager->Canary()->state == CanaryState::kRolledBack);
  CHECK(manager->Active().partition->version == 1);
  CHECK(manager->Route(5).partition->version == 1);
  CHECK(manager->Route(5).arm == PartitionRoute::Arm::kNoCanary);
  CHECK(manager->rejected_by_canary() == 1);
  REQUIRE(manager->rejections().size() == 1);
  CHECK(manager->rejections()[0].version == 2);
  CHECK(manager->rejections()[0].reason.find("canary rolled back: dropped mass") == 0);
  CHECK(manager->rejections()[0].reason.find("mean dropped mass 0.2350 over 4 measured (bound 0.2000)") !=
        std::string::npos);
  // Another canary may start after it.
  CHECK(manager->StartCanary(2, 0.5, std::nullopt).ok());
}

TEST_CASE("the operator promotes or aborts a canary at any time") {
  testing::TempDir dir;
  auto manager = WithTwoVersions(dir);
  CHECK(absl::IsFailedPrecondition(manager->PromoteCanary()));
  CHECK(absl::IsFailedPrecondition(manager->AbortCanary()));
  REQUIRE(manager->StartCanary(2, 0.1, std::nullopt).ok());
  SECTION("abort") {
    REQUIRE(manager->AbortCanary().ok());
    CHECK(manager->Canary()->state == CanaryState::kAborted);
    CHECK(manager->Canary()->reason == "aborted by the operator");
    CHECK(manager->Active().partition->version == 1);
    CHECK(manager->Route(9).arm == PartitionRoute::Arm::kNoCanary);
    // An abort is not a rejection.
    CHECK(manager->rejections().empty());
  }
  SECTION("promote") {
    Finish(*manager, 2, Sequence(0.5), Sequence(0.5));
    REQUIRE(manager->PromoteCanary().ok());
    CHECK(manager->Canary()->state == CanaryState::kPromoted);
    CHECK(manager->Canary()->canary.sequences == 2);
    CHECK(manager->Active().partition->version == 2);
  }
  CHECK(absl::IsFailedPrecondition(manager->AbortCanary()));
}

TEST_CASE("a running canary and its counts survive a restart; a decided one is remembered") {
  testing::TempDir dir;
  {
    auto manager = WithTwoVersions(dir);
    CanaryBounds bounds;
    bounds.sequences = 5;
    bounds.max_dropped_mass = 0.3;
    REQUIRE(manager->StartCanary(2, 0.4, bounds).ok());
    Finish(*manager, 3, Sequence(0.25), Sequence(0.05));
  }
  {
    auto manager = Open(dir);
    CHECK(manager->problems().empty());
    const std::optional<CanaryRecord> canary = manager->Canary();
    REQUIRE(canary.has_value());
    CHECK(canary->state == CanaryState::kRunning);
    CHECK(canary->version == 2);
    CHECK(canary->stable_version == 1);
    CHECK(canary->fraction == 0.4);
    CHECK(canary->bounds.sequences == 5);
    CHECK(canary->bounds.max_dropped_mass == 0.3);
    CHECK(canary->canary.sequences == 3);
    CHECK(canary->canary.mean_dropped_mass() == Approx(0.25));
    CHECK(canary->stable.sequences == 3);
    CHECK(manager->Active().partition->version == 1);
    CHECK(manager->Route(11).arm != PartitionRoute::Arm::kNoCanary);
    Finish(*manager, 2, Sequence(0.25), Sequence(0.05));
    CHECK(manager->Canary()->state == CanaryState::kPromoted);
  }
  auto manager = Open(dir);
  CHECK(manager->Canary()->state == CanaryState::kPromoted);
  CHECK(manager->Active().partition->version == 2);
  CHECK(manager->Route(11).arm == PartitionRoute::Arm::kNoCanary);
}

TEST_CASE("a damaged canary record is reported and nothing is routed by it") {
  testing::TempDir dir;
  {
    auto manager = WithTwoVersions(dir);
    REQUIRE(manager->StartCanary(2, 0.4, std::nullopt).ok());
  }
  REQUIRE(WriteDurableFile((std::filesystem::path(dir.str()) / "canary").string(), "{\"version\": 2}").ok());
  auto manager = Open(dir);
  REQUIRE(manager->problems().size() == 1);
  CHECK(manager->problems()[0].find("not a canary record") != std::string::npos);
  CHECK_FALSE(manager->Canary().has_value());
  CHECK(manager->Route(1).arm == PartitionRoute::Arm::kNoCanary);
}

TEST_CASE("bad canary requests name the field and change nothing") {
  testing::TempDir dir;
  auto manager = WithTwoVersions(dir);
  for (const double fraction : {0.0, -0.5, 1.5, std::nan("")}) {
    const absl::Status status = manager->StartCanary(2, fraction, std::nullopt);
    CHECK(absl::IsInvalidArgument(status));
    CHECK(status.message().find("canary_fraction must be in (0, 1]") == 0);
  }
  for (const double bound : {-0.1, 1.1, std::nan("")}) {
    CanaryBounds bounds;
    bounds.max_dropped_mass = bound;
    absl::Status status = manager->StartCanary(2, 0.5, bounds);
    CHECK(absl::IsInvalidArgument(status));
    CHECK(status.message().find("canary_max_dropped_mass must be in [0, 1]") == 0);
    bounds = {};
    bounds.max_error_rate = bound;
    status = manager->StartCanary(2, 0.5, bounds);
    CHECK(absl::IsInvalidArgument(status));
    CHECK(status.message().find("canary_max_error_rate must be in [0, 1]") == 0);
  }
  absl::Status status = manager->StartCanary(9, 0.5, std::nullopt);
  CHECK(absl::IsNotFound(status));
  CHECK(status.message().find("version: partition 9") == 0);
  CHECK(absl::IsFailedPrecondition(manager->StartCanary(1, 0.5, std::nullopt)));
  CHECK_FALSE(manager->Canary().has_value());
  CHECK_FALSE(std::filesystem::exists(std::filesystem::path(dir.str()) / "canary"));

  REQUIRE(manager->StartCanary(2, 0.5, std::nullopt).ok());
  status = manager->StartCanary(2, 0.7, std::nullopt);
  CHECK(absl::IsFailedPrecondition(status));
  CHECK(status.message().find("a canary of partition 2 runs") == 0);
  CHECK(absl::IsFailedPrecondition(manager->Activate(2)));
  CHECK(absl::IsFailedPrecondition(manager->Rollback()));
  CHECK(manager->Canary()->fraction == 0.5);
  CHECK(manager->Active().partition->version == 1);

  testing::TempDir empty_dir;
  auto empty = Open(empty_dir);
  REQUIRE(empty->SetHold(true).ok());
  REQUIRE(empty->Offer(Version(1)).ok());
  CHECK(absl::IsFailedPrecondition(empty->StartCanary(1, 0.5, std::nullopt)));
}

TEST_CASE("with an offer canary fraction, a partition from the trainer starts as a canary") {
  testing::TempDir dir;
  {
    auto manager = Open(dir, /*offer_canary_fraction=*/0.2);
    // The first has nothing to compare with: active at once.
    REQUIRE(manager->Offer(Version(1)).ok());
    CHECK(manager->Active().partition->version == 1);
    REQUIRE(manager->Offer(Version(2)).ok());
    CHECK(manager->Active().partition->version == 1);
    REQUIRE(manager->Canary().has_value());
    CHECK(manager->Canary()->version == 2);
    CHECK(manager->Canary()->fraction == 0.2);
    // A newer offer while the canary runs is stored, not activated.
    REQUIRE(manager->Offer(Version(3)).ok());
    CHECK(manager->Active().partition->version == 1);
    CHECK(manager->Canary()->version == 2);
  }
  // Nor after a restart: its decision was recorded.
  auto manager = Open(dir, 0.2);
  CHECK(manager->Active().partition->version == 1);
  CHECK(manager->Canary()->state == CanaryState::kRunning);
}

}  // namespace
}  // namespace lychee
