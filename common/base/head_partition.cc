#include "common/base/head_partition.h"

#include <fstream>
#include <iterator>

#include <google/protobuf/util/json_util.h>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"
#include "lychee/v1/head_partition.pb.h"

namespace lychee {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int64_t SelectionParams::max_mandatory_blocks() const {
  // The recent window can straddle one more block than it fills, plus the partial last block.
  return CeilDiv(sink_tokens, block_size) + CeilDiv(recent_tokens, block_size) + 1;
}

HeadPartition HeadPartition::AllRetrieval(int64_t num_layers, int64_t num_kv_heads, SelectionParams selection) {
  return HeadPartition(num_layers, num_kv_heads,
                       std::vector<HeadRole>(num_layers * num_kv_heads, HeadRole::kRetrieval), selection);
}

HeadPartition::HeadPartition(int64_t num_layers, int64_t num_kv_heads, std::vector<HeadRole> roles,
                             SelectionParams selection)
    : num_layers_(num_layers), num_kv_heads_(num_kv_heads), roles_(std::move(roles)), selection_(selection) {}

double HeadPartition::RetrievalDensity() const {
  int64_t retrieval = 0;
  for (int64_t layer = 1; layer < num_layers_; ++layer) {
    for (int64_t head = 0; head < num_kv_heads_; ++head) retrieval += role(layer, head) == HeadRole::kRetrieval;
  }
  const int64_t heads = (num_layers_ - 1) * num_kv_heads_;
  return heads > 0 ? static_cast<double>(retrieval) / heads : 1.0;
}

absl::Status HeadPartition::Validate() const {
  if (num_layers_ <= 0 || num_kv_heads_ <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head partition: num_layers and num_kv_heads must be > 0, got ", num_layers_, " and ", num_kv_heads_));
  }
  if (static_cast<int64_t>(roles_.size()) != num_layers_ * num_kv_heads_) {
    return absl::InvalidArgumentError(absl::StrCat("head partition: ", roles_.size(), " roles for ", num_layers_,
                                                   " layers of ", num_kv_heads_, " KV heads"));
  }
  for (int64_t head = 0; head < num_kv_heads_; ++head) {
    if (role(0, head) != HeadRole::kRetrieval) {
      return absl::InvalidArgumentError(
          absl::StrCat("head partition: layer 0 must be dense, but KV head ", head, " of layer 0 is sparse"));
    }
  }
  const SelectionParams& s = selection_;
  if (s.block_size <= 0 || (s.block_size & (s.block_size - 1)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("head partition: block_size must be a power of two, got ", s.block_size));
  }
  if (s.sink_tokens < 0 || s.recent_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("head partition: sink_tokens and recent_tokens must be >= 0, got ",
                                                   s.sink_tokens, " and ", s.recent_tokens));
  }
  if (s.token_budget < s.block_size) {
    return absl::InvalidArgumentError(absl::StrCat("head partition: token_budget ", s.token_budget,
                                                   " is below one block of ", s.block_size, " tokens"));
  }
  if (s.budget_blocks() <= s.max_mandatory_blocks()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head partition: token_budget ", s.token_budget, " (", s.budget_blocks(), " blocks of ", s.block_size,
        ") leaves no block to select beyond the ", s.max_mandatory_blocks(), " sink and recent blocks"));
  }
  return absl::OkStatus();
}

absl::Status HeadPartition::ValidateFor(const ModelConfig& config) const {
  LYCHEE_RETURN_IF_ERROR(Validate());
  if (num_layers_ != config.num_layers || num_kv_heads_ != config.num_kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat("head partition has ", num_layers_, " layers of ", num_kv_heads_,
                                                   " KV heads; the model has ", config.num_layers, " layers of ",
                                                   config.num_kv_heads));
  }
  return absl::OkStatus();
}

absl::StatusOr<HeadPartition> HeadPartitionFromProto(const v1::HeadPartition& proto) {
  const int64_t num_layers = proto.num_layers();
  const int64_t num_kv_heads = proto.num_kv_heads();
  if (proto.layers_size() != num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("head partition: num_layers is ", num_layers, " but ", proto.layers_size(), " layers are listed"));
  }
  std::vector<HeadRole> roles;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    const v1::LayerRoles& listed = proto.layers(static_cast<int>(layer));
    if (listed.kv_heads_size() != num_kv_heads) {
      return absl::InvalidArgumentError(absl::StrCat("head partition: layer ", layer, " lists ", listed.kv_heads_size(),
                                                     " KV heads, num_kv_heads is ", num_kv_heads));
    }
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      switch (listed.kv_heads(static_cast<int>(head))) {
        case v1::HEAD_ROLE_RETRIEVAL:
          roles.push_back(HeadRole::kRetrieval);
          break;
        case v1::HEAD_ROLE_SPARSE:
          roles.push_back(HeadRole::kSparse);
          break;
        default:
          return absl::InvalidArgumentError(
              absl::StrCat("head partition: layer ", layer, " KV head ", head, " has no role"));
      }
    }
  }
  SelectionParams selection;
  // Zero means "not given" in proto3; the defaults then apply.
  if (proto.block_size() != 0) selection.block_size = proto.block_size();
  if (proto.token_budget() != 0) selection.token_budget = proto.token_budget();
  if (proto.has_sink_tokens()) selection.sink_tokens = proto.sink_tokens();
  if (proto.has_recent_tokens()) selection.recent_tokens = proto.recent_tokens();
  HeadPartition partition(num_layers, num_kv_heads, std::move(roles), selection);
  LYCHEE_RETURN_IF_ERROR(partition.Validate());
  partition.model_fingerprint = proto.model_fingerprint();
  partition.version = proto.version();
  partition.source = proto.source();
  partition.created_unix_seconds = proto.created_unix_seconds();
  for (const v1::HeadGate& gate : proto.gates()) {
    partition.gates.push_back({gate.layer(), gate.kv_head(), gate.a(), gate.b(), gate.kuma_mean()});
  }
  const v1::TrainingMetrics& m = proto.metrics();
  partition.training = {static_cast<int64_t>(m.steps()), m.final_loss(), m.final_distillation_loss(),
                        m.expected_density(), m.deployed_density(), m.target_density(),
                        m.lambda(), m.seconds(), m.job_name()};
  return partition;
}

v1::HeadPartition HeadPartitionToProto(const HeadPartition& partition) {
  v1::HeadPartition proto;
  proto.set_model_fingerprint(partition.model_fingerprint);
  proto.set_version(partition.version);
  proto.set_num_layers(static_cast<uint32_t>(partition.num_layers()));
  proto.set_num_kv_heads(static_cast<uint32_t>(partition.num_kv_heads()));
  for (int64_t layer = 0; layer < partition.num_layers(); ++layer) {
    v1::LayerRoles* roles = proto.add_layers();
    for (int64_t head = 0; head < partition.num_kv_heads(); ++head) {
      roles->add_kv_heads(partition.role(layer, head) == HeadRole::kRetrieval ? v1::HEAD_ROLE_RETRIEVAL
                                                                                : v1::HEAD_ROLE_SPARSE);
    }
  }
  const SelectionParams& s = partition.selection();
  proto.set_block_size(static_cast<uint32_t>(s.block_size));
  proto.set_token_budget(static_cast<uint32_t>(s.token_budget));
  proto.set_sink_tokens(static_cast<uint32_t>(s.sink_tokens));
  proto.set_recent_tokens(static_cast<uint32_t>(s.recent_tokens));
  for (const HeadGateRecord& gate : partition.gates) {
    v1::HeadGate* g = proto.add_gates();
    g->set_layer(static_cast<uint32_t>(gate.layer));
    g->set_kv_head(static_cast<uint32_t>(gate.kv_head));
    g->set_a(gate.a);
    g->set_b(gate.b);
    g->set_kuma_mean(gate.kuma_mean);
  }
  const TrainingRecord& t = partition.training;
  v1::TrainingMetrics* m = proto.mutable_metrics();
  m->set_steps(static_cast<uint64_t>(t.steps));
  m->set_final_loss(t.final_loss);
  m->set_final_distillation_loss(t.final_distillation_loss);
  m->set_expected_density(t.expected_density);
  m->set_deployed_density(t.deployed_density);
  m->set_target_density(t.target_density);
  m->set_lambda(t.lambda);
  m->set_seconds(t.seconds);
  m->set_job_name(t.job_name);
  proto.set_source(partition.source);
  proto.set_created_unix_seconds(partition.created_unix_seconds);
  return proto;
}

absl::StatusOr<HeadPartition> HeadPartitionFromJson(std::string_view json, std::string_view source) {
  v1::HeadPartition proto;
  const auto status = google::protobuf::util::JsonStringToMessage(std::string(json), &proto);
  if (!status.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(source), ": not a lychee.v1.HeadPartition in JSON: ", status.message().ToString()));
  }
  auto partition = HeadPartitionFromProto(proto);
  if (!partition.ok()) return absl::InvalidArgumentError(absl::StrCat(std::string(source), ": ", partition.status().message()));
  return partition;
}

absl::StatusOr<HeadPartition> LoadHeadPartitionJson(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read head partition ", path));
  return HeadPartitionFromJson(std::string(std::istreambuf_iterator<char>(in), {}), path);
}

absl::StatusOr<std::string> HeadPartitionToJson(const HeadPartition& partition) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  const auto status = google::protobuf::util::MessageToJsonString(HeadPartitionToProto(partition), &json, options);
  if (!status.ok()) return absl::InternalError(std::string(status.message()));
  return json;
}

}  // namespace lychee
