// Which KV head of each layer is a retrieval head and which a sparse head, and how retrieval
// heads select blocks for the sparse heads. Immutable once built; the services share it through
// shared_ptr<const HeadPartition> snapshots. Free of LibTorch.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/model_config.h"

namespace lychee {
namespace v1 {
class HeadPartition;
}

enum class HeadRole { kRetrieval, kSparse };

struct SelectionParams {
  int64_t block_size = 64;     // tokens per selectable block, a power of two
  int64_t token_budget = 4096;  // most tokens a sparse head attends to
  int64_t sink_tokens = 64;    // always kept at the start of the context
  int64_t recent_tokens = 64;  // always kept at the end, besides the current partial block

  int64_t budget_blocks() const { return token_budget / block_size; }
  // Blocks that every selection must hold at most: sink blocks plus recent blocks.
  int64_t max_mandatory_blocks() const;
};

struct HeadGateRecord {
  int64_t layer = 0;
  int64_t kv_head = 0;
  double a = 1.0;
  double b = 1.0;
  double kuma_mean = 0.5;
};

struct TrainingRecord {
  int64_t steps = 0;
  double final_loss = 0;
  double final_distillation_loss = 0;
  double expected_density = 0;  // of the learned gates: what training held at the target
  double deployed_density = 0;  // of the roles the trainer gave: the target rounded down to whole heads
  double target_density = 0;
  double lambda = 0;
  double seconds = 0;
  std::string job_name;
};

class HeadPartition {
 public:
  // Every head a retrieval head: hybrid decoding then attends densely everywhere and only
  // selects, which makes it equal to dense attention when the budget covers the context.
  static HeadPartition AllRetrieval(int64_t num_layers, int64_t num_kv_heads, SelectionParams selection);

  HeadPartition(int64_t num_layers, int64_t num_kv_heads, std::vector<HeadRole> roles, SelectionParams selection);

  int64_t num_layers() const { return num_layers_; }
  int64_t num_kv_heads() const { return num_kv_heads_; }
  HeadRole role(int64_t layer, int64_t kv_head) const { return roles_[layer * num_kv_heads_ + kv_head]; }
  void set_role(int64_t layer, int64_t kv_head, HeadRole role) { roles_[layer * num_kv_heads_ + kv_head] = role; }
  const SelectionParams& selection() const { return selection_; }
  SelectionParams& mutable_selection() { return selection_; }
  // Share of retrieval heads outside layer 0.
  double RetrievalDensity() const;

  // Checks the partition on its own (roles, block size, budget) and, when given, against a
  // model's shape: INVALID_ARGUMENT naming what does not fit.
  absl::Status Validate() const;
  absl::Status ValidateFor(const ModelConfig& config) const;

  std::string model_fingerprint;
  uint64_t version = 0;
  std::string source;
  int64_t created_unix_seconds = 0;
  std::vector<HeadGateRecord> gates;
  TrainingRecord training;

 private:
  int64_t num_layers_;
  int64_t num_kv_heads_;
  std::vector<HeadRole> roles_;  // layer-major
  SelectionParams selection_;
};

// Conversion to and from lychee.v1.HeadPartition; FromProto validates.
absl::StatusOr<HeadPartition> HeadPartitionFromProto(const v1::HeadPartition& proto);
v1::HeadPartition HeadPartitionToProto(const HeadPartition& partition);

// The protobuf JSON mapping of lychee.v1.HeadPartition, which people write by hand.
absl::StatusOr<HeadPartition> HeadPartitionFromJson(std::string_view json, std::string_view source);
absl::StatusOr<HeadPartition> LoadHeadPartitionJson(const std::string& path);
absl::StatusOr<std::string> HeadPartitionToJson(const HeadPartition& partition);

}  // namespace lychee
