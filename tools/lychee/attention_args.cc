#include "tools/lychee/attention_args.h"

#include <algorithm>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/head_partition.h"
#include "common/status_macros.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#ifdef LYCHEE_CUDA_ATTENTION
#include "kernels/cuda_attention.h"
#endif

namespace lychee::cli {
namespace {

// Layer 0 dense; round(density * heads) of the other heads retrieval, chosen by `seed`.
absl::StatusOr<HeadPartition> RandomPartition(const ModelConfig& config, double density, uint64_t seed) {
  if (!(density >= 0 && density <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("--random-partition must be a density in [0, 1], got ", density));
  }
  HeadPartition partition = HeadPartition::AllRetrieval(config.num_layers, config.num_kv_heads, SelectionParams{});
  std::vector<int64_t> heads((config.num_layers - 1) * config.num_kv_heads);
  std::iota(heads.begin(), heads.end(), 0);
  std::shuffle(heads.begin(), heads.end(), std::mt19937_64(seed));
  const auto retrieval = static_cast<size_t>(std::lround(density * static_cast<double>(heads.size())));
  for (size_t i = retrieval; i < heads.size(); ++i) {
    partition.set_role(1 + heads[i] / config.num_kv_heads, heads[i] % config.num_kv_heads, HeadRole::kSparse);
  }
  partition.source = absl::StrCat("random, density ", density, ", seed ", seed);
  return partition;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const AttentionBackend>> AttentionFromArgs(const Args& args, const ModelConfig& config,
                                                                          [[maybe_unused]] at::Device device) {
  const std::string mode = args.GetOr("attention", "dense");
  const bool has_partition = args.Has("partition") || args.Has("random-partition");
  if (mode == "dense") {
    if (has_partition || args.Has("budget")) {
      return absl::InvalidArgumentError("--partition, --random-partition and --budget go with --attention hybrid");
    }
#ifdef LYCHEE_CUDA_ATTENTION
    if (device.is_cuda()) return MakeCudaDenseAttention();
#endif
    return std::make_shared<DenseAttentionBackend>();
  }
  if (mode != "hybrid") {
    return absl::InvalidArgumentError(absl::StrCat("--attention must be dense or hybrid, got '", mode, "'"));
  }
  if (args.Has("partition") == args.Has("random-partition")) {
    return absl::InvalidArgumentError("--attention hybrid needs one of --partition FILE and --random-partition DENSITY");
  }
  HeadPartition partition = HeadPartition::AllRetrieval(1, 1, SelectionParams{});
  if (args.Has("partition")) {
    LYCHEE_ASSIGN_OR_RETURN(partition, LoadHeadPartitionJson(*args.Get("partition")));
  } else {
    LYCHEE_ASSIGN_OR_RETURN(double density, args.GetDouble("random-partition", 0));
    LYCHEE_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("partition-seed", 1));
    LYCHEE_ASSIGN_OR_RETURN(partition, RandomPartition(config, density, static_cast<uint64_t>(seed)));
  }
  LYCHEE_ASSIGN_OR_RETURN(partition.mutable_selection().token_budget,
                          args.GetInt("budget", partition.selection().token_budget));
  auto shared = std::make_shared<const HeadPartition>(std::move(partition));
#ifdef LYCHEE_CUDA_ATTENTION
  if (device.is_cuda()) return MakeCudaHybridAttention(std::move(shared), config);
#endif
  LYCHEE_ASSIGN_OR_RETURN(auto hybrid, HybridAttentionBackend::Create(std::move(shared), config));
  return std::shared_ptr<const AttentionBackend>(std::move(hybrid));
}

}  // namespace lychee::cli
