// The host-side plan of the hybrid decode launch (no GPU needed): the selection rule's counts, and
// a pool of work items that covers every head's blocks exactly once in near-equal pieces, dense
// heads getting proportionally more of them.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <memory>

#include "kernels/cuda/hybrid_decode.h"

namespace lychee {
namespace cuda {
namespace {

using Blocks = std::vector<int32_t>;

BlockSelectionConfig Config(int block, int budget, int sink, int recent) {
  BlockSelectionConfig c;
  c.block_size = block, c.token_budget = budget, c.sink_tokens = sink, c.recent_tokens = recent;
  return c;
}

TEST_CASE("mandatory blocks are the sink blocks and those holding the recent window") {
  const BlockSelectionConfig p = Config(64, 4096, 64, 64);
  CHECK(MandatoryBlocks(1, p) == Blocks({0}));
  CHECK(MandatoryBlocks(64, p) == Blocks({0}));
  CHECK(MandatoryBlocks(300, p) == Blocks({0, 3, 4}));
  CHECK(MandatoryBlocks(320, p) == Blocks({0, 4}));
  CHECK(MandatoryBlocks(300, Config(64, 4096, 0, 0)) == Blocks({4}));
  CHECK(MandatoryBlocks(1000, Config(32, 4096, 70, 100)) == Blocks({0, 1, 2, 28, 29, 30, 31}));
  CHECK(SelectedBlockCount(4096, p) == 64);
  CHECK(SelectedBlockCount(4097, p) == 64);
  CHECK(SelectedBlockCount(1000, p) == 16);
}

// Positions of `blocks` in a context of `length`, each block cut at the end.
int64_t PositionsOf(const Blocks& blocks, int64_t length, int block_size) {
  int64_t positions = 0;
  for (int32_t block : blocks) positions += std::min<int64_t>(length - int64_t{block} * block_size, block_size);
  return positions;
}

TEST_CASE("a head's attended positions follow from the length and its mode") {
  const BlockSelectionConfig p = Config(64, 1024, 64, 64);
  for (const int64_t length : {1, 63, 64, 65, 300, 1024, 1025, 1087, 5000, 131071}) {
    INFO("length " << length);
    CHECK(HeadPositionsAttended(length, KvHeadMode::kDense, false, p) == length);
    CHECK(HeadPositionsAttended(length, KvHeadMode::kRetrieval, true, p) == length);
    CHECK(HeadPositionsAttended(length, KvHeadMode::kSparse, false, p) ==
          PositionsOf(MandatoryBlocks(length, p), length, 64));
    // Any selection of budget blocks holding the last block: here the first ones and the last.
    const int64_t count = SelectedBlockCount(length, p);
    const int64_t last = NumBlocks(length, 64) - 1;
    Blocks selection;
    for (int64_t block = 0; block < count - 1; ++block) selection.push_back(static_cast<int32_t>(block));
    selection.push_back(static_cast<int32_t>(last));
    CHECK(HeadPositionsAttended(length, KvHeadMode::kSparse, true, p) == PositionsOf(selection, length, 64));
  }
}

struct Unpacked {
  std::vector<WorkItem> work;
  std::vector<MergeItem> merges;
  std::vector<SelectItem> selects;
};

// Reads the items back as the kernels do: counts from the header, each section at its offset.
Unpacked Unpack(const HybridPlan& plan) {
  Unpacked u;
  const int32_t* words = plan.words.data();
  CHECK(words[0] == plan.num_work);
  CHECK(words[1] == plan.num_merge);
  CHECK(words[2] == plan.num_select);
  const int32_t* w = words + kPlanHeaderWords;
  for (int i = 0; i < words[0]; ++i, w += 8) u.work.push_back({w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]});
  w = words + plan.merge_offset();
  for (int i = 0; i < words[1]; ++i, w += 4) u.merges.push_back({w[0], w[1], w[2], w[3]});
  w = words + plan.select_offset();
  for (int i = 0; i < words[2]; ++i, w += 4) u.selects.push_back({w[0], w[1], w[2], w[3]});
  CHECK(static_cast<int64_t>(plan.words.size()) == plan.select_offset() + 4 * plan.capacity.select);
  return u;
}

TEST_CASE("the plan covers every head's blocks once, in near-equal items from one pool") {
  const BlockSelectionConfig cfg = Config(64, 4096, 64, 64);
  const HybridDecodeShape shape{3, 32, 8, 128};
  const std::vector<int64_t> lengths = {131072, 5000, 1};
  std::vector<KvHeadMode> modes(8, KvHeadMode::kSparse);
  modes[2] = KvHeadMode::kRetrieval;
  modes[5] = KvHeadMode::kDense;
  std::unique_ptr<bool[]> has(new bool[8]);
  for (int h = 0; h < 8; ++h) has[h] = h % 2 == 0;  // odd sparse heads fall back to sink + recent
  PlanOptions opts;
  HybridPlan plan;
  REQUIRE(PlanHybridDecode(shape, cfg, lengths.data(), modes.data(), has.get(), opts, &plan).empty());
  const Unpacked u = Unpack(plan);

  std::map<std::pair<int, int>, std::vector<WorkItem>> by_head;
  for (const WorkItem& w : u.work) by_head[{w.batch, w.kv_head}].push_back(w);
  REQUIRE(by_head.size() == 24);
  int64_t total = 0;
  for (auto& [key, items] : by_head) {
    const auto [b, h] = key;
    const int64_t L = lengths[b];
    int64_t expected_chunks = NumBlocks(L, 64);
    if (modes[h] == KvHeadMode::kSparse) {
      expected_chunks = has[h] ? SelectedBlockCount(L, cfg) : static_cast<int64_t>(MandatoryBlocks(L, cfg).size());
    }
    // Contiguous, non-overlapping, complete; sizes within the plan's chunk size.
    int64_t next = 0;
    for (const WorkItem& w : items) {
      CHECK(w.chunk_begin == next);
      CHECK(w.chunk_end > w.chunk_begin);
      CHECK(w.chunk_end - w.chunk_begin <= plan.chunks_per_item);
      CHECK(w.length == L);
      next = w.chunk_end;
      const bool sparse = modes[h] == KvHeadMode::kSparse;
      CHECK(((w.flags & kWorkSparse) != 0) == sparse);
      CHECK(((w.flags & kWorkFallback) != 0) == (sparse && !has[h]));
      CHECK(((w.flags & kWorkScore) != 0) == (modes[h] == KvHeadMode::kRetrieval));
      CHECK(((w.flags & kWorkFinal) != 0) == (items.size() == 1));
    }
    CHECK(next == expected_chunks);
    total += expected_chunks;
  }
  CHECK(total == plan.total_chunks);
  // Proportional splits: the 128K dense head has about 2048 / 64 = 32 times the items of a sparse one.
  const size_t dense_items = by_head[{0, 5}].size(), sparse_items = by_head[{0, 0}].size();
  CHECK(dense_items >= 16 * sparse_items);
  // One merge per split head, partial slots distinct and dense.
  std::vector<int> slot_use(plan.num_partials, 0);
  for (const WorkItem& w : u.work) {
    if (!(w.flags & kWorkFinal)) {
      REQUIRE(w.out_index >= 0);
      REQUIRE(w.out_index < plan.num_partials);
      ++slot_use[w.out_index];
    }
  }
  for (int c : slot_use) CHECK(c == 1);
  for (const MergeItem& m : u.merges) CHECK(m.num_splits == static_cast<int>(by_head[{m.batch, m.kv_head}].size()));
  // One selection per (sequence, retrieval head), with its own score range.
  REQUIRE(u.selects.size() == 3);
  int64_t scores = 0;
  for (const SelectItem& s : u.selects) {
    CHECK(s.kv_head == 2);
    CHECK(s.score_offset == scores);
    scores += NumBlocks(s.length, 64);
  }
  CHECK(scores == plan.num_scores);
  // Items per multiprocessor near the target: one resident wave.
  CHECK(plan.num_work <= opts.num_sms * opts.ctas_per_sm);
  CHECK(plan.reads_selection);
}

TEST_CASE("a plan laid out at a fixed capacity holds the same items, and any step of that size fits") {
  const BlockSelectionConfig cfg = Config(64, 4096, 64, 64);
  const HybridDecodeShape shape{4, 32, 8, 128};
  std::vector<KvHeadMode> modes(8, KvHeadMode::kSparse);
  modes[0] = KvHeadMode::kRetrieval;
  std::unique_ptr<bool[]> has(new bool[8]);
  for (int h = 0; h < 8; ++h) has[h] = true;
  PlanOptions opts;
  const int64_t max_length = int64_t{1} << 20;
  const PlanCapacity room = HybridPlanCapacity(shape, cfg, max_length, opts);
  CHECK(room.work >= opts.num_sms * opts.ctas_per_sm);
  CHECK(room.merge == 32);
  CHECK(room.select == 32);
  CHECK(room.scores == 32 * (max_length / 64));
  // Lengths from one block to the maximum, every retrieval head selecting: all fit the room, and
  // the items are those of the exact plan at fixed offsets.
  for (const std::vector<int64_t>& lengths : std::vector<std::vector<int64_t>>{
           {1, 1, 1, 1}, {100, 5000, 70000, 131072}, {max_length, max_length, max_length, max_length}}) {
    HybridPlan exact, fixed;
    REQUIRE(PlanHybridDecode(shape, cfg, lengths.data(), modes.data(), has.get(), opts, &exact).empty());
    REQUIRE(PlanHybridDecode(shape, cfg, lengths.data(), modes.data(), has.get(), opts, &fixed, &room).empty());
    CHECK(fixed.merge_offset() == kPlanHeaderWords + 8 * room.work);
    const Unpacked a = Unpack(exact), b = Unpack(fixed);
    REQUIRE(a.work.size() == b.work.size());
    for (size_t i = 0; i < a.work.size(); ++i) {
      CHECK(a.work[i].chunk_begin == b.work[i].chunk_begin);
      CHECK(a.work[i].chunk_end == b.work[i].chunk_end);
      CHECK(a.work[i].out_index == b.work[i].out_index);
    }
    CHECK(a.merges.size() == b.merges.size());
    CHECK(a.selects.size() == b.selects.size());
  }
  // A step longer than the layout was made for is refused, with the counts.
  PlanCapacity small = room;
  small.scores = 10;
  HybridPlan plan;
  const std::vector<int64_t> lengths = {4096, 4096, 4096, 4096};
  const std::string error = PlanHybridDecode(shape, cfg, lengths.data(), modes.data(), has.get(), opts, &plan, &small);
  CHECK(error.find("scores") != std::string::npos);
}

TEST_CASE("the plan rejects shapes and parameters the kernels do not take") {
  const std::vector<int64_t> lengths = {100};
  const std::vector<KvHeadMode> modes(2, KvHeadMode::kDense);
  HybridPlan plan;
  PlanOptions opts;
  const BlockSelectionConfig ok = Config(64, 4096, 64, 64);
  CHECK(PlanHybridDecode({1, 4, 2, 128}, ok, lengths.data(), modes.data(), nullptr, opts, &plan).empty());
  CHECK(!plan.reads_selection);
  CHECK(!PlanHybridDecode({1, 4, 2, 96}, ok, lengths.data(), modes.data(), nullptr, opts, &plan).empty());
  CHECK(!PlanHybridDecode({1, 5, 2, 128}, ok, lengths.data(), modes.data(), nullptr, opts, &plan).empty());
  CHECK(!PlanHybridDecode({1, 18, 2, 128}, ok, lengths.data(), modes.data(), nullptr, opts, &plan).empty());
  CHECK(!PlanHybridDecode({1, 4, 2, 128}, Config(48, 4096, 64, 64), lengths.data(), modes.data(), nullptr, opts, &plan)
             .empty());
  CHECK(!PlanHybridDecode({1, 4, 2, 128}, Config(64, 128, 64, 64), lengths.data(), modes.data(), nullptr, opts, &plan)
             .empty());
  const std::vector<int64_t> zero = {0};
  CHECK(!PlanHybridDecode({1, 4, 2, 128}, ok, zero.data(), modes.data(), nullptr, opts, &plan).empty());
}

}  // namespace
}  // namespace cuda
}  // namespace lychee
