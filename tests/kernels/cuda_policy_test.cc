// The CUDA paths of Quest, PrHS and Double-P (kernels/cuda_policies.cc on the kernels of
// kernels/cuda/policy_decode.h) against their LibTorch references (kernels/policies), both on
// the GPU over the same random bf16 caches: the selection steps one by one, then whole decode
// steps over several layers, GQA groups 1 to 8 and head_dim 64 and 128.
#include "tests/torch_catch.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <vector>

#include "kernels/cuda/torch_policy_decode.h"
#include "kernels/cuda_attention.h"
#include "kernels/policies/policies.h"

namespace lychee {
namespace {

at::TensorOptions Bf16() { return at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA); }

bool SkipWithoutGpu() {
  if (at::hasCUDA()) return false;
  WARN("SKIPPED: no CUDA device: the policy kernels run on the GPU host only");
  return true;
}

std::set<int32_t> RowSet(const cuda::HeadLists& lists, int64_t head) {
  const at::Tensor entries = lists.entries[head].cpu();
  const int32_t count = lists.counts[head].item<int32_t>();
  return std::set<int32_t>(entries.data_ptr<int32_t>(), entries.data_ptr<int32_t>() + count);
}

template <typename T>
std::set<int32_t> AsSet(const std::vector<T>& v) {
  return std::set<int32_t>(v.begin(), v.end());
}

TEST_CASE("Quest page scores and page selection on CUDA equal the reference's", "[cuda]") {
  if (SkipWithoutGpu()) return;
  at::manual_seed(1);
  const int64_t kv_heads = 2, group = 4, dim = 128, length = 3001;
  PolicySpec spec = PolicySpec::Defaults(PolicyKind::kQuest);
  spec.token_budget = 512;
  const at::Tensor keys = at::randn({kv_heads, length + 7, dim}, Bf16());
  const at::Tensor queries = at::randn({kv_heads * group, dim}, Bf16());
  const int64_t num_pages = (length + spec.page_size - 1) / spec.page_size;
  at::Tensor bounds = at::empty({kv_heads, num_pages, 2, dim}, Bf16());
  // In two parts, as decode grows them.
  cuda::QuestPageBounds(keys, length - 100, spec.page_size, 0, bounds);
  cuda::QuestPageBounds(keys, length, spec.page_size, (length - 100) / spec.page_size, bounds);
  const at::Tensor scores = cuda::QuestPageScores(queries, bounds, num_pages).cpu();
  const cuda::HeadLists pages = cuda::SelectBlocks(
      scores.cuda(), length,
      {static_cast<int>(spec.page_size), static_cast<int>(spec.token_budget), 0, 0});
  for (int64_t h = 0; h < kv_heads; ++h) {
    const at::Tensor reference_scores =
        QuestPageScores(queries.narrow(0, h * group, group), keys[h].narrow(0, 0, length), spec.page_size);
    const at::Tensor best = std::get<0>(reference_scores.max(0)).cpu();
    CHECK((best - scores[h]).abs().max().item<double>() < 1e-3 * (1 + best.abs().max().item<double>()));
    CHECK(RowSet(pages, h) == AsSet(QuestSelectPages(reference_scores, length, spec)));
  }
}

TEST_CASE("Double-P cluster classes and exact positions on CUDA equal the reference plan's", "[cuda]") {
  if (SkipWithoutGpu()) return;
  at::manual_seed(2);
  for (const int64_t dim : {64, 128}) {
    const int64_t kv_heads = 2, group = 3, length = 2500;
    const at::Tensor keys = at::randn({kv_heads, length, dim}, Bf16());
    const at::Tensor values = at::randn({kv_heads, length, dim}, Bf16());
    const at::Tensor queries = at::randn({kv_heads * group, dim}, Bf16()) * 2;
    const double scale = 1 / std::sqrt(static_cast<double>(dim));
    std::vector<KeyClusters> heads;
    for (int64_t h = 0; h < kv_heads; ++h) {
      heads.push_back(KMeansClusters(keys[h].narrow(0, 4, 2000), values[h].narrow(0, 4, 2000), 4, 40 + 30 * h, 5));
    }
    const int64_t capacity = std::max(heads[0].sizes.size(0), heads[1].sizes.size(0));
    cuda::ClusterTensors table;
    const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
    table.centroids = at::zeros({kv_heads, capacity, dim}, f32);
    table.value_means = at::zeros({kv_heads, capacity, dim}, f32);
    table.log_sizes = at::zeros({kv_heads, capacity}, f32);
    std::vector<int32_t> counts;
    std::vector<at::Tensor> assignment;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t c = heads[h].sizes.size(0);
      counts.push_back(static_cast<int32_t>(c));
      table.centroids[h].narrow(0, 0, c).copy_(heads[h].centroids);
      table.value_means[h].narrow(0, 0, c).copy_(heads[h].value_sums / heads[h].sizes.unsqueeze(1));
      table.log_sizes[h].narrow(0, 0, c).copy_(heads[h].sizes.log());
      assignment.push_back(heads[h].assignment.to(at::kInt));
    }
    table.counts = at::tensor(counts, at::kInt).cuda();
    for (const auto& [p1, p2] : {std::pair{0.95, 0.7}, std::pair{0.5, 0.2}, std::pair{1.0, 1.0}}) {
      const cuda::ClusterClasses classes = cuda::DoublePClassify(queries, table, scale, p1, p2);
      const cuda::HeadLists exact =
          cuda::DoublePExactPositions(at::stack(assignment), classes.exact, 4, 2004, length);
      const at::Tensor exact_flags = classes.exact.cpu();
      for (int64_t h = 0; h < kv_heads; ++h) {
        const DoublePPlan plan = PlanDoubleP(queries.narrow(0, h * group, group), heads[h], scale, p1, p2);
        std::vector<int32_t> exact_clusters;
        for (int64_t c = 0; c < counts[h]; ++c) {
          if (exact_flags[h][c].item<uint8_t>() != 0) exact_clusters.push_back(static_cast<int32_t>(c));
        }
        CHECK(AsSet(exact_clusters) == AsSet(plan.exact_clusters));
        CHECK(RowSet(classes.approximated, h) == AsSet(plan.approximated_clusters));
        // Positions: the sink, the exact clusters' members, the unclustered rest.
        const DoublePHeadResult reference = DoublePHeadAttention(
            queries.narrow(0, h * group, group).unsqueeze(1), keys[h], values[h], heads[h], scale, [&] {
              PolicySpec spec = PolicySpec::Defaults(PolicyKind::kDoubleP);
              spec.p1 = p1;
              spec.p2 = p2;
              return spec;
            }());
        const at::Tensor expected = reference.exact_positions.cpu().to(at::kInt);
        CHECK(RowSet(exact, h) == std::set<int32_t>(expected.data_ptr<int32_t>(),
                                                     expected.data_ptr<int32_t>() + expected.numel()));
      }
    }
  }
}

struct Shape {
  int64_t q_heads, kv_heads, dim;
};

// Runs `reference` and `fast` over one prefill and then `steps` decode steps of `layers` layers on
// the same random caches; returns the largest |difference| of their outputs.
double WorstDifference(const AttentionBackend& reference, const AttentionBackend& fast, const Shape& shape,
                       int64_t prompt, int steps, int layers) {
  std::vector<at::Tensor> keys, values;
  for (int layer = 0; layer < layers; ++layer) {
    keys.push_back(at::randn({shape.kv_heads, prompt + steps, shape.dim}, Bf16()));
    values.push_back(at::randn({shape.kv_heads, prompt + steps, shape.dim}, Bf16()));
  }
  auto reference_state = reference.NewSequenceState();
  auto fast_state = fast.NewSequenceState();
  const double scale = 1 / std::sqrt(static_cast<double>(shape.dim));
  double worst = 0;
  auto compare = [&](int layer, const at::Tensor& queries, int64_t length) {
    AttentionInput input;
    input.layer = layer;
    input.queries = queries;
    input.keys = keys[layer].narrow(1, 0, length);
    input.values = values[layer].narrow(1, 0, length);
    input.scale = scale;
    input.state = reference_state.get();
    const at::Tensor expected = reference.Attend(input).to(at::kFloat);
    input.state = fast_state.get();
    const at::Tensor got = fast.Attend(input).to(at::kFloat);
    REQUIRE(got.sizes() == expected.sizes());
    worst = std::max(worst, (got - expected).abs().max().item<double>());
  };
  for (int layer = 0; layer < layers; ++layer) compare(layer, at::randn({shape.q_heads, 8, shape.dim}, Bf16()), prompt);
  for (int step = 1; step <= steps; ++step) {
    for (int layer = 0; layer < layers; ++layer) {
      // Peaked attention, so that what a policy selects matters.
      compare(layer, at::randn({shape.q_heads, 1, shape.dim}, Bf16()) * 3, prompt + step);
    }
  }
  return worst;
}

TEST_CASE("Quest, PrHS and Double-P decode on CUDA as their references do", "[cuda]") {
  if (SkipWithoutGpu()) return;
  at::manual_seed(3);
  const Shape shapes[] = {{8, 8, 64}, {32, 8, 128}, {16, 4, 128}, {8, 1, 64}, {6, 2, 64}};
  for (const Shape& shape : shapes) {
    PolicySpec quest = PolicySpec::Defaults(PolicyKind::kQuest);
    quest.token_budget = 512;
    quest.quest_dense_layers = 1;
    PolicySpec prhs = PolicySpec::Defaults(PolicyKind::kPrhs);
    prhs.token_budget = 1024;
    prhs.prhs_window = 128;
    PolicySpec double_p = PolicySpec::Defaults(PolicyKind::kDoubleP);
    double_p.clusters = 48;
    double_p.kmeans_iterations = 4;
    double_p.recent_tokens = 16;
    double_p.tail_tokens = 3;  // so that decoded tokens get clustered within the test
    const struct {
      const char* name;
      std::shared_ptr<const AttentionBackend> reference, fast;
    } policies[] = {{"quest", MakeQuestBackend(quest), MakeCudaQuestAttention(quest)},
                    {"prhs", MakePrhsBackend(prhs), MakeCudaPrhsAttention(prhs)},
                    {"double-p", MakeDoublePBackend(double_p), MakeCudaDoublePAttention(double_p)}};
    for (const auto& policy : policies) {
      double worst = 0;
      try {
        worst = WorstDifference(*policy.reference, *policy.fast, shape, 2900, 6, 3);
      } catch (const std::exception& error) {
        FAIL_CHECK(policy.name << " H_kv " << shape.kv_heads << " D " << shape.dim << " threw: " << error.what());
        continue;
      }
      WARN(policy.name << " H_q " << shape.q_heads << " H_kv " << shape.kv_heads << " D " << shape.dim
                       << ": max |output difference| CUDA vs reference " << worst);
      CHECK(worst < 0.05);
    }
  }
}

}  // namespace
}  // namespace lychee
