// The head partitions an inference service holds, and which one it serves. Partitions arrive
// from the trainer (Offer), are validated against the served model and stored durably under the
// state directory; the active one is an immutable snapshot behind an atomically swapped pointer,
// so that a sequence pins the partition it was admitted with while new sequences get the new
// one. Which version is active, the rollback history and the hold switch survive a restart.
// Thread-safe; free of LibTorch.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/base/head_partition.h"
#include "common/base/model_config.h"
#include "inference/canary.h"

namespace lychee {

struct ActivePartition {
  std::shared_ptr<const HeadPartition> partition;
  // "trainer", "activate", "rollback", "canary" (a promoted canary) or "restored".
  std::string activated_by;
};

// Which partition a new sequence gets while a canary may run, and for which side of it.
struct PartitionRoute {
  enum class Arm { kNoCanary, kStable, kCanary };
  std::shared_ptr<const HeadPartition> partition;
  Arm arm = Arm::kNoCanary;
};

struct RejectedPartition {
  uint64_t version = 0;
  std::string reason;
  int64_t unix_seconds = 0;
};

class PartitionManager {
 public:
  using Snapshot = std::shared_ptr<const HeadPartition>;

  struct Options {
    // Holds partitions/<version>.pb and active (both written durably).
    std::string state_dir;
    std::string model_fingerprint;
    ModelConfig model_config;
    // Checks beyond the model's shape (whether the decoder's hybrid path can run it); may be empty.
    std::function<absl::Status(const HeadPartition&)> check_servable;
    // Called after every change of the active partition and every rejection, outside the lock.
    std::function<void()> on_change;
    // The bounds of a canary that names none.
    CanaryBounds canary_bounds;
    // In [0, 1]: when above 0, a partition that Offer would activate while another is active
    // starts as a canary of this fraction instead.
    double offer_canary_fraction = 0;
  };

  // Reads what an earlier run stored. A stored file that is damaged or no longer validates is
  // reported in problems() and not served.
  static absl::StatusOr<std::unique_ptr<PartitionManager>> Open(Options options);

  // The partition new sequences get; a null partition when none is active.
  ActivePartition Active() const;
  // A stored version: NOT_FOUND when this service does not hold it.
  absl::StatusOr<Snapshot> Get(uint64_t version) const;
  // Oldest first.
  std::vector<Snapshot> List() const;
  uint64_t highest_version() const;

  // A partition from the trainer: validated (fingerprint, shape, parameters, servability),
  // stored, and activated unless rollouts are held or a newer version is already active. A
  // version already held is ignored. An invalid one leaves everything as it was, is remembered
  // in rejections() and returned as the error.
  absl::Status Offer(const HeadPartition& partition);
  // Called with a partition about to become active by Offer or Activate, outside the lock, before
  // the switch: the engine captures its decode graphs there, so that no serving step waits for them.
  // An error is logged and the partition activated all the same. Rollback does not wait for it.
  void SetActivationPreparer(std::function<absl::Status(const Snapshot&)> preparer);
  // Called by Offer with a partition that passed the checks above, outside the lock, before it is
  // stored (shadow validation: it decodes prompts with the partition, which takes seconds). An
  // error rejects the partition: it is not stored, remembered in rejections() with the gate's
  // message and counted in rejected_by_gate(); offering the same version again returns the same
  // error without calling the gate again. None by default.
  void SetOfferGate(std::function<absl::Status(const HeadPartition&)> gate);

  // A partition that arrived but could not even be read; remembered like a rejection.
  void RejectUnreadable(uint64_t version, const absl::Status& why);
  // NOT_FOUND for a version not held.
  absl::Status Activate(uint64_t version);
  // Back to the version active before the current one; FAILED_PRECONDITION when there is none.
  absl::Status Rollback();
  absl::Status SetHold(bool hold);
  bool held() const;

  // Starts a canary: new sequences get `version` with probability `fraction` (in (0, 1]), the
  // others the active version, until DecideCanary decides it or the operator does. `bounds`
  // defaults to Options::canary_bounds. INVALID_ARGUMENT for a fraction or bounds out of range,
  // NOT_FOUND for a version not held, FAILED_PRECONDITION while a canary runs, with no active
  // version, or for the active one. While a canary runs, Activate and Rollback fail with
  // FAILED_PRECONDITION and offers are stored but not activated. Survives a restart.
  absl::Status StartCanary(uint64_t version, double fraction, const std::optional<CanaryBounds>& bounds);
  // The operator's decision: FAILED_PRECONDITION when no canary runs. A promoted canary becomes
  // the active version (activated_by "canary"); an aborted one is served to no new sequence.
  // Sequences already admitted finish with the version they have.
  absl::Status PromoteCanary();
  absl::Status AbortCanary();
  // Lock-free, for each new sequence: the canary or the active partition while a canary runs.
  PartitionRoute Route(uint64_t sequence_id) const;
  // A sequence that Route sent to `arm` has finished; decides the canary when it can.
  void RecordCanarySequence(PartitionRoute::Arm arm, uint64_t version, const CanarySequence& sequence);
  // The running canary, else the last one decided; none before the first.
  std::optional<CanaryRecord> Canary() const;
  uint64_t rejected_by_canary() const { return rejected_by_canary_.load(); }

  std::vector<RejectedPartition> rejections() const;
  const std::vector<std::string>& problems() const { return problems_; }
  uint64_t rollouts() const { return rollouts_.load(); }
  // Every rejection, those of the offer gate included.
  uint64_t rejected_count() const { return rejected_count_.load(); }
  uint64_t rejected_by_gate() const { return rejected_by_gate_.load(); }

 private:
  explicit PartitionManager(Options options) : options_(std::move(options)) {}
  absl::Status Validate(const HeadPartition& partition) const;
  absl::StatusOr<HeadPartition> ReadStored(const std::string& path, uint64_t version) const;
  // Whether an offered `version` becomes active: rollouts are not held and no newer one is active.
  bool ShouldActivateOffer(uint64_t version) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  bool CanaryRuns() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // FAILED_PRECONDITION while a canary runs: it must be promoted or aborted first.
  absl::Status RefuseWhileCanaryRuns() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // Why an offer that ShouldActivateOffer declined stays inactive, for the log.
  const char* KeptInactiveReason() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // Runs the preparer on a held `version`, then activates it; `as_offer`: only if an offer still
  // should be.
  absl::Status PrepareAndActivate(uint64_t version, const std::string& activated_by, bool as_offer);
  // Makes `version` active and persists the state.
  absl::Status MakeActive(uint64_t version, const std::string& activated_by, bool push_history)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  absl::Status PersistState() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void RecordRejection(uint64_t version, const absl::Status& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  std::string PartitionPath(uint64_t version) const;
  void Notify() const;
  // Reads the canary an earlier run stored; a running one is resumed only if it still can be.
  void RestoreCanary(uint64_t active_version) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  absl::Status PersistCanary() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  // The operator's decision; FAILED_PRECONDITION when no canary runs.
  absl::Status DecideCanaryNow(CanaryState state, const std::string& reason);
  // Ends the running canary as `state` says (promoting it activates its version).
  absl::Status FinishCanary(CanaryState state, const std::string& reason) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  const Options options_;
  std::vector<std::string> problems_;  // written by Open only, before the manager is shared
  mutable absl::Mutex mutex_;
  std::map<uint64_t, Snapshot> partitions_ ABSL_GUARDED_BY(mutex_);
  // Versions active before the current one, most recent last.
  std::vector<uint64_t> history_ ABSL_GUARDED_BY(mutex_);
  bool held_ ABSL_GUARDED_BY(mutex_) = false;
  // The highest version Offer has decided on (activated, or kept because of the hold or a newer
  // active one); a stored version above it was cut off by a crash before its decision was recorded.
  uint64_t decided_through_ ABSL_GUARDED_BY(mutex_) = 0;
  std::deque<RejectedPartition> rejections_ ABSL_GUARDED_BY(mutex_);
  std::function<absl::Status(const Snapshot&)> preparer_ ABSL_GUARDED_BY(mutex_);
  std::function<absl::Status(const HeadPartition&)> gate_ ABSL_GUARDED_BY(mutex_);
  // Versions the gate rejected, with why.
  std::map<uint64_t, absl::Status> gate_rejections_ ABSL_GUARDED_BY(mutex_);
  // Read without the lock by every admission; replaced whole under the lock.
  std::shared_ptr<const ActivePartition> active_;
  std::atomic<uint64_t> rollouts_{0};
  std::atomic<uint64_t> rejected_count_{0};
  std::atomic<uint64_t> rejected_by_gate_{0};
  std::atomic<uint64_t> rejected_by_canary_{0};
  // The running canary, else the last one decided.
  std::optional<CanaryRecord> canary_ ABSL_GUARDED_BY(mutex_);
  struct CanaryRouting {
    Snapshot partition;
    double fraction = 0;
  };
  // Read without the lock by every admission; null when no canary runs.
  std::shared_ptr<const CanaryRouting> canary_routing_;
};

}  // namespace lychee
