// Split-KV flash-decode for LycheeDecode hybrid-head attention, one launch for every head kind.
//
// Main kernel: one CTA (4 warps) per work item = a range of blocks ("chunks") of one
// (sequence, KV head). All G query heads of the KV head sit in the CTA, so K and V are read once
// per KV head. A dense or retrieval item's chunks are blocks chunk_begin..chunk_end-1 of the cache;
// a sparse item's are entries of the selection buffer (or the mandatory blocks, as fallback).
// Warp w takes stages w, w+4, ... of the item; K and V rows go to a per-warp ring with cp.async
// (16 bytes, coalesced, no registers held while in flight); softmax is online in the exp2 domain.
//   HybridDecodeMmaKernel<D, G> (default): q.k and p.v on tensor cores (mma.sync m16n8k16, bf16
//     in, fp32 accumulate), query rows padded to 16, 16-token stages, ldmatrix from a swizzled ring.
//   HybridDecodeKernel<D, G, NV> (kernel_variant 1, 2): the same on CUDA cores, each lane owning
//     NV 16-byte vectors of a row and reducing q.k over the row's lanes by shuffles.
// Retrieval items also keep, per block, the max over its positions of sum_g q_g.k / G (= mean(q).k),
// from the G dot products already computed, and write it for the selection.
// A head cut into several items writes unnormalized partials (o, m, l); the second kernel
// (HybridPostKernel) merges them (log-sum-exp) and runs the block selection of retrieval heads.
#pragma once

#include "kernels/cuda/block_topk.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/hybrid_decode.h"

namespace lychee {
namespace cuda {
namespace device {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kDecodePipe = 4;          // stages in flight per warp (ring slots)
constexpr int kStageVectors = 128;      // 16-byte vectors of K (and as many of V) per warp stage
constexpr int kPostThreads = 256;

struct DecodeParams {
  const __nv_bfloat16* q;
  int64_t q_batch_stride, q_head_stride;
  __nv_bfloat16* out;
  int64_t out_batch_stride, out_head_stride;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const void* const* k_ptrs;
  const void* const* v_ptrs;
  const int64_t* k_head_strides;
  const int64_t* v_head_strides;
  int64_t k_batch_stride, k_head_stride, k_token_stride;
  int64_t v_batch_stride, v_head_stride, v_token_stride;
  const int32_t* page_table;  // paged caches: [B, page_table_stride], or null
  int64_t page_table_stride;
  int log2_page_size;
  int64_t k_page_stride, v_page_stride;
  int32_t* sel_indices;
  int32_t* sel_counts;
  int64_t sel_batch_stride, sel_head_stride, sel_count_batch_stride;
  int kernel_variant;  // 0 tensor cores, 1 or 2 CUDA cores with that many vectors per lane
  float* partial_o;   // [num_partials, G, D]
  float2* partial_ml; // [num_partials, G]: (max in log2 units, sum of exp2)
  float* scores;      // block scores of retrieval heads
  float* lse;         // or null: [B, H_q] at lse_batch_stride, each head's log2 softmax denominator
  int64_t lse_batch_stride;
  const int* counts;  // the plan's header on the device: num_work, num_merge, num_select
  const int4* work;   // two int4 per item
  const int4* merges;
  const int4* selects;
  SelectConfig select;
  float scale_log2;   // softmax scale * log2(e)
  int main_ctas;      // the main launch's grid (the plan's work items or its capacity)
  bool skip_post;     // benchmarking only: do not launch the second kernel
};

__host__ __device__ constexpr size_t DecodeSmemBytes() {
  return 2 * kMaxItemChunks * sizeof(int32_t) +
         static_cast<size_t>(kDecodeWarps) * kDecodePipe * 2 * kStageVectors * 16;
}

// Where the keys and values of one (sequence, KV head) lie: a contiguous [capacity, D] region, or
// pages of a pool read through the sequence's page table. A stage's rows never cross a page (pages
// hold at least 16 positions, stages at most 16, both aligned).
struct KvRows {
  const __nv_bfloat16* k;  // the head's first row, or the head's base in the pool
  const __nv_bfloat16* v;
  const int32_t* pages;    // the sequence's page table, or null
  int64_t k_token_stride, v_token_stride, k_page_stride, v_page_stride;
  int log2_page_size;

  __device__ __forceinline__ KvRows(const DecodeParams& p, int b, int h) {
    if (p.page_table != nullptr) {
      k = p.k + h * p.k_head_stride;
      v = p.v + h * p.v_head_stride;
      pages = p.page_table + b * p.page_table_stride;
    } else {
      k = (p.k_ptrs != nullptr ? static_cast<const __nv_bfloat16*>(p.k_ptrs[b]) : p.k + b * p.k_batch_stride) +
          h * (p.k_head_strides != nullptr ? p.k_head_strides[b] : p.k_head_stride);
      v = (p.v_ptrs != nullptr ? static_cast<const __nv_bfloat16*>(p.v_ptrs[b]) : p.v + b * p.v_batch_stride) +
          h * (p.v_head_strides != nullptr ? p.v_head_strides[b] : p.v_head_stride);
      pages = nullptr;
    }
    k_token_stride = p.k_token_stride, v_token_stride = p.v_token_stride;
    k_page_stride = p.k_page_stride, v_page_stride = p.v_page_stride;
    log2_page_size = p.log2_page_size;
  }
  // Element offsets of position `pos` in k and in v.
  __device__ __forceinline__ void Offsets(int pos, int64_t* k_offset, int64_t* v_offset) const {
    if (pages == nullptr) {
      *k_offset = pos * k_token_stride;
      *v_offset = pos * v_token_stride;
      return;
    }
    const int64_t page = __ldg(pages + (pos >> log2_page_size));
    const int64_t in_page = pos & ((1 << log2_page_size) - 1);
    *k_offset = page * k_page_stride + in_page * k_token_stride;
    *v_offset = page * v_page_stride + in_page * v_token_stride;
  }
};

// Fills the item's block table (block index of each of its chunks) and clears the block maxima.
__device__ __forceinline__ void LoadBlockTable(const DecodeParams& p, int b, int h, int L, int c_begin, int n_chunks,
                                               int flags, int32_t* s_blocks, uint32_t* s_bmax) {
  const int lbs = p.select.log2_block_size;
  int sink_blocks = 0, recent_first = 0;
  if (flags & kWorkFallback) {
    const int bs = p.select.block_size;
    const int num_blocks = (L + bs - 1) >> lbs;
    sink_blocks = min(num_blocks, (p.select.sink_tokens + bs - 1) >> lbs);
    const int recent_start = min(L - 1, max(0, L - p.select.recent_tokens));
    recent_first = max(sink_blocks, recent_start >> lbs);
  }
  const int32_t* sel = p.sel_indices + b * p.sel_batch_stride + h * p.sel_head_stride;
  for (int c = threadIdx.x; c < n_chunks; c += kDecodeThreads) {
    const int chunk = c_begin + c;
    int block = chunk;
    if (flags & kWorkFallback) {
      block = chunk < sink_blocks ? chunk : recent_first + (chunk - sink_blocks);
    } else if (flags & kWorkSparse) {
      block = __ldg(sel + chunk);
    }
    s_blocks[c] = block;
    s_bmax[c] = 0;
  }
}

// Combines the warps' (m, l, o) of the item from shared memory and writes the output (single
// split) or the partial, and the block scores of a retrieval item. After a barrier.
template <int D, int G>
__device__ __forceinline__ void StoreItemResult(const DecodeParams& p, const float* red_o, const float* red_m,
                                                const float* red_l, int b, int h, int flags, int out_index,
                                                int n_chunks, int score_offset, const int32_t* s_blocks,
                                                const uint32_t* s_bmax) {
  const int tid = threadIdx.x;
  const bool final_out = (flags & kWorkFinal) != 0;
  for (int idx = tid; idx < G * (D / 8); idx += kDecodeThreads) {
    const int g = idx / (D / 8), d0 = (idx % (D / 8)) * 8;
    float mw[kDecodeWarps];
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      mw[w] = red_m[w * G + g];
      mx = fmaxf(mx, mw[w]);
    }
    const float base = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float f = FastExp2(mw[w] - base);
      sum = fmaf(red_l[w * G + g], f, sum);
      const float4* src = reinterpret_cast<const float4*>(red_o + (w * G + g) * D + d0);
      const float4 x = src[0], y = src[1];
      acc[0] = fmaf(x.x, f, acc[0]);
      acc[1] = fmaf(x.y, f, acc[1]);
      acc[2] = fmaf(x.z, f, acc[2]);
      acc[3] = fmaf(x.w, f, acc[3]);
      acc[4] = fmaf(y.x, f, acc[4]);
      acc[5] = fmaf(y.y, f, acc[5]);
      acc[6] = fmaf(y.z, f, acc[6]);
      acc[7] = fmaf(y.w, f, acc[7]);
    }
    if (final_out) {
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] *= inv;
      *reinterpret_cast<uint4*>(p.out + b * p.out_batch_stride + (h * G + g) * p.out_head_stride + d0) =
          FloatToBf16x8(acc);
      if (p.lse != nullptr && d0 == 0) p.lse[b * p.lse_batch_stride + h * G + g] = LogSumExp2(mx, sum);
    } else {
      float4* dst = reinterpret_cast<float4*>(p.partial_o + (static_cast<int64_t>(out_index) * G + g) * D + d0);
      dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      if (d0 == 0) p.partial_ml[static_cast<int64_t>(out_index) * G + g] = make_float2(mx, sum);
    }
  }
  if (flags & kWorkScore) {
    for (int c = tid; c < n_chunks; c += kDecodeThreads) p.scores[score_offset + s_blocks[c]] = KeyToFloat(s_bmax[c]);
  }
}

// NV: 16-byte vectors of a row per lane (1: D/8 lanes per row; 2: D/16 lanes per row, fewer
// shuffles and less redundant softmax work per byte, more registers).
template <int D, int G, int NV>
__global__ void __launch_bounds__(kDecodeThreads) HybridDecodeKernel(const DecodeParams p) {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(G >= 1 && G <= 8, "GQA group 1..8");
  static_assert(NV == 1 || NV == 2, "one or two vectors per lane");
  constexpr int E = 8 * NV;                    // elements of a row per lane
  constexpr int VPR = D / E;                   // lanes per row
  constexpr int RPS = 32 / VPR;                // rows per warp step
  constexpr int T = kStageVectors / (D / 8);   // tokens per stage: 8 (D 128) or 16 (D 64)
  constexpr int LOG2_T = D == 128 ? 3 : 4;
  constexpr int TPL = T / RPS;                 // rows per lane per stage
  static_assert(TPL * NV * 32 == kStageVectors, "stage layout");
  static_assert(kDecodeWarps * kDecodePipe * 2 * kStageVectors * 16 >=
                    (kDecodeWarps * G * (D + 2)) * sizeof(float),
                "reduction scratch fits in the ring");

  extern __shared__ __align__(16) unsigned char smem[];
  int32_t* s_blocks = reinterpret_cast<int32_t*>(smem);
  uint32_t* s_bmax = reinterpret_cast<uint32_t*>(s_blocks + kMaxItemChunks);
  uint4* ring = reinterpret_cast<uint4*>(s_bmax + kMaxItemChunks);

  if (static_cast<int>(blockIdx.x) >= __ldg(p.counts)) return;  // launched at a fixed capacity
  const int4 w0 = p.work[2 * blockIdx.x];
  const int4 w1 = p.work[2 * blockIdx.x + 1];
  const int b = w0.x, h = w0.y, L = w0.z, c_begin = w0.w;
  const int n_chunks = w1.x - c_begin, flags = w1.y, out_index = w1.z, score_offset = w1.w;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int lbs = p.select.log2_block_size;
  const bool scoring = (flags & kWorkScore) != 0;

  LoadBlockTable(p, b, h, L, c_begin, n_chunks, flags, s_blocks, s_bmax);

  const int col = lane % VPR, row0 = lane / VPR;
  float q[G][E];
  {
    const __nv_bfloat16* qb = p.q + b * p.q_batch_stride + (h * G) * p.q_head_stride + col * 8;
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        float f[8];
        Bf16x8ToFloat(__ldg(reinterpret_cast<const uint4*>(qb + g * p.q_head_stride + j * VPR * 8)), f);
#pragma unroll
        for (int e = 0; e < 8; ++e) q[g][j * 8 + e] = f[e];
      }
    }
  }
  const KvRows rows(p, b, h);
  const __nv_bfloat16* kb = rows.k + col * 8;
  const __nv_bfloat16* vb = rows.v + col * 8;
  __syncthreads();

  const int spc_log2 = lbs - LOG2_T;  // stages per chunk, log2
  const int n_stages = n_chunks << spc_log2;
  const int my_stages = n_stages > warp ? (n_stages - 1 - warp) / kDecodeWarps + 1 : 0;
  uint4* my_ring = ring + warp * (kDecodePipe * 2 * kStageVectors) + lane;

  // First row (token position) of the lane in the warp's j-th stage.
  auto stage_pos = [&](int j, int* chunk_local) {
    const int s = warp + j * kDecodeWarps;
    *chunk_local = s >> spc_log2;
    return (s_blocks[*chunk_local] << lbs) + ((s & ((1 << spc_log2) - 1)) << LOG2_T) + row0;
  };
  auto issue = [&](int j) {
    if (j < my_stages) {
      int chunk_local;
      const int pos0 = stage_pos(j, &chunk_local);
      uint4* slot = my_ring + (j % kDecodePipe) * (2 * kStageVectors);
#pragma unroll
      for (int t = 0; t < TPL; ++t) {
        const int pos = pos0 + t * RPS;
        const bool ok = pos < L;
        int64_t k_offset, v_offset;
        rows.Offsets(ok ? pos : 0, &k_offset, &v_offset);
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          CpAsync16(slot + (t * NV + j) * 32, kb + k_offset + j * VPR * 8, ok ? 16 : 0);
          CpAsync16(slot + kStageVectors + (t * NV + j) * 32, vb + v_offset + j * VPR * 8, ok ? 16 : 0);
        }
      }
    }
    CpAsyncCommit();
  };

  float m[G], l[G], o[G][E];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) o[g][e] = 0.f;
  }

#pragma unroll
  for (int j = 0; j < kDecodePipe - 1; ++j) issue(j);

#pragma unroll 1
  for (int j = 0; j < my_stages; ++j) {
    CpAsyncWait<kDecodePipe - 2>();
    const uint4* slot = my_ring + (j % kDecodePipe) * (2 * kStageVectors);
    int chunk_local;
    const int pos0 = stage_pos(j, &chunk_local);

    float sc[TPL][G];
    bool ok[TPL];
#pragma unroll
    for (int t = 0; t < TPL; ++t) {
      float kf[E];
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        float f[8];
        Bf16x8ToFloat(slot[(t * NV + j) * 32], f);
#pragma unroll
        for (int e = 0; e < 8; ++e) kf[j * 8 + e] = f[e];
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d0 = 0.f, d1 = 0.f;
#pragma unroll
        for (int e = 0; e < E; e += 2) {
          d0 = fmaf(q[g][e], kf[e], d0);
          d1 = fmaf(q[g][e + 1], kf[e + 1], d1);
        }
        sc[t][g] = d0 + d1;
      }
      ok[t] = pos0 + t * RPS < L;
    }
#pragma unroll
    for (int off = VPR / 2; off > 0; off >>= 1) {
#pragma unroll
      for (int t = 0; t < TPL; ++t) {
#pragma unroll
        for (int g = 0; g < G; ++g) sc[t][g] += __shfl_xor_sync(0xffffffffu, sc[t][g], off);
      }
    }
    if (scoring) {
      float bm = -INFINITY;
#pragma unroll
      for (int t = 0; t < TPL; ++t) {
        float sum = 0.f;
#pragma unroll
        for (int g = 0; g < G; ++g) sum += sc[t][g];
        if (ok[t]) bm = fmaxf(bm, sum);
      }
#pragma unroll
      for (int off = VPR; off < 32; off <<= 1) bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, off));
      if (lane == 0 && bm > -INFINITY) atomicMax(&s_bmax[chunk_local], OrderedKey(bm * (1.f / G)));
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int t = 0; t < TPL; ++t) {
        sc[t][g] = ok[t] ? sc[t][g] * p.scale_log2 : -INFINITY;
        mx = fmaxf(mx, sc[t][g]);
      }
      const float base = mx == -INFINITY ? 0.f : mx;
      const float corr = FastExp2(m[g] - base);
      float sum = 0.f;
#pragma unroll
      for (int t = 0; t < TPL; ++t) {
        sc[t][g] = FastExp2(sc[t][g] - base);
        sum += sc[t][g];
      }
      l[g] = fmaf(l[g], corr, sum);
      m[g] = mx;
#pragma unroll
      for (int e = 0; e < E; ++e) o[g][e] *= corr;
    }
#pragma unroll
    for (int t = 0; t < TPL; ++t) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        float vf[8];
        Bf16x8ToFloat(slot[kStageVectors + (t * NV + j) * 32], vf);
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
          for (int e = 0; e < 8; ++e) o[g][j * 8 + e] = fmaf(sc[t][g], vf[e], o[g][j * 8 + e]);
        }
      }
    }
    issue(j + kDecodePipe - 1);
  }
  CpAsyncWait<0>();

  // Merge the row groups of the warp (lanes col, col + VPR, ...).
#pragma unroll
  for (int off = VPR; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float lo = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float mn = fmaxf(m[g], mo);
      const float base = mn == -INFINITY ? 0.f : mn;
      const float a = FastExp2(m[g] - base), c = FastExp2(mo - base);
      l[g] = l[g] * a + lo * c;
#pragma unroll
      for (int e = 0; e < E; ++e) o[g][e] = o[g][e] * a + __shfl_xor_sync(0xffffffffu, o[g][e], off) * c;
      m[g] = mn;
    }
  }

  LaunchDependents();
  __syncthreads();  // every warp is done with the ring: reuse it for the cross-warp merge
  float* red_o = reinterpret_cast<float*>(ring);  // [warps][G][D]
  float* red_m = red_o + kDecodeWarps * G * D;    // [warps][G]
  float* red_l = red_m + kDecodeWarps * G;
  if (lane < VPR) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        float4* dst = reinterpret_cast<float4*>(red_o + (warp * G + g) * D + (col + j * VPR) * 8);
        dst[0] = make_float4(o[g][j * 8 + 0], o[g][j * 8 + 1], o[g][j * 8 + 2], o[g][j * 8 + 3]);
        dst[1] = make_float4(o[g][j * 8 + 4], o[g][j * 8 + 5], o[g][j * 8 + 6], o[g][j * 8 + 7]);
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      red_m[warp * G + g] = m[g];
      red_l[warp * G + g] = l[g];
    }
  }
  __syncthreads();

  StoreItemResult<D, G>(p, red_o, red_m, red_l, b, h, flags, out_index, n_chunks, score_offset, s_blocks, s_bmax);
}

// Tensor-core variant: the group's G query rows (padded to 16) times a stage of 16 tokens, with
// mma.sync m16n8k16 (bf16 in, float32 accumulate) for q.k and for p.v; ldmatrix reads K and V
// from a swizzled ring (16-byte chunk c of row r at c ^ (r & 7): conflict-free). Same items,
// block table, block scoring and epilogue as the CUDA-core kernel; about a seventh of its
// instructions per byte, so it stays memory-bound with few warps per SM.
template <int D>
struct MmaConfig {
  static constexpr int kTokens = 16;                             // tokens per stage
  static constexpr int kChunksPerRow = D / 8;                    // 16-byte chunks per row
  static constexpr int kStageChunks = kTokens * kChunksPerRow;   // of K, and as many of V
  static constexpr int kPipe = D == 128 ? 3 : 4;                 // ring slots per warp
  static constexpr size_t kSmemBytes =
      2 * kMaxItemChunks * sizeof(int32_t) + static_cast<size_t>(kDecodeWarps) * kPipe * 2 * kStageChunks * 16;
};

template <int D, int G>
__global__ void __launch_bounds__(kDecodeThreads) HybridDecodeMmaKernel(const DecodeParams p) {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(G >= 1 && G <= 8, "GQA group 1..8");
  using C = MmaConfig<D>;
  constexpr int CPR = C::kChunksPerRow, SC = C::kStageChunks, PIPE = C::kPipe;
  constexpr int CPL = SC / 32;   // copies per lane per stage, of K (and of V)
  constexpr int KSTEPS = D / 16; // k-steps of q.k
  constexpr int NT = D / 8;      // n-tiles of p.v
  static_assert(kDecodeWarps * PIPE * 2 * SC * 16 >= kDecodeWarps * G * (D + 2) * sizeof(float),
                "reduction scratch fits in the ring");

  extern __shared__ __align__(16) unsigned char smem[];
  int32_t* s_blocks = reinterpret_cast<int32_t*>(smem);
  uint32_t* s_bmax = reinterpret_cast<uint32_t*>(s_blocks + kMaxItemChunks);
  uint4* ring = reinterpret_cast<uint4*>(s_bmax + kMaxItemChunks);

  if (static_cast<int>(blockIdx.x) >= __ldg(p.counts)) return;  // launched at a fixed capacity
  const int4 w0 = p.work[2 * blockIdx.x];
  const int4 w1 = p.work[2 * blockIdx.x + 1];
  const int b = w0.x, h = w0.y, L = w0.z, c_begin = w0.w;
  const int n_chunks = w1.x - c_begin, flags = w1.y, out_index = w1.z, score_offset = w1.w;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int lbs = p.select.log2_block_size;
  const bool scoring = (flags & kWorkScore) != 0;
  const bool values = (flags & kWorkLseOnly) == 0;
  LoadBlockTable(p, b, h, L, c_begin, n_chunks, flags, s_blocks, s_bmax);

  const int grp = lane >> 2, qd = lane & 3;  // fragment row (query) and column pair
  const bool row_ok = grp < G;
  uint32_t qa[KSTEPS][2];  // A fragments: a0 (cols 2qd, 2qd+1) and a2 (cols 8 + 2qd, ...); rows 8..15 zero
  {
    const __nv_bfloat16* qrow = p.q + b * p.q_batch_stride + (h * G + (row_ok ? grp : 0)) * p.q_head_stride;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      qa[ks][0] = row_ok ? __ldg(reinterpret_cast<const unsigned int*>(qrow + ks * 16 + 2 * qd)) : 0u;
      qa[ks][1] = row_ok ? __ldg(reinterpret_cast<const unsigned int*>(qrow + ks * 16 + 8 + 2 * qd)) : 0u;
    }
  }
  const KvRows rows(p, b, h);
  __syncthreads();

  const int spc_log2 = lbs - 4;  // stages per chunk, log2
  const int n_stages = n_chunks << spc_log2;
  const int my_stages = n_stages > warp ? (n_stages - 1 - warp) / kDecodeWarps + 1 : 0;
  uint4* my_ring = ring + warp * (PIPE * 2 * SC);

  auto stage_tok0 = [&](int j, int* chunk_local) {
    const int s = warp + j * kDecodeWarps;
    *chunk_local = s >> spc_log2;
    return (s_blocks[*chunk_local] << lbs) + ((s & ((1 << spc_log2) - 1)) << 4);
  };
  auto issue = [&](int j) {
    if (j < my_stages) {
      int chunk_local;
      const int tok0 = stage_tok0(j, &chunk_local);
      uint4* slot = my_ring + (j % PIPE) * (2 * SC);
#pragma unroll
      for (int i = 0; i < CPL; ++i) {
        const int ci = lane + 32 * i, r = ci / CPR, c = ci % CPR;
        const int pos = tok0 + r;
        const bool ok = pos < L;
        int64_t k_offset, v_offset;
        rows.Offsets(ok ? pos : 0, &k_offset, &v_offset);
        uint4* dst = slot + r * CPR + (c ^ (r & 7));
        CpAsync16(dst, rows.k + k_offset + c * 8, ok ? 16 : 0);
        if (values) CpAsync16(dst + SC, rows.v + v_offset + c * 8, ok ? 16 : 0);
      }
    }
    CpAsyncCommit();
  };

  float m = -INFINITY, l = 0.f;
  float o[NT][4];
#pragma unroll
  for (int nd = 0; nd < NT; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;

#pragma unroll
  for (int j = 0; j < PIPE - 1; ++j) issue(j);

  const int mi = lane >> 3, ri = lane & 7;  // ldmatrix: which matrix this lane addresses, and its row
#pragma unroll 1
  for (int j = 0; j < my_stages; ++j) {
    CpAsyncWait<PIPE - 2>();
    __syncwarp();
    const uint4* ks_ = my_ring + (j % PIPE) * (2 * SC);
    const uint4* vs_ = ks_ + SC;
    int chunk_local;
    const int tok0 = stage_tok0(j, &chunk_local);

    // Scores of 16 tokens: n-tile 0 = tokens 0..7, n-tile 1 = tokens 8..15.
    float sacc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      uint32_t bk[4];
      const int tok = (mi >> 1) * 8 + ri, ch = 2 * ks + (mi & 1);
      LdMatrixX4(bk, ks_ + tok * CPR + (ch ^ (tok & 7)));
      MmaBf16(sacc[0], qa[ks][0], 0u, qa[ks][1], 0u, bk[0], bk[1]);
      MmaBf16(sacc[1], qa[ks][0], 0u, qa[ks][1], 0u, bk[2], bk[3]);
    }
    float x[4];
    bool ok[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[i] = sacc[i >> 1][i & 1];  // row grp, token (i >> 1) * 8 + 2 qd + (i & 1)
      ok[i] = tok0 + (i >> 1) * 8 + 2 * qd + (i & 1) < L;
    }
    if (scoring) {
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = row_ok ? x[i] : 0.f;
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) {
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
      }
      float bm = -INFINITY;
#pragma unroll
      for (int i = 0; i < 4; ++i) bm = ok[i] ? fmaxf(bm, v[i]) : bm;
      bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 1));
      bm = fmaxf(bm, __shfl_xor_sync(0xffffffffu, bm, 2));
      if (lane == 0 && bm > -INFINITY) atomicMax(&s_bmax[chunk_local], OrderedKey(bm * (1.f / G)));
    }
    float mx = m;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[i] = ok[i] ? x[i] * p.scale_log2 : -INFINITY;
      mx = fmaxf(mx, x[i]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float base = mx == -INFINITY ? 0.f : mx;
    const float corr = FastExp2(m - base);
    m = mx;
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = FastExp2(x[i] - base);
    l = fmaf(l, corr, (x[0] + x[1]) + (x[2] + x[3]));
#pragma unroll
    for (int nd = 0; nd < NT; ++nd) {
      o[nd][0] *= corr;
      o[nd][1] *= corr;
    }
    if (values) {
      const uint32_t pa0 = PackBf16x2(x[0], x[1]), pa2 = PackBf16x2(x[2], x[3]);
#pragma unroll
      for (int nd2 = 0; nd2 < NT / 2; ++nd2) {
        uint32_t bv[4];
        const int tok = (mi & 1) * 8 + ri, ch = 2 * nd2 + (mi >> 1);
        LdMatrixX4Trans(bv, vs_ + tok * CPR + (ch ^ (tok & 7)));
        MmaBf16(o[2 * nd2], pa0, 0u, pa2, 0u, bv[0], bv[1]);
        MmaBf16(o[2 * nd2 + 1], pa0, 0u, pa2, 0u, bv[2], bv[3]);
      }
    }
    __syncwarp();
    issue(j + PIPE - 1);
  }
  CpAsyncWait<0>();
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);

  LaunchDependents();
  __syncthreads();  // every warp is done with the ring: reuse it for the cross-warp merge
  float* red_o = reinterpret_cast<float*>(ring);  // [warps][G][D]
  float* red_m = red_o + kDecodeWarps * G * D;    // [warps][G]
  float* red_l = red_m + kDecodeWarps * G;
  if (row_ok) {
#pragma unroll
    for (int nd = 0; nd < NT; ++nd) {
      *reinterpret_cast<float2*>(red_o + (warp * G + grp) * D + nd * 8 + 2 * qd) = make_float2(o[nd][0], o[nd][1]);
    }
    if (qd == 0) {
      red_m[warp * G + grp] = m;
      red_l[warp * G + grp] = l;
    }
  }
  __syncthreads();
  StoreItemResult<D, G>(p, red_o, red_m, red_l, b, h, flags, out_index, n_chunks, score_offset, s_blocks, s_bmax);
}

// Second kernel: CTAs [0, num_merge * G) merge the split partials of one query head each;
// CTAs after them select the blocks of one retrieval (sequence, KV head) each.
template <int D>
__global__ void __launch_bounds__(kPostThreads) HybridPostKernel(const DecodeParams p, int group) {
  constexpr int kWarps = kPostThreads / 32;
  constexpr int DPL = D / 32;  // floats per lane
  WaitPrerequisites();
  const int n_merge_ctas = __ldg(p.counts + 1) * group;
  if (static_cast<int>(blockIdx.x) >= n_merge_ctas) {
    // Launched at a fixed capacity: CTAs past the plan's selections have nothing to do.
    if (static_cast<int>(blockIdx.x) - n_merge_ctas >= __ldg(p.counts + 2)) return;
    const int4 it = p.selects[blockIdx.x - n_merge_ctas];  // batch, kv_head, length, score_offset
    SelectBlocksCta<kPostThreads>(p.scores + it.w, it.z, p.select,
                                  p.sel_indices + it.x * p.sel_batch_stride + it.y * p.sel_head_stride,
                                  p.sel_counts + it.x * p.sel_count_batch_stride + it.y);
    return;
  }
  __shared__ float s_m[kWarps], s_l[kWarps];
  __shared__ __align__(16) float s_o[kWarps][D];
  const int4 mi = p.merges[blockIdx.x / group];  // batch, kv_head, first_partial, num_splits
  const int g = blockIdx.x % group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float mx = -INFINITY, sum = 0.f, acc[DPL];
#pragma unroll
  for (int e = 0; e < DPL; ++e) acc[e] = 0.f;
  // Batches of kBatch splits per warp, all loads of a batch in flight before any use.
  constexpr int kBatch = 16;
  for (int i0 = warp; i0 < mi.w; i0 += kWarps * kBatch) {
    float2 ml[kBatch];
    float x[kBatch][DPL];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = i0 + k * kWarps;
      ml[k] = make_float2(-INFINITY, 0.f);
#pragma unroll
      for (int e = 0; e < DPL; ++e) x[k][e] = 0.f;
      if (i < mi.w) {
        const int64_t part = static_cast<int64_t>(mi.z + i) * group + g;
        ml[k] = p.partial_ml[part];
        if constexpr (DPL == 4) {
          const float4 v = *reinterpret_cast<const float4*>(p.partial_o + part * D + lane * 4);
          x[k][0] = v.x, x[k][1] = v.y, x[k][2] = v.z, x[k][3] = v.w;
        } else {
          const float2 v = *reinterpret_cast<const float2*>(p.partial_o + part * D + lane * 2);
          x[k][0] = v.x, x[k][1] = v.y;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const float mn = fmaxf(mx, ml[k].x);
      const float base = mn == -INFINITY ? 0.f : mn;
      const float a = FastExp2(mx - base), c = FastExp2(ml[k].x - base);
      sum = sum * a + ml[k].y * c;
#pragma unroll
      for (int e = 0; e < DPL; ++e) acc[e] = acc[e] * a + x[k][e] * c;
      mx = mn;
    }
  }
#pragma unroll
  for (int e = 0; e < DPL; ++e) s_o[warp][lane * DPL + e] = acc[e];
  if (lane == 0) {
    s_m[warp] = mx;
    s_l[warp] = sum;
  }
  __syncthreads();
  float m_all = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_m[w]);
  const float base = m_all == -INFINITY ? 0.f : m_all;
  float factor[kWarps], total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    factor[w] = FastExp2(s_m[w] - base);
    total = fmaf(s_l[w], factor[w], total);
  }
  for (int d = threadIdx.x; d < D; d += kPostThreads) {
    float value = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) value = fmaf(s_o[w][d], factor[w], value);
    p.out[mi.x * p.out_batch_stride + (mi.y * group + g) * p.out_head_stride + d] =
        __float2bfloat16_rn(total > 0.f ? value / total : 0.f);
  }
  if (p.lse != nullptr && threadIdx.x == 0)
    p.lse[mi.x * p.lse_batch_stride + mi.y * group + g] = LogSumExp2(m_all, total);
}

}  // namespace device
}  // namespace cuda
}  // namespace lychee
