#include "tools/lychee/attention_args.h"

#include <algorithm>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/base/random_partition.h"
#include "common/base/status_macros.h"
#include "common/model/tensor_parallel.h"
#include "kernels/policy_backend.h"

namespace lychee::cli {
namespace {

absl::StatusOr<std::vector<int64_t>> IntList(const std::string& flag, const std::string& text) {
  std::vector<int64_t> values;
  for (const std::string& item : std::vector<std::string>(absl::StrSplit(text, ','))) {
    char* end = nullptr;
    const long long value = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0') {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", item, "' is not an integer"));
    }
    values.push_back(value);
  }
  return values;
}

// The policy names of --policy, or of the older --attention.
absl::StatusOr<std::vector<PolicyKind>> PolicyKinds(const Args& args) {
  if (args.Has("policy") && args.Has("attention")) {
    return absl::InvalidArgumentError("give one of --policy and --attention");
  }
  std::vector<PolicyKind> kinds;
  if (args.Has("attention")) {
    const std::string mode = *args.Get("attention");
    if (mode != "dense" && mode != "hybrid") {
      return absl::InvalidArgumentError(absl::StrCat("--attention must be dense or hybrid, got '", mode, "'"));
    }
    kinds.push_back(mode == "dense" ? PolicyKind::kDense : PolicyKind::kLychee);
    return kinds;
  }
  for (const std::string& name : std::vector<std::string>(absl::StrSplit(args.GetOr("policy", "dense"), ','))) {
    absl::StatusOr<PolicyKind> kind = ParsePolicyKind(name);
    if (!kind.ok()) return absl::InvalidArgumentError(absl::StrCat("--", kind.status().message()));
    kinds.push_back(*kind);
  }
  return kinds;
}

}  // namespace

const std::set<std::string>& PolicyValuedFlags() {
  static const std::set<std::string> flags = {"policy",
                                              "attention",
                                              "partition",
                                              "random-partition",
                                              "partition-seed",
                                              "budget",
                                              "block-size",
                                              "sink",
                                              "recent",
                                              "p1",
                                              "p2",
                                              "clusters",
                                              "kmeans-iterations",
                                              "tail-tokens",
                                              "prhs-selectors",
                                              "prhs-enlargement",
                                              "prhs-window",
                                              "tidal-layers",
                                              "page-size",
                                              "quest-dense-layers",
                                              "audit-every"};
  return flags;
}

const std::set<std::string>& PolicySwitches() {
  static const std::set<std::string> switches = {"audit"};
  return switches;
}

absl::StatusOr<std::shared_ptr<const HeadPartition>> PartitionFromArgs(const Args& args, const ModelConfig& config) {
  if (args.Has("partition") && args.Has("random-partition")) {
    return absl::InvalidArgumentError("give one of --partition FILE and --random-partition DENSITY");
  }
  if (args.Has("partition")) {
    LYCHEE_ASSIGN_OR_RETURN(HeadPartition partition, LoadHeadPartitionJson(*args.Get("partition")));
    return std::make_shared<const HeadPartition>(std::move(partition));
  }
  if (args.Has("random-partition")) {
    LYCHEE_ASSIGN_OR_RETURN(double density, args.GetDouble("random-partition", 0));
    LYCHEE_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("partition-seed", 1));
    LYCHEE_ASSIGN_OR_RETURN(HeadPartition partition, RandomHeadPartition(config, density, static_cast<uint64_t>(seed)));
    return std::make_shared<const HeadPartition>(std::move(partition));
  }
  return std::shared_ptr<const HeadPartition>();
}

absl::StatusOr<std::vector<PolicySpec>> PolicySpecsFromArgs(const Args& args, const ModelConfig& config,
                                                            const HeadPartition* partition) {
  LYCHEE_ASSIGN_OR_RETURN(std::vector<PolicyKind> kinds, PolicyKinds(args));
  const bool sparse_named = std::any_of(kinds.begin(), kinds.end(), [](PolicyKind k) { return k != PolicyKind::kDense; });
  if (!sparse_named && (partition != nullptr || args.Has("budget"))) {
    return absl::InvalidArgumentError(
        "--partition, --random-partition and --budget go with a sparse policy (--policy or --attention hybrid)");
  }
  std::vector<PolicySpec> specs;
  for (PolicyKind kind : kinds) {
    PolicySpec spec = kind == PolicyKind::kLychee ? PolicySpec::LycheeAsPartition() : PolicySpec::Defaults(kind);
    if (PolicyNeedsPartition(kind)) {
      if (partition == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("--policy ", PolicyName(kind),
                                                       " needs one of --partition FILE and --random-partition DENSITY"));
      }
      spec = spec.WithPartitionSelection(partition->selection());
    }
    LYCHEE_ASSIGN_OR_RETURN(spec.token_budget, args.GetInt("budget", spec.token_budget));
    LYCHEE_ASSIGN_OR_RETURN(spec.block_size, args.GetInt("block-size", spec.block_size));
    LYCHEE_ASSIGN_OR_RETURN(spec.sink_tokens, args.GetInt("sink", spec.sink_tokens));
    LYCHEE_ASSIGN_OR_RETURN(spec.recent_tokens, args.GetInt("recent", spec.recent_tokens));
    LYCHEE_ASSIGN_OR_RETURN(spec.p1, args.GetDouble("p1", spec.p1));
    LYCHEE_ASSIGN_OR_RETURN(spec.p2, args.GetDouble("p2", spec.p2));
    LYCHEE_ASSIGN_OR_RETURN(spec.clusters, args.GetInt("clusters", spec.clusters));
    LYCHEE_ASSIGN_OR_RETURN(spec.kmeans_iterations, args.GetInt("kmeans-iterations", spec.kmeans_iterations));
    LYCHEE_ASSIGN_OR_RETURN(spec.tail_tokens, args.GetInt("tail-tokens", spec.tail_tokens));
    if (args.Has("prhs-selectors")) {
      LYCHEE_ASSIGN_OR_RETURN(spec.prhs_selectors, ParsePrhsSelectors(*args.Get("prhs-selectors")));
    }
    LYCHEE_ASSIGN_OR_RETURN(spec.prhs_enlargement, args.GetInt("prhs-enlargement", spec.prhs_enlargement));
    LYCHEE_ASSIGN_OR_RETURN(spec.prhs_window, args.GetInt("prhs-window", spec.prhs_window));
    if (args.Has("tidal-layers")) {
      LYCHEE_ASSIGN_OR_RETURN(spec.tidal_selection_layers, IntList("tidal-layers", *args.Get("tidal-layers")));
    }
    LYCHEE_ASSIGN_OR_RETURN(spec.page_size, args.GetInt("page-size", spec.page_size));
    LYCHEE_ASSIGN_OR_RETURN(spec.quest_dense_layers, args.GetInt("quest-dense-layers", spec.quest_dense_layers));
    spec.audit = args.Has("audit");
    if (args.Has("audit-every") && !spec.audit) return absl::InvalidArgumentError("--audit-every goes with --audit");
    LYCHEE_ASSIGN_OR_RETURN(spec.audit_every, args.GetInt("audit-every", spec.audit_every));
    LYCHEE_RETURN_IF_ERROR(spec.Validate(config));
    specs.push_back(std::move(spec));
  }
  return specs;
}

absl::StatusOr<std::shared_ptr<const AttentionBackend>> AttentionFromArgs(const Args& args, const ModelConfig& config,
                                                                          at::Device device) {
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const HeadPartition> partition, PartitionFromArgs(args, config));
  LYCHEE_ASSIGN_OR_RETURN(std::vector<PolicySpec> specs, PolicySpecsFromArgs(args, config, partition.get()));
  if (specs.size() != 1) return absl::InvalidArgumentError("--policy: name one policy here");
  return MakePolicyBackend(specs[0], config, std::move(partition), device);
}

absl::StatusOr<std::shared_ptr<const AttentionBackend>> RankAttentionFromArgs(const Args& args,
                                                                              const ModelConfig& config,
                                                                              const ModelConfig& shard_config, int rank,
                                                                              int world_size, at::Device device) {
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<const HeadPartition> partition, PartitionFromArgs(args, config));
  LYCHEE_ASSIGN_OR_RETURN(std::vector<PolicySpec> specs, PolicySpecsFromArgs(args, config, partition.get()));
  if (specs.size() != 1) return absl::InvalidArgumentError("--policy: name one policy here");
  if (partition != nullptr) {
    LYCHEE_ASSIGN_OR_RETURN(HeadPartition shard, ShardHeadPartition(*partition, rank, world_size));
    partition = std::make_shared<const HeadPartition>(std::move(shard));
  }
  return MakePolicyBackend(specs[0], shard_config, std::move(partition), device);
}

}  // namespace lychee::cli
