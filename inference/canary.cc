#include "inference/canary.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace lychee {
namespace {

constexpr size_t kRecentLatenciesKept = 1024;
// How far above the bound, in standard errors of the mean, the dropped mass must be to roll a
// canary back before its full run: a one-sided test that a within-bounds partition fails by chance
// about once in 700 canaries.
constexpr double kEarlyRollbackStandardErrors = 3;

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

bool InUnitInterval(double value) { return value >= 0 && value <= 1; }

nlohmann::json ArmToJson(const CanaryArmStats& stats) {
  return {{"sequences", stats.sequences},
          {"errors", stats.errors},
          {"audited_sequences", stats.audited_sequences},
          {"dropped_mass_sum", stats.dropped_mass_sum},
          {"dropped_mass_square_sum", stats.dropped_mass_square_sum},
          {"tokens", stats.tokens},
          {"token_latency_sum", stats.token_latency_sum}};
}

bool ArmFromJson(const nlohmann::json& json, CanaryArmStats& stats) {
  if (!json.is_object()) return false;
  try {
    stats.sequences = json.at("sequences").get<int64_t>();
    stats.errors = json.at("errors").get<int64_t>();
    stats.audited_sequences = json.at("audited_sequences").get<int64_t>();
    stats.dropped_mass_sum = json.at("dropped_mass_sum").get<double>();
    stats.dropped_mass_square_sum = json.at("dropped_mass_square_sum").get<double>();
    stats.tokens = json.at("tokens").get<int64_t>();
    stats.token_latency_sum = json.at("token_latency_sum").get<double>();
  } catch (const nlohmann::json::exception&) {
    return false;
  }
  return true;
}

std::string Numbers(const CanaryRecord& record) {
  return absl::StrFormat(
      "%d canary sequences: mean dropped mass %.4f over %d measured (bound %.4f), error rate %.4f (bound %.4f), "
      "mean per-token latency %.6f s vs %.6f s stable (bound x%.2f)",
      record.canary.sequences, record.canary.mean_dropped_mass(), record.canary.audited_sequences,
      record.bounds.max_dropped_mass, record.canary.error_rate(), record.bounds.max_error_rate,
      record.canary.mean_token_latency(), record.stable.mean_token_latency(), record.bounds.max_latency_ratio);
}

}  // namespace

absl::Status CanaryBounds::Validate(const std::string& prefix) const {
  if (sequences < 1)
    return absl::InvalidArgumentError(absl::StrCat(prefix, "sequences must be at least 1, got ", sequences));
  if (!InUnitInterval(max_dropped_mass)) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "max_dropped_mass must be in [0, 1], got ", max_dropped_mass));
  }
  if (!InUnitInterval(max_error_rate)) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "max_error_rate must be in [0, 1], got ", max_error_rate));
  }
  if (!(max_latency_ratio >= 1 && std::isfinite(max_latency_ratio))) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "max_latency_ratio must be a finite number of at least 1, got ", max_latency_ratio));
  }
  return absl::OkStatus();
}

double CanaryArmStats::mean_dropped_mass() const {
  return audited_sequences == 0 ? 0 : dropped_mass_sum / static_cast<double>(audited_sequences);
}

double CanaryArmStats::error_rate() const {
  return sequences == 0 ? 0 : static_cast<double>(errors) / static_cast<double>(sequences);
}

double CanaryArmStats::mean_token_latency() const {
  return tokens == 0 ? 0 : token_latency_sum / static_cast<double>(tokens);
}

double CanaryArmStats::p99_sequence_latency() const {
  if (recent_sequence_latencies.empty()) return 0;
  std::vector<double> sorted(recent_sequence_latencies.begin(), recent_sequence_latencies.end());
  const size_t rank = static_cast<size_t>(std::ceil(0.99 * static_cast<double>(sorted.size()))) - 1;
  std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(rank), sorted.end());
  return sorted[rank];
}

void AddSequence(const CanarySequence& sequence, CanaryArmStats& stats) {
  ++stats.sequences;
  if (sequence.error) ++stats.errors;
  if (sequence.mean_dropped_mass) {
    ++stats.audited_sequences;
    stats.dropped_mass_sum += *sequence.mean_dropped_mass;
    stats.dropped_mass_square_sum += *sequence.mean_dropped_mass * *sequence.mean_dropped_mass;
  }
  if (sequence.timed_tokens > 0) {
    stats.tokens += sequence.timed_tokens;
    stats.token_latency_sum += sequence.token_latency_sum;
    stats.recent_sequence_latencies.push_back(sequence.token_latency_sum / static_cast<double>(sequence.timed_tokens));
    if (stats.recent_sequence_latencies.size() > kRecentLatenciesKept) stats.recent_sequence_latencies.pop_front();
  }
}

const char* CanaryStateName(CanaryState state) {
  switch (state) {
    case CanaryState::kRunning: return "running";
    case CanaryState::kPromoted: return "promoted";
    case CanaryState::kRolledBack: return "rolled_back";
    case CanaryState::kAborted: return "aborted";
  }
  return "unknown";
}

nlohmann::json CanaryRecordToJson(const CanaryRecord& record) {
  return {{"version", record.version},
          {"stable_version", record.stable_version},
          {"fraction", record.fraction},
          {"sequences", record.bounds.sequences},
          {"max_dropped_mass", record.bounds.max_dropped_mass},
          {"max_error_rate", record.bounds.max_error_rate},
          {"max_latency_ratio", record.bounds.max_latency_ratio},
          {"state", CanaryStateName(record.state)},
          {"reason", record.reason},
          {"canary", ArmToJson(record.canary)},
          {"stable", ArmToJson(record.stable)},
          {"started_unix_seconds", record.started_unix_seconds},
          {"decided_unix_seconds", record.decided_unix_seconds}};
}

absl::Status CanaryRecordFromJson(const nlohmann::json& json, CanaryRecord& record) {
  const absl::Status malformed = absl::InvalidArgumentError("not a canary record");
  if (!json.is_object()) return malformed;
  try {
    record.version = json.at("version").get<uint64_t>();
    record.stable_version = json.at("stable_version").get<uint64_t>();
    record.fraction = json.at("fraction").get<double>();
    record.bounds.sequences = json.at("sequences").get<int64_t>();
    record.bounds.max_dropped_mass = json.at("max_dropped_mass").get<double>();
    record.bounds.max_error_rate = json.at("max_error_rate").get<double>();
    record.bounds.max_latency_ratio = json.at("max_latency_ratio").get<double>();
    const std::string state = json.at("state").get<std::string>();
    bool known = false;
    for (CanaryState candidate :
         {CanaryState::kRunning, CanaryState::kPromoted, CanaryState::kRolledBack, CanaryState::kAborted}) {
      if (state == CanaryStateName(candidate)) {
        record.state = candidate;
        known = true;
      }
    }
    if (!known) return malformed;
    record.reason = json.at("reason").get<std::string>();
    record.started_unix_seconds = json.at("started_unix_seconds").get<int64_t>();
    record.decided_unix_seconds = json.at("decided_unix_seconds").get<int64_t>();
  } catch (const nlohmann::json::exception&) {
    return malformed;
  }
  if (!ArmFromJson(json["canary"], record.canary) || !ArmFromJson(json["stable"], record.stable)) return malformed;
  if (!(record.fraction > 0 && record.fraction <= 1)) return malformed;
  return record.bounds.Validate("canary_");
}

CanaryVerdict DecideCanary(const CanaryRecord& record) {
  const CanaryBounds& bounds = record.bounds;
  const CanaryArmStats& canary = record.canary;
  // More errors than a run of this length may have: no later sequence can bring the rate back
  // within the bound by the time the canary is decided.
  const double run = static_cast<double>(std::max(bounds.sequences, canary.sequences));
  if (static_cast<double>(canary.errors) > bounds.max_error_rate * run) {
    return {CanaryState::kRolledBack,
            absl::StrCat("error rate: ", canary.errors, " errors exceed the ", bounds.max_error_rate, " allowed over ",
                         static_cast<int64_t>(run), " sequences; ", Numbers(record))};
  }
  const int64_t audited = canary.audited_sequences;
  if (audited >= 2 && 2 * audited >= bounds.sequences && audited < bounds.sequences) {
    const double mean = canary.mean_dropped_mass();
    const double variance =
        std::max(0.0, (canary.dropped_mass_square_sum - static_cast<double>(audited) * mean * mean) /
                          static_cast<double>(audited - 1));
    const double standard_error = std::sqrt(variance / static_cast<double>(audited));
    if (mean - kEarlyRollbackStandardErrors * standard_error > bounds.max_dropped_mass) {
      return {CanaryState::kRolledBack,
              absl::StrFormat("dropped mass: %.4f exceeds the bound by more than %.0f standard errors (%.4f); %s", mean,
                              kEarlyRollbackStandardErrors, standard_error, Numbers(record))};
    }
  }
  // Decided on measured sequences: one that its sparse heads served as dense attention would
  // (its context within their budget) says nothing of the partition.
  if (audited < bounds.sequences) return {};
  if (canary.mean_dropped_mass() > bounds.max_dropped_mass) {
    return {CanaryState::kRolledBack, absl::StrCat("dropped mass above the bound; ", Numbers(record))};
  }
  if (record.stable.tokens > 0 && canary.tokens > 0 &&
      canary.mean_token_latency() > bounds.max_latency_ratio * record.stable.mean_token_latency()) {
    return {CanaryState::kRolledBack, absl::StrCat("per-token latency above the bound; ", Numbers(record))};
  }
  return {CanaryState::kPromoted, absl::StrCat("within bounds; ", Numbers(record))};
}

bool RoutesToCanary(uint64_t sequence_id, uint64_t version, double fraction) {
  const uint64_t hash = SplitMix64(sequence_id ^ SplitMix64(version));
  // The top 53 bits as a double in [0, 1).
  const double uniform = static_cast<double>(hash >> 11) * 0x1.0p-53;
  return uniform < fraction;
}

}  // namespace lychee
