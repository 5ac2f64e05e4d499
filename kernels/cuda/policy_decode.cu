// Host launchers of the selection policies' kernels (policy_decode.cuh): argument checks that
// need no device access, the split of gather work, dispatch on head_dim.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/policy_decode.cuh"

namespace lychee {
namespace cuda {
namespace {

bool IsPowerOfTwo(int x) { return x > 0 && (x & (x - 1)) == 0; }
bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

bool ValidShape(const PolicyDecodeShape& s) {
  return s.num_kv_heads >= 1 && s.num_q_heads % s.num_kv_heads == 0 && s.group() >= 1 &&
         s.group() <= device::kMaxGroup && (s.head_dim == 64 || s.head_dim == 128);
}

// Either mode: 16-byte aligned rows at every position; in paged mode also a page table and a pool
// page size of 1 to 2^30 positions.
bool ValidKv(const KvView& kv) {
  const int64_t strides[] = {kv.k_head_stride, kv.k_token_stride, kv.v_head_stride, kv.v_token_stride,
                             kv.k_page_stride, kv.v_page_stride};
  for (int64_t s : strides) {
    if (s % 8 != 0) return false;
  }
  if (kv.page_table != nullptr && (kv.log2_page_size < 0 || kv.log2_page_size > 30)) return false;
  return kv.k != nullptr && kv.v != nullptr && Aligned16(kv.k) && Aligned16(kv.v) && kv.length >= 1;
}

bool ValidQueries(const QueryView& q) { return q.q != nullptr && Aligned16(q.q) && q.head_stride % 8 == 0; }

bool ValidSelection(const BlockSelectionConfig& c) {
  return IsPowerOfTwo(c.block_size) && c.budget_blocks() >= 1 && c.sink_tokens >= 0 && c.recent_tokens >= 0;
}

// Splits per head: about 256 entries each, and no more CTAs than two waves of the GPU.
int GatherSplits(const PolicyDecodeShape& shape, const GatherEntries& entries, int num_sms) {
  const int by_work = std::max(1, (entries.max_entries + 255) / 256);
  const int by_gpu = std::max(1, (2 * std::max(1, num_sms) + shape.num_kv_heads - 1) / shape.num_kv_heads);
  return std::min(by_work, by_gpu);
}

size_t Align256(size_t x) { return (x + 255) & ~size_t{255}; }

}  // namespace

cudaError_t LaunchQuestPageBounds(const KvView& kv, const PolicyDecodeShape& shape, int quest_page_size,
                                  int first_page, int end_page, void* bounds, int64_t bounds_head_stride,
                                  cudaStream_t stream) {
  if (!ValidShape(shape) || !ValidKv(kv) || quest_page_size < 1 || bounds == nullptr || first_page < 0) {
    return cudaErrorInvalidValue;
  }
  if (end_page <= first_page) return cudaSuccess;
  const dim3 grid(end_page - first_page, shape.num_kv_heads);
  auto* out = static_cast<__nv_bfloat16*>(bounds);
  if (shape.head_dim == 64) {
    device::QuestPageBoundsKernel<64><<<grid, 64, 0, stream>>>(kv, quest_page_size, first_page, out,
                                                               bounds_head_stride);
  } else {
    device::QuestPageBoundsKernel<128><<<grid, 128, 0, stream>>>(kv, quest_page_size, first_page, out,
                                                                 bounds_head_stride);
  }
  return cudaGetLastError();
}

cudaError_t LaunchQuestPageScores(const QueryView& queries, const PolicyDecodeShape& shape, const void* bounds,
                                  int64_t bounds_head_stride, int num_pages, float* scores, int64_t score_head_stride,
                                  cudaStream_t stream) {
  if (!ValidShape(shape) || !ValidQueries(queries) || bounds == nullptr || !Aligned16(bounds) ||
      bounds_head_stride % 8 != 0 || scores == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (num_pages <= 0) return cudaSuccess;
  const auto* b = static_cast<const __nv_bfloat16*>(bounds);
  const int warps = device::kGatherThreads / 32;
  if (shape.head_dim == 64) {
    const int per_cta = warps * device::RowLayout<64>::kRowsPerWarp;
    const dim3 grid((num_pages + per_cta - 1) / per_cta, shape.num_kv_heads);
    device::QuestPageScoresKernel<64><<<grid, device::kGatherThreads, 0, stream>>>(
        queries, shape.group(), b, bounds_head_stride, num_pages, scores, score_head_stride);
  } else {
    const int per_cta = warps * device::RowLayout<128>::kRowsPerWarp;
    const dim3 grid((num_pages + per_cta - 1) / per_cta, shape.num_kv_heads);
    device::QuestPageScoresKernel<128><<<grid, device::kGatherThreads, 0, stream>>>(
        queries, shape.group(), b, bounds_head_stride, num_pages, scores, score_head_stride);
  }
  return cudaGetLastError();
}

cudaError_t LaunchHeadBlockSelect(const float* scores, int64_t score_head_stride, int length,
                                  const BlockSelectionConfig& config, int num_kv_heads, int32_t* indices,
                                  int64_t index_head_stride, int32_t* counts, cudaStream_t stream) {
  if (scores == nullptr || indices == nullptr || counts == nullptr || length < 1 || num_kv_heads < 1 ||
      !ValidSelection(config) || index_head_stride < config.budget_blocks()) {
    return cudaErrorInvalidValue;
  }
  device::HeadBlockSelectKernel<<<num_kv_heads, device::kHeadThreads, 0, stream>>>(
      scores, score_head_stride, length, device::ToSelectConfig(config), indices, index_head_stride, counts);
  return cudaGetLastError();
}

cudaError_t LaunchPrhsPriority(const BlockMassSource& previous_step, const BlockMassSource& previous_layer,
                               int num_blocks, int enlargement, int num_kv_heads, float* priority,
                               int64_t priority_head_stride, cudaStream_t stream) {
  if (priority == nullptr || num_kv_heads < 1 || enlargement < 0) return cudaErrorInvalidValue;
  if (num_blocks <= 0) return cudaSuccess;
  const dim3 grid((num_blocks + device::kHeadThreads - 1) / device::kHeadThreads, num_kv_heads);
  device::PrhsPriorityKernel<<<grid, device::kHeadThreads, 0, stream>>>(
      previous_step, previous_layer, num_blocks, std::min(enlargement, num_blocks), priority, priority_head_stride);
  return cudaGetLastError();
}

cudaError_t LaunchDropUnproposedBlocks(const float* scores, int64_t score_head_stride, int length,
                                       const BlockSelectionConfig& config, int num_kv_heads, int32_t* indices,
                                       int64_t index_head_stride, int32_t* counts, cudaStream_t stream) {
  if (scores == nullptr || indices == nullptr || counts == nullptr || length < 1 || num_kv_heads < 1 ||
      !ValidSelection(config)) {
    return cudaErrorInvalidValue;
  }
  device::DropUnproposedBlocksKernel<<<num_kv_heads, device::kHeadThreads, 0, stream>>>(
      scores, score_head_stride, length, device::ToSelectConfig(config), indices, index_head_stride, counts);
  return cudaGetLastError();
}

cudaError_t LaunchDoublePClassify(const QueryView& queries, const PolicyDecodeShape& shape, const ClusterTable& clusters,
                                  float scale, double p1, double p2, uint8_t* exact, int32_t* approximated,
                                  int32_t* approximated_counts, cudaStream_t stream) {
  if (!ValidShape(shape) || queries.q == nullptr || clusters.centroids == nullptr || clusters.log_sizes == nullptr ||
      clusters.counts == nullptr || clusters.capacity < 1 || clusters.capacity > kMaxClustersPerHead ||
      exact == nullptr || approximated == nullptr || approximated_counts == nullptr || !(p1 > 0 && p1 <= 1) ||
      !(p2 > 0 && p2 <= 1)) {
    return cudaErrorInvalidValue;
  }
  const float s = scale > 0 ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(shape.head_dim)));
  if (shape.head_dim == 64) {
    device::DoublePClassifyKernel<64><<<shape.num_kv_heads, device::kHeadThreads, 0, stream>>>(
        queries, shape.group(), clusters, s, p1, p2, exact, approximated, approximated_counts);
  } else {
    device::DoublePClassifyKernel<128><<<shape.num_kv_heads, device::kHeadThreads, 0, stream>>>(
        queries, shape.group(), clusters, s, p1, p2, exact, approximated, approximated_counts);
  }
  return cudaGetLastError();
}

cudaError_t LaunchDoublePExactPositions(const int32_t* assignment, int64_t assignment_head_stride, const uint8_t* exact,
                                        int exact_head_stride, int first, int end, int length, int num_kv_heads,
                                        int32_t* positions, int64_t position_head_stride, int32_t* counts,
                                        cudaStream_t stream) {
  if (positions == nullptr || counts == nullptr || num_kv_heads < 1 || first < 0 || end < first || length < 1 ||
      position_head_stride < length || (end > first && (assignment == nullptr || exact == nullptr))) {
    return cudaErrorInvalidValue;
  }
  device::DoublePExactPositionsKernel<<<num_kv_heads, device::kHeadThreads, 0, stream>>>(
      assignment, assignment_head_stride, exact, exact_head_stride, first, end, length, positions,
      position_head_stride, counts);
  return cudaGetLastError();
}

size_t GatherWorkspaceBytes(const PolicyDecodeShape& shape, const GatherEntries& entries, int num_sms) {
  if (!ValidShape(shape)) return 0;
  const size_t slots = static_cast<size_t>(shape.num_kv_heads) * GatherSplits(shape, entries, num_sms) * shape.group();
  return Align256(slots * shape.head_dim * sizeof(float)) + Align256(slots * sizeof(float2)) + 256;
}

cudaError_t LaunchGatherDecode(const QueryView& queries, const KvView& kv, const PolicyDecodeShape& shape,
                               const GatherEntries& entries, float scale, void* out, int64_t out_head_stride,
                               const GatherExtras& extras, void* workspace, int num_sms, cudaStream_t stream) {
  if (!ValidShape(shape) || !ValidQueries(queries) || !ValidKv(kv) || out == nullptr || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  if ((entries.blocks == nullptr) == (entries.positions == nullptr) || entries.counts == nullptr ||
      entries.max_entries < 1) {
    return cudaErrorInvalidValue;
  }
  if (entries.blocks != nullptr && !IsPowerOfTwo(entries.block_size)) return cudaErrorInvalidValue;
  if (entries.clusters != nullptr &&
      (entries.cluster_counts == nullptr || entries.table.centroids == nullptr || entries.table.value_means == nullptr ||
       entries.table.log_sizes == nullptr || !Aligned16(entries.table.centroids) ||
       !Aligned16(entries.table.value_means))) {
    return cudaErrorInvalidValue;
  }
  if (extras.logits != nullptr && extras.logit_head_stride < static_cast<int64_t>(shape.group()) * entries.max_entries) {
    return cudaErrorInvalidValue;
  }
  device::GatherParams p;
  p.q = queries;
  p.kv = kv;
  p.entries = entries;
  p.extras = extras;
  p.group = shape.group();
  p.splits = GatherSplits(shape, entries, num_sms);
  p.log2_block_size = entries.blocks != nullptr ? device::Log2(entries.block_size) : 0;
  p.scale = scale > 0 ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(shape.head_dim)));
  const size_t slots = static_cast<size_t>(shape.num_kv_heads) * p.splits * p.group;
  const uintptr_t base = (reinterpret_cast<uintptr_t>(workspace) + 255) & ~uintptr_t{255};
  p.partial_o = reinterpret_cast<float*>(base);
  p.partial_ml = reinterpret_cast<float2*>(base + Align256(slots * shape.head_dim * sizeof(float)));
  const dim3 grid(p.splits, shape.num_kv_heads);
  auto* o = static_cast<__nv_bfloat16*>(out);
  if (shape.head_dim == 64) {
    device::GatherDecodeKernel<64><<<grid, device::kGatherThreads, 0, stream>>>(p);
    device::GatherMergeKernel<64><<<shape.num_q_heads, 64, 0, stream>>>(p.partial_o, p.partial_ml, p.splits, p.group,
                                                                       o, out_head_stride, extras.lse);
  } else {
    device::GatherDecodeKernel<128><<<grid, device::kGatherThreads, 0, stream>>>(p);
    device::GatherMergeKernel<128><<<shape.num_q_heads, 128, 0, stream>>>(p.partial_o, p.partial_ml, p.splits,
                                                                         p.group, o, out_head_stride, extras.lse);
  }
  return cudaGetLastError();
}

cudaError_t LaunchBlockMass(const GatherEntries& entries, const GatherExtras& extras, int num_kv_heads, int group,
                            int length, int num_blocks, float* mass, int64_t mass_head_stride, cudaStream_t stream) {
  if (num_kv_heads < 1 || group < 1 || group > device::kMaxGroup || entries.blocks == nullptr || !IsPowerOfTwo(entries.block_size) ||
      entries.counts == nullptr || extras.lse == nullptr || extras.logits == nullptr || mass == nullptr ||
      num_blocks < 1 || mass_head_stride < num_blocks) {
    return cudaErrorInvalidValue;
  }
  device::BlockMassKernel<<<num_kv_heads, device::kHeadThreads, 0, stream>>>(
      entries, extras, group, device::Log2(entries.block_size), length, num_blocks, mass, mass_head_stride);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lychee
