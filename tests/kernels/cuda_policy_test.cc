// The CUDA paths of Quest, PrHS and Double-P (kernels/cuda_policies.cc on the kernels of
// kernels/cuda/policy_decode.h) against their LibTorch references (kernels/policies), both on
// the GPU over the same random bf16 caches: the selection steps one by one, then whole decode
// steps over several layers, GQA groups 1 to 8 and head_dim 64 and 128. Then the paged cache: the
// kernels read a KV pool's pages through a page table exactly as they read the same cache
// contiguous, and whole decode steps of the bundled model over one shared pool, its pages handed
// out of order and interleaved between the sequences, match the references and each sequence
// decoded alone.
#include "tests/torch_catch.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <set>
#include <vector>

#include "common/model/kv_pool.h"
#include "common/model/model.h"
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

// ---- Paged caches ----------------------------------------------------------------------------

// One layer of a KV pool on the device, [H_kv, 1 + pages, pool page size, D] keys and values, a
// sequence's page table listing pool pages in random order (as a row of a larger table, the way
// a decode step holds it), and the same cache contiguous, [H_kv, used pages * page size, D].
struct PagedCache {
  at::Tensor pool_keys, pool_values;
  at::Tensor table;       // int32 [3, used + 4]; row 1 is the sequence's
  at::Tensor page_table;  // table[1], narrowed to the used pages
  at::Tensor keys, values;
};

PagedCache RandomPagedCache(int64_t kv_heads, int64_t dim, int64_t pool_page_size, int64_t length) {
  const int64_t used = (length + pool_page_size - 1) / pool_page_size;
  const int64_t pages = used + 5;
  PagedCache cache;
  cache.pool_keys = at::randn({kv_heads, 1 + pages, pool_page_size, dim}, Bf16());
  cache.pool_values = at::randn({kv_heads, 1 + pages, pool_page_size, dim}, Bf16());
  // Pages 1..pages (0 is the pool's reserved page) in random order, the first `used` of them.
  const at::Tensor order = (at::randperm(pages, at::TensorOptions().dtype(at::kLong)) + 1).narrow(0, 0, used);
  cache.table = at::zeros({3, used + 4}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA));
  cache.table[1].narrow(0, 0, used).copy_(order);
  cache.page_table = cache.table[1].narrow(0, 0, used);
  const at::Tensor index = order.to(at::kCUDA);
  cache.keys = cache.pool_keys.index_select(1, index).reshape({kv_heads, used * pool_page_size, dim});
  cache.values = cache.pool_values.index_select(1, index).reshape({kv_heads, used * pool_page_size, dim});
  return cache;
}

TEST_CASE("Quest bounds and the gather decode read a paged cache exactly as the same cache contiguous", "[cuda]") {
  if (SkipWithoutGpu()) return;
  at::manual_seed(4);
  const int64_t kv_heads = 2, group = 4, length = 1000;  // not a multiple of any page or block size
  const auto i32 = at::TensorOptions().dtype(at::kInt).device(at::kCUDA);
  for (const int64_t dim : {64, 128}) {
    for (const int64_t pool_page_size : {16, 64}) {
      INFO("D " << dim << ", pool pages of " << pool_page_size);
      const PagedCache cache = RandomPagedCache(kv_heads, dim, pool_page_size, length);
      const cuda::KvCache paged = cuda::KvCache::Paged(cache.pool_keys, cache.pool_values, cache.page_table, length);
      const cuda::KvCache contiguous = cuda::KvCache::Contiguous(cache.keys, cache.values, length);
      const at::Tensor queries = at::randn({kv_heads * group, dim}, Bf16()) * 3;

      // Quest's pages (its selection unit) inside one pool page (16) and across several (128).
      for (const int64_t quest_page_size : {16, 128}) {
        INFO("Quest pages of " << quest_page_size);
        const int64_t quest_pages = (length + quest_page_size - 1) / quest_page_size;
        at::Tensor from_pages = at::zeros({kv_heads, quest_pages, 2, dim}, Bf16());
        at::Tensor from_contiguous = at::zeros({kv_heads, quest_pages, 2, dim}, Bf16());
        // In two parts, as decode grows them.
        cuda::QuestPageBounds(cuda::KvCache::Paged(cache.pool_keys, cache.pool_values, cache.page_table, 700),
                              quest_page_size, 0, from_pages);
        cuda::QuestPageBounds(paged, quest_page_size, 700 / quest_page_size, from_pages);
        cuda::QuestPageBounds(contiguous, quest_page_size, 0, from_contiguous);
        CHECK(at::equal(from_pages, from_contiguous));
        for (int64_t page = 0; page < quest_pages; ++page) {
          const int64_t begin = page * quest_page_size, count = std::min(quest_page_size, length - begin);
          const at::Tensor span = cache.keys.narrow(1, begin, count);
          CHECK(at::equal(from_pages.select(1, page).select(1, 0), std::get<0>(span.max(1))));
          CHECK(at::equal(from_pages.select(1, page).select(1, 1), std::get<0>(span.min(1))));
        }
      }

      // Whole blocks of 32 positions (neither pool page size), the last one past the end, as PrHS
      // gathers them, with its block masses.
      const int64_t block_size = 32, blocks = (length + block_size - 1) / block_size;
      const at::Tensor scores = at::rand({kv_heads, blocks}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
      const cuda::HeadLists selected = cuda::SelectBlocks(scores, length, {32, 512, 64, 64});
      cuda::GatherInput by_block;
      by_block.tokens = &selected;
      by_block.block_size = block_size;
      by_block.max_entries = selected.entries.size(1) * block_size;
      by_block.keep_logits = true;
      const cuda::GatherOutput a = cuda::GatherDecode(queries, paged, by_block, 0);
      const cuda::GatherOutput b = cuda::GatherDecode(queries, contiguous, by_block, 0);
      CHECK(at::equal(a.out, b.out));
      CHECK(at::equal(a.lse, b.lse));
      CHECK(at::equal(cuda::BlockMass(by_block, a, group, length, blocks),
                      cuda::BlockMass(by_block, b, group, length, blocks)));
      // The contiguous gather is the reference's exact attention over the selected positions.
      const double scale = 1 / std::sqrt(static_cast<double>(dim));
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::vector<int64_t> positions;
        for (const int32_t block : RowSet(selected, h)) {
          for (int64_t p = block * block_size; p < std::min(length, (block + 1) * block_size); ++p) positions.push_back(p);
        }
        const at::Tensor index = at::tensor(positions, at::kLong).to(at::kCUDA);
        const at::Tensor q = queries.narrow(0, h * group, group).to(at::kFloat);
        const at::Tensor k = cache.keys[h].index_select(0, index).to(at::kFloat);
        const at::Tensor v = cache.values[h].index_select(0, index).to(at::kFloat);
        const at::Tensor expected = at::softmax(at::mm(q, k.t()) * scale, 1).mm(v);
        CHECK((a.out.narrow(0, h * group, group).to(at::kFloat) - expected).abs().max().item<double>() < 2e-2);
      }

      // Positions one by one (every third, and the last), written into a row of a larger output.
      std::vector<int32_t> every_third;
      for (int32_t p = 0; p < length; p += 3) every_third.push_back(p);
      if (every_third.back() != length - 1) every_third.push_back(static_cast<int32_t>(length - 1));
      const int64_t count = static_cast<int64_t>(every_third.size());
      const cuda::HeadLists by_position_lists{
          at::tensor(every_third, at::kInt).to(at::kCUDA).unsqueeze(0).expand({kv_heads, count}).contiguous(),
          at::full({kv_heads}, count, i32)};
      at::Tensor rows = at::zeros({3, kv_heads * group, dim}, Bf16());
      const at::Tensor row = rows[1];
      cuda::GatherInput by_position;
      by_position.tokens = &by_position_lists;
      by_position.max_entries = count;
      by_position.out = row;
      const cuda::GatherOutput c = cuda::GatherDecode(queries, paged, by_position, 0);
      CHECK(c.out.data_ptr() == row.data_ptr());
      by_position.out = at::Tensor();
      const cuda::GatherOutput d = cuda::GatherDecode(queries, contiguous, by_position, 0);
      CHECK(at::equal(rows[1], d.out));
      CHECK(rows[0].abs().max().item<double>() == 0);
      CHECK(rows[2].abs().max().item<double>() == 0);
    }
  }
}

std::vector<int32_t> Prompt(size_t length, int salt) {
  std::vector<int32_t> ids(length);
  for (size_t i = 0; i < length; ++i) ids[i] = static_cast<int32_t>(100 + (i * 37 + salt * 11) % 4000);
  return ids;
}

bool Consecutive(const std::vector<int32_t>& pages) {
  for (size_t i = 1; i < pages.size(); ++i) {
    if (pages[i] != pages[0] + static_cast<int32_t>(i)) return false;
  }
  return true;
}

// The fixed token every sequence is given at decode step `step`.
int32_t NextToken(int step) { return 200 + 13 * step; }

// Prefills `prompts` into sequences of one KV pool of `page_size` positions per page, whose pages
// are handed out of order (some given back one by one first, so that they come out descending) and
// interleaved between the sequences (one page each in turn), then decodes `steps` fixed tokens as
// one batch through Model::Decode, so that both backends see the same inputs however their logits
// differ. Each step's logits [B, V] on the host.
std::vector<at::Tensor> DecodeInSharedPool(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                           const std::vector<std::vector<int32_t>>& prompts, int steps,
                                           int64_t page_size) {
  int64_t pages = 16;
  for (const auto& prompt : prompts) pages += (static_cast<int64_t>(prompt.size()) + steps + page_size - 1) / page_size;
  std::shared_ptr<KvPool> pool = model.NewKvPool(pages, page_size).value();
  const std::vector<int32_t> given_back = pool->Allocate(16).value();
  for (const int32_t page : given_back) pool->Free({page});
  std::vector<std::unique_ptr<Sequence>> sequences;
  std::vector<Sequence*> batch;
  for (size_t i = 0; i < prompts.size(); ++i) {
    sequences.push_back(model.NewSequence(pool, attention));
    batch.push_back(sequences.back().get());
  }
  for (int64_t tokens = page_size;; tokens += page_size) {
    bool more = false;
    for (size_t i = 0; i < prompts.size(); ++i) {
      const int64_t prompt = static_cast<int64_t>(prompts[i].size());
      REQUIRE(sequences[i]->Reserve(std::min(tokens, prompt)).ok());
      more = more || tokens < prompt;
    }
    if (!more) break;
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    const absl::StatusOr<at::Tensor> prefilled = model.Prefill(*sequences[i], prompts[i]);
    INFO(prefilled.status().ToString());
    REQUIRE(prefilled.ok());
  }
  std::vector<at::Tensor> logits;
  for (int step = 0; step < steps; ++step) {
    const std::vector<int32_t> next(prompts.size(), NextToken(step));
    const absl::StatusOr<at::Tensor> decoded = model.Decode(batch, next);
    INFO("step " << step << ": " << decoded.status().ToString());
    REQUIRE(decoded.ok());
    logits.push_back(decoded->cpu());
  }
  // Else this would not test reading through page tables.
  for (const auto& sequence : sequences) CHECK(!Consecutive(sequence->pages()));
  return logits;
}

// One sequence alone in a pool of its own (consecutive pages, one row per step).
std::vector<at::Tensor> DecodeAlone(const Model& model, std::shared_ptr<const AttentionBackend> attention,
                                    const std::vector<int32_t>& prompt, int steps) {
  auto sequence = model.NewSequence(std::move(attention));
  const absl::StatusOr<at::Tensor> prefilled = model.Prefill(*sequence, prompt);
  INFO(prefilled.status().ToString());
  REQUIRE(prefilled.ok());
  Sequence* const batch[] = {sequence.get()};
  std::vector<at::Tensor> logits;
  for (int step = 0; step < steps; ++step) {
    const int32_t next[] = {NextToken(step)};
    const absl::StatusOr<at::Tensor> decoded = model.Decode(batch, next);
    INFO("step " << step << ": " << decoded.status().ToString());
    REQUIRE(decoded.ok());
    logits.push_back((*decoded)[0].cpu());
  }
  return logits;
}

// Tolerances of cuda_attention_test (the same model and backends): 0.25 on the logits against the
// references (bf16, where logits between 32 and 64 are 0.25 apart, so one step of rounding is
// allowed), 0.05 between a batch and each sequence decoded alone.
TEST_CASE("Quest, PrHS and Double-P decode steps over a shared paged KV pool as their references do", "[cuda]") {
  if (SkipWithoutGpu()) return;
  auto model = Model::Load("models/tiny-llama-retrieval", ModelOptionsForDevice("cuda").value());
  REQUIRE(model.ok());
  PolicySpec quest = PolicySpec::Defaults(PolicyKind::kQuest);  // Quest pages of 16, two dense layers
  quest.token_budget = 512;
  PolicySpec prhs = PolicySpec::Defaults(PolicyKind::kPrhs);
  prhs.token_budget = 512;
  PolicySpec double_p = PolicySpec::Defaults(PolicyKind::kDoubleP);
  double_p.recent_tokens = 16;
  double_p.tail_tokens = 4;  // so that decoded tokens get clustered, through ranges of the pages
  const struct {
    const char* name;
    std::shared_ptr<const AttentionBackend> cuda, reference;
  } pairs[] = {{"quest", MakeCudaQuestAttention(quest), MakeQuestBackend(quest)},
               {"prhs", MakeCudaPrhsAttention(prhs), MakePrhsBackend(prhs)},
               {"double-p", MakeCudaDoublePAttention(double_p), MakeDoublePBackend(double_p)}};
  const std::vector<std::vector<int32_t>> prompts = {Prompt(1500, 1), Prompt(333, 2), Prompt(700, 3)};
  const int steps = 8;
  for (const int64_t page_size : {16, 64}) {
    for (const auto& pair : pairs) {
      INFO(pair.name << ", pool pages of " << page_size);
      const auto fast = DecodeInSharedPool(**model, pair.cuda, prompts, steps, page_size);
      const auto reference = DecodeInSharedPool(**model, pair.reference, prompts, steps, page_size);
      double worst = 0;
      for (int step = 0; step < steps; ++step) {
        worst = std::max(worst, (fast[step] - reference[step]).abs().max().item<double>());
      }
      WARN(pair.name << ", shared pool of " << page_size
                     << "-position pages: max |logit difference| CUDA kernels vs LibTorch reference, bf16: " << worst);
      CHECK(worst <= 0.25);
      for (size_t i = 0; i < prompts.size(); ++i) {
        const auto alone = DecodeAlone(**model, pair.cuda, prompts[i], steps);
        double alone_worst = 0;
        for (int step = 0; step < steps; ++step) {
          alone_worst = std::max(alone_worst, (alone[step] - fast[step][i]).abs().max().item<double>());
        }
        INFO("sequence " << i << ": max |logit difference| alone vs in the batch " << alone_worst);
        CHECK(alone_worst < 0.05);
      }
    }
  }
}

}  // namespace
}  // namespace lychee
