// Fused kernels of the model's decode step (host API and rounding rules in model_kernels.h) and
// their launchers. Every bf16 result is rounded where LibTorch's op-by-op step rounds it: a bf16
// elementwise op computes in float32 and rounds its result once; Model::RmsNorm computes the
// normalised row in float32 and rounds it before the weight. The accurate math functions (expf,
// cosf, sinf, rsqrtf, IEEE division) are the ones LibTorch's CUDA kernels call; this file must not
// be built with --use_fast_math.
#include "common/model/cuda/model_kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/model/cuda/bf16.cuh"
#include "common/model/cuda/dependent_launch.cuh"

namespace lychee {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;
using device::LaunchDependents;
using device::MmaBf16;
using device::WaitPrerequisites;

// ---- helpers ---------------------------------------------------------------------------------------

// A float rounded to the nearest bf16 (ties to even), as a float.
__device__ __forceinline__ float RoundBf16(float f) { return __bfloat162float(__float2bfloat16_rn(f)); }

// 16-byte load of data that nothing writes during the kernel, through the read-only path.
__device__ __forceinline__ uint4 LoadConst16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// 16-byte load of streamed data read once (a weight): not kept in L1, so that what is reused stays.
__device__ __forceinline__ uint4 LoadStream16(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The sum of v over the CTA, returned to every thread (all warps reduce the same partials in the
// same order, so every thread gets the same bits). `scratch` holds one float per warp.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpSum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  return WarpSum(lane < warps ? scratch[lane] : 0.f);
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---- AddRmsNorm --------------------------------------------------------------------------------------

// One CTA per row; thread i holds the 16-byte vectors i, i + blockDim.x, ... (VPT of them) of the
// row in registers between the two passes.
template <int VPT>
__global__ void __launch_bounds__(1024) AddRmsNormKernel(const bf16* x, int64_t x_stride, bf16* residual,
                                                         int64_t residual_stride, const bf16* __restrict__ weight,
                                                         float eps, float inv_hidden, int nvec, bf16* out,
                                                         int64_t out_stride) {
  __shared__ float scratch[32];
  LaunchDependents();
  WaitPrerequisites();
  const int64_t row = blockIdx.x;
  uint4* res = reinterpret_cast<uint4*>(residual + row * residual_stride);
  const uint4* xs = x != nullptr ? reinterpret_cast<const uint4*>(x + row * x_stride) : nullptr;
  uint4* outs = reinterpret_cast<uint4*>(out + row * out_stride);

  // Every load first, so that they are all in flight together.
  uint4 rv[VPT], xv[VPT], wv[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      rv[i] = res[idx];
      if (xs != nullptr) xv[i] = xs[idx];
      wv[i] = LoadConst16(weight + 8 * idx);
    }
  }
  float v[VPT][8];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      device::Bf16x8ToFloat(rv[i], v[i]);
      if (xs != nullptr) {
        float xf[8];
        device::Bf16x8ToFloat(xv[i], xf);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[i][e] = RoundBf16(v[i][e] + xf[e]);  // hidden = hidden + x, in bf16
        res[idx] = device::FloatToBf16x8(v[i]);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) sum_sq += v[i][e] * v[i][e];
    }
  }
  // mean as at::mean computes it: the float32 sum times 1 / hidden; eps added in float32.
  const float scale = rsqrtf(BlockSum(sum_sq, scratch) * inv_hidden + eps);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      float wf[8], o[8];
      device::Bf16x8ToFloat(wv[i], wf);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = wf[e] * RoundBf16(v[i][e] * scale);  // weight * normed.to(bf16)
      outs[idx] = device::FloatToBf16x8(o);
    }
  }
}

// ---- RopeAppend ------------------------------------------------------------------------------------

constexpr int kRopeWarps = 4;  // heads per CTA, one warp each

// grid (ceil(heads / kRopeWarps), rows). The CTA's first D/2 threads compute the row's bf16 cos and
// sin into shared memory; then each warp takes one head of the row: lane l holds the elements
// j = l + 32 e (e < E) of the first half and j + D/2 of the second, coalesced 2-byte accesses.
template <int E>
__global__ void __launch_bounds__(kRopeWarps * 32) RopeAppendKernel(const RopeAppendArgs a) {
  __shared__ float cos_s[kMaxRopeHeadDim / 2], sin_s[kMaxRopeHeadDim / 2];
  LaunchDependents();
  WaitPrerequisites();
  const int row = blockIdx.y;
  const int half = a.head_dim / 2;
  if (threadIdx.x < half) {
    // As Model::RopeCosSin: float(position) * inv_freq in float32, cos and sin in float32, to bf16.
    const float angle = static_cast<float>(a.positions[row]) * a.inv_freq[threadIdx.x];
    cos_s[threadIdx.x] = RoundBf16(cosf(angle));
    sin_s[threadIdx.x] = RoundBf16(sinf(angle));
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int head = blockIdx.x * kRopeWarps + warp;
  const int num_heads = a.num_q_heads + 2 * a.num_kv_heads;
  const bf16* src = static_cast<const bf16*>(a.qkv) + row * a.qkv_stride + static_cast<int64_t>(head) * a.head_dim;
  float lo[E], hi[E];
  if (head < num_heads) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int j = lane + 32 * e;
      lo[e] = j < half ? __bfloat162float(src[j]) : 0.f;
      hi[e] = j < half ? __bfloat162float(src[j + half]) : 0.f;
    }
  }
  __syncthreads();  // cos_s and sin_s; no thread returns before it
  if (head >= num_heads) return;

  const bool is_q = head < a.num_q_heads;
  const bool is_v = head >= a.num_q_heads + a.num_kv_heads;
  bf16* dst;
  if (is_q) {
    dst = static_cast<bf16*>(a.q_out) + row * a.q_out_stride + static_cast<int64_t>(head) * a.head_dim;
  } else {
    const int slot = a.slots[row];
    if (slot < 0 || slot >= a.pool_tokens) return;  // outside the pool: nothing is written
    const int kv_head = is_v ? head - a.num_q_heads - a.num_kv_heads : head - a.num_q_heads;
    dst = static_cast<bf16*>(is_v ? a.v_pool : a.k_pool) +
          (static_cast<int64_t>(kv_head) * a.pool_tokens + slot) * a.head_dim;
  }
  if (is_v) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int j = lane + 32 * e;
      if (j < half) {
        dst[j] = __float2bfloat16_rn(lo[e]);  // exact: lo and hi hold bf16 values
        dst[j + half] = __float2bfloat16_rn(hi[e]);
      }
    }
    return;
  }
  const bf16* norm = static_cast<const bf16*>(is_q ? a.q_norm : a.k_norm);
  if (norm != nullptr) {
    // Model::RmsNorm over the head's D elements (Qwen3's q_norm / k_norm).
    float sum_sq = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) sum_sq += lo[e] * lo[e] + hi[e] * hi[e];
    const float scale = rsqrtf(WarpSum(sum_sq) * (1.f / static_cast<float>(a.head_dim)) + a.eps);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int j = lane + 32 * e;
      if (j < half) {
        lo[e] = RoundBf16(__bfloat162float(norm[j]) * RoundBf16(lo[e] * scale));
        hi[e] = RoundBf16(__bfloat162float(norm[j + half]) * RoundBf16(hi[e] * scale));
      }
    }
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int j = lane + 32 * e;
    if (j < half) {
      // q * cos + rotate_half(q) * sin, each product and the sum rounded to bf16; the cos and sin
      // of element j + D/2 are those of j.
      const float c = cos_s[j], s = sin_s[j];
      const float out_lo = RoundBf16(lo[e] * c) + RoundBf16(-hi[e] * s);
      const float out_hi = RoundBf16(hi[e] * c) + RoundBf16(lo[e] * s);
      dst[j] = __float2bfloat16_rn(out_lo);
      dst[j + half] = __float2bfloat16_rn(out_hi);
    }
  }
}

// ---- SiluMul ---------------------------------------------------------------------------------------

constexpr int kSiluThreads = 128;

// One 16-byte vector of 8 outputs per thread and step, grid-stride.
__global__ void __launch_bounds__(kSiluThreads) SiluMulKernel(const bf16* __restrict__ gate_up, int64_t gate_up_stride,
                                                              int rows, int inter, bf16* __restrict__ out,
                                                              int64_t out_stride) {
  LaunchDependents();
  WaitPrerequisites();
  const int vec_per_row = inter / 8;
  const int64_t total = static_cast<int64_t>(rows) * vec_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / vec_per_row;
    const int c = static_cast<int>(i - r * vec_per_row) * 8;
    const bf16* src = gate_up + r * gate_up_stride + c;
    float g[8], u[8], o[8];
    device::Bf16x8ToFloat(LoadConst16(src), g);
    device::Bf16x8ToFloat(LoadConst16(src + inter), u);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      // at::silu in float32 (x / (1 + exp(-x)), IEEE division), rounded; then the bf16 product.
      o[e] = RoundBf16(g[e] / (1.f + expf(-g[e]))) * u[e];
    }
    *reinterpret_cast<uint4*>(out + r * out_stride + c) = device::FloatToBf16x8(o);
  }
}

// ---- ArgmaxRows ------------------------------------------------------------------------------------

constexpr int kArgmaxThreads = 1024;
constexpr int kArgmaxUnroll = 4;  // float4 loads in flight per thread

// Whether (v, i) comes before (best, best_i) in at::argmax's order: NaN above everything, then the
// larger value, then the lower index.
__device__ __forceinline__ bool ArgmaxBetter(float v, int i, float best, int best_i) {
  if (isnan(v)) return !isnan(best) || i < best_i;
  if (isnan(best)) return false;
  return v > best || (v == best && i < best_i);
}

__global__ void __launch_bounds__(kArgmaxThreads) ArgmaxRowsKernel(const float* __restrict__ logits, int64_t stride,
                                                                   int vocab, int32_t* __restrict__ out) {
  __shared__ float best_s[kArgmaxThreads / 32];
  __shared__ int index_s[kArgmaxThreads / 32];
  const float* p = logits + blockIdx.x * stride;
  float best = -INFINITY;
  int best_i = INT_MAX;
  const int nvec = vocab / 4;
  const float4* p4 = reinterpret_cast<const float4*>(p);
  for (int base = threadIdx.x; base < nvec; base += kArgmaxThreads * kArgmaxUnroll) {
    float4 v[kArgmaxUnroll];
#pragma unroll
    for (int u = 0; u < kArgmaxUnroll; ++u) {
      const int idx = base + u * kArgmaxThreads;
      v[u] = idx < nvec ? __ldg(p4 + idx) : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    }
#pragma unroll
    for (int u = 0; u < kArgmaxUnroll; ++u) {
      const int i = 4 * (base + u * kArgmaxThreads);  // past the end only with -inf, which never wins
      if (ArgmaxBetter(v[u].x, i, best, best_i)) best = v[u].x, best_i = i;
      if (ArgmaxBetter(v[u].y, i + 1, best, best_i)) best = v[u].y, best_i = i + 1;
      if (ArgmaxBetter(v[u].z, i + 2, best, best_i)) best = v[u].z, best_i = i + 2;
      if (ArgmaxBetter(v[u].w, i + 3, best, best_i)) best = v[u].w, best_i = i + 3;
    }
  }
  for (int i = 4 * nvec + threadIdx.x; i < vocab; i += kArgmaxThreads) {
    if (ArgmaxBetter(p[i], i, best, best_i)) best = p[i], best_i = i;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, off);
    const int oi = __shfl_xor_sync(0xffffffffu, best_i, off);
    if (ArgmaxBetter(ov, oi, best, best_i)) best = ov, best_i = oi;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) best_s[warp] = best, index_s[warp] = best_i;
  __syncthreads();
  if (warp != 0) return;
  best = best_s[lane];
  best_i = index_s[lane];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, off);
    const int oi = __shfl_xor_sync(0xffffffffu, best_i, off);
    if (ArgmaxBetter(ov, oi, best, best_i)) best = ov, best_i = oi;
  }
  // An index past the end (vocab < 1 cannot reach here) only if every element was -inf and lost to
  // the initial -inf: then the first element is the answer.
  if (lane == 0) out[blockIdx.x] = best_i < vocab ? best_i : 0;
}

// ---- Gemv ------------------------------------------------------------------------------------------

constexpr int kGemvWarps = 8;   // warps of a CTA, which split k
constexpr int kGemvUnroll = 4;  // 32-wide k blocks per warp and step: 2 weight + 1 x 16-byte loads each

// A CTA computes the 16 outputs n0 .. n0 + 15 of every row as one m16n8k16 tile, D[m][r] =
// sum_k w[n0 + m][k] * x[r][k] (weight rows as M, the rows of x as N, padded to 8). Lane (g, t) =
// (lane / 4, lane % 4) loads 16 bytes, k = 32 b + 8 t .. + 8, of weight rows n0 + g and n0 + g + 8
// and of x row g, for 32-wide k blocks b; a block is two mma steps s, and step s gives the lane's
// k 8t + 4s + {0, 1} to the fragment slots 2t, 2t + 1 and 8t + 4s + {2, 3} to 2t + 8, 2t + 9, in A
// and in B alike (a sum over k does not care which slot holds which k). So every load is a plain
// 16-byte vector and the fragments are its words: step s uses words 2s, 2s + 1.
// The CTA's warps take the k blocks in turns of kGemvUnroll consecutive blocks and sum their tiles
// through shared memory at the end.
template <int ROWS>
__global__ void __launch_bounds__(kGemvWarps * 32)
    GemvKernel(const bf16* __restrict__ x, int64_t x_stride, const bf16* __restrict__ w, int64_t w_stride,
               const bf16* residual, int64_t residual_stride, int n, int k, bf16* y, int64_t y_stride,
               uint32_t prefetch_row_bytes) {
  __shared__ float partial[kGemvWarps][32][4];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 16;
  // The weight is no kernel's output: while the previous kernel finishes, bring the start of this
  // CTA's rows (what its warps read first) into L2.
  if (prefetch_row_bytes > 0 && threadIdx.x < 16 && n0 + static_cast<int>(threadIdx.x) < n) {
    device::PrefetchL2(w + static_cast<int64_t>(n0 + threadIdx.x) * w_stride, prefetch_row_bytes);
  }
  LaunchDependents();
  WaitPrerequisites();
  // Weight rows past n are read clamped and their outputs dropped; x rows past ROWS likewise.
  const bf16* wa = w + static_cast<int64_t>(min(n0 + g, n - 1)) * w_stride + 8 * t;
  const bf16* wb = w + static_cast<int64_t>(min(n0 + g + 8, n - 1)) * w_stride + 8 * t;
  const bf16* xr = x + static_cast<int64_t>(min(g, ROWS - 1)) * x_stride + 8 * t;
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  // Steps whose blocks lie wholly inside k run without bounds checks; a warp has at most one step
  // past them (blocks - full <= 1 < kGemvWarps * kGemvUnroll - kGemvUnroll), checked per lane.
  const int blocks = (k + 31) / 32, full = k / 32;
  int b0 = warp * kGemvUnroll;
  for (; b0 + kGemvUnroll <= full; b0 += kGemvWarps * kGemvUnroll) {
    uint4 va[kGemvUnroll], vb[kGemvUnroll], vx[kGemvUnroll];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int off = (b0 + u) * 32;
      va[u] = LoadStream16(wa + off);
      vb[u] = LoadStream16(wb + off);
      vx[u] = LoadConst16(xr + off);
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      MmaBf16(c, va[u].x, vb[u].x, va[u].y, vb[u].y, vx[u].x, vx[u].y);
      MmaBf16(c, va[u].z, vb[u].z, va[u].w, vb[u].w, vx[u].z, vx[u].w);
    }
  }
  if (b0 < blocks) {
    uint4 va[kGemvUnroll], vb[kGemvUnroll], vx[kGemvUnroll];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int off = (b0 + u) * 32;
      if (off + 8 * t < k) {
        va[u] = LoadStream16(wa + off);
        vb[u] = LoadStream16(wb + off);
        vx[u] = LoadConst16(xr + off);
      } else {
        va[u] = vb[u] = vx[u] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      MmaBf16(c, va[u].x, vb[u].x, va[u].y, vb[u].y, vx[u].x, vx[u].y);
      MmaBf16(c, va[u].z, vb[u].z, va[u].w, vb[u].w, vx[u].z, vx[u].w);
    }
  }
  // c = D[g][2t], D[g][2t + 1], D[g + 8][2t], D[g + 8][2t + 1].
#pragma unroll
  for (int j = 0; j < 4; ++j) partial[warp][lane][j] = c[j];
  __syncthreads();
  if (threadIdx.x >= 128) return;
  const int src_lane = threadIdx.x >> 2, j = threadIdx.x & 3;
  const int r = 2 * (src_lane & 3) + (j & 1);
  const int col = n0 + (src_lane >> 2) + 8 * (j >> 1);
  if (r >= ROWS || col >= n) return;
  float acc = 0.f;
#pragma unroll
  for (int wp = 0; wp < kGemvWarps; ++wp) acc += partial[wp][src_lane][j];
  if (residual != nullptr) acc += __bfloat162float(residual[r * residual_stride + col]);
  y[r * y_stride + col] = __float2bfloat16_rn(acc);
}

// What an overlapped GEMV prefetches into L2 in all, of its weight rows' first bytes: enough to keep
// memory busy through the previous kernel's tail, a fraction of L2 (50 MB on the H100) so that it
// stays there until read. On the H100 (e2e_bench, 8B shape, batch 1) 16 MiB took 0.03-0.12 ms off
// a step against none, and 64 MiB added 0.1-0.2 ms.
constexpr int64_t kGemvPrefetchBytes = 16 << 20;

template <int ROWS>
cudaError_t LaunchGemvRows(const bf16* x, int64_t x_stride, const bf16* w, int64_t w_stride, const bf16* residual,
                           int64_t residual_stride, int n, int k, bf16* y, int64_t y_stride, cudaStream_t stream,
                           bool overlap_previous) {
  // Whole 128-byte lines of each row, none when the share of a row is under one line.
  const int64_t share = std::min<int64_t>(2 * static_cast<int64_t>(k), kGemvPrefetchBytes / n) / 128 * 128;
  const auto prefetch_row_bytes = static_cast<uint32_t>(overlap_previous ? share : 0);
  return LaunchKernel(GemvKernel<ROWS>, dim3((n + 15) / 16), dim3(kGemvWarps * 32), 0, stream, overlap_previous, x,
                      x_stride, w, w_stride, residual, residual_stride, n, k, y, y_stride, prefetch_row_bytes);
}

}  // namespace

cudaError_t LaunchAddRmsNorm(const void* x, int64_t x_stride, void* residual, int64_t residual_stride,
                             const void* weight, float eps, int rows, int hidden, void* out, int64_t out_stride,
                             cudaStream_t stream, bool overlap_previous) {
  if (residual == nullptr || weight == nullptr || out == nullptr || rows < 0 || hidden < 8 || hidden % 8 != 0 ||
      hidden > kMaxRmsNormWidth || !Aligned16(residual) || !Aligned16(weight) || !Aligned16(out) ||
      residual_stride % 8 != 0 || out_stride % 8 != 0 || (x != nullptr && (!Aligned16(x) || x_stride % 8 != 0)) ||
      out == residual) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int nvec = hidden / 8;
  // About 512 threads a row (1024 past 16384 wide): vectors per thread 1, 2 or 4. Four are the most
  // that fit the 64 registers a 1024-thread CTA leaves each thread.
  const int vpt = nvec <= 512 ? 1 : nvec <= 1024 ? 2 : 4;
  const int threads = ((nvec + vpt - 1) / vpt + 31) / 32 * 32;
  const float inv_hidden = 1.f / static_cast<float>(hidden);
  const auto* xs = static_cast<const bf16*>(x);
  auto* res = static_cast<bf16*>(residual);
  const auto* ws = static_cast<const bf16*>(weight);
  auto* os = static_cast<bf16*>(out);
  const auto kernel = vpt == 1 ? AddRmsNormKernel<1> : vpt == 2 ? AddRmsNormKernel<2> : AddRmsNormKernel<4>;
  return LaunchKernel(kernel, dim3(rows), dim3(threads), 0, stream, overlap_previous, xs, x_stride, res,
                      residual_stride, ws, eps, inv_hidden, nvec, os, out_stride);
}

cudaError_t LaunchRopeAppend(const RopeAppendArgs& a, cudaStream_t stream, bool overlap_previous) {
  if (a.qkv == nullptr || a.positions == nullptr || a.inv_freq == nullptr || a.q_out == nullptr ||
      a.k_pool == nullptr || a.v_pool == nullptr || a.slots == nullptr || a.rows < 0 || a.num_q_heads < 1 ||
      a.num_kv_heads < 1 || a.head_dim < 2 || a.head_dim % 2 != 0 || a.head_dim > kMaxRopeHeadDim ||
      (a.q_norm == nullptr) != (a.k_norm == nullptr) || a.pool_tokens < 0 || a.pool_tokens > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  if (a.rows == 0) return cudaSuccess;
  const int num_heads = a.num_q_heads + 2 * a.num_kv_heads;
  const dim3 grid((num_heads + kRopeWarps - 1) / kRopeWarps, a.rows);
  const int half = a.head_dim / 2;
  const auto kernel = half <= 32 ? RopeAppendKernel<1> : half <= 64 ? RopeAppendKernel<2> : RopeAppendKernel<4>;
  return LaunchKernel(kernel, grid, dim3(kRopeWarps * 32), 0, stream, overlap_previous, a);
}

cudaError_t LaunchSiluMul(const void* gate_up, int64_t gate_up_stride, int rows, int inter, void* out,
                          int64_t out_stride, cudaStream_t stream, bool overlap_previous) {
  if (gate_up == nullptr || out == nullptr || rows < 0 || inter < 8 || inter % 8 != 0 || !Aligned16(gate_up) ||
      !Aligned16(out) || gate_up_stride % 8 != 0 || out_stride % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int64_t total = static_cast<int64_t>(rows) * (inter / 8);
  const int64_t blocks = std::min<int64_t>((total + kSiluThreads - 1) / kSiluThreads, int64_t{1} << 20);
  return LaunchKernel(SiluMulKernel, dim3(static_cast<unsigned>(blocks)), dim3(kSiluThreads), 0, stream,
                      overlap_previous, static_cast<const bf16*>(gate_up), gate_up_stride, rows, inter,
                      static_cast<bf16*>(out), out_stride);
}

cudaError_t LaunchArgmaxRows(const float* logits, int64_t stride, int rows, int vocab, int32_t* out,
                             cudaStream_t stream) {
  if (logits == nullptr || out == nullptr || rows < 0 || vocab < 1 || !Aligned16(logits) || stride % 4 != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  ArgmaxRowsKernel<<<rows, kArgmaxThreads, 0, stream>>>(logits, stride, vocab, out);
  return cudaGetLastError();
}

// LaunchGemvRows<rows> at rows - 1.
constexpr decltype(&LaunchGemvRows<1>) kGemvLaunchers[kMaxGemvRows] = {
    LaunchGemvRows<1>, LaunchGemvRows<2>, LaunchGemvRows<3>, LaunchGemvRows<4>,
    LaunchGemvRows<5>, LaunchGemvRows<6>, LaunchGemvRows<7>, LaunchGemvRows<8>};

cudaError_t LaunchGemv(const void* x, int64_t x_stride, const void* w, int64_t w_stride, const void* residual,
                       int64_t residual_stride, int rows, int n, int k, void* y, int64_t y_stride, cudaStream_t stream,
                       bool overlap_previous) {
  if (x == nullptr || w == nullptr || y == nullptr || rows < 0 || n < 1 || k < 8 || k % 8 != 0 || !Aligned16(x) ||
      !Aligned16(w) || x_stride % 8 != 0 || w_stride % 8 != 0 || w_stride < k) {
    return cudaErrorInvalidValue;
  }
  for (int r0 = 0; r0 < rows; r0 += kMaxGemvRows) {
    const int chunk = std::min(kMaxGemvRows, rows - r0);
    const auto* xs = static_cast<const bf16*>(x) + r0 * x_stride;
    const auto* ws = static_cast<const bf16*>(w);
    const auto* rs = residual != nullptr ? static_cast<const bf16*>(residual) + r0 * residual_stride : nullptr;
    auto* ys = static_cast<bf16*>(y) + r0 * y_stride;
    const cudaError_t err = kGemvLaunchers[chunk - 1](xs, x_stride, ws, w_stride, rs, residual_stride, n, k, ys,
                                                      y_stride, stream, overlap_previous);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace lychee
