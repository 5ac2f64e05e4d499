// Device code of the selection policies' kernels (host API: policy_decode.h). Each launch covers
// the KV heads of one layer of one sequence. Rows (keys, values, page bounds) are read as 16-byte
// vectors: a row of D bf16 is spread over D / 8 lanes (a "row group"), so a warp reads 32 / (D / 8)
// rows at a time and reduces a dot product with log2(D / 8) shuffles. Keys and values are only
// ever addressed through KeyRow / ValueRow (KvRowOffset), which serve the contiguous and the
// paged cache alike.
#pragma once

#include "kernels/cuda/block_topk.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/policy_decode.h"

namespace lychee {
namespace cuda {
namespace device {

constexpr int kMaxGroup = 8;
constexpr int kGatherThreads = 128;
constexpr int kHeadThreads = 256;  // kernels with one CTA per KV head

template <int D>
struct RowLayout {
  static constexpr int kLanesPerRow = D / 8;
  static constexpr int kRowsPerWarp = 32 / kLanesPerRow;
};

// Sum over the lanes of one row group (aligned groups of kLanes lanes); every lane gets it.
template <int kLanes>
__device__ __forceinline__ float RowGroupSum(float x) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ void LoadBf16Row8(const void* row, float (&f)[8]) {
  Bf16x8ToFloat(*reinterpret_cast<const uint4*>(row), f);
}

__device__ __forceinline__ void LoadFloatRow8(const float* row, float (&f)[8]) {
  const float4 a = reinterpret_cast<const float4*>(row)[0];
  const float4 b = reinterpret_cast<const float4*>(row)[1];
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

// Where position p of KV head h lives, in elements from the base of the keys (or values, with
// their strides): p * token_stride in a contiguous cache; in a paged one (KV pool) the page
// table's pool page of p, then p's offset in that pool page. The only place where the kernels
// turn a cache position into an address.
__device__ __forceinline__ int64_t KvRowOffset(const KvView& kv, int h, int p, int64_t head_stride,
                                               int64_t page_stride, int64_t token_stride) {
  const int64_t head = static_cast<int64_t>(h) * head_stride;
  if (kv.page_table == nullptr) return head + static_cast<int64_t>(p) * token_stride;
  const int64_t page = __ldg(kv.page_table + (p >> kv.log2_page_size));
  const int offset = p & ((1 << kv.log2_page_size) - 1);
  return head + page * page_stride + static_cast<int64_t>(offset) * token_stride;
}

__device__ __forceinline__ const __nv_bfloat16* KeyRow(const KvView& kv, int h, int p) {
  return static_cast<const __nv_bfloat16*>(kv.k) + KvRowOffset(kv, h, p, kv.k_head_stride, kv.k_page_stride,
                                                               kv.k_token_stride);
}

__device__ __forceinline__ const __nv_bfloat16* ValueRow(const KvView& kv, int h, int p) {
  return static_cast<const __nv_bfloat16*>(kv.v) + KvRowOffset(kv, h, p, kv.v_head_stride, kv.v_page_stride,
                                                               kv.v_token_stride);
}

// The group's queries of KV head h, this lane's 8 dimensions; zeros beyond the group.
template <int D>
__device__ __forceinline__ void LoadGroupQueries(const QueryView& q, int h, int group, int sub_lane,
                                                 float (&qf)[kMaxGroup][8]) {
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g < group) {
      LoadBf16Row8(static_cast<const __nv_bfloat16*>(q.q) + (h * group + g) * q.head_stride + sub_lane * 8, qf[g]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[g][i] = 0.f;
    }
  }
}

// ---- Quest ----------------------------------------------------------------------------------

// grid (Quest pages, H_kv), D threads: thread d bounds dimension d of one Quest page (Quest's
// selection unit of quest_page_size positions; in a paged cache it may span several pool pages or
// lie inside one, so every position is addressed on its own).
template <int D>
__global__ void __launch_bounds__(D)
    QuestPageBoundsKernel(KvView kv, int quest_page_size, int first_page, __nv_bfloat16* bounds,
                          int64_t bounds_head_stride) {
  const int page = first_page + blockIdx.x, h = blockIdx.y, d = threadIdx.x;
  const int begin = page * quest_page_size, end = min(kv.length, begin + quest_page_size);
  float hi = -INFINITY, lo = INFINITY;
  for (int p = begin; p < end; ++p) {
    const float x = __bfloat162float(KeyRow(kv, h, p)[d]);
    hi = fmaxf(hi, x);
    lo = fminf(lo, x);
  }
  __nv_bfloat16* out = bounds + h * bounds_head_stride + static_cast<int64_t>(page) * 2 * D;
  out[d] = __float2bfloat16(hi);
  out[D + d] = __float2bfloat16(lo);
}

// grid (ceil(pages / rows per CTA), H_kv), kGatherThreads: one row group per page.
template <int D>
__global__ void __launch_bounds__(kGatherThreads)
    QuestPageScoresKernel(QueryView q, int group, const __nv_bfloat16* bounds, int64_t bounds_head_stride,
                          int num_pages, float* scores, int64_t score_head_stride) {
  using L = RowLayout<D>;
  const int h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sub_lane = lane % L::kLanesPerRow;
  const int page = (blockIdx.x * (kGatherThreads / 32) + warp) * L::kRowsPerWarp + lane / L::kLanesPerRow;
  float qf[kMaxGroup][8];
  LoadGroupQueries<D>(q, h, group, sub_lane, qf);
  const bool valid = page < num_pages;
  float hi[8] = {}, lo[8] = {};
  if (valid) {
    const __nv_bfloat16* row = bounds + h * bounds_head_stride + static_cast<int64_t>(page) * 2 * D + sub_lane * 8;
    LoadBf16Row8(row, hi);
    LoadBf16Row8(row + D, lo);
  }
  float best = -INFINITY;
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (g < group) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) s += fmaxf(qf[g][i] * hi[i], qf[g][i] * lo[i]);
      best = fmaxf(best, RowGroupSum<L::kLanesPerRow>(s));
    }
  }
  if (valid && sub_lane == 0) scores[h * score_head_stride + page] = best;
}

// ---- Block selection per head ------------------------------------------------------------------

// One CTA per KV head of one sequence: the retrieval heads' rule (SelectBlocksCta).
__global__ void __launch_bounds__(kHeadThreads)
    HeadBlockSelectKernel(const float* scores, int64_t score_head_stride, int length, SelectConfig cfg,
                          int32_t* indices, int64_t index_head_stride, int32_t* counts) {
  const int h = blockIdx.x;
  SelectBlocksCta<kHeadThreads>(scores + h * score_head_stride, length, cfg, indices + h * index_head_stride,
                                counts + h);
}

// ---- PrHS ---------------------------------------------------------------------------------------

__device__ __forceinline__ float WindowMax(const BlockMassSource& source, int h, int block, int num_blocks,
                                           int enlargement, float best) {
  if (source.mass == nullptr) return best;
  const int known = min(num_blocks, source.known_blocks);
  const float* mass = source.mass + h * source.head_stride;
  for (int j = max(0, block - enlargement); j <= min(known - 1, block + enlargement); ++j) best = fmaxf(best, mass[j]);
  return best;
}

// grid (ceil(blocks / kHeadThreads), H_kv).
__global__ void __launch_bounds__(kHeadThreads)
    PrhsPriorityKernel(BlockMassSource previous_step, BlockMassSource previous_layer, int num_blocks, int enlargement,
                       float* priority, int64_t priority_head_stride) {
  const int h = blockIdx.y, block = blockIdx.x * kHeadThreads + threadIdx.x;
  if (block >= num_blocks) return;
  float best = WindowMax(previous_step, h, block, num_blocks, enlargement, -1.f);
  best = WindowMax(previous_layer, h, block, num_blocks, enlargement, best);
  priority[h * priority_head_stride + block] = best;
}

// One CTA per KV head: compacts the selection in place, keeping mandatory and proposed blocks.
__global__ void __launch_bounds__(kHeadThreads)
    DropUnproposedBlocksKernel(const float* scores, int64_t score_head_stride, int length, SelectConfig cfg,
                               int32_t* indices, int64_t index_head_stride, int32_t* counts) {
  __shared__ int s_warp[kHeadThreads / 32];
  const int h = blockIdx.x;
  const int bs = cfg.block_size, lbs = cfg.log2_block_size;
  const int num_blocks = (length + bs - 1) >> lbs;
  if (num_blocks <= cfg.budget_blocks) return;  // every block, as the reference keeps them
  const int sink_blocks = min(num_blocks, (cfg.sink_tokens + bs - 1) >> lbs);
  const int recent_start = min(length - 1, max(0, length - cfg.recent_tokens));
  const int recent_first = max(sink_blocks, recent_start >> lbs);
  const float* score = scores + h * score_head_stride;
  int32_t* list = indices + h * index_head_stride;
  const int count = counts[h];
  int taken = 0;
  for (int base = 0; base < count; base += kHeadThreads) {
    const int i = base + threadIdx.x;
    const int block = i < count ? list[i] : 0;
    const bool keep = i < count && (block < sink_blocks || block >= recent_first || score[block] >= 0.f);
    int total;
    const int rank = CtaExclusiveScanFlags<kHeadThreads>(keep, s_warp, &total);
    if (keep) list[taken + rank] = block;
    taken += total;
  }
  if (threadIdx.x == 0) counts[h] = taken;
}

// ---- Double-P -------------------------------------------------------------------------------------

// The logits of cluster c for every query of the group: q . centroid * scale + log size.
template <int D>
__device__ __forceinline__ void ClusterLogits(const float (*s_q)[D], int group, const float* centroid,
                                              float log_size, float scale, float (&logits)[kMaxGroup]) {
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) logits[g] = 0.f;
  for (int d = 0; d < D; ++d) {
    const float x = centroid[d];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) logits[g] += s_q[g][d] * x;
  }
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) logits[g] = g < group ? logits[g] * scale + log_size : -INFINITY;
}

// Block-wide reduction of kMaxGroup values per thread into s_out (max or sum). Every thread calls.
template <bool kMax>
__device__ __forceinline__ void CtaReduceGroup(float (&v)[kMaxGroup], float (*s_warp)[kMaxGroup],
                                               float* s_out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    float x = v[g];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float y = __shfl_xor_sync(0xffffffffu, x, off);
      x = kMax ? fmaxf(x, y) : x + y;
    }
    if (lane == 0) s_warp[warp][g] = x;
  }
  __syncthreads();
  if (threadIdx.x < kMaxGroup) {
    float x = kMax ? -INFINITY : 0.f;
    for (int w = 0; w < kHeadThreads / 32; ++w) x = kMax ? fmaxf(x, s_warp[w][threadIdx.x]) : x + s_warp[w][threadIdx.x];
    s_out[threadIdx.x] = x;
  }
  __syncthreads();
}

// One CTA per KV head.
template <int D>
__global__ void __launch_bounds__(kHeadThreads)
    DoublePClassifyKernel(QueryView q, int group, ClusterTable table, float scale, double p1, double p2,
                          uint8_t* exact, int32_t* approximated, int32_t* approximated_counts) {
  enum : uint8_t { kDropped = 0, kApproximated = 1, kExact = 2 };
  __shared__ float s_q[kMaxGroup][D];
  __shared__ float s_warp[kHeadThreads / 32][kMaxGroup];
  __shared__ float s_max[kMaxGroup], s_sum[kMaxGroup];
  __shared__ float s_mass[kMaxClustersPerHead];
  __shared__ int32_t s_order[kMaxClustersPerHead];
  __shared__ uint8_t s_class[kMaxClustersPerHead];
  __shared__ int s_scan[kHeadThreads / 32];
  const int h = blockIdx.x;
  const int count = min(table.counts[h], kMaxClustersPerHead);
  for (int t = threadIdx.x; t < kMaxGroup * D; t += kHeadThreads) {
    const int g = t / D, d = t % D;
    s_q[g][d] = g < group ? __bfloat162float(static_cast<const __nv_bfloat16*>(q.q)[(h * group + g) * q.head_stride + d])
                          : 0.f;
  }
  __syncthreads();
  const float* centroids = table.centroids + static_cast<int64_t>(h) * table.capacity * D;
  const float* log_sizes = table.log_sizes + static_cast<int64_t>(h) * table.capacity;
  // Softmax over clusters per query: the maxima, then the sums, then each cluster's mean mass.
  float part[kMaxGroup], logits[kMaxGroup];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) part[g] = -INFINITY;
  for (int c = threadIdx.x; c < count; c += kHeadThreads) {
    ClusterLogits<D>(s_q, group, centroids + c * D, log_sizes[c], scale, logits);
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) part[g] = fmaxf(part[g], logits[g]);
  }
  CtaReduceGroup<true>(part, s_warp, s_max);
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) part[g] = 0.f;
  for (int c = threadIdx.x; c < count; c += kHeadThreads) {
    ClusterLogits<D>(s_q, group, centroids + c * D, log_sizes[c], scale, logits);
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) part[g] += g < group ? expf(logits[g] - s_max[g]) : 0.f;
  }
  CtaReduceGroup<false>(part, s_warp, s_sum);
  for (int c = threadIdx.x; c < count; c += kHeadThreads) {
    ClusterLogits<D>(s_q, group, centroids + c * D, log_sizes[c], scale, logits);
    float mass = 0.f;
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) mass += g < group ? expf(logits[g] - s_max[g]) / s_sum[g] : 0.f;
    s_mass[c] = mass / group;
  }
  __syncthreads();
  // Rank by mass, descending, ties to the lower index (a stable sort's order).
  for (int c = threadIdx.x; c < count; c += kHeadThreads) {
    const float mine = s_mass[c];
    int rank = 0;
    for (int o = 0; o < count; ++o) {
      const float other = s_mass[o];
      rank += other > mine || (other == mine && o < c);
    }
    s_order[rank] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double above = 0;
    for (int r = 0; r < count; ++r) {
      const int c = s_order[r];
      s_class[c] = p1 < 1 && above >= p1 ? kDropped : p2 >= 1 || above < p2 ? kExact : kApproximated;
      above += s_mass[c];
    }
  }
  __syncthreads();
  uint8_t* exact_row = exact + static_cast<int64_t>(h) * table.capacity;
  int32_t* approximated_row = approximated + static_cast<int64_t>(h) * table.capacity;
  int taken = 0;
  for (int base = 0; base < count; base += kHeadThreads) {
    const int c = base + threadIdx.x;
    const uint8_t cls = c < count ? s_class[c] : kDropped;
    if (c < count) exact_row[c] = cls == kExact;
    int total;
    const int rank = CtaExclusiveScanFlags<kHeadThreads>(cls == kApproximated, s_scan, &total);
    if (cls == kApproximated) approximated_row[taken + rank] = c;
    taken += total;
  }
  if (threadIdx.x == 0) approximated_counts[h] = taken;
}

// One CTA per KV head.
__global__ void __launch_bounds__(kHeadThreads)
    DoublePExactPositionsKernel(const int32_t* assignment, int64_t assignment_head_stride, const uint8_t* exact,
                                int exact_head_stride, int first, int end, int length, int32_t* positions,
                                int64_t position_head_stride, int32_t* counts) {
  __shared__ int s_scan[kHeadThreads / 32];
  const int h = blockIdx.x;
  int32_t* out = positions + h * position_head_stride;
  const int sink = min(first, length);
  for (int i = threadIdx.x; i < sink; i += kHeadThreads) out[i] = i;
  int taken = sink;
  const int32_t* cluster_of = assignment + h * assignment_head_stride;
  const uint8_t* is_exact = exact + static_cast<int64_t>(h) * exact_head_stride;
  const int clustered_end = min(end, length);
  for (int base = first; base < clustered_end; base += kHeadThreads) {
    const int p = base + threadIdx.x;
    const bool keep = p < clustered_end && is_exact[cluster_of[p - first]];
    int total;
    const int rank = CtaExclusiveScanFlags<kHeadThreads>(keep, s_scan, &total);
    if (keep) out[taken + rank] = p;
    taken += total;
  }
  const int tail_begin = max(end, sink);
  for (int i = threadIdx.x; i < length - tail_begin; i += kHeadThreads) out[taken + i] = tail_begin + i;
  if (threadIdx.x == 0) counts[h] = taken + max(0, length - tail_begin);
}

// ---- Gather decode ----------------------------------------------------------------------------------

struct GatherParams {
  QueryView q;
  KvView kv;
  GatherEntries entries;
  GatherExtras extras;
  int group, splits, log2_block_size;
  float scale;
  float* partial_o;     // [H_kv][splits][G][D]
  float2* partial_ml;   // [H_kv][splits][G]: running maximum, sum of exponentials
};

// grid (splits, H_kv), kGatherThreads. Split s of head h attends to entries
// [total * s / splits, total * (s + 1) / splits): the token entries, then the clusters.
template <int D>
__global__ void __launch_bounds__(kGatherThreads) GatherDecodeKernel(GatherParams p) {
  using L = RowLayout<D>;
  constexpr int kRowGroups = (kGatherThreads / 32) * L::kRowsPerWarp;
  __shared__ float s_m[kRowGroups][kMaxGroup], s_l[kRowGroups][kMaxGroup];
  __shared__ float s_acc[kRowGroups][kMaxGroup][D];
  const int h = blockIdx.y, split = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_in_warp = lane / L::kLanesPerRow, sub_lane = lane % L::kLanesPerRow;
  const int row_group = warp * L::kRowsPerWarp + row_in_warp;
  const int group = p.group;
  const GatherEntries& e = p.entries;

  const int listed = e.counts[h];
  const int num_tokens = e.blocks != nullptr ? listed << p.log2_block_size : listed;
  const int num_clusters = e.clusters != nullptr ? e.cluster_counts[h] : 0;
  const int total = num_tokens + num_clusters;
  const int begin = static_cast<int>(static_cast<int64_t>(total) * split / p.splits);
  const int end = static_cast<int>(static_cast<int64_t>(total) * (split + 1) / p.splits);

  float qf[kMaxGroup][8];
  LoadGroupQueries<D>(p.q, h, group, sub_lane, qf);
  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][8];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }
  const int64_t list_row = h * e.head_stride;
  const int64_t table_row = static_cast<int64_t>(h) * e.table.capacity;
  float* logits_out = p.extras.logits != nullptr ? p.extras.logits + h * p.extras.logit_head_stride : nullptr;

  // The loop bound is the same for the whole warp, so every lane reaches every shuffle.
  for (int first = begin + warp * L::kRowsPerWarp; first < end; first += kRowGroups) {
    const int entry = first + row_in_warp;
    bool valid = entry < end;
    float kf[8] = {}, vf[8] = {};
    float bias = 0.f;
    if (valid) {
      if (entry < num_tokens) {
        const int position = e.blocks != nullptr
                                 ? (e.blocks[list_row + (entry >> p.log2_block_size)] << p.log2_block_size) +
                                       (entry & ((1 << p.log2_block_size) - 1))
                                 : e.positions[list_row + entry];
        valid = position < p.kv.length;
        if (valid) {
          LoadBf16Row8(KeyRow(p.kv, h, position) + sub_lane * 8, kf);
          LoadBf16Row8(ValueRow(p.kv, h, position) + sub_lane * 8, vf);
        }
      } else {
        const int64_t c = table_row + e.clusters[table_row + entry - num_tokens];
        LoadFloatRow8(e.table.centroids + c * D + sub_lane * 8, kf);
        LoadFloatRow8(e.table.value_means + c * D + sub_lane * 8, vf);
        bias = e.table.log_sizes[c];
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= group) continue;
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) s += qf[g][i] * kf[i];
      s = RowGroupSum<L::kLanesPerRow>(s);
      if (!valid) continue;
      const float logit = s * p.scale + bias;
      if (logits_out != nullptr && sub_lane == 0) logits_out[g * e.max_entries + entry] = logit;
      const float m_new = fmaxf(m[g], logit);
      const float correction = expf(m[g] - m_new);
      const float weight = expf(logit - m_new);
      l[g] = l[g] * correction + weight;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = acc[g][i] * correction + weight * vf[i];
      m[g] = m_new;
    }
  }

#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    if (sub_lane == 0) {
      s_m[row_group][g] = m[g];
      s_l[row_group][g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) s_acc[row_group][g][sub_lane * 8 + i] = acc[g][i];
  }
  __syncthreads();
  for (int t = threadIdx.x; t < group * D; t += kGatherThreads) {
    const int g = t / D, d = t % D;
    float max_logit = -INFINITY;
    for (int r = 0; r < kRowGroups; ++r) max_logit = fmaxf(max_logit, s_m[r][g]);
    float sum = 0.f, out = 0.f;
    if (max_logit > -INFINITY) {
      for (int r = 0; r < kRowGroups; ++r) {
        if (s_m[r][g] == -INFINITY) continue;
        const float w = expf(s_m[r][g] - max_logit);
        sum += s_l[r][g] * w;
        out += s_acc[r][g][d] * w;
      }
    }
    const int64_t slot = (static_cast<int64_t>(h) * p.splits + split) * group + g;
    p.partial_o[slot * D + d] = out;
    if (d == 0) p.partial_ml[slot] = make_float2(max_logit, sum);
  }
}

// grid (H_q), D threads: combines a query head's splits.
template <int D>
__global__ void __launch_bounds__(D)
    GatherMergeKernel(const float* partial_o, const float2* partial_ml, int splits, int group, __nv_bfloat16* out,
                      int64_t out_head_stride, float* lse) {
  const int head = blockIdx.x, h = head / group, g = head % group, d = threadIdx.x;
  const int64_t first_slot = static_cast<int64_t>(h) * splits * group + g;
  float max_logit = -INFINITY;
  for (int s = 0; s < splits; ++s) max_logit = fmaxf(max_logit, partial_ml[first_slot + s * group].x);
  float sum = 0.f, acc = 0.f;
  if (max_logit > -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float2 ml = partial_ml[first_slot + s * group];
      if (ml.x == -INFINITY) continue;
      const float w = expf(ml.x - max_logit);
      sum += ml.y * w;
      acc += partial_o[(first_slot + s * group) * D + d] * w;
    }
  }
  out[head * out_head_stride + d] = __float2bfloat16(sum > 0.f ? acc / sum : 0.f);
  if (lse != nullptr && d == 0) lse[head] = sum > 0.f ? max_logit + logf(sum) : -INFINITY;
}

// One CTA per KV head; one warp per selected block.
__global__ void __launch_bounds__(kHeadThreads)
    BlockMassKernel(GatherEntries e, GatherExtras x, int group, int log2_block_size, int length, int num_blocks,
                    float* mass, int64_t mass_head_stride) {
  const int h = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* row = mass + h * mass_head_stride;
  for (int b = threadIdx.x; b < num_blocks; b += kHeadThreads) row[b] = -1.f;
  __syncthreads();
  const int block_size = 1 << log2_block_size;
  const int count = e.counts[h];
  const float* logits = x.logits + h * x.logit_head_stride;
  const float* lse = x.lse + h * group;
  for (int i = warp; i < count; i += kHeadThreads / 32) {
    const int block = e.blocks[h * e.head_stride + i];
    float sum = 0.f;
    for (int j = lane; j < block_size; j += 32) {
      if ((block << log2_block_size) + j >= length) break;
      const int entry = (i << log2_block_size) + j;
      float weight = 0.f;
      for (int g = 0; g < group; ++g) weight += expf(logits[g * e.max_entries + entry] - lse[g]);
      sum += weight / group;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) row[block] = sum;
  }
}

}  // namespace device
}  // namespace cuda
}  // namespace lychee
