// The CPU reference backends of the selection policies of kernels/policy.h (dense and lychee are
// kernels/dense_attention.h and kernels/hybrid_attention.h), exact and readable: attention from
// matmul and softmax through ATen, so they also run, slowly, on any device. Every backend
// prefills densely, keeps every head's whole cache, and accounts its decode reads (and, with
// spec.audit, the dropped attention mass) in its sequences' telemetry. Build them through
// MakePolicyBackend (kernels/policy_backend.h), which validates the spec first.
//
// The selection helpers are public so that the tests can check each rule on its own.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "common/base/head_partition.h"
#include "common/model/attention.h"
#include "kernels/policy.h"

namespace lychee {

// Quest: per page of `page_size` keys [L, D] the per-dimension maxima and minima, and for each
// query of queries [G, D] the page scores sum_d max(q_d * kmax_d, q_d * kmin_d); float32 [G, pages].
at::Tensor QuestPageScores(const at::Tensor& queries, const at::Tensor& keys, int64_t page_size);
// The pages a KV head attends: every page when the budget covers them; otherwise the pages
// holding the sink, the recent positions and the current position, then the best others by the
// group's highest score (ties: lower index first), up to token_budget / page_size pages. Ascending.
std::vector<int64_t> QuestSelectPages(const at::Tensor& group_page_scores, int64_t length, const PolicySpec& spec);

// Positions every token-level selection keeps: [0, sink) and [length - recent, length), plus the
// current position. Ascending.
std::vector<int64_t> SinkAndRecentPositions(int64_t length, int64_t sink_tokens, int64_t recent_tokens);

// TidalDecode's token selection for a KV head: the sink and recent positions, then the positions
// of highest attention weight (softmax of queries [G, D] against keys [L, D], averaged over the
// group; ties: lower position first), up to token_budget. Every position when the budget covers
// the cache. Ascending int64 tensor on the keys' device.
at::Tensor TidalSelectTokens(const at::Tensor& queries, const at::Tensor& keys, double scale,
                             const PolicySpec& spec);

// Double-P's clusters of one KV head, over the cache positions [first, end).
struct KeyClusters {
  int64_t first = 0;
  int64_t end = 0;
  at::Tensor centroids;   // float32 [C, D]
  at::Tensor sizes;       // float32 [C], every size >= 1
  at::Tensor value_sums;  // float32 [C, D]
  at::Tensor assignment;  // int64 [end - first]: the cluster of each position
};
// k-means (squared Euclidean distance) of keys [n, D] into at most `clusters` clusters,
// initialized at evenly spaced keys, `iterations` rounds of assignment and update; clusters left
// empty are removed. Positions are numbered from `first`.
KeyClusters KMeansClusters(const at::Tensor& keys, const at::Tensor& values, int64_t first, int64_t clusters,
                           int64_t iterations);
// Appends `more` (clusters of later positions, more.first == into.end) to `into`.
void AppendClusters(KeyClusters& into, const KeyClusters& more);
// A KV head's clusters at a decode step over its keys and values [L, D]: made over
// [sink, L - recent) at the first call (empty when that range is); later, once the tail between
// the clusters and the recent window holds spec.tail_tokens, the tail is clustered and appended.
const KeyClusters& UpdateDoublePClusters(std::optional<KeyClusters>& slot, const at::Tensor& keys,
                                         const at::Tensor& values, const PolicySpec& spec);
// The same for a cache of `length` positions of `dim` on `device` that it reads only where it
// clusters: `read(first, count)` returns the keys and values [count, D] of positions
// [first, first + count) (a paged cache gathers just those through its page table).
using KvRangeReader = std::function<std::pair<at::Tensor, at::Tensor>(int64_t first, int64_t count)>;
const KeyClusters& UpdateDoublePClusters(std::optional<KeyClusters>& slot, int64_t length, int64_t dim,
                                         at::Device device, const KvRangeReader& read, const PolicySpec& spec);

// Double-P's two-stage plan for one KV head: cluster masses averaged over the group's queries
// [G, D] (softmax over clusters of q.C * scale + log size), ranked; a cluster is kept in stage 1
// while the mass ranked above it is below p1, attended exactly while that mass is below p2 (p = 1
// keeps every cluster). Ascending cluster indices.
struct DoublePPlan {
  std::vector<int64_t> exact_clusters;
  std::vector<int64_t> approximated_clusters;
};
DoublePPlan PlanDoubleP(const at::Tensor& queries, const KeyClusters& clusters, double scale, double p1, double p2);

// Double-P attention of queries [G, 1, D] over keys and values [L, D]: `exact_positions` (int64)
// exactly, `approximated` clusters each as one entry of logit q.C * scale + log size and value
// value_sum / size, all in one softmax. [G, 1, D].
at::Tensor DoublePAttention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& exact_positions, const KeyClusters& clusters,
                            const std::vector<int64_t>& approximated, double scale);

// One KV head's decode step of Double-P over its clusters: the plan, then the attention.
struct DoublePHeadResult {
  at::Tensor output;           // [G, 1, D]
  at::Tensor exact_positions;  // int64, ascending
  int64_t approximated_clusters = 0;
};
DoublePHeadResult DoublePHeadAttention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                                       const KeyClusters& clusters, double scale, const PolicySpec& spec);

// PrHS: the pre-hoc priority of each of `num_blocks` blocks from a carried-over block mass
// (-1 where unknown): the largest mass within `enlargement` blocks of it; -1 where none is known.
at::Tensor EnlargedPriority(const at::Tensor& block_mass, int64_t num_blocks, int64_t enlargement);

std::shared_ptr<const AttentionBackend> MakeQuestBackend(const PolicySpec& spec);
std::shared_ptr<const AttentionBackend> MakeTidalBackend(const PolicySpec& spec, int64_t num_layers);
std::shared_ptr<const AttentionBackend> MakeStreamingBackend(const PolicySpec& spec,
                                                             std::shared_ptr<const HeadPartition> partition);
std::shared_ptr<const AttentionBackend> MakeDoublePBackend(const PolicySpec& spec);
std::shared_ptr<const AttentionBackend> MakePrhsBackend(const PolicySpec& spec);

}  // namespace lychee
