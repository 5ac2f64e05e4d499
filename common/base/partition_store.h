// The head-partition registry: every published partition gets the next version number of its
// model (models are told apart by their fingerprint, common/base/model_fingerprint.h) and is stored
// durably, one checksummed file per version, under <registry_dir>/partitions/<fingerprint>/.
// The trainer publishes; the trainer and the inference service read and watch. Thread-safe.
// Free of LibTorch.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/base/head_partition.h"

namespace lychee {

class PartitionStore {
 public:
  using Snapshot = std::shared_ptr<const HeadPartition>;

  // Scans what earlier runs stored. A file that is corrupt, torn or disagrees with its place
  // (fingerprint directory, version in its name) is skipped and reported in problems() and on
  // stderr; its version still counts as taken, so that it is never handed out again.
  static absl::StatusOr<std::unique_ptr<PartitionStore>> Open(const std::string& registry_dir);

  // One line per file the scan at Open skipped, naming the file and what is wrong with it.
  const std::vector<std::string>& problems() const { return problems_; }

  // Stores `partition` (which must be valid and carry a model fingerprint) as the next version of
  // its model and wakes the watchers; returns that version. A version whose write failed is not
  // reused either.
  absl::StatusOr<uint64_t> Publish(HeadPartition partition);

  // The readable versions of a model, oldest first; empty for an unknown fingerprint.
  std::vector<Snapshot> List(const std::string& fingerprint) const;
  // NOT_FOUND for a version never stored, DATA_LOSS for one whose file is damaged.
  absl::StatusOr<Snapshot> Get(const std::string& fingerprint, uint64_t version) const;
  // The newest readable version; NOT_FOUND when the model has none.
  absl::StatusOr<Snapshot> Latest(const std::string& fingerprint) const;
  // Every readable version above `after_version`, oldest first, waiting up to `timeout` for one
  // to be published when there is none yet (then the result is empty).
  std::vector<Snapshot> WaitForNewerThan(const std::string& fingerprint, uint64_t after_version,
                                         std::chrono::milliseconds timeout) const;

 private:
  struct ModelVersions {
    std::map<uint64_t, Snapshot> readable;
    std::map<uint64_t, std::string> damaged;  // version -> what is wrong
    uint64_t last_version = 0;               // highest ever taken, readable or not
  };

  explicit PartitionStore(std::string partitions_dir) : partitions_dir_(std::move(partitions_dir)) {}
  void ScanModel(const std::string& fingerprint) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  std::vector<Snapshot> NewerThan(const std::string& fingerprint, uint64_t after_version) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  const std::string partitions_dir_;
  std::vector<std::string> problems_;  // written by Open only, before the store is shared
  mutable absl::Mutex mutex_;
  std::map<std::string, ModelVersions> models_ ABSL_GUARDED_BY(mutex_);
};

// Whether `fingerprint` can name a registry directory: 1 to 128 of [0-9A-Za-z_-].
bool IsValidFingerprint(const std::string& fingerprint);

// Decodes one stored registry file, `record` being its whole content as read from `path` (which
// errors name): the durable record (header, checksum), then the lychee.v1.HeadPartition it holds,
// validated. DATA_LOSS when any of it is wrong. What the store reads every file with; pure, so
// that it can be fuzzed.
absl::StatusOr<HeadPartition> ParseStoredPartition(std::string_view record, const std::string& path);

}  // namespace lychee
