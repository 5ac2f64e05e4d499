#include "common/base/random_partition.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"

namespace lychee {

absl::StatusOr<HeadPartition> RandomHeadPartition(const ModelConfig& config, double density, uint64_t seed) {
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

}  // namespace lychee
