// What the fuzz targets share: the input as text, failing on a broken property, and comparing
// head partitions field by field.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "common/base/head_partition.h"

// A property the code promises does not hold: abort, which libFuzzer reports as a crash and
// saves the input for.
#define LYCHEE_FUZZ_CHECK(condition)                                                                \
  do {                                                                                              \
    if (!(condition)) {                                                                             \
      std::fprintf(stderr, "%s:%d: fuzz property failed: %s\n", __FILE__, __LINE__, #condition); \
      std::abort();                                                                                 \
    }                                                                                               \
  } while (0)

namespace lychee::fuzz {

inline std::string_view AsText(const uint8_t* data, size_t size) {
  return std::string_view(reinterpret_cast<const char*>(data), size);
}

// Equal values, or both NaN: protobuf's JSON mapping keeps neither a NaN's payload nor the sign
// of a zero.
inline bool SameDouble(double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); }

// The first field in which two partitions differ, or "" when they are the same.
inline std::string PartitionDifference(const HeadPartition& a, const HeadPartition& b) {
  if (a.num_layers() != b.num_layers() || a.num_kv_heads() != b.num_kv_heads()) return "shape";
  for (int64_t layer = 0; layer < a.num_layers(); ++layer) {
    for (int64_t head = 0; head < a.num_kv_heads(); ++head) {
      if (a.role(layer, head) != b.role(layer, head)) return "roles";
    }
  }
  const SelectionParams& sa = a.selection();
  const SelectionParams& sb = b.selection();
  if (sa.block_size != sb.block_size || sa.token_budget != sb.token_budget || sa.sink_tokens != sb.sink_tokens ||
      sa.recent_tokens != sb.recent_tokens) {
    return "selection";
  }
  if (a.model_fingerprint != b.model_fingerprint) return "model_fingerprint";
  if (a.version != b.version) return "version";
  if (a.source != b.source) return "source";
  if (a.created_unix_seconds != b.created_unix_seconds) return "created_unix_seconds";
  if (a.gates.size() != b.gates.size()) return "number of gates";
  for (size_t i = 0; i < a.gates.size(); ++i) {
    const HeadGateRecord& ga = a.gates[i];
    const HeadGateRecord& gb = b.gates[i];
    if (ga.layer != gb.layer || ga.kv_head != gb.kv_head || !SameDouble(ga.a, gb.a) || !SameDouble(ga.b, gb.b) ||
        !SameDouble(ga.kuma_mean, gb.kuma_mean)) {
      return "gate " + std::to_string(i);
    }
  }
  const TrainingRecord& ta = a.training;
  const TrainingRecord& tb = b.training;
  if (ta.steps != tb.steps || !SameDouble(ta.final_loss, tb.final_loss) ||
      !SameDouble(ta.final_distillation_loss, tb.final_distillation_loss) ||
      !SameDouble(ta.expected_density, tb.expected_density) || !SameDouble(ta.deployed_density, tb.deployed_density) ||
      !SameDouble(ta.target_density, tb.target_density) ||
      !SameDouble(ta.lambda, tb.lambda) || !SameDouble(ta.seconds, tb.seconds) || ta.job_name != tb.job_name) {
    return "training record";
  }
  return "";
}

// Aborts naming the field when `copy` (what a round trip made of `original`) differs from it.
inline void CheckSamePartition(const absl::StatusOr<HeadPartition>& copy, const HeadPartition& original,
                               const char* round_trip) {
  if (!copy.ok()) {
    std::fprintf(stderr, "fuzz property failed: %s refused the partition: %s\n", round_trip,
                 copy.status().ToString().c_str());
    std::abort();
  }
  const std::string difference = PartitionDifference(*copy, original);
  if (!difference.empty()) {
    std::fprintf(stderr, "fuzz property failed: %s changed the partition's %s\n", round_trip, difference.c_str());
    std::abort();
  }
}

}  // namespace lychee::fuzz
