// The hybrid-head CPU reference against a naive masked attention that uses the same selection
// rule written out with loops, and against dense attention on the bundled model.
#include "tests/torch_catch.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/model/model.h"
#include "kernels/dense_attention.h"
#include "kernels/hybrid_attention.h"
#include "tests/kernels/greedy_decode.h"

namespace lychee {
namespace {

using Blocks = std::vector<int64_t>;

SelectionParams Params(int64_t block, int64_t budget, int64_t sink, int64_t recent) {
  SelectionParams params;
  params.block_size = block;
  params.token_budget = budget;
  params.sink_tokens = sink;
  params.recent_tokens = recent;
  return params;
}

TEST_CASE("mandatory blocks are the sink blocks and those holding the recent window") {
  const SelectionParams p = Params(64, 4096, 64, 64);
  CHECK(MandatoryBlocks(1, p) == Blocks({0}));
  CHECK(MandatoryBlocks(64, p) == Blocks({0}));
  CHECK(MandatoryBlocks(300, p) == Blocks({0, 3, 4}));
  CHECK(MandatoryBlocks(320, p) == Blocks({0, 4}));
  CHECK(MandatoryBlocks(300, Params(64, 4096, 0, 0)) == Blocks({4}));
  CHECK(MandatoryBlocks(1000, Params(32, 4096, 70, 100)) == Blocks({0, 1, 2, 28, 29, 30, 31}));
}

TEST_CASE("selection keeps the mandatory blocks and the best others, or every block within the budget") {
  const SelectionParams p = Params(4, 20, 4, 4);  // 5 blocks of budget
  at::Tensor scores = at::tensor(std::vector<float>{0, 9, 1, 7, 7, 3, 8, 2, 0, 0});
  CHECK(SelectBlocks(scores, 40, p) == Blocks({0, 1, 3, 6, 9}));  // 3 and 4 tie: 3 first
  CHECK(SelectBlocks(scores.narrow(0, 0, 5), 20, p) == Blocks({0, 1, 2, 3, 4}));
  CHECK(SelectBlocks(scores, 38, Params(4, 20, 4, 6)) == Blocks({0, 1, 6, 8, 9}));
}

// The selection rule written independently: scores by loops, order by (score desc, index asc).
std::vector<int64_t> NaiveSelection(const at::Tensor& keys, const at::Tensor& group_queries, const SelectionParams& p) {
  const int64_t length = keys.size(0), dim = keys.size(1);
  const int64_t blocks = (length + p.block_size - 1) / p.block_size;
  std::vector<int64_t> all(blocks);
  std::iota(all.begin(), all.end(), 0);
  if (blocks <= p.token_budget / p.block_size) return all;
  at::Tensor pooled = group_queries.to(at::kDouble).mean(0);
  std::vector<double> score(blocks, -INFINITY);
  for (int64_t t = 0; t < length; ++t) {
    double dot = 0;
    for (int64_t d = 0; d < dim; ++d) dot += keys[t][d].item<double>() * pooled[d].item<double>();
    score[t / p.block_size] = std::max(score[t / p.block_size], dot);
  }
  std::vector<bool> keep(blocks, false);
  int64_t kept = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    const bool sink = b * p.block_size < p.sink_tokens;
    const bool recent = (b + 1) * p.block_size > std::min(length - 1, std::max<int64_t>(0, length - p.recent_tokens));
    if (sink || recent) keep[b] = true, ++kept;
  }
  std::vector<int64_t> order;
  for (int64_t b = 0; b < blocks; ++b) {
    if (!keep[b]) order.push_back(b);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  for (int64_t i = 0; i < p.token_budget / p.block_size - kept && i < static_cast<int64_t>(order.size()); ++i) {
    keep[order[i]] = true;
  }
  std::vector<int64_t> selected;
  for (int64_t b = 0; b < blocks; ++b) {
    if (keep[b]) selected.push_back(b);
  }
  return selected;
}

// Softmax attention of one query over the positions that `mask` allows, in double.
at::Tensor MaskedAttention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                           const std::vector<bool>& mask, double scale) {
  at::Tensor scores = at::mv(keys.to(at::kDouble), query.to(at::kDouble)) * scale;
  for (size_t t = 0; t < mask.size(); ++t) {
    if (!mask[t]) scores[t] = -INFINITY;
  }
  return at::mv(values.to(at::kDouble).t(), at::softmax(scores, 0));
}

TEST_CASE("hybrid decode equals masked attention over the selection shared per KV-head index") {
  at::manual_seed(3);
  const int64_t layers = 4, kv_heads = 2, group = 3, dim = 16;
  const SelectionParams p = Params(32, 256, 32, 32);
  // Layer 0 dense; layer 1 selects at head 0; layer 2 reuses it at head 0 and selects at head 1;
  // layer 3 is all sparse and reuses both.
  const std::vector<HeadRole> roles = {HeadRole::kRetrieval, HeadRole::kRetrieval, HeadRole::kRetrieval,
                                       HeadRole::kSparse,    HeadRole::kSparse,    HeadRole::kRetrieval,
                                       HeadRole::kSparse,    HeadRole::kSparse};
  auto partition = std::make_shared<const HeadPartition>(layers, kv_heads, roles, p);
  ModelConfig config;
  config.num_layers = layers;
  config.num_kv_heads = kv_heads;
  auto backend = HybridAttentionBackend::Create(partition, config);
  REQUIRE(backend.ok());
  for (int64_t length : {1, 200, 257, 1000, 2049}) {
    auto state = (*backend)->NewSequenceState();
    std::vector<std::vector<int64_t>> latest(kv_heads);
    for (int64_t layer = 0; layer < layers; ++layer) {
      AttentionInput input;
      input.layer = static_cast<int>(layer);
      input.queries = at::randn({kv_heads * group, 1, dim});
      input.keys = at::randn({kv_heads, length, dim});
      input.values = at::randn({kv_heads, length, dim});
      input.scale = 0.25;
      input.state = state.get();
      at::Tensor actual = (*backend)->Attend(input);
      REQUIRE(actual.sizes() == input.queries.sizes());
      for (int64_t head = 0; head < kv_heads; ++head) {
        at::Tensor group_queries = input.queries.narrow(0, head * group, group).squeeze(1);
        std::vector<bool> mask(length, true);
        if (partition->role(layer, head) == HeadRole::kRetrieval) {
          latest[head] = NaiveSelection(input.keys[head], group_queries, p);
          CHECK(static_cast<HybridSequenceState&>(*state).selected_blocks[head] == latest[head]);
        } else {
          std::fill(mask.begin(), mask.end(), false);
          for (int64_t block : latest[head]) {
            for (int64_t t = block * p.block_size; t < std::min(length, (block + 1) * p.block_size); ++t) mask[t] = true;
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          at::Tensor expected = MaskedAttention(group_queries[g], input.keys[head], input.values[head], mask, 0.25);
          INFO("length " << length << " layer " << layer << " head " << head);
          CHECK((actual[head * group + g][0].to(at::kDouble) - expected).abs().max().item<double>() < 1e-5);
        }
      }
    }
    if (length > p.token_budget) CHECK(latest[0].size() == static_cast<size_t>(p.token_budget / p.block_size));
  }
}

using testing::DecodeLogits;
using testing::kModelDir;

TEST_CASE("on the bundled model, hybrid with a budget covering the context equals dense") {
  auto model = Model::Load(kModelDir);
  REQUIRE(model.ok());
  const ModelConfig& config = (*model)->config();
  // Every head past layer 0 sparse: with the whole context in the budget it must still be exact.
  HeadPartition partition = HeadPartition::AllRetrieval(config.num_layers, config.num_kv_heads, Params(64, 1024, 64, 64));
  for (int64_t layer = 1; layer < config.num_layers; ++layer) {
    for (int64_t head = 0; head < config.num_kv_heads; ++head) partition.set_role(layer, head, HeadRole::kSparse);
  }
  auto covering = HybridAttentionBackend::Create(std::make_shared<const HeadPartition>(partition), config);
  REQUIRE(covering.ok());
  partition.mutable_selection().token_budget = 256;
  auto narrow = HybridAttentionBackend::Create(std::make_shared<const HeadPartition>(partition), config);
  REQUIRE(narrow.ok());

  const auto dense = DecodeLogits(**model, std::make_shared<DenseAttentionBackend>(), 8);
  const auto hybrid = DecodeLogits(**model, *covering, 8);
  const auto sparse = DecodeLogits(**model, *narrow, 8);
  double worst = 0, sparse_gap = 0;
  for (size_t i = 0; i < dense.size(); ++i) {
    worst = std::max(worst, (hybrid[i] - dense[i]).abs().max().item<double>());
    sparse_gap = std::max(sparse_gap, (sparse[i] - dense[i]).abs().max().item<double>());
  }
  INFO("max |hybrid - dense| " << worst << ", with a 256-token budget " << sparse_gap);
  CHECK(worst < 1e-4);
  CHECK(sparse_gap > 1e-3);  // the narrow budget really drops tokens
}

TEST_CASE("a partition that does not fit the model is refused before any attention runs") {
  ModelConfig config;
  config.num_layers = 6;
  config.num_kv_heads = 2;
  auto wrong_shape = std::make_shared<const HeadPartition>(HeadPartition::AllRetrieval(5, 2, SelectionParams{}));
  CHECK(HybridAttentionBackend::Create(wrong_shape, config).status().code() == absl::StatusCode::kInvalidArgument);
  config.sliding_window = 4096;
  auto fits = std::make_shared<const HeadPartition>(HeadPartition::AllRetrieval(6, 2, SelectionParams{}));
  CHECK(HybridAttentionBackend::Create(fits, config).status().code() == absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace lychee
