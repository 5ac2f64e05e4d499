// The attention flags shared by the subcommands that run a model in-process: which selection
// policy (kernels/policy.h) and its parameters.
//   --policy NAME[,NAME...]  dense, lychee (or hybrid), double-p, prhs, streaming, tidal, quest
//   --attention dense|hybrid the older spelling of --policy dense|lychee
//   --partition FILE | --random-partition DENSITY [--partition-seed S]   for lychee and streaming
//   --budget N --block-size N --sink N --recent N                  fixed-budget selection
//   --p1 P --p2 P --clusters N --kmeans-iterations N --tail-tokens N   Double-P
//   --prhs-selectors temporal,recency,cross-layer --prhs-enlargement BLOCKS --prhs-window N
//   --tidal-layers L1,L2   --page-size N --quest-dense-layers N   --audit
// A parameter given applies to every policy that uses it; the others keep their authors'
// defaults (lychee takes its selection from the partition file).
#pragma once

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/head_partition.h"
#include "common/model/attention.h"
#include "common/model/model.h"
#include "kernels/policy.h"
#include "tools/lychee/args.h"

namespace lychee::cli {

// The valued flags and the switches above, for Args::Parse.
const std::set<std::string>& PolicyValuedFlags();
const std::set<std::string>& PolicySwitches();

// The partition that --partition or --random-partition names; null when neither is given.
absl::StatusOr<std::shared_ptr<const HeadPartition>> PartitionFromArgs(const Args& args, const ModelConfig& config);

// One spec per policy named, validated against the model (INVALID_ARGUMENT naming the flag's
// parameter). A policy that needs a partition without one given is INVALID_ARGUMENT.
absl::StatusOr<std::vector<PolicySpec>> PolicySpecsFromArgs(const Args& args, const ModelConfig& config,
                                                            const HeadPartition* partition);

// The backend of the single policy named (default dense). On a CUDA device, dense and lychee
// decode on the CUDA kernels where this build has them.
absl::StatusOr<std::shared_ptr<const AttentionBackend>> AttentionFromArgs(const Args& args, const ModelConfig& config,
                                                                          at::Device device);

// AttentionFromArgs for rank `rank` of `world_size` under tensor parallelism (any policy: each
// selects per KV head): the partition is read for the whole model (`config`) and sharded to the
// rank's KV heads, the backend built for the rank's shard (`shard_config`).
absl::StatusOr<std::shared_ptr<const AttentionBackend>> RankAttentionFromArgs(const Args& args,
                                                                              const ModelConfig& config,
                                                                              const ModelConfig& shard_config, int rank,
                                                                              int world_size, at::Device device);

}  // namespace lychee::cli
