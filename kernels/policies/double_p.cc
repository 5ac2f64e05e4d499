// Double-P: hierarchical top-p attention over k-means clusters of each KV head's keys.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>

#include "kernels/dense_attention.h"
#include "kernels/policies/accounting.h"
#include "kernels/policies/policies.h"

namespace lychee {
namespace {

struct DoublePState : AccountedState {
  using AccountedState::AccountedState;
  // [layer][kv head]: the clusters, made at the first decode step (the cache is then the prompt
  // and one token) and grown as the decoded tail leaves the recent window.
  std::vector<std::vector<std::optional<KeyClusters>>> clusters;

  std::optional<KeyClusters>& Slot(int layer, int64_t head, int64_t num_kv_heads) {
    if (static_cast<int64_t>(clusters.size()) <= layer) clusters.resize(layer + 1);
    if (clusters[layer].empty()) clusters[layer].resize(num_kv_heads);
    return clusters[layer][head];
  }
};

KeyClusters EmptyClusters(int64_t at, int64_t dim, at::Device device) {
  KeyClusters none;
  none.first = none.end = at;
  auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  none.centroids = at::zeros({0, dim}, options);
  none.sizes = at::zeros({0}, options);
  none.value_sums = at::zeros({0, dim}, options);
  none.assignment = at::zeros({0}, options.dtype(at::kLong));
  return none;
}

// The sink, everything from the end of the clusters on (the tail and the recent window), and
// the members of the exact clusters.
at::Tensor ExactPositions(const KeyClusters& clusters, const std::vector<int64_t>& exact_clusters, int64_t length,
                          at::Device device) {
  auto options = at::TensorOptions().dtype(at::kLong).device(device);
  std::vector<at::Tensor> parts = {at::arange(std::min(clusters.first, length), options)};
  if (!exact_clusters.empty()) {
    at::Tensor chosen = at::zeros({clusters.sizes.size(0)}, options.dtype(at::kBool));
    chosen.index_fill_(0, at::tensor(exact_clusters, at::kLong).to(device), true);
    parts.push_back(chosen.index_select(0, clusters.assignment).nonzero().squeeze(1) + clusters.first);
  }
  if (clusters.end < length) parts.push_back(at::arange(clusters.end, length, options));
  return at::cat(parts);
}

class DoublePBackend : public AttentionBackend {
 public:
  explicit DoublePBackend(const PolicySpec& spec) : spec_(spec) {}

  std::unique_ptr<SequenceAttentionState> NewSequenceState() const override {
    return std::make_unique<DoublePState>(spec_.AuditPeriod());
  }

  at::Tensor Attend(const AttentionInput& input) const override {
    if (input.queries.size(1) > 1) return DenseAttention(input.queries, input.keys, input.values, input.scale);
    auto& state = static_cast<DoublePState&>(*input.state);
    CountDecodeStep(&state, input.layer);
    const int64_t num_kv_heads = input.keys.size(0);
    const int64_t group = input.queries.size(0) / num_kv_heads;
    const int64_t length = input.keys.size(1);
    const int64_t dim = input.keys.size(2);
    const int64_t bytes_per_position = KvBytesPerPosition(input.keys);
    const int64_t bytes_per_vector = dim * static_cast<int64_t>(input.keys.element_size());
    std::vector<at::Tensor> outputs;
    for (int64_t head = 0; head < num_kv_heads; ++head) {
      at::Tensor queries = input.queries.narrow(0, head * group, group);
      at::Tensor keys = input.keys[head];
      at::Tensor values = input.values[head];
      const KeyClusters& clusters =
          UpdateDoublePClusters(state.Slot(input.layer, head, num_kv_heads), keys, values, spec_);
      DoublePHeadResult result = DoublePHeadAttention(queries, keys, values, clusters, input.scale, spec_);
      outputs.push_back(result.output);
      AccountHead(&state, input.layer, head, num_kv_heads, result.exact_positions.numel(), bytes_per_position,
                  (clusters.sizes.size(0) + result.approximated_clusters) * bytes_per_vector);
      AuditDroppedMass(&state, queries, keys, result.exact_positions, input.scale);
    }
    return at::cat(outputs, 0);
  }

 private:
  PolicySpec spec_;
};

}  // namespace

const KeyClusters& UpdateDoublePClusters(std::optional<KeyClusters>& slot, const at::Tensor& keys,
                                         const at::Tensor& values, const PolicySpec& spec) {
  return UpdateDoublePClusters(
      slot, keys.size(0), keys.size(1), keys.device(),
      [&](int64_t first, int64_t count) {
        return std::make_pair(keys.narrow(0, first, count), values.narrow(0, first, count));
      },
      spec);
}

const KeyClusters& UpdateDoublePClusters(std::optional<KeyClusters>& slot, int64_t length, int64_t dim,
                                         at::Device device, const KvRangeReader& read, const PolicySpec& spec) {
  const int64_t window_begin = std::max(spec.sink_tokens, length - spec.recent_tokens);
  if (!slot) {
    slot = EmptyClusters(spec.sink_tokens, dim, device);
    if (window_begin > spec.sink_tokens) {
      const auto [keys, values] = read(slot->first, window_begin - slot->first);
      slot = KMeansClusters(keys, values, slot->first, spec.clusters, spec.kmeans_iterations);
    }
    return *slot;
  }
  const int64_t tail = window_begin - slot->end;
  if (tail >= spec.tail_tokens) {
    const int64_t clustered = slot->end - slot->first;
    const int64_t existing = slot->sizes.size(0);
    const int64_t count =
        existing == 0 ? spec.clusters
                      : std::max<int64_t>(1, std::llround(static_cast<double>(tail) * existing / clustered));
    const auto [keys, values] = read(slot->end, tail);
    AppendClusters(*slot, KMeansClusters(keys, values, slot->end, count, spec.kmeans_iterations));
  }
  return *slot;
}

KeyClusters KMeansClusters(const at::Tensor& keys, const at::Tensor& values, int64_t first, int64_t clusters,
                           int64_t iterations) {
  const int64_t count = keys.size(0);
  const int64_t dim = keys.size(1);
  at::Tensor points = keys.to(at::kFloat);
  const int64_t k = std::min(clusters, count);
  std::vector<int64_t> evenly_spaced(k);
  for (int64_t i = 0; i < k; ++i) evenly_spaced[i] = i * count / k;
  at::Tensor seeds = at::tensor(evenly_spaced, at::kLong).to(keys.device());
  at::Tensor centroids = points.index_select(0, seeds);
  at::Tensor assignment;
  auto assign = [&] {
    // argmin |x - c|^2 = argmax 2 x.c - |c|^2
    at::Tensor affinity = at::mm(points, centroids.t()) * 2 - centroids.pow(2).sum(1).unsqueeze(0);
    assignment = affinity.argmax(1);
  };
  for (int64_t round = 0; round < iterations; ++round) {
    assign();
    at::Tensor sums = at::zeros({k, dim}, points.options()).index_add_(0, assignment, points);
    at::Tensor sizes = at::zeros({k}, points.options()).index_add_(0, assignment, at::ones({count}, points.options()));
    // An emptied cluster keeps its centroid for the next round.
    at::Tensor occupied = (sizes > 0).unsqueeze(1);
    centroids = at::where(occupied, sums / sizes.clamp_min(1).unsqueeze(1), centroids);
  }
  assign();
  at::Tensor sizes = at::zeros({k}, points.options()).index_add_(0, assignment, at::ones({count}, points.options()));
  at::Tensor value_sums = at::zeros({k, dim}, points.options()).index_add_(0, assignment, values.to(at::kFloat));
  // Drop empty clusters and renumber the assignment.
  at::Tensor kept = (sizes > 0).nonzero().squeeze(1);
  at::Tensor renumber = at::full({k}, -1, assignment.options());
  renumber.index_copy_(0, kept, at::arange(kept.size(0), assignment.options()));

  KeyClusters result;
  result.first = first;
  result.end = first + count;
  result.centroids = centroids.index_select(0, kept);
  result.sizes = sizes.index_select(0, kept);
  result.value_sums = value_sums.index_select(0, kept);
  result.assignment = renumber.index_select(0, assignment);
  return result;
}

void AppendClusters(KeyClusters& into, const KeyClusters& more) {
  const int64_t offset = into.sizes.size(0);
  into.centroids = at::cat({into.centroids, more.centroids});
  into.sizes = at::cat({into.sizes, more.sizes});
  into.value_sums = at::cat({into.value_sums, more.value_sums});
  into.assignment = at::cat({into.assignment, more.assignment + offset});
  into.end = more.end;
}

DoublePPlan PlanDoubleP(const at::Tensor& queries, const KeyClusters& clusters, double scale, double p1, double p2) {
  DoublePPlan plan;
  const int64_t count = clusters.sizes.size(0);
  if (count == 0) return plan;
  at::Tensor logits = at::mm(queries.to(at::kFloat), clusters.centroids.t()) * scale + clusters.sizes.log();
  at::Tensor mass = at::softmax(logits.to(at::kDouble), -1).mean(0).cpu().contiguous();
  const double* share = mass.data_ptr<double>();
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return share[a] > share[b]; });
  double above = 0;
  for (int64_t cluster : order) {
    if (p1 < 1 && above >= p1) break;
    if (p2 >= 1 || above < p2) {
      plan.exact_clusters.push_back(cluster);
    } else {
      plan.approximated_clusters.push_back(cluster);
    }
    above += share[cluster];
  }
  std::sort(plan.exact_clusters.begin(), plan.exact_clusters.end());
  std::sort(plan.approximated_clusters.begin(), plan.approximated_clusters.end());
  return plan;
}

at::Tensor DoublePAttention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& exact_positions, const KeyClusters& clusters,
                            const std::vector<int64_t>& approximated, double scale) {
  at::Tensor q = queries.squeeze(1).to(at::kFloat);  // [G, D]
  at::Tensor entry_keys = keys.index_select(0, exact_positions).to(at::kFloat);
  at::Tensor entry_values = values.index_select(0, exact_positions).to(at::kFloat);
  at::Tensor logits = at::mm(q, entry_keys.t()) * scale;
  if (!approximated.empty()) {
    at::Tensor chosen = at::tensor(approximated, at::kLong).to(keys.device());
    at::Tensor sizes = clusters.sizes.index_select(0, chosen);
    at::Tensor centroid_logits =
        at::mm(q, clusters.centroids.index_select(0, chosen).t()) * scale + sizes.log().unsqueeze(0);
    logits = at::cat({logits, centroid_logits}, 1);
    entry_values = at::cat({entry_values, clusters.value_sums.index_select(0, chosen) / sizes.unsqueeze(1)});
  }
  return at::mm(at::softmax(logits, -1), entry_values).unsqueeze(1).to(queries.scalar_type());
}

DoublePHeadResult DoublePHeadAttention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                                       const KeyClusters& clusters, double scale, const PolicySpec& spec) {
  const DoublePPlan plan = PlanDoubleP(queries.squeeze(1), clusters, scale, spec.p1, spec.p2);
  DoublePHeadResult result;
  result.exact_positions = ExactPositions(clusters, plan.exact_clusters, keys.size(0), keys.device());
  result.approximated_clusters = static_cast<int64_t>(plan.approximated_clusters.size());
  result.output =
      DoublePAttention(queries, keys, values, result.exact_positions, clusters, plan.approximated_clusters, scale);
  return result;
}

std::shared_ptr<const AttentionBackend> MakeDoublePBackend(const PolicySpec& spec) {
  return std::make_shared<DoublePBackend>(spec);
}

}  // namespace lychee
