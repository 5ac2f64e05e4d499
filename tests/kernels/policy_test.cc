// The selection policies of kernels/policy.h: each against a naive masked attention that uses the
// same selection rule written out with loops; the exact limits (Double-P with p1 = p2 = 1, every
// policy with a budget covering the context) against dense attention; the telemetry and the
// audit of the dropped mass; and the refusal of bad parameters, naming them.
#include "tests/torch_catch.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "common/model/model.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#include "kernels/policies/policies.h"
#include "kernels/policy.h"
#include "kernels/policy_backend.h"
#include "tests/kernels/greedy_decode.h"

namespace lychee {
namespace {

constexpr int64_t kLayers = 4, kKvHeads = 2, kGroup = 3, kDim = 16;
constexpr double kScale = 0.25;

ModelConfig SmallConfig() {
  ModelConfig config;
  config.num_layers = kLayers;
  config.num_kv_heads = kKvHeads;
  config.num_attention_heads = kKvHeads * kGroup;
  config.head_dim = kDim;
  return config;
}

std::shared_ptr<const AttentionBackend> Backend(const PolicySpec& spec,
                                                std::shared_ptr<const HeadPartition> partition = nullptr) {
  auto backend = MakePolicyBackend(spec, SmallConfig(), std::move(partition));
  INFO(backend.status().ToString());
  REQUIRE(backend.ok());
  return *backend;
}

// One decode call of `layer`: random queries, keys and values of a cache of `length` positions.
AttentionInput RandomInput(int layer, int64_t length, SequenceAttentionState* state) {
  AttentionInput input;
  input.layer = layer;
  input.queries = at::randn({kKvHeads * kGroup, 1, kDim});
  input.keys = at::randn({kKvHeads, length, kDim});
  input.values = at::randn({kKvHeads, length, kDim});
  input.scale = kScale;
  input.state = state;
  return input;
}

// Softmax attention of one query over the positions that `mask` allows, in double.
at::Tensor MaskedAttention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                           const std::vector<bool>& mask) {
  at::Tensor scores = at::mv(keys.to(at::kDouble), query.to(at::kDouble)) * kScale;
  for (size_t t = 0; t < mask.size(); ++t) {
    if (!mask[t]) scores[t] = -INFINITY;
  }
  return at::mv(values.to(at::kDouble).t(), at::softmax(scores, 0));
}

// The largest difference between `actual` [H, 1, D] and masked attention of each query head over
// its KV head's mask.
double WorstError(const AttentionInput& input, const at::Tensor& actual, const std::vector<std::vector<bool>>& masks) {
  double worst = 0;
  for (int64_t head = 0; head < kKvHeads; ++head) {
    for (int64_t g = 0; g < kGroup; ++g) {
      const int64_t q = head * kGroup + g;
      at::Tensor expected = MaskedAttention(input.queries[q][0], input.keys[head], input.values[head], masks[head]);
      worst = std::max(worst, (actual[q][0].to(at::kDouble) - expected).abs().max().item<double>());
    }
  }
  return worst;
}

std::vector<bool> AllPositions(int64_t length) { return std::vector<bool>(length, true); }

// Sink, recent window and current position, written out.
std::vector<bool> SinkAndRecentMask(int64_t length, int64_t sink, int64_t recent) {
  std::vector<bool> mask(length, false);
  for (int64_t t = 0; t < length; ++t) mask[t] = t < sink || t >= length - recent || t == length - 1;
  return mask;
}

// Keeps the `count` best of the unmasked units by score (ties: lower index), in place.
void KeepBest(std::vector<bool>& keep, const std::vector<double>& score, int64_t count) {
  std::vector<int64_t> order;
  for (size_t u = 0; u < keep.size(); ++u) {
    if (!keep[u]) order.push_back(static_cast<int64_t>(u));
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  for (int64_t i = 0; i < count && i < static_cast<int64_t>(order.size()); ++i) keep[order[i]] = true;
}

std::vector<bool> UnitsToMask(const std::vector<bool>& units, int64_t unit, int64_t length) {
  std::vector<bool> mask(length, false);
  for (int64_t t = 0; t < length; ++t) mask[t] = units[t / unit];
  return mask;
}

std::vector<bool> PositionsToMask(const at::Tensor& positions, int64_t length) {
  std::vector<bool> mask(length, false);
  at::Tensor cpu = positions.cpu();
  for (int64_t i = 0; i < cpu.numel(); ++i) mask[cpu[i].item<int64_t>()] = true;
  return mask;
}

TEST_CASE("policy names parse, and unknown ones are refused with the list") {
  for (PolicyKind kind : AllPolicyKinds()) {
    auto parsed = ParsePolicyKind(PolicyName(kind));
    REQUIRE(parsed.ok());
    CHECK(*parsed == kind);
  }
  CHECK(*ParsePolicyKind("hybrid") == PolicyKind::kLychee);
  auto unknown = ParsePolicyKind("h2o");
  CHECK(unknown.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(unknown.status().message()).find("quest") != std::string::npos);
  CHECK(ParsePrhsSelectors("temporal,bogus").status().code() == absl::StatusCode::kInvalidArgument);
  auto selectors = ParsePrhsSelectors("cross-layer");
  REQUIRE(selectors.ok());
  CHECK((!selectors->temporal && !selectors->recency && selectors->cross_layer));
}

TEST_CASE("parameters out of range are INVALID_ARGUMENT naming the parameter") {
  struct Case {
    PolicyKind kind;
    std::function<void(PolicySpec&)> change;
    std::string parameter;
  };
  const Case cases[] = {
      {PolicyKind::kDoubleP, [](PolicySpec& s) { s.p1 = 0; }, "p1"},
      {PolicyKind::kDoubleP, [](PolicySpec& s) { s.p1 = 1.5; }, "p1"},
      {PolicyKind::kDoubleP, [](PolicySpec& s) { s.p2 = -0.1; }, "p2"},
      {PolicyKind::kDoubleP, [](PolicySpec& s) { s.clusters = 0; }, "clusters"},
      {PolicyKind::kDoubleP, [](PolicySpec& s) { s.kmeans_iterations = 0; }, "kmeans_iterations"},
      {PolicyKind::kLychee, [](PolicySpec& s) { s.token_budget = 32; }, "token_budget"},
      {PolicyKind::kLychee, [](PolicySpec& s) { s.block_size = 48; }, "block_size"},
      {PolicyKind::kPrhs, [](PolicySpec& s) { s.token_budget = 63; }, "token_budget"},
      {PolicyKind::kPrhs, [](PolicySpec& s) { s.prhs_selectors = {false, false, false}; }, "prhs_selectors"},
      {PolicyKind::kPrhs, [](PolicySpec& s) { s.prhs_enlargement = -1; }, "prhs_enlargement"},
      {PolicyKind::kQuest, [](PolicySpec& s) { s.token_budget = 8; }, "token_budget"},
      {PolicyKind::kQuest, [](PolicySpec& s) { s.page_size = 0; }, "page_size"},
      {PolicyKind::kQuest, [](PolicySpec& s) { s.quest_dense_layers = kLayers + 1; }, "quest_dense_layers"},
      {PolicyKind::kTidal, [](PolicySpec& s) { s.tidal_selection_layers = {2, 1}; }, "tidal_selection_layers"},
      {PolicyKind::kTidal, [](PolicySpec& s) { s.tidal_selection_layers = {kLayers}; }, "tidal_selection_layers"},
      {PolicyKind::kTidal, [](PolicySpec& s) { s.token_budget = 0; }, "token_budget"},
      {PolicyKind::kStreaming, [](PolicySpec& s) { s.token_budget = 64; }, "token_budget"},
      {PolicyKind::kStreaming, [](PolicySpec& s) { s.sink_tokens = -1; }, "sink_tokens"},
  };
  for (const Case& c : cases) {
    PolicySpec spec = PolicySpec::Defaults(c.kind);
    REQUIRE(spec.Validate(SmallConfig()).ok());
    c.change(spec);
    const absl::Status status = spec.Validate(SmallConfig());
    INFO(PolicyName(c.kind) << ": " << status.ToString());
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    CHECK(std::string(status.message()).find(c.parameter) != std::string::npos);
    CHECK(MakePolicyBackend(spec, SmallConfig(), nullptr).status().code() == absl::StatusCode::kInvalidArgument);
  }
  auto no_partition = MakePolicyBackend(PolicySpec::Defaults(PolicyKind::kLychee), SmallConfig(), nullptr);
  CHECK(no_partition.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(no_partition.status().message()).find("partition") != std::string::npos);
}

TEST_CASE("quest attends the pages of highest key-bound score, after its dense layers") {
  at::manual_seed(11);
  PolicySpec spec = PolicySpec::Defaults(PolicyKind::kQuest);
  spec.page_size = 8;
  spec.token_budget = 64;
  spec.quest_dense_layers = 1;
  auto backend = Backend(spec);
  for (int64_t length : {40, 64, 65, 300, 1001}) {
    auto state = backend->NewSequenceState();
    for (int layer = 0; layer < 2; ++layer) {
      AttentionInput input = RandomInput(layer, length, state.get());
      at::Tensor actual = backend->Attend(input);
      std::vector<std::vector<bool>> masks;
      for (int64_t head = 0; head < kKvHeads; ++head) {
        const int64_t pages = (length + spec.page_size - 1) / spec.page_size;
        if (layer == 0 || pages * spec.page_size <= spec.token_budget) {
          masks.push_back(AllPositions(length));
          continue;
        }
        // Page score: the best over the group of sum_d max(q_d kmax_d, q_d kmin_d), by loops.
        std::vector<double> score(pages, -INFINITY);
        for (int64_t g = 0; g < kGroup; ++g) {
          at::Tensor q = input.queries[head * kGroup + g][0];
          for (int64_t page = 0; page < pages; ++page) {
            double total = 0;
            for (int64_t d = 0; d < kDim; ++d) {
              double high = -INFINITY, low = INFINITY;
              for (int64_t t = page * spec.page_size; t < std::min(length, (page + 1) * spec.page_size); ++t) {
                high = std::max(high, input.keys[head][t][d].item<double>());
                low = std::min(low, input.keys[head][t][d].item<double>());
              }
              total += std::max(q[d].item<double>() * high, q[d].item<double>() * low);
            }
            score[page] = std::max(score[page], total);
          }
        }
        std::vector<bool> keep(pages, false);
        keep[pages - 1] = true;  // the current page
        KeepBest(keep, score, spec.token_budget / spec.page_size - 1);
        masks.push_back(UnitsToMask(keep, spec.page_size, length));
      }
      INFO("length " << length << " layer " << layer);
      CHECK(WorstError(input, actual, masks) < 1e-5);
    }
  }
}

TEST_CASE("streaming heads attend the sink and the recent tokens; retrieval heads everything") {
  at::manual_seed(12);
  PolicySpec spec = PolicySpec::Defaults(PolicyKind::kStreaming);
  spec.sink_tokens = 16;
  spec.token_budget = 80;
  auto partition = std::make_shared<HeadPartition>(HeadPartition::AllRetrieval(kLayers, kKvHeads, SelectionParams{}));
  partition->set_role(1, 1, HeadRole::kSparse);
  auto backend = Backend(spec, partition);
  for (int64_t length : {50, 80, 81, 500}) {
    auto state = backend->NewSequenceState();
    AttentionInput input = RandomInput(1, length, state.get());
    at::Tensor actual = backend->Attend(input);
    const std::vector<std::vector<bool>> masks = {AllPositions(length), SinkAndRecentMask(length, 16, 64)};
    INFO("length " << length);
    CHECK(WorstError(input, actual, masks) < 1e-5);
  }
}

TEST_CASE("tidal selection layers pick the top tokens, and the layers after them reuse the pick") {
  at::manual_seed(13);
  PolicySpec spec = PolicySpec::Defaults(PolicyKind::kTidal);
  spec.token_budget = 40;
  spec.sink_tokens = 4;
  spec.recent_tokens = 8;
  spec.tidal_selection_layers = {1};
  auto backend = Backend(spec);
  const int64_t length = 333;
  auto state = backend->NewSequenceState();
  std::vector<std::vector<bool>> picked(kKvHeads);
  for (int layer = 0; layer < kLayers; ++layer) {
    AttentionInput input = RandomInput(layer, length, state.get());
    at::Tensor actual = backend->Attend(input);
    std::vector<std::vector<bool>> masks;
    for (int64_t head = 0; head < kKvHeads; ++head) {
      if (layer <= 1) masks.push_back(AllPositions(length));
      if (layer != 1) continue;
      // The group's mean softmax weight per position, by loops.
      std::vector<double> weight(length, 0);
      for (int64_t g = 0; g < kGroup; ++g) {
        at::Tensor scores = at::mv(input.keys[head].to(at::kDouble), input.queries[head * kGroup + g][0].to(at::kDouble));
        at::Tensor probabilities = at::softmax(scores * kScale, 0);
        for (int64_t t = 0; t < length; ++t) weight[t] += probabilities[t].item<double>() / kGroup;
      }
      picked[head] = SinkAndRecentMask(length, 4, 8);
      const int64_t always = std::count(picked[head].begin(), picked[head].end(), true);
      KeepBest(picked[head], weight, spec.token_budget - always);
    }
    if (layer > 1) masks = picked;
    INFO("layer " << layer);
    CHECK(WorstError(input, actual, masks) < 1e-5);
  }
  CHECK(std::count(picked[0].begin(), picked[0].end(), true) == spec.token_budget);
  CHECK(TidalSelectionLayers(PolicySpec::Defaults(PolicyKind::kTidal), 32) == std::vector<int64_t>({2, 13}));
  CHECK(TidalSelectionLayers(PolicySpec::Defaults(PolicyKind::kTidal), 6) == std::vector<int64_t>({2}));
}

TEST_CASE("k-means clusters partition the keys, and sizes and value sums add up") {
  at::manual_seed(14);
  at::Tensor keys = at::randn({200, kDim});
  at::Tensor values = at::randn({200, kDim});
  KeyClusters clusters = KMeansClusters(keys, values, 10, 16, 5);
  CHECK(clusters.first == 10);
  CHECK(clusters.end == 210);
  const int64_t count = clusters.sizes.size(0);
  CHECK(count <= 16);
  CHECK(clusters.sizes.min().item<float>() >= 1);
  CHECK(clusters.sizes.sum().item<float>() == 200);
  for (int64_t c = 0; c < count; ++c) {
    at::Tensor members = (clusters.assignment == c).nonzero().squeeze(1);
    CHECK(members.numel() == clusters.sizes[c].item<float>());
    CHECK((values.index_select(0, members).sum(0) - clusters.value_sums[c]).abs().max().item<float>() < 1e-4);
    // Every key is at least as close to its own centroid as to any other.
    at::Tensor distances = at::cdist(keys.index_select(0, members), clusters.centroids);
    CHECK((distances.argmin(1) == c).all().item<bool>());
  }
}

TEST_CASE("double-p plans by top-p over size-weighted cluster masses") {
  KeyClusters clusters;
  // Three clusters along one axis; with q along it, logits 2, 1, 0 plus log sizes 0, log 2, 0.
  clusters.centroids = at::zeros({3, 2});
  clusters.centroids[0][0] = 2;
  clusters.centroids[1][0] = 1;
  clusters.sizes = at::tensor(std::vector<float>{1, 2, 1});
  at::Tensor q = at::tensor(std::vector<float>{1, 0}).view({1, 2});
  // Masses e^2 : 2e : 1, that is 0.534, 0.393 and 0.072.
  DoublePPlan plan = PlanDoubleP(q, clusters, 1.0, 0.9, 0.5);
  CHECK(plan.exact_clusters == std::vector<int64_t>({0}));
  CHECK(plan.approximated_clusters == std::vector<int64_t>({1}));
  plan = PlanDoubleP(q, clusters, 1.0, 0.96, 0.96);
  CHECK(plan.exact_clusters == std::vector<int64_t>({0, 1, 2}));
  plan = PlanDoubleP(q, clusters, 1.0, 0.5, 0.4);
  CHECK(plan.exact_clusters == std::vector<int64_t>({0}));
  CHECK(plan.approximated_clusters.empty());
  plan = PlanDoubleP(q, clusters, 1.0, 1.0, 1.0);
  CHECK(plan.exact_clusters == std::vector<int64_t>({0, 1, 2}));
}

// Double-P written out in double: the positions outside [clusters.first, clusters.end) and the
// members of the exact clusters one entry each, every approximated cluster one entry of logit
// q.C * scale + log size and value value_sum / size, all in one softmax. [G, D].
at::Tensor DoublePByHand(const at::Tensor& group, const at::Tensor& keys, const at::Tensor& values,
                         const KeyClusters& clusters, const DoublePPlan& plan) {
  const std::set<int64_t> exact(plan.exact_clusters.begin(), plan.exact_clusters.end());
  std::vector<at::Tensor> outputs;
  for (int64_t g = 0; g < group.size(0); ++g) {
    std::vector<double> logits;
    std::vector<at::Tensor> entry_values;
    for (int64_t t = 0; t < keys.size(0); ++t) {
      const bool clustered = t >= clusters.first && t < clusters.end;
      if (clustered && exact.count(clusters.assignment[t - clusters.first].item<int64_t>()) == 0) continue;
      logits.push_back(at::dot(group[g].to(at::kDouble), keys[t].to(at::kDouble)).item<double>() * kScale);
      entry_values.push_back(values[t].to(at::kDouble));
    }
    for (int64_t c : plan.approximated_clusters) {
      const double size = clusters.sizes[c].item<double>();
      logits.push_back(at::dot(group[g].to(at::kDouble), clusters.centroids[c].to(at::kDouble)).item<double>() *
                           kScale +
                       std::log(size));
      entry_values.push_back(clusters.value_sums[c].to(at::kDouble) / size);
    }
    at::Tensor weights = at::softmax(at::tensor(logits, at::kDouble), 0);
    outputs.push_back(at::mv(at::stack(entry_values).t(), weights));
  }
  return at::stack(outputs);
}

// The largest difference between a Double-P output [H, 1, D] and DoublePByHand per KV head with
// the clusters `cluster_of_head` gives it.
double DoublePError(const AttentionInput& input, const at::Tensor& actual, const PolicySpec& spec,
                    const std::function<KeyClusters(int64_t head)>& cluster_of_head, bool& approximated_some) {
  double worst = 0;
  for (int64_t head = 0; head < kKvHeads; ++head) {
    at::Tensor group = input.queries.narrow(0, head * kGroup, kGroup).squeeze(1);
    const KeyClusters clusters = cluster_of_head(head);
    const DoublePPlan plan = PlanDoubleP(group, clusters, kScale, spec.p1, spec.p2);
    approximated_some = approximated_some || !plan.approximated_clusters.empty();
    at::Tensor expected = DoublePByHand(group, input.keys[head], input.values[head], clusters, plan);
    at::Tensor got = actual.narrow(0, head * kGroup, kGroup).squeeze(1).to(at::kDouble);
    worst = std::max(worst, (got - expected).abs().max().item<double>());
  }
  return worst;
}

TEST_CASE("double-p equals its formula written out, and dense when p1 = p2 = 1") {
  at::manual_seed(15);
  PolicySpec spec = PolicySpec::Defaults(PolicyKind::kDoubleP);
  spec.clusters = 12;
  spec.sink_tokens = 4;
  spec.recent_tokens = 16;
  spec.p1 = 0.9;
  spec.p2 = 0.5;
  const int64_t length = 400;
  AttentionInput input = RandomInput(0, length, nullptr);
  auto backend = Backend(spec);
  auto state = backend->NewSequenceState();
  input.state = state.get();
  at::Tensor actual = backend->Attend(input);
  bool approximated_some = false;
  const double worst = DoublePError(
      input, actual, spec,
      [&](int64_t head) {
        return KMeansClusters(input.keys[head].narrow(0, 4, length - 20), input.values[head].narrow(0, 4, length - 20),
                              4, spec.clusters, spec.kmeans_iterations);
      },
      approximated_some);
  CHECK(worst < 1e-5);
  CHECK(approximated_some);

  spec.p1 = spec.p2 = 1.0;
  auto exact_backend = Backend(spec);
  auto exact_state = exact_backend->NewSequenceState();
  input.state = exact_state.get();
  CHECK(WorstError(input, exact_backend->Attend(input), {AllPositions(length), AllPositions(length)}) < 1e-5);
}

TEST_CASE("double-p keeps decoded tokens exact until the tail is long enough to cluster") {
  at::manual_seed(16);
  PolicySpec spec = PolicySpec::Defaults(PolicyKind::kDoubleP);
  spec.clusters = 8;
  spec.sink_tokens = 4;
  spec.recent_tokens = 8;
  spec.tail_tokens = 5;
  spec.p1 = 0.9;
  spec.p2 = 0.3;
  auto backend = Backend(spec);
  auto state = backend->NewSequenceState();
  at::Tensor keys = at::randn({kKvHeads, 120, kDim}), values = at::randn({kKvHeads, 120, kDim});
  // The first step (length 100) clusters [4, 92); the tail [92, length - 8) reaches 5 tokens at
  // length 105 and becomes one more cluster (of the prefill's mean size, 11, rounded: 5 * 8 / 88
  // rounds to 0, at least 1), and again at 110.
  auto clusters_at = [&](int64_t length, int64_t head) {
    KeyClusters clusters = KMeansClusters(keys[head].narrow(0, 4, 88), values[head].narrow(0, 4, 88), 4, 8, 10);
    for (int64_t begin = 92; begin + 5 <= length - 8; begin += 5) {
      AppendClusters(clusters, KMeansClusters(keys[head].narrow(0, begin, 5), values[head].narrow(0, begin, 5), begin,
                                              1, 10));
    }
    return clusters;
  };
  bool approximated_some = false;
  for (int64_t length = 100; length <= 110; ++length) {
    AttentionInput input = RandomInput(0, length, state.get());
    input.keys = keys.narrow(1, 0, length);
    input.values = values.narrow(1, 0, length);
    at::Tensor actual = backend->Attend(input);
    INFO("length " << length);
    CHECK(DoublePError(
              input, actual, spec, [&](int64_t head) { return clusters_at(length, head); }, approximated_some) < 1e-5);
  }
  CHECK(approximated_some);
  CHECK(state->telemetry()->decode_steps == 11);
}

// The CUDA Double-P backend clusters a paged cache through KvPool::GatherRange, reading only the
// positions the clustering asks for: the same clusters as from the whole contiguous cache.
TEST_CASE("double-p clusters from ranges gathered through a page table equal those of the whole cache") {
  at::manual_seed(17);
  PolicySpec spec = PolicySpec::Defaults(PolicyKind::kDoubleP);
  spec.clusters = 8;
  spec.sink_tokens = 4;
  spec.recent_tokens = 8;
  spec.tail_tokens = 5;
  KvPool::Options options;
  options.page_size = 16;
  options.num_pages = 24;
  auto pool = KvPool::Create(SmallConfig(), at::TensorOptions().dtype(at::kFloat), options);
  REQUIRE(pool.ok());
  // Pages handed back one by one come out again in descending order: a page table far from
  // consecutive.
  const std::vector<int32_t> taken = (*pool)->Allocate(24).value();
  for (const int32_t page : taken) (*pool)->Free({page});
  const std::vector<int32_t> pages = (*pool)->Allocate(8).value();
  REQUIRE(pages.front() > pages.back());
  const int64_t capacity = 8 * options.page_size;
  const at::Tensor keys = at::randn({kKvHeads, capacity, kDim}), values = at::randn({kKvHeads, capacity, kDim});
  for (int layer = 0; layer < kLayers; ++layer) (*pool)->Write(layer, pages, 0, keys, values);

  SECTION("a range equals the same positions of the whole gathered cache") {
    const int layer = 1;
    const std::vector<std::pair<int64_t, int64_t>> ranges = {{0, 16}, {5, 3}, {4, 88}, {92, 5}, {17, 0}, {31, 2},
                                                             {0, capacity}};
    for (const auto& [first, count] : ranges) {
      INFO("first " << first << " count " << count);
      const auto [range_keys, range_values] = (*pool)->GatherRange(layer, pages, first, count);
      CHECK(range_keys.sizes() == at::IntArrayRef({kKvHeads, count, kDim}));
      CHECK(at::equal(range_keys, keys.narrow(1, first, count)));
      CHECK(at::equal(range_values, values.narrow(1, first, count)));
    }
  }

  SECTION("the clusters, step by step, and only the clustered positions read") {
    std::optional<KeyClusters> whole, paged;
    const int layer = 2, head = 1;
    for (int64_t length = 100; length <= 115; ++length) {
      INFO("length " << length);
      const KeyClusters& expected =
          UpdateDoublePClusters(whole, keys[head].narrow(0, 0, length), values[head].narrow(0, 0, length), spec);
      std::vector<std::pair<int64_t, int64_t>> reads;
      const KeyClusters& actual = UpdateDoublePClusters(
          paged, length, kDim, at::kCPU,
          [&](int64_t first, int64_t count) {
            reads.emplace_back(first, count);
            const auto [range_keys, range_values] = (*pool)->GatherRange(layer, pages, first, count);
            return std::make_pair(range_keys[head], range_values[head]);
          },
          spec);
      CHECK(actual.first == expected.first);
      CHECK(actual.end == expected.end);
      CHECK(at::equal(actual.centroids, expected.centroids));
      CHECK(at::equal(actual.sizes, expected.sizes));
      CHECK(at::equal(actual.value_sums, expected.value_sums));
      CHECK(at::equal(actual.assignment, expected.assignment));
      // The first step reads the clustered span [4, 92), later ones only each new tail of 5.
      if (length == 100) {
        CHECK(reads == std::vector<std::pair<int64_t, int64_t>>{{4, 88}});
      } else if ((length - 8 - 92) % 5 == 0) {
        CHECK(reads == std::vector<std::pair<int64_t, int64_t>>{{length - 8 - 5, 5}});
      } else {
        CHECK(reads.empty());
      }
    }
  }
}

// PrHS's selection written out: blocks carried over from the previous step (or the last prompt
// position) and from the previous layer, each enlarged by one block, ranked by mass.
TEST_CASE("prhs attends blocks chosen before scoring: previous step, previous layer, recency window") {
  at::manual_seed(17);
  PolicySpec spec = PolicySpec::Defaults(PolicyKind::kPrhs);
  spec.block_size = 8;
  spec.sink_tokens = 8;
  spec.recent_tokens = 8;
  spec.prhs_window = 16;
  spec.prhs_enlargement = 1;
  spec.token_budget = 64;  // 8 blocks: sink, 3 of window and current, and 4 carried over
  auto backend = Backend(spec);
  auto state = backend->NewSequenceState();
  const int64_t prompt = 200;
  const int64_t prompt_blocks = 25;
  at::Tensor keys = at::randn({kLayers, kKvHeads, prompt + 3, kDim});
  at::Tensor values = at::randn({kLayers, kKvHeads, prompt + 3, kDim});
  // [layer][head] block masses (mean over the group of the softmax over the attended positions,
  // summed per block), -1 where not attended.
  std::vector<std::vector<std::vector<double>>> previous(kLayers, std::vector<std::vector<double>>(kKvHeads));
  auto mass_of = [&](const at::Tensor& group, const at::Tensor& k, const std::vector<bool>& mask, int64_t blocks) {
    std::vector<double> mass(blocks, -1);
    for (int64_t t = 0; t < static_cast<int64_t>(mask.size()); ++t) {
      if (mask[t]) mass[t / 8] = 0;
    }
    for (int64_t g = 0; g < group.size(0); ++g) {
      at::Tensor scores = at::mv(k.to(at::kDouble), group[g].to(at::kDouble)) * kScale;
      for (size_t t = 0; t < mask.size(); ++t) {
        if (!mask[t]) scores[t] = -INFINITY;
      }
      at::Tensor weights = at::softmax(scores, 0);
      for (size_t t = 0; t < mask.size(); ++t) {
        if (mask[t]) mass[t / 8] += weights[t].item<double>() / group.size(0);
      }
    }
    return mass;
  };
  auto enlarged = [](const std::vector<double>& mass, int64_t blocks) {
    std::vector<double> priority(blocks, -1);
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t n = std::max<int64_t>(0, b - 1); n <= std::min<int64_t>(blocks - 1, b + 1); ++n) {
        if (n < static_cast<int64_t>(mass.size())) priority[b] = std::max(priority[b], mass[n]);
      }
    }
    return priority;
  };
  // Prefill: the last prompt position's dense attention seeds each (layer, head).
  for (int layer = 0; layer < kLayers; ++layer) {
    AttentionInput input;
    input.layer = layer;
    input.queries = at::randn({kKvHeads * kGroup, 5, kDim});
    input.keys = keys[layer].narrow(1, 0, prompt);
    input.values = values[layer].narrow(1, 0, prompt);
    input.scale = kScale;
    input.state = state.get();
    backend->Attend(input);
    for (int64_t head = 0; head < kKvHeads; ++head) {
      at::Tensor last = input.queries.narrow(0, head * kGroup, kGroup).select(1, 4);
      previous[layer][head] = mass_of(last, input.keys[head], AllPositions(prompt), prompt_blocks);
    }
  }
  double worst = 0;
  for (int64_t step = 1; step <= 3; ++step) {
    const int64_t length = prompt + step;
    const int64_t blocks = (length + 7) / 8;
    std::vector<std::vector<double>> layer_mass(kKvHeads);
    for (int layer = 0; layer < kLayers; ++layer) {
      AttentionInput input = RandomInput(layer, length, state.get());
      input.keys = keys[layer].narrow(1, 0, length);
      input.values = values[layer].narrow(1, 0, length);
      at::Tensor actual = backend->Attend(input);
      std::vector<std::vector<bool>> masks;
      std::vector<std::vector<double>> this_layer(kKvHeads);
      for (int64_t head = 0; head < kKvHeads; ++head) {
        std::vector<bool> mandatory(blocks, false);
        mandatory[0] = true;  // the sink
        for (int64_t t = length - 16; t < length; ++t) mandatory[t / 8] = true;  // the recency window
        std::vector<double> priority = enlarged(previous[layer][head], blocks);
        if (layer > 0) {
          const std::vector<double> from_layer = enlarged(layer_mass[head], blocks);
          for (int64_t b = 0; b < blocks; ++b) priority[b] = std::max(priority[b], from_layer[b]);
        }
        std::vector<int64_t> proposed;
        for (int64_t b = 0; b < blocks; ++b) {
          if (!mandatory[b] && priority[b] >= 0) proposed.push_back(b);
        }
        std::stable_sort(proposed.begin(), proposed.end(),
                         [&](int64_t a, int64_t b) { return priority[a] > priority[b]; });
        std::vector<bool> keep = mandatory;
        const int64_t free_blocks = 8 - std::count(mandatory.begin(), mandatory.end(), true);
        for (int64_t i = 0; i < free_blocks && i < static_cast<int64_t>(proposed.size()); ++i) keep[proposed[i]] = true;
        const std::vector<bool> mask = UnitsToMask(keep, 8, length);
        CHECK(std::count(keep.begin(), keep.end(), true) == 8);
        masks.push_back(mask);
        at::Tensor group = input.queries.narrow(0, head * kGroup, kGroup).squeeze(1);
        this_layer[head] = mass_of(group, input.keys[head], mask, blocks);
      }
      INFO("step " << step << " layer " << layer);
      worst = std::max(worst, WorstError(input, actual, masks));
      for (int64_t head = 0; head < kKvHeads; ++head) previous[layer][head] = this_layer[head];
      layer_mass = this_layer;
    }
  }
  CHECK(worst < 1e-5);
}

TEST_CASE("telemetry counts steps, positions and bytes; audit reports the dropped dense mass") {
  at::manual_seed(18);
  const int64_t length = 500;
  auto partition = std::make_shared<HeadPartition>(HeadPartition::AllRetrieval(kLayers, kKvHeads, SelectionParams{}));
  partition->set_role(1, 1, HeadRole::kSparse);
  PolicySpec quest = PolicySpec::Defaults(PolicyKind::kQuest);
  quest.token_budget = 64;
  quest.quest_dense_layers = 1;
  PolicySpec lychee = PolicySpec::Defaults(PolicyKind::kLychee);
  lychee.token_budget = 256;
  const PolicySpec specs[] = {PolicySpec::Defaults(PolicyKind::kDense), quest, lychee};
  for (PolicySpec spec : specs) {
    spec.audit = true;
    auto backend = Backend(spec, partition);
    auto state = backend->NewSequenceState();
    std::vector<AttentionInput> inputs;
    for (int layer = 0; layer < 2; ++layer) {
      inputs.push_back(RandomInput(layer, length, state.get()));
      backend->Attend(inputs.back());
    }
    const AttentionTelemetry* telemetry = state->telemetry();
    REQUIRE(telemetry != nullptr);
    INFO(spec.Describe());
    CHECK(telemetry->decode_steps == 1);
    CHECK(telemetry->audited);
    CHECK(telemetry->audited_heads == 2 * kKvHeads * kGroup);
    const int64_t bytes_per_position = 2 * kDim * 4;
    if (spec.kind == PolicyKind::kDense) {
      CHECK(telemetry->tokens(1, 1) == length);
      CHECK(telemetry->kv_bytes_read == 2 * kKvHeads * length * bytes_per_position);
      CHECK(telemetry->max_dropped_mass == 0);
      continue;
    }
    // Layer 0 is dense for both; at layer 1 quest drops pages on both heads and lychee on its
    // sparse head 1, which reuses head 1's layer-0 selection.
    CHECK(telemetry->tokens(0, 0) == length);
    at::Tensor layer1_positions[kKvHeads];
    if (spec.kind == PolicyKind::kQuest) {
      for (int64_t head = 0; head < kKvHeads; ++head) {
        const std::vector<int64_t> pages = QuestSelectPages(
            QuestPageScores(inputs[1].queries.narrow(0, head * kGroup, kGroup).squeeze(1), inputs[1].keys[head], 16),
            length, quest);
        layer1_positions[head] = UnitPositions(pages, 16, length, at::kCPU);
      }
      const int64_t attended = layer1_positions[0].numel() + layer1_positions[1].numel();
      CHECK(telemetry->tokens(1, 0) == layer1_positions[0].numel());
      CHECK(layer1_positions[0].numel() < 64);  // 4 pages, the current one partial
      const int64_t pages = (length + 15) / 16;
      CHECK(telemetry->kv_bytes_read == (2 * length + attended) * bytes_per_position + 2 * pages * 2 * kDim * 4);
    } else {
      layer1_positions[0] = at::arange(length, at::kLong);
      const SelectionParams params = {64, 256, 64, 64};
      at::Tensor pooled = inputs[0].queries.narrow(0, kGroup, kGroup).mean(0).squeeze(0);
      layer1_positions[1] =
          UnitPositions(SelectBlocks(BlockScores(inputs[0].keys[1], pooled, 64), length, params), 64, length, at::kCPU);
      CHECK(telemetry->tokens(1, 1) == layer1_positions[1].numel());
      CHECK(telemetry->kv_bytes_read == (3 * length + layer1_positions[1].numel()) * bytes_per_position);
    }
    // The dropped mass computed directly: the dense softmax mass outside the attended positions.
    double worst = 0, total = 0;
    for (int64_t head = 0; head < kKvHeads; ++head) {
      const std::vector<bool> kept = PositionsToMask(layer1_positions[head], length);
      for (int64_t g = 0; g < kGroup; ++g) {
        at::Tensor weights = at::softmax(
            at::mv(inputs[1].keys[head].to(at::kDouble), inputs[1].queries[head * kGroup + g][0].to(at::kDouble)) *
                kScale,
            0);
        double dropped = 0;
        for (int64_t t = 0; t < length; ++t) dropped += kept[t] ? 0 : weights[t].item<double>();
        worst = std::max(worst, dropped);
        total += dropped;
      }
    }
    CHECK(worst > 0);
    CHECK(std::abs(telemetry->max_dropped_mass - worst) < 1e-9);
    CHECK(std::abs(telemetry->mean_dropped_mass() - total / telemetry->audited_heads) < 1e-9);
  }
}

TEST_CASE("an audit with a period audits the sequence's steps 1, N + 1, 2N + 1, ...") {
  at::manual_seed(19);
  auto partition = std::make_shared<HeadPartition>(HeadPartition::AllRetrieval(kLayers, kKvHeads, SelectionParams{}));
  partition->set_role(1, 1, HeadRole::kSparse);
  PolicySpec lychee = PolicySpec::Defaults(PolicyKind::kLychee);
  lychee.token_budget = 256;
  lychee.audit = true;
  for (const int64_t every : {1, 3, 8}) {
    PolicySpec spec = lychee;
    spec.audit_every = every;
    auto backend = Backend(spec, partition);
    auto state = backend->NewSequenceState();
    for (int step = 0; step < 7; ++step) {
      for (int layer = 0; layer < 2; ++layer) backend->Attend(RandomInput(layer, 500 + step, state.get()));
    }
    const AttentionTelemetry* telemetry = state->telemetry();
    INFO("every " << every);
    CHECK(telemetry->decode_steps == 7);
    CHECK(telemetry->audited_heads == (6 / every + 1) * 2 * kKvHeads * kGroup);
    CHECK(telemetry->max_dropped_mass > 0);
  }
  // Unset (0) is the server's period; where no server sets one, kDefaultAuditEvery.
  lychee.audit_every = 0;
  CHECK(lychee.AuditPeriod() == kDefaultAuditEvery);
  CHECK(lychee.Describe().find("audit every=16") != std::string::npos);
  lychee.audit = false;
  CHECK(lychee.AuditPeriod() == 0);
  lychee.audit_every = -1;
  const absl::Status negative = lychee.Validate(SmallConfig());
  CHECK(negative.code() == absl::StatusCode::kInvalidArgument);
  CHECK(negative.message().find("audit_every") != std::string::npos);
}

using testing::DecodeLogits;
using testing::kModelDir;

double MaxGap(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double gap = 0;
  for (size_t i = 0; i < a.size(); ++i) gap = std::max(gap, (a[i] - b[i]).abs().max().item<double>());
  return gap;
}

TEST_CASE("on the bundled model, every policy whose budget covers the context decodes as dense does") {
  auto model = Model::Load(kModelDir);
  REQUIRE(model.ok());
  const ModelConfig& config = (*model)->config();
  auto partition = std::make_shared<HeadPartition>(
      HeadPartition::AllRetrieval(config.num_layers, config.num_kv_heads, SelectionParams{}));
  for (int64_t layer = 1; layer < config.num_layers; ++layer) partition->set_role(layer, 1, HeadRole::kSparse);
  const auto dense = DecodeLogits(**model, std::make_shared<DenseAttentionBackend>(), 6);
  for (PolicyKind kind : AllPolicyKinds()) {
    PolicySpec covering = PolicySpec::Defaults(kind);
    covering.token_budget = 1024;
    covering.p1 = covering.p2 = 1.0;
    covering.clusters = 16;
    auto backend = MakePolicyBackend(covering, config, partition);
    REQUIRE(backend.ok());
    INFO(covering.Describe());
    CHECK(MaxGap(DecodeLogits(**model, *backend, 6), dense) < 1e-4);
    if (kind == PolicyKind::kDense || kind == PolicyKind::kDoubleP) continue;
    // A narrow budget really changes the result, so the equality above is not vacuous.
    PolicySpec narrow = covering;
    narrow.token_budget = kind == PolicyKind::kStreaming ? 128 : 256;
    if (kind == PolicyKind::kPrhs) narrow.prhs_window = 64;
    auto narrow_backend = MakePolicyBackend(narrow, config, partition);
    REQUIRE(narrow_backend.ok());
    CHECK(MaxGap(DecodeLogits(**model, *narrow_backend, 6), dense) > 1e-3);
  }
  PolicySpec double_p = PolicySpec::Defaults(PolicyKind::kDoubleP);
  double_p.clusters = 16;
  auto approximate = MakePolicyBackend(double_p, config, partition);
  REQUIRE(approximate.ok());
  CHECK(MaxGap(DecodeLogits(**model, *approximate, 6), dense) > 1e-3);
}

TEST_CASE("a forked sequence decodes as one prefilled with its own backend") {
  auto model = Model::Load(kModelDir);
  REQUIRE(model.ok());
  PolicySpec quest = PolicySpec::Defaults(PolicyKind::kQuest);
  quest.token_budget = 128;
  auto backend = MakePolicyBackend(quest, (*model)->config(), nullptr);
  REQUIRE(backend.ok());
  std::vector<int32_t> prompt(300);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>(50 + (i * 91) % 5000);
  auto dense = (*model)->NewSequence(std::make_shared<DenseAttentionBackend>());
  REQUIRE((*model)->Prefill(*dense, prompt).ok());
  auto fork = (*model)->Fork(*dense, *backend).value();
  auto own = (*model)->NewSequence(*backend);
  REQUIRE((*model)->Prefill(*own, prompt).ok());
  for (int32_t token : {5, 17, 400}) {
    Sequence* const forked[] = {fork.get()};
    Sequence* const owned[] = {own.get()};
    const int32_t next[] = {token};
    at::Tensor a = (*model)->Decode(forked, next).value();
    at::Tensor b = (*model)->Decode(owned, next).value();
    CHECK((a - b).abs().max().item<double>() == 0);
  }
  CHECK(dense->length() == 300);
  CHECK(fork->attention_state()->telemetry()->decode_steps == 3);
}

}  // namespace
}  // namespace lychee
