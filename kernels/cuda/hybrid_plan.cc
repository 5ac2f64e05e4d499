// Host-side planning of the hybrid decode launch: the selection rule's counts and the pool of
// equal-sized work items. Plain C++ (no CUDA runtime calls), tested on any machine.
#include <algorithm>
#include <string>

#include "kernels/cuda/hybrid_decode.h"

namespace lychee {
namespace cuda {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool IsPowerOfTwo(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace

int64_t NumBlocks(int64_t length, int block_size) { return CeilDiv(length, block_size); }

std::vector<int32_t> MandatoryBlocks(int64_t length, const BlockSelectionConfig& config) {
  const int64_t bs = config.block_size;
  const int64_t num_blocks = NumBlocks(length, config.block_size);
  const int64_t sink_blocks = std::min(num_blocks, CeilDiv(config.sink_tokens, bs));
  const int64_t recent_start = std::min(length - 1, std::max<int64_t>(0, length - config.recent_tokens));
  std::vector<int32_t> blocks;
  for (int64_t b = 0; b < sink_blocks; ++b) blocks.push_back(static_cast<int32_t>(b));
  for (int64_t b = std::max(sink_blocks, recent_start / bs); b < num_blocks; ++b) blocks.push_back(static_cast<int32_t>(b));
  return blocks;
}

int64_t SelectedBlockCount(int64_t length, const BlockSelectionConfig& config) {
  const int64_t num_blocks = NumBlocks(length, config.block_size);
  return num_blocks <= config.budget_blocks() ? num_blocks : config.budget_blocks();
}

int64_t HeadPositionsAttended(int64_t length, KvHeadMode mode, bool has_selection, const BlockSelectionConfig& config) {
  if (mode != KvHeadMode::kSparse) return length;
  const int64_t blocks = has_selection ? SelectedBlockCount(length, config)
                                       : static_cast<int64_t>(MandatoryBlocks(length, config).size());
  const int64_t padding = NumBlocks(length, config.block_size) * config.block_size - length;
  return std::min<int64_t>(length, blocks * config.block_size - padding);
}

std::string PlanHybridDecode(const HybridDecodeShape& shape, const BlockSelectionConfig& config,
                             const int64_t* lengths, const KvHeadMode* modes, const bool* has_selection,
                             const PlanOptions& options, HybridPlan* plan, const PlanCapacity* capacity) {
  if (shape.batch < 1) return "batch must be at least 1";
  if (shape.num_kv_heads < 1 || shape.num_q_heads < shape.num_kv_heads || shape.num_q_heads % shape.num_kv_heads != 0) {
    return "num_q_heads (" + std::to_string(shape.num_q_heads) + ") must be a multiple of num_kv_heads (" +
           std::to_string(shape.num_kv_heads) + ")";
  }
  const int group = shape.num_q_heads / shape.num_kv_heads;
  if (group > 8) return "GQA group " + std::to_string(group) + " is over 8";
  if (shape.head_dim != 64 && shape.head_dim != 128) return "head_dim must be 64 or 128, not " + std::to_string(shape.head_dim);
  if (!IsPowerOfTwo(config.block_size) || config.block_size < 16 || config.block_size > 1024) {
    return "block_size must be a power of two from 16 to 1024, not " + std::to_string(config.block_size);
  }
  if (config.sink_tokens < 0 || config.recent_tokens < 0) return "sink_tokens and recent_tokens must be >= 0";
  const int64_t max_mandatory =
      CeilDiv(config.sink_tokens, config.block_size) + CeilDiv(config.recent_tokens, config.block_size) + 1;
  if (config.budget_blocks() < max_mandatory) {
    return "token_budget " + std::to_string(config.token_budget) + " holds fewer blocks than the " +
           std::to_string(max_mandatory) + " sink and recent blocks";
  }
  if (options.num_sms < 1 || options.ctas_per_sm < 1) return "num_sms and ctas_per_sm must be positive";

  struct Head {
    int64_t chunks;
    int32_t flags;
  };
  std::vector<Head> heads(static_cast<size_t>(shape.batch) * shape.num_kv_heads);
  int64_t total = 0, total_tokens = 0;
  bool reads_selection = false;
  for (int b = 0; b < shape.batch; ++b) {
    const int64_t length = lengths[b];
    if (length < 1 || length > (int64_t{1} << 30)) return "length " + std::to_string(length) + " out of range";
    const int64_t num_blocks = NumBlocks(length, config.block_size);
    for (int h = 0; h < shape.num_kv_heads; ++h) {
      Head& head = heads[static_cast<size_t>(b) * shape.num_kv_heads + h];
      const bool selected = has_selection != nullptr && has_selection[h];
      switch (modes[h]) {
        case KvHeadMode::kDense:
          head = {num_blocks, 0};
          break;
        case KvHeadMode::kRetrieval:
          head = {num_blocks, kWorkScore};
          break;
        case KvHeadMode::kSparse:
          head = {selected ? SelectedBlockCount(length, config)
                           : static_cast<int64_t>(MandatoryBlocks(length, config).size()),
                  kWorkSparse | (selected ? 0 : kWorkFallback)};
          break;
        default:
          return "unknown head mode";
      }
      if ((head.flags & kWorkScore) || ((head.flags & kWorkSparse) && !(head.flags & kWorkFallback))) {
        reads_selection = true;
      }
      total += head.chunks;
      total_tokens += HeadPositionsAttended(length, modes[h], selected, config);
    }
  }

  // The smallest chunks-per-item whose items (each head cut separately) fit in one resident wave
  // of `target` CTAs, so that no second wave idles most of the GPU.
  const int64_t target = static_cast<int64_t>(options.num_sms) * options.ctas_per_sm;
  auto items_for = [&](int64_t c) {
    int64_t n = 0;
    for (const Head& head : heads) n += CeilDiv(head.chunks, c);
    return n;
  };
  const int64_t min_cpi = std::max(1, options.min_chunks_per_item);
  int64_t lo = std::clamp<int64_t>(CeilDiv(total, target), min_cpi, kMaxItemChunks), hi = kMaxItemChunks;
  if (items_for(lo) > target) {
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (items_for(mid) <= target) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
  }
  const int64_t cpi = lo;

  HybridPlan& p = *plan;
  p = HybridPlan();
  p.total_chunks = total;
  p.total_tokens = total_tokens;
  p.chunks_per_item = static_cast<int>(cpi);
  p.reads_selection = reads_selection;
  std::vector<WorkItem> work;
  std::vector<MergeItem> merges;
  std::vector<SelectItem> selects;
  for (int b = 0; b < shape.batch; ++b) {
    const int64_t length = lengths[b];
    for (int h = 0; h < shape.num_kv_heads; ++h) {
      const Head& head = heads[static_cast<size_t>(b) * shape.num_kv_heads + h];
      const int64_t splits = CeilDiv(head.chunks, cpi);
      int32_t score_offset = -1;
      if (head.flags & kWorkScore) {
        score_offset = static_cast<int32_t>(p.num_scores);
        selects.push_back({b, h, static_cast<int32_t>(length), score_offset});
        p.num_scores += NumBlocks(length, config.block_size);
      }
      if (splits > 1) merges.push_back({b, h, p.num_partials, static_cast<int32_t>(splits)});
      // Even split of the head's chunks: sizes differ by at most one.
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t begin = head.chunks * s / splits, end = head.chunks * (s + 1) / splits;
        WorkItem item{b, h, static_cast<int32_t>(length), static_cast<int32_t>(begin), static_cast<int32_t>(end),
                      head.flags, -1, score_offset};
        if (splits == 1) {
          item.flags |= kWorkFinal;
        } else {
          item.out_index = p.num_partials + static_cast<int32_t>(s);
        }
        work.push_back(item);
      }
      if (splits > 1) p.num_partials += static_cast<int32_t>(splits);
    }
  }
  p.num_work = static_cast<int>(work.size());
  p.num_merge = static_cast<int>(merges.size());
  p.num_select = static_cast<int>(selects.size());
  p.capacity = capacity != nullptr ? *capacity : PlanCapacity{p.num_work, p.num_merge, p.num_select, p.num_partials,
                                                                p.num_scores};
  const PlanCapacity& room = p.capacity;
  if (p.num_work > room.work || p.num_merge > room.merge || p.num_select > room.select ||
      p.num_partials > room.partials || p.num_scores > room.scores) {
    return "the plan needs " + std::to_string(p.num_work) + " work items, " + std::to_string(p.num_merge) +
           " merges, " + std::to_string(p.num_select) + " selections, " + std::to_string(p.num_partials) +
           " partials and " + std::to_string(p.num_scores) + " scores; its layout has room for " +
           std::to_string(room.work) + ", " + std::to_string(room.merge) + ", " + std::to_string(room.select) + ", " +
           std::to_string(room.partials) + " and " + std::to_string(room.scores);
  }
  p.words.assign(static_cast<size_t>(p.select_offset()) + room.select * 4, 0);
  p.words[0] = p.num_work;
  p.words[1] = p.num_merge;
  p.words[2] = p.num_select;
  int32_t* w = p.words.data() + kPlanHeaderWords;
  for (const WorkItem& item : work) {
    const int32_t words[8] = {item.batch, item.kv_head,  item.length,    item.chunk_begin,
                              item.chunk_end, item.flags, item.out_index, item.score_offset};
    std::copy(words, words + 8, w);
    w += 8;
  }
  w = p.words.data() + p.merge_offset();
  for (const MergeItem& m : merges) {
    const int32_t words[4] = {m.batch, m.kv_head, m.first_partial, m.num_splits};
    std::copy(words, words + 4, w);
    w += 4;
  }
  w = p.words.data() + p.select_offset();
  for (const SelectItem& s : selects) {
    const int32_t words[4] = {s.batch, s.kv_head, s.length, s.score_offset};
    std::copy(words, words + 4, w);
    w += 4;
  }
  return "";
}

PlanCapacity HybridPlanCapacity(const HybridDecodeShape& max_shape, const BlockSelectionConfig& config,
                                int64_t max_length, const PlanOptions& options) {
  const int64_t heads = static_cast<int64_t>(max_shape.batch) * max_shape.num_kv_heads;
  const int64_t max_blocks = NumBlocks(std::max<int64_t>(max_length, 1), config.block_size);
  // The plan keeps to one wave of CTAs unless its heads need more items than that at the largest
  // item size.
  const int64_t wave = static_cast<int64_t>(options.num_sms) * options.ctas_per_sm;
  const int64_t work = std::max(wave, heads * CeilDiv(max_blocks, kMaxItemChunks));
  PlanCapacity capacity;
  capacity.work = static_cast<int>(work);
  capacity.merge = static_cast<int>(heads);
  capacity.select = static_cast<int>(heads);
  capacity.partials = static_cast<int>(work);
  capacity.scores = heads * max_blocks;
  return capacity;
}

namespace {
size_t Align256(size_t x) { return (x + 255) & ~size_t{255}; }
}  // namespace

size_t HybridWorkspaceBytes(const HybridPlan& plan, const HybridDecodeShape& shape) {
  const size_t group = static_cast<size_t>(shape.num_q_heads / std::max(1, shape.num_kv_heads));
  const size_t partials = static_cast<size_t>(plan.capacity.partials);
  return Align256(partials * group * shape.head_dim * sizeof(float)) + Align256(partials * group * 2 * sizeof(float)) +
         Align256(static_cast<size_t>(plan.capacity.scores) * sizeof(float)) + 256;
}

}  // namespace cuda
}  // namespace lychee
