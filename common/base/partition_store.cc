#include "common/base/partition_store.h"

#include <glog/logging.h>

#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/base/durable_file.h"
#include "common/base/status_macros.h"
#include "lychee/v1/head_partition.pb.h"

namespace lychee {
namespace fs = std::filesystem;
namespace {

constexpr std::string_view kSuffix = ".partition";
constexpr size_t kMaxFingerprintLength = 128;

// Zero-padded so that a directory listing sorts by version.
std::string FileName(uint64_t version) {
  std::string digits = std::to_string(version);
  if (digits.size() < 12) digits.insert(0, 12 - digits.size(), '0');
  return digits + std::string(kSuffix);
}

bool ParseFileName(const std::string& name, uint64_t* version) {
  if (name.size() <= kSuffix.size() || name.compare(name.size() - kSuffix.size(), kSuffix.size(), kSuffix) != 0) {
    return false;
  }
  const std::string digits = name.substr(0, name.size() - kSuffix.size());
  if (digits.find_first_not_of("0123456789") != std::string::npos) return false;
  return absl::SimpleAtoi(digits, version) && *version > 0;
}

absl::StatusOr<HeadPartition> ReadPartition(const std::string& path) {
  LYCHEE_ASSIGN_OR_RETURN(const std::string record, ReadDurableRecord(path));
  return ParseStoredPartition(record, path);
}

}  // namespace

absl::StatusOr<HeadPartition> ParseStoredPartition(std::string_view record, const std::string& path) {
  LYCHEE_ASSIGN_OR_RETURN(const std::string payload, DecodeDurableRecord(record, path));
  v1::HeadPartition proto;
  if (!proto.ParseFromString(payload)) {
    return absl::DataLossError(absl::StrCat(path, ": checksum matches but the payload is not a lychee.v1.HeadPartition"));
  }
  absl::StatusOr<HeadPartition> partition = HeadPartitionFromProto(proto);
  if (!partition.ok()) return absl::DataLossError(absl::StrCat(path, ": ", std::string(partition.status().message())));
  return partition;
}

bool IsValidFingerprint(const std::string& fingerprint) {
  if (fingerprint.empty() || fingerprint.size() > kMaxFingerprintLength) return false;
  for (const char c : fingerprint) {
    const bool allowed = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '-';
    if (!allowed) return false;
  }
  return true;
}

absl::StatusOr<std::unique_ptr<PartitionStore>> PartitionStore::Open(const std::string& registry_dir) {
  const std::string partitions_dir = (fs::path(registry_dir) / "partitions").string();
  LYCHEE_RETURN_IF_ERROR(CreateDurableDirectory(partitions_dir));
  std::unique_ptr<PartitionStore> store(new PartitionStore(partitions_dir));
  std::error_code error;
  for (const fs::directory_entry& entry : fs::directory_iterator(partitions_dir, error)) {
    const std::string name = entry.path().filename().string();
    std::error_code type_error;
    if (entry.is_directory(type_error) && IsValidFingerprint(name)) {
      absl::MutexLock lock(&store->mutex_);
      store->ScanModel(name);
    } else if (!IsDurableTemporaryName(name)) {
      store->problems_.push_back(absl::StrCat(entry.path().string(), ": not a model fingerprint directory, ignored"));
    }
  }
  if (error) {
    return absl::UnavailableError(absl::StrCat("cannot list the registry ", partitions_dir, ": ", error.message()));
  }
  for (const std::string& problem : store->problems_) LOG(WARNING) << "partition registry: " << problem;
  return store;
}

void PartitionStore::ScanModel(const std::string& fingerprint) {
  ModelVersions& versions = models_[fingerprint];
  std::error_code error;
  const fs::path dir = fs::path(partitions_dir_) / fingerprint;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir, error)) {
    const std::string name = entry.path().filename().string();
    if (IsDurableTemporaryName(name)) continue;  // a write that a crash cut short: never published
    uint64_t version = 0;
    if (!ParseFileName(name, &version)) {
      problems_.push_back(absl::StrCat(entry.path().string(), ": not a partition version file, ignored"));
      continue;
    }
    versions.last_version = std::max(versions.last_version, version);
    absl::StatusOr<HeadPartition> partition = ReadPartition(entry.path().string());
    std::string problem;
    if (!partition.ok()) {
      problem = std::string(partition.status().message());
    } else if (partition->model_fingerprint != fingerprint || partition->version != version) {
      problem = absl::StrCat(entry.path().string(), ": holds version ", partition->version, " of model ",
                             partition->model_fingerprint, ", not what its place says");
    }
    if (problem.empty()) {
      versions.readable[version] = std::make_shared<const HeadPartition>(*std::move(partition));
    } else {
      problems_.push_back(absl::StrCat(problem, "; skipped"));
      versions.damaged[version] = problem;
    }
  }
  if (error) problems_.push_back(absl::StrCat(dir.string(), ": cannot list: ", error.message()));
}

absl::StatusOr<uint64_t> PartitionStore::Publish(HeadPartition partition) {
  if (!IsValidFingerprint(partition.model_fingerprint)) {
    return absl::InvalidArgumentError(absl::StrCat("publish: model_fingerprint '", partition.model_fingerprint,
                                                   "' is not 1 to 128 letters, digits, '_' or '-'"));
  }
  LYCHEE_RETURN_IF_ERROR(partition.Validate());
  const std::string dir = (fs::path(partitions_dir_) / partition.model_fingerprint).string();
  // Held across the write so that versions become visible in order: a watcher that has seen
  // version n has seen every readable version below it.
  absl::MutexLock lock(&mutex_);
  LYCHEE_RETURN_IF_ERROR(CreateDurableDirectory(dir));
  ModelVersions& versions = models_[partition.model_fingerprint];
  partition.version = ++versions.last_version;
  const std::string path = (fs::path(dir) / FileName(partition.version)).string();
  LYCHEE_RETURN_IF_ERROR(WriteDurableFile(path, HeadPartitionToProto(partition).SerializeAsString()));
  const uint64_t version = partition.version;
  versions.readable[version] = std::make_shared<const HeadPartition>(std::move(partition));
  return version;
}

std::vector<PartitionStore::Snapshot> PartitionStore::List(const std::string& fingerprint) const {
  absl::MutexLock lock(&mutex_);
  return NewerThan(fingerprint, 0);
}

absl::StatusOr<PartitionStore::Snapshot> PartitionStore::Get(const std::string& fingerprint, uint64_t version) const {
  absl::MutexLock lock(&mutex_);
  const auto model = models_.find(fingerprint);
  if (model != models_.end()) {
    if (const auto it = model->second.readable.find(version); it != model->second.readable.end()) return it->second;
    if (const auto it = model->second.damaged.find(version); it != model->second.damaged.end()) {
      return absl::DataLossError(absl::StrCat("partition version ", version, " of model ", fingerprint,
                                              " is damaged and not served: ", it->second));
    }
  }
  return absl::NotFoundError(absl::StrCat("no partition version ", version, " for model ", fingerprint));
}

absl::StatusOr<PartitionStore::Snapshot> PartitionStore::Latest(const std::string& fingerprint) const {
  absl::MutexLock lock(&mutex_);
  const auto model = models_.find(fingerprint);
  if (model == models_.end() || model->second.readable.empty()) {
    return absl::NotFoundError(absl::StrCat("no partition stored for model ", fingerprint));
  }
  return model->second.readable.rbegin()->second;
}

std::vector<PartitionStore::Snapshot> PartitionStore::WaitForNewerThan(const std::string& fingerprint,
                                                                       uint64_t after_version,
                                                                       std::chrono::milliseconds timeout) const {
  absl::MutexLock lock(&mutex_);
  const auto published = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    const auto model = models_.find(fingerprint);
    return model != models_.end() && model->second.readable.upper_bound(after_version) != model->second.readable.end();
  };
  mutex_.AwaitWithTimeout(absl::Condition(&published), absl::FromChrono(timeout));
  return NewerThan(fingerprint, after_version);
}

std::vector<PartitionStore::Snapshot> PartitionStore::NewerThan(const std::string& fingerprint,
                                                                uint64_t after_version) const {
  std::vector<Snapshot> newer;
  const auto model = models_.find(fingerprint);
  if (model == models_.end()) return newer;
  for (auto it = model->second.readable.upper_bound(after_version); it != model->second.readable.end(); ++it) {
    newer.push_back(it->second);
  }
  return newer;
}

}  // namespace lychee
