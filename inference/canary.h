// A canary rollout of a head partition: a fraction of new sequences gets the canary version, the
// others the stable (active) one, each audited so that the attention mass it drops is measured.
// This header holds what the partition manager keeps of a canary and the rule that decides it:
// the per-version numbers, the bounds, when to promote and when to roll back. Free of LibTorch.
#pragma once

#include <cstdint>
#include <deque>
#include <optional>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "absl/status/status.h"

namespace lychee {

struct CanaryBounds {
  // Measured canary sequences (CanarySequence::mean_dropped_mass set) after which the canary is
  // decided; earlier when a bound is clearly exceeded.
  int64_t sequences = 32;
  // In [0, 1]: the highest mean, over the canary's audited sequences, of their mean dropped mass.
  double max_dropped_mass = 0.2;
  // In [0, 1]: the highest fraction of canary sequences that may end in an error.
  double max_error_rate = 0.05;
  // At least 1: the canary's mean per-token latency may be at most this many times the stable
  // version's (both audited alike, over the same period).
  double max_latency_ratio = 1.5;

  // INVALID_ARGUMENT naming the field (with `prefix`, e.g. "canary_") that is out of range.
  absl::Status Validate(const std::string& prefix) const;
};

// What the sequences of one version finished during a canary.
struct CanaryArmStats {
  int64_t sequences = 0;
  int64_t errors = 0;
  // Sequences whose dropped mass was measured (see CanarySequence); the sums are over their means.
  int64_t audited_sequences = 0;
  double dropped_mass_sum = 0;
  double dropped_mass_square_sum = 0;
  int64_t tokens = 0;
  double token_latency_sum = 0;
  // The most recent sequences' mean per-token latencies, for a p99 (not stored across restarts).
  std::deque<double> recent_sequence_latencies;

  double mean_dropped_mass() const;
  double error_rate() const;
  double mean_token_latency() const;
  // Over recent_sequence_latencies (nearest rank); 0 when there are none.
  double p99_sequence_latency() const;
};

// How one finished sequence of a canary went.
struct CanarySequence {
  bool error = false;
  // The mean dropped mass of its audited steps; unset when none was audited, when it failed, or
  // when its context stayed within the sparse heads' token budget (they then attend to all of it,
  // and the sequence says nothing of the partition).
  std::optional<double> mean_dropped_mass;
  // Tokens after the first, and the sum of their latencies.
  int64_t timed_tokens = 0;
  double token_latency_sum = 0;
};

void AddSequence(const CanarySequence& sequence, CanaryArmStats& stats);

enum class CanaryState { kRunning, kPromoted, kRolledBack, kAborted };
const char* CanaryStateName(CanaryState state);

struct CanaryRecord {
  uint64_t version = 0;
  uint64_t stable_version = 0;
  double fraction = 0;
  CanaryBounds bounds;
  CanaryState state = CanaryState::kRunning;
  // Why it was decided, with the numbers; empty while it runs.
  std::string reason;
  CanaryArmStats canary;
  CanaryArmStats stable;
  int64_t started_unix_seconds = 0;
  int64_t decided_unix_seconds = 0;
};

nlohmann::json CanaryRecordToJson(const CanaryRecord& record);
// INVALID_ARGUMENT when `json` is not a record CanaryRecordToJson wrote.
absl::Status CanaryRecordFromJson(const nlohmann::json& json, CanaryRecord& record);

struct CanaryVerdict {
  // kRunning: not decided yet.
  CanaryState state = CanaryState::kRunning;
  std::string reason;
};

// Decides a running canary from its numbers so far. Once bounds.sequences canary sequences had
// their dropped mass measured, it is promoted when the mean of that mass, the error rate and the
// per-token latency are within the bounds, else rolled back. Earlier, it is rolled back when the
// errors already exceed what the run allows, or when, after half the run, the mean dropped mass
// exceeds the bound by more than three standard errors.
CanaryVerdict DecideCanary(const CanaryRecord& record);

// Whether sequence `sequence_id` of a canary of `version` at `fraction` gets the canary: a hash of
// the two, uniform in [0, 1), below the fraction. Deterministic, so a test can predict it.
bool RoutesToCanary(uint64_t sequence_id, uint64_t version, double fraction);

}  // namespace lychee
