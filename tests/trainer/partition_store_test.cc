// The head-partition registry: versions per model, restart, damaged files, concurrent
// publishers, watchers; and the pieces under it (durable files, model fingerprints).
#include <catch2/catch.hpp>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

#include "common/base/durable_file.h"
#include "common/base/model_fingerprint.h"
#include "common/base/partition_store.h"
#include "harness/temp_dir.h"

namespace lychee {
namespace {
namespace fs = std::filesystem;

const std::string kFingerprintA = Sha256Hex("model a");
const std::string kFingerprintB = Sha256Hex("model b");

using testing::TempDir;

// 6 layers of 2 KV heads; `sparse_layer` > 0 gets a sparse head 1 so that partitions differ.
HeadPartition Partition(const std::string& fingerprint, int64_t sparse_layer = 1) {
  HeadPartition partition = HeadPartition::AllRetrieval(6, 2, SelectionParams{64, 512, 64, 64});
  partition.set_role(sparse_layer, 1, HeadRole::kSparse);
  partition.model_fingerprint = fingerprint;
  partition.source = "test";
  return partition;
}

std::vector<uint64_t> Versions(const std::vector<PartitionStore::Snapshot>& partitions) {
  std::vector<uint64_t> versions;
  for (const auto& partition : partitions) versions.push_back(partition->version);
  return versions;
}

fs::path VersionFile(const TempDir& registry, const std::string& fingerprint, uint64_t version) {
  std::string digits = std::to_string(version);
  digits.insert(0, 12 - digits.size(), '0');
  return registry.path / "partitions" / fingerprint / (digits + ".partition");
}

std::string ReadBytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteBytes(const fs::path& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

TEST_CASE("versions count up per model, and a reopened store has the same ones and continues after them") {
  TempDir registry;
  {
    auto store = PartitionStore::Open(registry.str()).value();
    CHECK(store->Publish(Partition(kFingerprintA, 1)).value() == 1);
    CHECK(store->Publish(Partition(kFingerprintA, 2)).value() == 2);
    CHECK(store->Publish(Partition(kFingerprintB, 3)).value() == 1);
    CHECK(store->Publish(Partition(kFingerprintA, 3)).value() == 3);
  }
  auto store = PartitionStore::Open(registry.str()).value();
  CHECK(store->problems().empty());
  CHECK(Versions(store->List(kFingerprintA)) == std::vector<uint64_t>{1, 2, 3});
  CHECK(Versions(store->List(kFingerprintB)) == std::vector<uint64_t>{1});
  const auto second = store->Get(kFingerprintA, 2).value();
  CHECK(second->model_fingerprint == kFingerprintA);
  CHECK(second->role(2, 1) == HeadRole::kSparse);
  CHECK(second->role(1, 1) == HeadRole::kRetrieval);
  CHECK(second->selection().token_budget == 512);
  CHECK(store->Latest(kFingerprintA).value()->version == 3);
  CHECK(store->Publish(Partition(kFingerprintA)).value() == 4);
  CHECK(store->Publish(Partition(kFingerprintB)).value() == 2);
}

TEST_CASE("models with different fingerprints are kept apart") {
  TempDir registry;
  auto store = PartitionStore::Open(registry.str()).value();
  store->Publish(Partition(kFingerprintA, 4)).value();
  CHECK(store->List(kFingerprintB).empty());
  CHECK(store->Latest(kFingerprintB).status().code() == absl::StatusCode::kNotFound);
  CHECK(store->Get(kFingerprintB, 1).status().code() == absl::StatusCode::kNotFound);
  CHECK(store->Get(kFingerprintA, 2).status().code() == absl::StatusCode::kNotFound);
  CHECK(store->Get(kFingerprintA, 1).value()->role(4, 1) == HeadRole::kSparse);
}

TEST_CASE("a corrupt, torn or misplaced file is reported and skipped, and its version is never reused") {
  TempDir registry;
  {
    auto store = PartitionStore::Open(registry.str()).value();
    for (int i = 0; i < 4; ++i) store->Publish(Partition(kFingerprintA)).value();
  }
  // Version 4 (the newest) gets a flipped payload byte, version 2 loses its tail, version 1 is
  // copied to the name of version 7; a temporary from a crashed write and a stray file appear.
  const fs::path newest = VersionFile(registry, kFingerprintA, 4);
  std::string bytes = ReadBytes(newest);
  bytes[bytes.size() - 3] ^= 0x20;
  WriteBytes(newest, bytes);
  const fs::path torn = VersionFile(registry, kFingerprintA, 2);
  const std::string whole = ReadBytes(torn);
  WriteBytes(torn, whole.substr(0, whole.size() - 10));
  fs::copy_file(VersionFile(registry, kFingerprintA, 1), VersionFile(registry, kFingerprintA, 7));
  WriteBytes(VersionFile(registry, kFingerprintA, 8).string() + ".tmp-AbC123", "half a write");
  WriteBytes(registry.path / "partitions" / kFingerprintA / "notes.txt", "hello");

  auto store = PartitionStore::Open(registry.str()).value();
  const std::vector<std::string>& problems = store->problems();
  REQUIRE(problems.size() == 4);
  const auto reported = [&](const std::string& file, const std::string& what) {
    return std::any_of(problems.begin(), problems.end(), [&](const std::string& problem) {
      return problem.find(file) != std::string::npos && problem.find(what) != std::string::npos;
    });
  };
  CHECK(reported(newest.string(), "checksum mismatch"));
  CHECK(reported(torn.string(), "torn"));
  CHECK(reported(VersionFile(registry, kFingerprintA, 7).string(), "holds version 1"));
  CHECK(reported("notes.txt", "not a partition version file"));

  CHECK(Versions(store->List(kFingerprintA)) == std::vector<uint64_t>{1, 3});
  CHECK(store->Latest(kFingerprintA).value()->version == 3);
  for (const uint64_t damaged : {2, 4, 7}) CHECK(store->Get(kFingerprintA, damaged).status().code() == absl::StatusCode::kDataLoss);
  CHECK(store->WaitForNewerThan(kFingerprintA, 3, std::chrono::milliseconds(0)).empty());
  CHECK(store->Publish(Partition(kFingerprintA)).value() == 8);
}

TEST_CASE("publish refuses a partition without a usable fingerprint or with a bad shape") {
  TempDir registry;
  auto store = PartitionStore::Open(registry.str()).value();
  for (const std::string& fingerprint : std::vector<std::string>{"", "../escape", "a/b", std::string(129, 'a')}) {
    const auto result = store->Publish(Partition(fingerprint));
    CHECK(result.status().code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(result.status().message()), Catch::Contains("model_fingerprint"));
  }
  HeadPartition dense_layer_zero_sparse = Partition(kFingerprintA);
  dense_layer_zero_sparse.set_role(0, 0, HeadRole::kSparse);
  CHECK(store->Publish(dense_layer_zero_sparse).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(store->List(kFingerprintA).empty());
  CHECK(!fs::exists(registry.path / "escape"));
}

TEST_CASE("concurrent publishers get distinct, gapless versions") {
  TempDir registry;
  auto store = PartitionStore::Open(registry.str()).value();
  constexpr int kThreads = 6;
  constexpr int kEach = 5;
  std::vector<std::vector<uint64_t>> got(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; ++i) got[t].push_back(store->Publish(Partition(kFingerprintA, 1 + (t + i) % 5)).value());
    });
  }
  for (std::thread& thread : threads) thread.join();
  std::vector<uint64_t> all;
  for (const auto& versions : got) {
    CHECK(std::is_sorted(versions.begin(), versions.end()));
    all.insert(all.end(), versions.begin(), versions.end());
  }
  std::sort(all.begin(), all.end());
  std::vector<uint64_t> expected(kThreads * kEach);
  for (size_t i = 0; i < expected.size(); ++i) expected[i] = i + 1;
  CHECK(all == expected);
  CHECK(Versions(PartitionStore::Open(registry.str()).value()->List(kFingerprintA)) == expected);
}

TEST_CASE("a watcher gets what is newer than it has seen, and wakes when a version is published") {
  TempDir registry;
  auto store = PartitionStore::Open(registry.str()).value();
  store->Publish(Partition(kFingerprintA)).value();
  store->Publish(Partition(kFingerprintA)).value();
  CHECK(Versions(store->WaitForNewerThan(kFingerprintA, 0, std::chrono::milliseconds(0))) == std::vector<uint64_t>{1, 2});
  CHECK(Versions(store->WaitForNewerThan(kFingerprintA, 1, std::chrono::milliseconds(0))) == std::vector<uint64_t>{2});

  const auto start = std::chrono::steady_clock::now();
  CHECK(store->WaitForNewerThan(kFingerprintA, 2, std::chrono::milliseconds(50)).empty());
  CHECK(std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(50));

  std::thread publisher([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    store->Publish(Partition(kFingerprintB)).value();  // another model: must not wake the watcher with nothing
    store->Publish(Partition(kFingerprintA)).value();
  });
  const auto wait_start = std::chrono::steady_clock::now();
  const auto newer = store->WaitForNewerThan(kFingerprintA, 2, std::chrono::seconds(20));
  const auto waited = std::chrono::steady_clock::now() - wait_start;
  publisher.join();
  CHECK(Versions(newer) == std::vector<uint64_t>{3});
  CHECK(waited < std::chrono::seconds(10));
}

TEST_CASE("a durable file reads back what was written; damage and absence are told apart") {
  TempDir dir;
  const std::string path = (dir.path / "record").string();
  CHECK(ReadDurableFile(path).status().code() == absl::StatusCode::kNotFound);
  const std::string payload("binary\0payload", 14);
  REQUIRE(WriteDurableFile(path, payload).ok());
  CHECK(ReadDurableFile(path).value() == payload);
  REQUIRE(WriteDurableFile(path, "replaced").ok());
  CHECK(ReadDurableFile(path).value() == "replaced");
  // Only the record is left behind: the temporary was renamed over it.
  CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);
  WriteBytes(path, "plain text, no header at all, long enough to hold one");
  CHECK(ReadDurableFile(path).status().code() == absl::StatusCode::kDataLoss);
  CHECK(IsDurableTemporaryName("000000000001.partition.tmp-x1Y2z3"));
  CHECK(!IsDurableTemporaryName("000000000001.partition"));
}

TEST_CASE("a model fingerprint covers config.json and the checkpoint headers") {
  CHECK(Sha256Hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string bundled = ModelFingerprint("models/tiny-llama-retrieval").value();
  CHECK(bundled.size() == 64);
  CHECK(bundled == ModelFingerprint("models/tiny-llama-retrieval").value());

  // The same weights under another config are another model.
  TempDir copy;
  fs::create_symlink(fs::absolute("models/tiny-llama-retrieval/model.safetensors"), copy.path / "model.safetensors");
  WriteBytes(copy.path / "config.json", ReadBytes("models/tiny-llama-retrieval/config.json"));
  CHECK(ModelFingerprint(copy.str()).value() == bundled);
  WriteBytes(copy.path / "config.json", ReadBytes("models/tiny-llama-retrieval/config.json") + "\n");
  CHECK(ModelFingerprint(copy.str()).value() != bundled);
  fs::remove(copy.path / "model.safetensors");
  CHECK(!ModelFingerprint(copy.str()).ok());
}

}  // namespace
}  // namespace lychee
