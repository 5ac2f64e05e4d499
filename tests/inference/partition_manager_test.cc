#include "inference/partition_manager.h"

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>

#include "common/base/durable_file.h"
#include "harness/temp_dir.h"

namespace lychee {
namespace {

constexpr char kFingerprint[] = "abc123";

ModelConfig SmallConfig() {
  ModelConfig config;
  config.num_layers = 3;
  config.num_kv_heads = 2;
  config.num_attention_heads = 4;
  config.head_dim = 16;
  return config;
}

HeadPartition Version(uint64_t version, const std::string& fingerprint = kFingerprint) {
  HeadPartition partition = HeadPartition::AllRetrieval(3, 2, SelectionParams{});
  partition.set_role(2, 1, HeadRole::kSparse);
  partition.model_fingerprint = fingerprint;
  partition.version = version;
  partition.source = "test " + std::to_string(version);
  return partition;
}

std::unique_ptr<PartitionManager> Open(const testing::TempDir& dir, int* changes = nullptr) {
  PartitionManager::Options options;
  options.state_dir = dir.str();
  options.model_fingerprint = kFingerprint;
  options.model_config = SmallConfig();
  options.check_servable = [](const HeadPartition& partition) {
    return partition.selection().token_budget > 100000 ? absl::InvalidArgumentError("budget too large for the test")
                                                        : absl::OkStatus();
  };
  if (changes != nullptr) options.on_change = [changes] { ++*changes; };
  absl::StatusOr<std::unique_ptr<PartitionManager>> manager = PartitionManager::Open(options);
  REQUIRE(manager.ok());
  return *std::move(manager);
}

uint64_t ActiveVersion(const PartitionManager& manager) {
  const auto active = manager.Active().partition;
  return active == nullptr ? 0 : active->version;
}

TEST_CASE("offered partitions are validated, stored and activated in version order") {
  testing::TempDir dir;
  int changes = 0;
  auto manager = Open(dir, &changes);
  CHECK(manager->Active().partition == nullptr);
  REQUIRE(manager->Offer(Version(1)).ok());
  CHECK(ActiveVersion(*manager) == 1);
  CHECK(manager->Active().activated_by == "trainer");
  REQUIRE(manager->Offer(Version(3)).ok());
  CHECK(ActiveVersion(*manager) == 3);
  // An older version arriving late is kept but does not replace a newer one.
  REQUIRE(manager->Offer(Version(2)).ok());
  CHECK(ActiveVersion(*manager) == 3);
  CHECK(manager->List().size() == 3);
  CHECK(manager->highest_version() == 3);
  CHECK(manager->rollouts() == 2);
  CHECK(changes == 3);
  // Offering a held version again changes nothing.
  REQUIRE(manager->Offer(Version(3)).ok());
  CHECK(manager->rollouts() == 2);
}

TEST_CASE("a partition is prepared before it becomes active; one whose preparation fails is activated all the same") {
  testing::TempDir dir;
  auto manager = Open(dir);
  std::vector<std::pair<uint64_t, uint64_t>> prepared;  // (version prepared, version active meanwhile)
  bool fail = false;
  manager->SetActivationPreparer([&](const PartitionManager::Snapshot& partition) {
    prepared.emplace_back(partition->version, ActiveVersion(*manager));
    return fail ? absl::InternalError("capture failed") : absl::OkStatus();
  });
  REQUIRE(manager->Offer(Version(1)).ok());
  fail = true;
  REQUIRE(manager->Offer(Version(2)).ok());
  CHECK(ActiveVersion(*manager) == 2);
  fail = false;
  REQUIRE(manager->Activate(1).ok());
  // An offer that does not become active, a rollback and a held version are not prepared.
  REQUIRE(manager->Offer(Version(1)).ok());  // held already: ignored
  REQUIRE(manager->Rollback().ok());
  REQUIRE(manager->SetHold(true).ok());
  REQUIRE(manager->Offer(Version(5)).ok());
  CHECK(ActiveVersion(*manager) == 2);
  CHECK(prepared == std::vector<std::pair<uint64_t, uint64_t>>{{1, 0}, {2, 1}, {1, 2}});
}

TEST_CASE("an offer is decided again after its preparation: a newer version activated meanwhile stays") {
  testing::TempDir dir;
  auto manager = Open(dir);
  manager->SetActivationPreparer([&](const PartitionManager::Snapshot& partition) {
    // While version 4 prepares, version 6 arrives and becomes active (prepared in turn).
    if (partition->version == 4) REQUIRE(manager->Offer(Version(6)).ok());
    return absl::OkStatus();
  });
  REQUIRE(manager->Offer(Version(4)).ok());
  CHECK(ActiveVersion(*manager) == 6);
  CHECK(manager->List().size() == 2);
}

TEST_CASE("a partition that fails validation leaves the active one and is reported") {
  testing::TempDir dir;
  auto manager = Open(dir);
  REQUIRE(manager->Offer(Version(1)).ok());

  absl::Status wrong_model = manager->Offer(Version(2, "other-model"));
  CHECK(wrong_model.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(wrong_model.message()).find("other-model") != std::string::npos);

  HeadPartition wrong_shape(4, 2, std::vector<HeadRole>(8, HeadRole::kRetrieval), SelectionParams{});
  wrong_shape.model_fingerprint = kFingerprint;
  wrong_shape.version = 3;
  absl::Status shape = manager->Offer(wrong_shape);
  CHECK(shape.code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(shape.message()).find("4 layers") != std::string::npos);

  HeadPartition unservable = Version(4);
  unservable.mutable_selection().token_budget = 1 << 20;
  CHECK(manager->Offer(unservable).code() == absl::StatusCode::kInvalidArgument);

  CHECK(ActiveVersion(*manager) == 1);
  CHECK(manager->rejected_count() == 3);
  const std::vector<RejectedPartition> rejected = manager->rejections();
  REQUIRE(rejected.size() == 3);
  CHECK(rejected[0].version == 2);
  CHECK(rejected[2].reason.find("budget too large") != std::string::npos);
  CHECK(manager->List().size() == 1);
  // Nothing of the rejected ones reached the disk.
  CHECK(!std::filesystem::exists(dir.path / "partitions" / "2.pb"));
}

TEST_CASE("hold, activate and rollback") {
  testing::TempDir dir;
  auto manager = Open(dir);
  REQUIRE(manager->Offer(Version(1)).ok());
  REQUIRE(manager->SetHold(true).ok());
  REQUIRE(manager->Offer(Version(2)).ok());
  CHECK(ActiveVersion(*manager) == 1);
  CHECK(manager->Get(2).ok());
  REQUIRE(manager->Activate(2).ok());
  CHECK(ActiveVersion(*manager) == 2);
  CHECK(manager->Active().activated_by == "activate");
  CHECK(manager->Activate(9).code() == absl::StatusCode::kNotFound);
  REQUIRE(manager->Rollback().ok());
  CHECK(ActiveVersion(*manager) == 1);
  CHECK(manager->Active().activated_by == "rollback");
  CHECK(manager->Rollback().code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(manager->SetHold(false).ok());
  REQUIRE(manager->Offer(Version(3)).ok());
  CHECK(ActiveVersion(*manager) == 3);
}

TEST_CASE("a sequence's pinned snapshot outlives the switch") {
  testing::TempDir dir;
  auto manager = Open(dir);
  REQUIRE(manager->Offer(Version(1)).ok());
  const PartitionManager::Snapshot pinned = manager->Active().partition;
  REQUIRE(manager->Offer(Version(2)).ok());
  CHECK(pinned->version == 1);
  CHECK(pinned->source == "test 1");
  CHECK(ActiveVersion(*manager) == 2);
}

TEST_CASE("the active version, history and hold survive a restart; damaged files are not served") {
  testing::TempDir dir;
  {
    auto manager = Open(dir);
    REQUIRE(manager->Offer(Version(1)).ok());
    REQUIRE(manager->Offer(Version(2)).ok());
    REQUIRE(manager->Offer(Version(3)).ok());
    REQUIRE(manager->Activate(2).ok());
    REQUIRE(manager->SetHold(true).ok());
  }
  {
    auto manager = Open(dir);
    CHECK(ActiveVersion(*manager) == 2);
    CHECK(manager->Active().activated_by == "restored");
    CHECK(manager->held());
    CHECK(manager->List().size() == 3);
    REQUIRE(manager->Rollback().ok());
    CHECK(ActiveVersion(*manager) == 3);
  }
  // A torn write of version 3 and a stray file.
  std::filesystem::resize_file(dir.path / "partitions" / "3.pb", 10);
  std::ofstream(dir.path / "partitions" / "notes.txt") << "hello";
  auto manager = Open(dir);
  // The torn file, the stray one, and the active version that is gone with the torn file.
  REQUIRE(manager->problems().size() == 3);
  CHECK(manager->problems()[2].find("version 3 was active") != std::string::npos);
  CHECK(manager->Get(3).status().code() == absl::StatusCode::kNotFound);
  CHECK(manager->Active().partition == nullptr);
  CHECK(manager->List().size() == 2);
}

TEST_CASE("a version stored just before a crash is activated on restart, unless held or rolled back past") {
  testing::TempDir dir;
  {
    auto manager = Open(dir);
    REQUIRE(manager->Offer(Version(1)).ok());
    REQUIRE(manager->Offer(Version(2)).ok());
  }
  // The crash window: version 3's file is written, the record of its activation is not.
  {
    testing::TempDir scratch;
    auto other = Open(scratch);
    REQUIRE(other->Offer(Version(3)).ok());
    std::filesystem::copy_file(scratch.path / "partitions" / "3.pb", dir.path / "partitions" / "3.pb");
  }
  {
    auto manager = Open(dir);
    CHECK(ActiveVersion(*manager) == 3);
    CHECK(manager->Active().activated_by == "trainer");
    // A rollback is a decision too: it survives the next restart.
    REQUIRE(manager->Rollback().ok());
  }
  {
    auto manager = Open(dir);
    CHECK(ActiveVersion(*manager) == 2);
    REQUIRE(manager->SetHold(true).ok());
  }
  {
    testing::TempDir scratch;
    auto other = Open(scratch);
    REQUIRE(other->Offer(Version(4)).ok());
    std::filesystem::copy_file(scratch.path / "partitions" / "4.pb", dir.path / "partitions" / "4.pb");
  }
  auto manager = Open(dir);
  CHECK(ActiveVersion(*manager) == 2);
  CHECK(manager->Get(4).ok());
}

TEST_CASE("the offer gate rejects a partition before it is stored, once") {
  testing::TempDir dir;
  int changes = 0;
  std::unique_ptr<PartitionManager> manager = Open(dir, &changes);
  int gate_calls = 0;
  manager->SetOfferGate([&gate_calls](const HeadPartition& partition) {
    ++gate_calls;
    if (partition.version == 3) return absl::CancelledError("shutting down");
    return partition.version == 1 ? absl::FailedPreconditionError("accuracy 0.25 against dense 1.00")
                                  : absl::OkStatus();
  });
  const absl::Status rejected = manager->Offer(Version(1));
  CHECK(absl::IsFailedPrecondition(rejected));
  CHECK(ActiveVersion(*manager) == 0);
  CHECK(!manager->Get(1).ok());
  CHECK(!std::filesystem::exists(dir.path / "partitions" / "1.pb"));
  REQUIRE(manager->rejections().size() == 1);
  CHECK(manager->rejections()[0].reason == "accuracy 0.25 against dense 1.00");
  CHECK(manager->rejected_by_gate() == 1);
  CHECK(manager->rejected_count() == 1);
  CHECK(changes == 1);
  // Offered again: the same answer, the gate not asked again.
  CHECK(manager->Offer(Version(1)) == rejected);
  CHECK(gate_calls == 1);

  REQUIRE(manager->Offer(Version(2)).ok());
  CHECK(ActiveVersion(*manager) == 2);
  // A gate cut short decides nothing: not a rejection, and asked again next time.
  CHECK(absl::IsCancelled(manager->Offer(Version(3))));
  CHECK(manager->rejected_count() == 1);
  CHECK(ActiveVersion(*manager) == 2);
  CHECK(absl::IsCancelled(manager->Offer(Version(3))));
  CHECK(gate_calls == 4);
}

}  // namespace
}  // namespace lychee
