#include "inference/partition_manager.h"

#include <algorithm>
#include <filesystem>
#include <optional>

#include <glog/logging.h>
#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/base/durable_file.h"
#include "common/base/status_macros.h"
#include "lychee/v1/head_partition.pb.h"

namespace lychee {
namespace {

constexpr size_t kRejectionsKept = 16;
constexpr char kPartitionSuffix[] = ".pb";
constexpr char kCanaryFile[] = "canary";

// Why an offered partition was kept without being activated (PartitionManager::ShouldActivateOffer).

}  // namespace

absl::StatusOr<std::unique_ptr<PartitionManager>> PartitionManager::Open(Options options) {
  if (options.state_dir.empty()) return absl::InvalidArgumentError("the state directory is required");
  std::unique_ptr<PartitionManager> manager(new PartitionManager(std::move(options)));
  // Not shared yet: held so that the guarded members are only ever touched under the lock.
  absl::ReleasableMutexLock lock(&manager->mutex_);
  const std::filesystem::path partitions_dir = std::filesystem::path(manager->options_.state_dir) / "partitions";
  LYCHEE_RETURN_IF_ERROR(CreateDurableDirectory(partitions_dir.string()));

  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(partitions_dir, error)) {
    const std::string name = entry.path().filename().string();
    if (IsDurableTemporaryName(name)) continue;
    uint64_t version = 0;
    if (entry.path().extension() != kPartitionSuffix ||
        !absl::SimpleAtoi(std::string(entry.path().stem().string()), &version) || version == 0) {
      manager->problems_.push_back(absl::StrCat(entry.path().string(), ": not a stored partition, ignored"));
      continue;
    }
    absl::StatusOr<HeadPartition> partition = manager->ReadStored(entry.path().string(), version);
    if (!partition.ok()) {
      manager->problems_.push_back(std::string(partition.status().message()));
      continue;
    }
    manager->partitions_[version] = std::make_shared<const HeadPartition>(*std::move(partition));
  }
  if (error) {
    return absl::InternalError(absl::StrCat("cannot list ", partitions_dir.string(), ": ", error.message()));
  }

  const std::string state_path = (std::filesystem::path(manager->options_.state_dir) / "active").string();
  absl::StatusOr<std::string> state_text = ReadDurableFile(state_path);
  uint64_t active_version = 0;
  std::optional<uint64_t> decided_through;
  if (state_text.ok()) {
    const nlohmann::json state = nlohmann::json::parse(*state_text, nullptr, /*allow_exceptions=*/false);
    if (state.is_object() && state.value("active_version", nlohmann::json()).is_number_unsigned()) {
      active_version = state["active_version"].get<uint64_t>();
      manager->held_ = state.value("held", false);
      if (state.value("decided_through", nlohmann::json()).is_number_unsigned()) {
        decided_through = state["decided_through"].get<uint64_t>();
      }
      for (const nlohmann::json& version : state.value("history", nlohmann::json::array())) {
        if (version.is_number_unsigned() && manager->partitions_.count(version.get<uint64_t>()) != 0) {
          manager->history_.push_back(version.get<uint64_t>());
        }
      }
    } else {
      manager->problems_.push_back(absl::StrCat(state_path, ": not a state record, starting with none active"));
    }
  } else if (!absl::IsNotFound(state_text.status())) {
    manager->problems_.push_back(std::string(state_text.status().message()));
  }
  if (active_version != 0 && manager->partitions_.count(active_version) == 0) {
    manager->problems_.push_back(
        absl::StrCat("version ", active_version, " was active but is not readable; starting with none active"));
    active_version = 0;
  }
  manager->active_ = std::make_shared<const ActivePartition>(ActivePartition{
      active_version == 0 ? nullptr : manager->partitions_[active_version], active_version == 0 ? "" : "restored"});
  manager->RestoreCanary(active_version);
  for (const std::string& problem : manager->problems_) LOG(WARNING) << "partition state: " << problem;
  // A version stored just before a crash, before its activation was recorded, is decided now as
  // Offer would have decided it.
  const uint64_t highest = manager->partitions_.empty() ? 0 : manager->partitions_.rbegin()->first;
  manager->decided_through_ = decided_through.value_or(highest);
  if (highest > manager->decided_through_ && !manager->held_ && highest > active_version &&
      manager->canary_routing_ == nullptr) {
    manager->decided_through_ = highest;
    LYCHEE_RETURN_IF_ERROR(manager->MakeActive(highest, "trainer", /*push_history=*/true));
  }
  lock.Release();
  return manager;
}

absl::StatusOr<HeadPartition> PartitionManager::ReadStored(const std::string& path, uint64_t version) const {
  LYCHEE_ASSIGN_OR_RETURN(const std::string payload, ReadDurableFile(path));  // names the file
  v1::HeadPartition proto;
  if (!proto.ParseFromString(payload)) return absl::DataLossError(absl::StrCat(path, ": not a lychee.v1.HeadPartition"));
  absl::StatusOr<HeadPartition> partition = HeadPartitionFromProto(proto);
  if (!partition.ok()) return absl::DataLossError(absl::StrCat(path, ": ", partition.status().message()));
  if (partition->version != version) {
    return absl::DataLossError(absl::StrCat(path, ": holds version ", partition->version));
  }
  if (absl::Status valid = Validate(*partition); !valid.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(path, ": ", valid.message()));
  }
  return partition;
}

absl::Status PartitionManager::Validate(const HeadPartition& partition) const {
  if (partition.version == 0) return absl::InvalidArgumentError("partition has no registry version");
  if (partition.model_fingerprint != options_.model_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat("partition ", partition.version, " is for model ",
                                                      partition.model_fingerprint.empty() ? "(none)" : partition.model_fingerprint,
                                                      ", this service serves ", options_.model_fingerprint));
  }
  if (absl::Status fits = partition.ValidateFor(options_.model_config); !fits.ok()) {
    return absl::Status(fits.code(), absl::StrCat("partition ", partition.version, ": ", fits.message()));
  }
  if (options_.check_servable) {
    if (absl::Status servable = options_.check_servable(partition); !servable.ok()) {
      return absl::Status(servable.code(), absl::StrCat("partition ", partition.version, ": ", servable.message()));
    }
  }
  return absl::OkStatus();
}

ActivePartition PartitionManager::Active() const { return *std::atomic_load(&active_); }

absl::StatusOr<PartitionManager::Snapshot> PartitionManager::Get(uint64_t version) const {
  absl::MutexLock lock(&mutex_);
  auto it = partitions_.find(version);
  if (it == partitions_.end()) {
    return absl::NotFoundError(absl::StrCat("partition version ", version, " is not held by this service"));
  }
  return it->second;
}

std::vector<PartitionManager::Snapshot> PartitionManager::List() const {
  absl::MutexLock lock(&mutex_);
  std::vector<Snapshot> list;
  for (const auto& [version, partition] : partitions_) list.push_back(partition);
  return list;
}

uint64_t PartitionManager::highest_version() const {
  absl::MutexLock lock(&mutex_);
  return partitions_.empty() ? 0 : partitions_.rbegin()->first;
}

absl::Status PartitionManager::Offer(const HeadPartition& partition) {
  std::function<absl::Status(const HeadPartition&)> gate;
  absl::Status valid;
  {
    absl::MutexLock lock(&mutex_);
    if (partitions_.count(partition.version) != 0) return absl::OkStatus();
    if (auto rejected = gate_rejections_.find(partition.version); rejected != gate_rejections_.end()) {
      return rejected->second;
    }
    valid = Validate(partition);
    if (!valid.ok()) RecordRejection(partition.version, valid);
    gate = gate_;
  }
  if (!valid.ok()) {
    Notify();
    return valid;
  }
  // Outside the lock: admissions read partitions while the gate decodes.
  if (gate) {
    if (absl::Status passed = gate(partition); !passed.ok()) {
      // Cut short (the server is shutting down): nothing was decided about the partition.
      if (absl::IsCancelled(passed)) return passed;
      {
        absl::MutexLock lock(&mutex_);
        gate_rejections_[partition.version] = passed;
        ++rejected_by_gate_;
        RecordRejection(partition.version, passed);
      }
      Notify();
      return passed;
    }
  }
  absl::Status status;
  bool activate = false;
  bool as_canary = false;
  {
    absl::MutexLock lock(&mutex_);
    if (partitions_.count(partition.version) != 0) return absl::OkStatus();
    v1::HeadPartition proto = HeadPartitionToProto(partition);
    status = WriteDurableFile(PartitionPath(partition.version), proto.SerializeAsString());
    if (status.ok()) {
      partitions_[partition.version] = std::make_shared<const HeadPartition>(partition);
      decided_through_ = std::max(decided_through_, partition.version);
      activate = ShouldActivateOffer(partition.version);
      // A canary does not change the active version: the decision is recorded here.
      as_canary = activate && options_.offer_canary_fraction > 0 && std::atomic_load(&active_)->partition != nullptr;
      if (!activate) {
        LOG(INFO) << "partition " << partition.version << " stored, not activated: " << KeptInactiveReason();
      }
      if (!activate || as_canary) status = PersistState();
    } else {
      RecordRejection(partition.version, status);
    }
  }
  if (as_canary && status.ok()) {
    status = StartCanary(partition.version, options_.offer_canary_fraction, std::nullopt);
  } else if (activate) {
    status = PrepareAndActivate(partition.version, "trainer", /*as_offer=*/true);
  }
  Notify();
  return status;
}

bool PartitionManager::ShouldActivateOffer(uint64_t version) const {
  const Snapshot current = std::atomic_load(&active_)->partition;
  return !held_ && !CanaryRuns() && (current == nullptr || current->version < version);
}

bool PartitionManager::CanaryRuns() const { return canary_ && canary_->state == CanaryState::kRunning; }

absl::Status PartitionManager::RefuseWhileCanaryRuns() const {
  if (!CanaryRuns()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("a canary of partition ", canary_->version, " runs; promote or abort it first"));
}

const char* PartitionManager::KeptInactiveReason() const {
  if (held_) return "rollouts are on hold";
  return CanaryRuns() ? "a canary runs" : "a newer version is active";
}

void PartitionManager::SetOfferGate(std::function<absl::Status(const HeadPartition&)> gate) {
  absl::MutexLock lock(&mutex_);
  gate_ = std::move(gate);
}

void PartitionManager::SetActivationPreparer(std::function<absl::Status(const Snapshot&)> preparer) {
  absl::MutexLock lock(&mutex_);
  preparer_ = std::move(preparer);
}

absl::Status PartitionManager::PrepareAndActivate(uint64_t version, const std::string& activated_by, bool as_offer) {
  std::function<absl::Status(const Snapshot&)> preparer;
  Snapshot snapshot;
  {
    absl::MutexLock lock(&mutex_);
    preparer = preparer_;
    snapshot = partitions_.at(version);
  }
  // Outside the lock: preparing takes a while, and admissions read partitions meanwhile.
  if (preparer) {
    if (absl::Status prepared = preparer(snapshot); !prepared.ok()) {
      LOG(WARNING) << "partition " << version << " is activated unprepared (its first decode steps capture their "
                   << "CUDA graphs): " << prepared.message();
    }
  }
  absl::MutexLock lock(&mutex_);
  // An offer is decided again: a newer version may have become active, or rollouts been held, meanwhile.
  if (as_offer && !ShouldActivateOffer(version)) {
    LOG(INFO) << "partition " << version << " stored, not activated: " << KeptInactiveReason();
    return PersistState();
  }
  return MakeActive(version, activated_by, /*push_history=*/true);
}

void PartitionManager::RejectUnreadable(uint64_t version, const absl::Status& why) {
  {
    absl::MutexLock lock(&mutex_);
    RecordRejection(version, why);
  }
  Notify();
}

void PartitionManager::RecordRejection(uint64_t version, const absl::Status& why) {
  rejections_.push_back({version, std::string(why.message()), absl::ToUnixSeconds(absl::Now())});
  if (rejections_.size() > kRejectionsKept) rejections_.pop_front();
  ++rejected_count_;
  LOG(INFO) << "partition " << version << " rejected: " << why.message();
}

absl::Status PartitionManager::Activate(uint64_t version) {
  {
    absl::MutexLock lock(&mutex_);
    if (partitions_.count(version) == 0) {
      return absl::NotFoundError(absl::StrCat("partition version ", version, " is not held by this service"));
    }
    LYCHEE_RETURN_IF_ERROR(RefuseWhileCanaryRuns());
  }
  LYCHEE_RETURN_IF_ERROR(PrepareAndActivate(version, "activate", /*as_offer=*/false));
  Notify();
  return absl::OkStatus();
}

absl::Status PartitionManager::Rollback() {
  {
    absl::MutexLock lock(&mutex_);
    LYCHEE_RETURN_IF_ERROR(RefuseWhileCanaryRuns());
    if (history_.empty()) return absl::FailedPreconditionError("no earlier partition to roll back to");
    const uint64_t previous = history_.back();
    history_.pop_back();
    LYCHEE_RETURN_IF_ERROR(MakeActive(previous, "rollback", /*push_history=*/false));
  }
  Notify();
  return absl::OkStatus();
}

absl::Status PartitionManager::SetHold(bool hold) {
  {
    absl::MutexLock lock(&mutex_);
    const bool was = held_;
    held_ = hold;
    if (absl::Status persisted = PersistState(); !persisted.ok()) {
      held_ = was;
      return persisted;
    }
    LOG(INFO) << "partition rollouts " << (hold ? "held" : "resumed");
  }
  Notify();
  return absl::OkStatus();
}

bool PartitionManager::held() const {
  absl::MutexLock lock(&mutex_);
  return held_;
}

std::vector<RejectedPartition> PartitionManager::rejections() const {
  absl::MutexLock lock(&mutex_);
  return {rejections_.begin(), rejections_.end()};
}

absl::Status PartitionManager::MakeActive(uint64_t version, const std::string& activated_by, bool push_history) {
  const std::shared_ptr<const ActivePartition> previous = std::atomic_load(&active_);
  const std::vector<uint64_t> previous_history = history_;
  if (push_history && previous->partition != nullptr && previous->partition->version != version) {
    history_.push_back(previous->partition->version);
  }
  std::atomic_store(&active_, std::make_shared<const ActivePartition>(ActivePartition{partitions_[version], activated_by}));
  // The switch is only acknowledged once it would survive a restart.
  if (absl::Status persisted = PersistState(); !persisted.ok()) {
    std::atomic_store(&active_, previous);
    history_ = previous_history;
    return persisted;
  }
  ++rollouts_;
  LOG(INFO) << "partition " << version << " active (" << activated_by << ")";
  return absl::OkStatus();
}

absl::Status PartitionManager::PersistState() const {
  const Snapshot active = std::atomic_load(&active_)->partition;
  const nlohmann::json state = {{"active_version", active == nullptr ? 0 : active->version},
                                {"history", history_},
                                {"held", held_},
                                {"decided_through", decided_through_}};
  return WriteDurableFile((std::filesystem::path(options_.state_dir) / "active").string(), state.dump());
}

std::string PartitionManager::PartitionPath(uint64_t version) const {
  return (std::filesystem::path(options_.state_dir) / "partitions" / absl::StrCat(version, kPartitionSuffix)).string();
}

absl::Status PartitionManager::StartCanary(uint64_t version, double fraction,
                                           const std::optional<CanaryBounds>& bounds) {
  // Written so that NaN fails too.
  if (!(fraction > 0 && fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("canary_fraction must be in (0, 1], got ", fraction));
  }
  if (bounds) LYCHEE_RETURN_IF_ERROR(bounds->Validate("canary_"));
  std::function<absl::Status(const Snapshot&)> preparer;
  Snapshot snapshot;
  {
    absl::MutexLock lock(&mutex_);
    auto it = partitions_.find(version);
    if (it == partitions_.end()) {
      return absl::NotFoundError(absl::StrCat("version: partition ", version, " is not held by this service"));
    }
    LYCHEE_RETURN_IF_ERROR(RefuseWhileCanaryRuns());
    const Snapshot active = std::atomic_load(&active_)->partition;
    if (active == nullptr) {
      return absl::FailedPreconditionError("a canary needs an active partition to compare with; activate one first");
    }
    if (active->version == version) {
      return absl::FailedPreconditionError(absl::StrCat("version: partition ", version, " is already active"));
    }
    preparer = preparer_;
    snapshot = it->second;
  }
  // Outside the lock, as for an activation: the canary's first sequences then replay captured graphs.
  if (preparer) {
    if (absl::Status prepared = preparer(snapshot); !prepared.ok()) {
      LOG(WARNING) << "canary partition " << version << " starts unprepared: " << prepared.message();
    }
  }
  {
    absl::MutexLock lock(&mutex_);
    LYCHEE_RETURN_IF_ERROR(RefuseWhileCanaryRuns());
    const Snapshot active = std::atomic_load(&active_)->partition;
    if (active == nullptr || active->version == version) {
      return absl::FailedPreconditionError(
          absl::StrCat("the active partition changed while canary ", version, " was prepared; start it again"));
    }
    const std::optional<CanaryRecord> previous = canary_;
    CanaryRecord record;
    record.version = version;
    record.stable_version = active->version;
    record.fraction = fraction;
    record.bounds = bounds.value_or(options_.canary_bounds);
    record.started_unix_seconds = absl::ToUnixSeconds(absl::Now());
    canary_ = std::move(record);
    if (absl::Status persisted = PersistCanary(); !persisted.ok()) {
      canary_ = previous;
      return persisted;
    }
    std::atomic_store(&canary_routing_, std::make_shared<const CanaryRouting>(CanaryRouting{snapshot, fraction}));
    LOG(INFO) << "partition " << version << " canary started for a fraction " << fraction << " of new sequences";
  }
  Notify();
  return absl::OkStatus();
}

absl::Status PartitionManager::PromoteCanary() {
  return DecideCanaryNow(CanaryState::kPromoted, "promoted by the operator");
}

absl::Status PartitionManager::AbortCanary() {
  return DecideCanaryNow(CanaryState::kAborted, "aborted by the operator");
}

absl::Status PartitionManager::DecideCanaryNow(CanaryState state, const std::string& reason) {
  {
    absl::MutexLock lock(&mutex_);
    if (!CanaryRuns()) return absl::FailedPreconditionError("no canary runs");
    LYCHEE_RETURN_IF_ERROR(FinishCanary(state, reason));
  }
  Notify();
  return absl::OkStatus();
}

PartitionRoute PartitionManager::Route(uint64_t sequence_id) const {
  const std::shared_ptr<const CanaryRouting> canary = std::atomic_load(&canary_routing_);
  const Snapshot active = std::atomic_load(&active_)->partition;
  if (canary == nullptr) return {active, PartitionRoute::Arm::kNoCanary};
  if (RoutesToCanary(sequence_id, canary->partition->version, canary->fraction)) {
    return {canary->partition, PartitionRoute::Arm::kCanary};
  }
  return {active, PartitionRoute::Arm::kStable};
}

void PartitionManager::RecordCanarySequence(PartitionRoute::Arm arm, uint64_t version, const CanarySequence& sequence) {
  if (arm == PartitionRoute::Arm::kNoCanary) return;
  bool decided = false;
  {
    absl::MutexLock lock(&mutex_);
    // A sequence of a canary decided since its admission, or of an earlier one.
    if (!CanaryRuns()) return;
    const bool canary_arm = arm == PartitionRoute::Arm::kCanary;
    if (version != (canary_arm ? canary_->version : canary_->stable_version)) return;
    AddSequence(sequence, canary_arm ? canary_->canary : canary_->stable);
    // Stored with each canary sequence, not each stable one: the decision depends on the former.
    if (!canary_arm) return;
    const CanaryVerdict verdict = DecideCanary(*canary_);
    if (verdict.state == CanaryState::kRunning) {
      if (absl::Status persisted = PersistCanary(); !persisted.ok()) {
        LOG(ERROR) << "canary of partition " << version << ": its counts were not stored: " << persisted.message();
      }
      return;
    }
    if (absl::Status finished = FinishCanary(verdict.state, verdict.reason); !finished.ok()) {
      LOG(ERROR) << "canary of partition " << version << " could not be " << CanaryStateName(verdict.state) << ": "
                 << finished.message();
      return;
    }
    decided = true;
  }
  if (decided) Notify();
}

std::optional<CanaryRecord> PartitionManager::Canary() const {
  absl::MutexLock lock(&mutex_);
  return canary_;
}

absl::Status PartitionManager::FinishCanary(CanaryState state, const std::string& reason) {
  const CanaryRecord running = *canary_;
  canary_->state = state;
  canary_->reason = reason;
  canary_->decided_unix_seconds = absl::ToUnixSeconds(absl::Now());
  if (absl::Status persisted = PersistCanary(); !persisted.ok()) {
    canary_ = running;
    return persisted;
  }
  std::atomic_store(&canary_routing_, std::shared_ptr<const CanaryRouting>());
  if (state == CanaryState::kPromoted) {
    // Recorded as promoted first, so that a crash between the two cannot resume a promoted canary;
    // a failed activation leaves the stable version active and says so in the record.
    if (absl::Status activated = MakeActive(running.version, "canary", /*push_history=*/true); !activated.ok()) {
      canary_->state = CanaryState::kAborted;
      canary_->reason = absl::StrCat(reason, "; its activation failed: ", activated.message());
      if (absl::Status persisted = PersistCanary(); !persisted.ok()) {
        LOG(ERROR) << "canary of partition " << running.version << ": " << persisted.message();
      }
      return activated;
    }
  }
  if (state == CanaryState::kRolledBack) {
    ++rejected_by_canary_;
    // Logged as a rejection.
    RecordRejection(running.version, absl::FailedPreconditionError(absl::StrCat("canary rolled back: ", reason)));
  } else {
    LOG(INFO) << "canary of partition " << running.version << " " << CanaryStateName(state) << ": " << reason;
  }
  return absl::OkStatus();
}

absl::Status PartitionManager::PersistCanary() const {
  return WriteDurableFile((std::filesystem::path(options_.state_dir) / kCanaryFile).string(),
                          CanaryRecordToJson(*canary_).dump());
}

void PartitionManager::RestoreCanary(uint64_t active_version) {
  const std::string path = (std::filesystem::path(options_.state_dir) / kCanaryFile).string();
  absl::StatusOr<std::string> text = ReadDurableFile(path);
  if (!text.ok()) {
    if (!absl::IsNotFound(text.status())) problems_.push_back(std::string(text.status().message()));
    return;
  }
  CanaryRecord record;
  const nlohmann::json json = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (absl::Status read = CanaryRecordFromJson(json, record); !read.ok()) {
    problems_.push_back(absl::StrCat(path, ": ", read.message(), "; no canary restored"));
    return;
  }
  if (record.state == CanaryState::kRunning) {
    auto it = partitions_.find(record.version);
    if (it == partitions_.end() || record.stable_version != active_version) {
      problems_.push_back(absl::StrCat("the canary of partition ", record.version, " against ", record.stable_version,
                                       " cannot resume (its version is not readable or another is active); "
                                       "it is aborted"));
      record.state = CanaryState::kAborted;
      record.reason = "could not resume after a restart";
      record.decided_unix_seconds = absl::ToUnixSeconds(absl::Now());
    } else {
      canary_routing_ = std::make_shared<const CanaryRouting>(CanaryRouting{it->second, record.fraction});
    }
  }
  canary_ = std::move(record);
}

void PartitionManager::Notify() const {
  if (options_.on_change) options_.on_change();
}

}  // namespace lychee
