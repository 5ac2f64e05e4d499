// Block selection of LycheeDecode retrieval heads: keep the mandatory blocks (sink and recent) and
// the highest-scoring other blocks up to the budget, ties to the lower block index. One CTA per
// (sequence, KV head) by radix select over the float32 scores (8-bit passes of a 256-bin histogram
// over the bits where the keys differ, then one pass that gathers the winners), not a sort.
#pragma once

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/hybrid_decode.h"

namespace lychee {
namespace cuda {
namespace device {

struct SelectConfig {
  int block_size, log2_block_size, budget_blocks, sink_tokens, recent_tokens;
};

// Host side: log2 of a power of two, and the kernels' form of a selection config.
inline int Log2(int power_of_two) {
  int r = 0;
  while ((1 << r) < power_of_two) ++r;
  return r;
}
inline SelectConfig ToSelectConfig(const BlockSelectionConfig& c) {
  return {c.block_size, Log2(c.block_size), c.budget_blocks(), c.sink_tokens, c.recent_tokens};
}

// Block-wide exclusive scan of 0/1 flags in thread order (kThreads a multiple of 32). Returns the
// exclusive prefix; *total gets the sum. Contains two barriers; every thread must call it.
template <int kThreads>
__device__ __forceinline__ int CtaExclusiveScanFlags(bool flag, int* s_warp, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) s_warp[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    const int c = s_warp[w];
    before += w < warp ? c : 0;
    sum += c;
  }
  __syncthreads();
  *total = sum;
  return before + in_warp;
}

// Fast path for up to kThreads * 16 candidates: scores stay in registers; one 2048-bin histogram
// pass (bins linear in the score between its min and max) finds the bin of the k-th largest score; every key in a
// higher bin is taken, and the keys of that bin (at most kListMax, else this returns false and the
// general path runs) are ranked exactly by (key desc, index asc) by one warp. Every thread calls.
template <int kThreads>
__device__ bool FastSelectCta(const float* __restrict__ cand, int cand_begin, int num_cand, int k,
                              int32_t* __restrict__ out) {
  constexpr int R = 16, kBins = 2048, kBinsPerThread = kBins / kThreads, kListMax = 256;
  static_assert(kBins % kThreads == 0, "bins per thread");
  __shared__ int s_hist[kBins];
  __shared__ int s_part[kThreads / 32];
  __shared__ float s_min[kThreads / 32], s_max[kThreads / 32];
  __shared__ int s_bin, s_above, s_count;
  __shared__ uint32_t s_list_key[kListMax];
  __shared__ int32_t s_list_idx[kListMax];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Bins linear in the score value (monotone, so the order of bins is the order of scores, and
  // equal scores share a bin): scores spread over the bins, so few atomics collide.
  float val[R];
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int i = tid + u * kThreads;
    val[u] = i < num_cand ? cand[i] : 0.f;
  }
  float vmin = INFINITY, vmax = -INFINITY;
#pragma unroll
  for (int u = 0; u < R; ++u) {
    if (tid + u * kThreads < num_cand) vmin = fminf(vmin, val[u]), vmax = fmaxf(vmax, val[u]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    vmin = fminf(vmin, __shfl_xor_sync(0xffffffffu, vmin, off));
    vmax = fmaxf(vmax, __shfl_xor_sync(0xffffffffu, vmax, off));
  }
  if (lane == 0) s_min[warp] = vmin, s_max[warp] = vmax;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) s_hist[tid * kBinsPerThread + j] = 0;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) vmin = fminf(vmin, s_min[w]), vmax = fmaxf(vmax, s_max[w]);
  const float bin_scale = vmax > vmin ? (kBins - 0.5f) / (vmax - vmin) : 0.f;
  if (!(bin_scale < INFINITY)) return false;  // uniform: a range too small (or not finite) to bin
  auto bin_of = [&](float v) { return min(kBins - 1, static_cast<int>((v - vmin) * bin_scale)); };
#pragma unroll
  for (int u = 0; u < R; ++u) {
    if (tid + u * kThreads < num_cand) atomicAdd(&s_hist[bin_of(val[u])], 1);
  }
  __syncthreads();
  // Thread t owns bins [kBins - (t + 1) * per, kBins - t * per): a scan over t counts from the top.
  int local[kBinsPerThread], sum = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    local[j] = s_hist[kBins - 1 - (tid * kBinsPerThread + j)];  // descending bins
    sum += local[j];
  }
  int incl = sum;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += y;
  }
  if (lane == 31) s_part[warp] = incl;
  __syncthreads();
  for (int w = 0; w < warp; ++w) incl += s_part[w];
  int before = incl - sum;
  if (before < k && incl >= k) {
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      if (before < k && before + local[j] >= k) {
        s_bin = kBins - 1 - (tid * kBinsPerThread + j);
        s_above = before;
        s_count = local[j];
      }
      before += local[j];
    }
  }
  __syncthreads();
  const int bin = s_bin, above = s_above, count = s_count;
  if (count > kListMax) return false;  // uniform
  // Output slots by a block scan of per-thread counts (above-bin keys in the low 16 bits, keys of
  // the bin in the high 16 bits), not by contended atomics on one counter.
  int mine = 0;
#pragma unroll
  for (int u = 0; u < R; ++u) {
    if (tid + u * kThreads < num_cand) {
      const int kb = bin_of(val[u]);
      mine += kb > bin ? 1 : kb == bin ? (1 << 16) : 0;
    }
  }
  int scan = mine;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, scan, off);
    if (lane >= off) scan += y;
  }
  if (lane == 31) s_part[warp] = scan;
  __syncthreads();
  for (int w = 0; w < warp; ++w) scan += s_part[w];
  int gt_pos = (scan - mine) & 0xffff, list_pos = (scan - mine) >> 16;
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int i = tid + u * kThreads;
    if (i < num_cand) {
      const int kb = bin_of(val[u]);
      if (kb > bin) {
        out[gt_pos++] = cand_begin + i;
      } else if (kb == bin) {
        s_list_key[list_pos] = OrderedKey(val[u]);
        s_list_idx[list_pos] = cand_begin + i;
        ++list_pos;
      }
    }
  }
  __syncthreads();
  const int need = k - above;  // 1..count
  if (warp == 0) {
    for (int e = lane; e < count; e += 32) {
      const uint32_t ke = s_list_key[e];
      const int32_t ie = s_list_idx[e];
      int rank = 0;
      for (int f = 0; f < count; ++f) {
        const uint32_t kf = s_list_key[f];
        rank += kf > ke || (kf == ke && s_list_idx[f] < ie);
      }
      if (rank < need) out[above + rank] = ie;
    }
  }
  return true;
}

// One CTA (kThreads == 256) selects the blocks of a context of `length` tokens from `scores`
// ([ceil(length / block_size)] float32) into indices[0, count) (ascending for the mandatory and
// the budget-covers-all cases; otherwise mandatory first, the rest in no particular order) and
// *count. Every thread must call it.
template <int kThreads>
__device__ void SelectBlocksCta(const float* __restrict__ scores, int length, const SelectConfig& cfg,
                                int32_t* __restrict__ indices, int32_t* __restrict__ count) {
  static_assert(kThreads == 256, "the histogram scan maps one thread to one bin");
  __shared__ int s_hist[256];
  __shared__ int s_warp[kThreads / 32];
  __shared__ int s_digit, s_krem, s_gt, s_eq, s_eqpos;
  __shared__ uint32_t s_wmin[kThreads / 32], s_wmax[kThreads / 32];
  constexpr int kSmemKeys = 4096;  // candidates kept in shared memory (else re-read from L2)
  __shared__ uint32_t s_keys[kSmemKeys];
  const int tid = threadIdx.x;
  const int bs = cfg.block_size, lbs = cfg.log2_block_size;
  const int num_blocks = (length + bs - 1) >> lbs;
  if (num_blocks <= cfg.budget_blocks) {
    for (int i = tid; i < num_blocks; i += kThreads) indices[i] = i;
    if (tid == 0) *count = num_blocks;
    return;
  }
  const int sink_blocks = min(num_blocks, (cfg.sink_tokens + bs - 1) >> lbs);
  const int recent_start = min(length - 1, max(0, length - cfg.recent_tokens));
  const int recent_first = max(sink_blocks, recent_start >> lbs);
  const int num_mandatory = sink_blocks + (num_blocks - recent_first);
  for (int i = tid; i < num_mandatory; i += kThreads) {
    indices[i] = i < sink_blocks ? i : recent_first + (i - sink_blocks);
  }
  const int cand_begin = sink_blocks, num_cand = recent_first - sink_blocks;
  const int k = min(cfg.budget_blocks - num_mandatory, num_cand);
  if (tid == 0) *count = num_mandatory + max(k, 0);
  if (k <= 0) return;
  int32_t* out = indices + num_mandatory;
  const float* cand = scores + cand_begin;
  if (k == num_cand) {
    for (int i = tid; i < num_cand; i += kThreads) out[i] = cand_begin + i;
    return;
  }

  if (num_cand <= kThreads * 16 && FastSelectCta<kThreads>(cand, cand_begin, num_cand, k, out)) return;
  __syncthreads();  // the fast path's shared memory is separate, but keep its readers out of the way

  const bool in_smem = num_cand <= kSmemKeys;
  if (in_smem) {
    for (int i = tid; i < num_cand; i += kThreads) s_keys[i] = OrderedKey(cand[i]);
    __syncthreads();
  }
  auto key_at = [&](int i) { return in_smem ? s_keys[i] : OrderedKey(cand[i]); };

  // Radix select of the k-th largest key over d = key - min (only the bits where keys differ, so
  // the first digit already spreads the keys over the bins), most significant digit first.
  uint32_t kmin = 0xffffffffu, kmax = 0u;
  for (int i = tid; i < num_cand; i += kThreads) {
    const uint32_t key = key_at(i);
    kmin = min(kmin, key);
    kmax = max(kmax, key);
  }
  kmin = __reduce_min_sync(0xffffffffu, kmin);
  kmax = __reduce_max_sync(0xffffffffu, kmax);
  const int lane = tid & 31, warp = tid >> 5;
  if (lane == 0) {
    s_wmin[warp] = kmin;
    s_wmax[warp] = kmax;
  }
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    kmin = min(kmin, s_wmin[w]);
    kmax = max(kmax, s_wmax[w]);
  }
  const uint32_t range = kmax - kmin;
  const int bits = range == 0 ? 0 : 32 - __clz(range);
  uint32_t prefix = 0, mask = 0;
  int krem = k, eq_count = num_cand;
#pragma unroll 1
  for (int shift = ((bits + 7) / 8 - 1) * 8; shift >= 0; shift -= 8) {
    s_hist[tid] = 0;
    __syncthreads();
    for (int i = tid; i < num_cand; i += kThreads) {
      const uint32_t d = key_at(i) - kmin;
      if ((d & mask) == prefix) atomicAdd(&s_hist[(d >> shift) & 255u], 1);
    }
    __syncthreads();
    // Thread t holds bin 255 - t; an inclusive scan over t counts the keys with digit >= bin.
    const int c = s_hist[255 - tid];
    int incl = c;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += y;
    }
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    for (int w = 0; w < warp; ++w) incl += s_warp[w];
    if (incl >= krem && incl - c < krem) {
      s_digit = 255 - tid;
      s_krem = krem - (incl - c);
      s_eq = c;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(s_digit) << shift;
    mask |= 255u << shift;
    krem = s_krem;
    eq_count = s_eq;
  }
  // threshold is the k-th largest key; eq_count keys equal it, of which krem are taken.
  const uint32_t threshold = prefix + kmin;
  const bool take_all_equal = eq_count == krem;
  __syncthreads();  // every thread has read the last pass's results before they are reused
  if (tid == 0) {
    s_gt = 0;
    s_eqpos = 0;
  }
  __syncthreads();
  int32_t* out_eq = out + (k - krem);
  for (int i = tid; i < num_cand; i += kThreads) {
    const uint32_t key = key_at(i);
    if (key > threshold) {
      out[atomicAdd(&s_gt, 1)] = cand_begin + i;
    } else if (take_all_equal && key == threshold) {
      out_eq[atomicAdd(&s_eqpos, 1)] = cand_begin + i;
    }
  }
  if (take_all_equal) return;
  // More keys equal the threshold than are taken: the lowest-indexed ones, in index order.
  int taken = 0;
  for (int base = 0; base < num_cand && taken < krem; base += kThreads) {
    const int i = base + tid;
    const bool eq = i < num_cand && key_at(i) == threshold;
    int total;
    const int rank = CtaExclusiveScanFlags<kThreads>(eq, s_warp, &total);
    if (eq && taken + rank < krem) out_eq[taken + rank] = cand_begin + i;
    taken += total;
  }
}

template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    BlockSelectKernel(const float* __restrict__ scores, const int4* __restrict__ items, SelectConfig cfg,
                      int32_t* sel_indices, int32_t* sel_counts, int64_t sel_batch_stride, int64_t sel_head_stride,
                      int64_t sel_count_batch_stride) {
  const int4 it = items[blockIdx.x];  // batch, kv_head, length, score_offset
  SelectBlocksCta<kThreads>(scores + it.w, it.z, cfg, sel_indices + it.x * sel_batch_stride + it.y * sel_head_stride,
                            sel_counts + it.x * sel_count_batch_stride + it.y);
}

}  // namespace device
}  // namespace cuda
}  // namespace lychee
