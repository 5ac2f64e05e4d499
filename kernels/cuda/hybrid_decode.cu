// Host launchers of the hybrid decode kernels: argument checks that need no device access,
// workspace layout, dispatch on head_dim (the per-head-dim units instantiate the kernels).
#include <cmath>
#include <cstdint>

#include "kernels/cuda/block_topk.cuh"
#include "kernels/cuda/hybrid_decode.h"
#include "kernels/cuda/hybrid_decode_launch.cuh"

namespace lychee {
namespace cuda {
namespace {

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

cudaError_t LaunchHybridDecode(const HybridDecodeArgs& a, const HybridPlan& plan, const HybridDecodeShape& shape,
                               const BlockSelectionConfig& config, cudaStream_t stream) {
  if (shape.num_kv_heads < 1 || shape.num_q_heads % shape.num_kv_heads != 0) return cudaErrorInvalidValue;
  const int group = shape.num_q_heads / shape.num_kv_heads;
  if (group < 1 || group > 8 || (shape.head_dim != 64 && shape.head_dim != 128)) return cudaErrorInvalidValue;
  const PlanCapacity& room = plan.capacity;
  const int main_ctas = a.launch_capacity ? room.work : plan.num_work;
  const int post_ctas = a.launch_capacity ? room.merge * group + room.select : plan.num_merge * group + plan.num_select;
  if (main_ctas == 0) return cudaSuccess;
  if (a.q == nullptr || a.out == nullptr || a.plan == nullptr || !Aligned16(a.plan)) return cudaErrorInvalidValue;
  if ((a.k_ptrs == nullptr) != (a.v_ptrs == nullptr)) return cudaErrorInvalidValue;
  if (a.k_ptrs == nullptr && (a.k == nullptr || a.v == nullptr)) return cudaErrorInvalidValue;
  if (a.page_table != nullptr &&
      (a.k_ptrs != nullptr || a.page_size < 16 || (a.page_size & (a.page_size - 1)) != 0 || a.page_table_stride < 1)) {
    return cudaErrorInvalidValue;
  }
  // 16-byte vectors everywhere: pointers aligned, strides multiples of 8 elements.
  const int64_t strides[] = {a.q_batch_stride, a.q_head_stride, a.out_batch_stride, a.out_head_stride,
                             a.k_batch_stride, a.k_head_stride, a.k_token_stride,   a.v_batch_stride,
                             a.v_head_stride,  a.v_token_stride, a.k_page_stride,   a.v_page_stride};
  for (int64_t s : strides) {
    if (s % 8 != 0) return cudaErrorInvalidValue;
  }
  if (!Aligned16(a.q) || !Aligned16(a.out) || !Aligned16(a.k) || !Aligned16(a.v)) return cudaErrorInvalidValue;
  if (plan.reads_selection && a.sel_indices == nullptr) return cudaErrorInvalidValue;
  if (plan.num_select > 0 && a.sel_counts == nullptr) return cudaErrorInvalidValue;
  if ((plan.num_partials > 0 || plan.num_scores > 0) && a.workspace == nullptr) return cudaErrorInvalidValue;

  device::DecodeParams p = {};
  p.q = static_cast<const __nv_bfloat16*>(a.q);
  p.q_batch_stride = a.q_batch_stride;
  p.q_head_stride = a.q_head_stride;
  p.out = static_cast<__nv_bfloat16*>(a.out);
  p.out_batch_stride = a.out_batch_stride;
  p.out_head_stride = a.out_head_stride;
  p.k = static_cast<const __nv_bfloat16*>(a.k);
  p.v = static_cast<const __nv_bfloat16*>(a.v);
  p.k_ptrs = a.k_ptrs;
  p.v_ptrs = a.v_ptrs;
  p.k_head_strides = a.k_head_strides;
  p.v_head_strides = a.v_head_strides;
  p.k_batch_stride = a.k_batch_stride;
  p.k_head_stride = a.k_head_stride;
  p.k_token_stride = a.k_token_stride;
  p.v_batch_stride = a.v_batch_stride;
  p.v_head_stride = a.v_head_stride;
  p.v_token_stride = a.v_token_stride;
  p.page_table = a.page_table;
  p.page_table_stride = a.page_table_stride;
  p.log2_page_size = 0;
  while (a.page_table != nullptr && (1 << p.log2_page_size) < a.page_size) ++p.log2_page_size;
  p.k_page_stride = a.k_page_stride;
  p.v_page_stride = a.v_page_stride;
  p.sel_indices = a.sel_indices;
  p.sel_counts = a.sel_counts;
  p.sel_batch_stride = a.sel_batch_stride;
  p.sel_head_stride = a.sel_head_stride;
  p.sel_count_batch_stride = a.sel_count_batch_stride;
  p.lse = a.lse;
  p.lse_batch_stride = a.lse_batch_stride;

  const size_t partials = static_cast<size_t>(room.partials);
  auto align = [](uintptr_t x) { return (x + 255) & ~uintptr_t{255}; };
  uintptr_t ws = align(reinterpret_cast<uintptr_t>(a.workspace));
  p.partial_o = reinterpret_cast<float*>(ws);
  ws = align(ws + partials * group * shape.head_dim * sizeof(float));
  p.partial_ml = reinterpret_cast<float2*>(ws);
  ws = align(ws + partials * group * sizeof(float2));
  p.scores = reinterpret_cast<float*>(ws);

  p.counts = a.plan;
  p.work = reinterpret_cast<const int4*>(a.plan + kPlanHeaderWords);
  p.merges = reinterpret_cast<const int4*>(a.plan + plan.merge_offset());
  p.selects = reinterpret_cast<const int4*>(a.plan + plan.select_offset());
  p.main_ctas = main_ctas;
  p.select = device::ToSelectConfig(config);
  const double scale = a.scale > 0 ? a.scale : 1.0 / std::sqrt(static_cast<double>(shape.head_dim));
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  p.skip_post = a.skip_post_for_benchmark;
  p.kernel_variant = a.kernel_variant;
  return shape.head_dim == 64 ? device::LaunchDecode64(p, group, post_ctas, a.use_pdl, stream)
                              : device::LaunchDecode128(p, group, post_ctas, a.use_pdl, stream);
}

int HybridDecodeMaxCtasPerSm(int head_dim, int group) {
  if (head_dim == 64) return device::MaxCtasPerSm64(group);
  if (head_dim == 128) return device::MaxCtasPerSm128(group);
  return 0;
}

cudaError_t LaunchBlockSelect(const float* scores, const SelectItem* items, int num_items, int32_t* sel_indices,
                              int32_t* sel_counts, int64_t sel_batch_stride, int64_t sel_head_stride,
                              int64_t sel_count_batch_stride, const BlockSelectionConfig& config,
                              cudaStream_t stream) {
  if (num_items == 0) return cudaSuccess;
  if (scores == nullptr || items == nullptr || sel_indices == nullptr || sel_counts == nullptr) {
    return cudaErrorInvalidValue;
  }
  device::BlockSelectKernel<device::kPostThreads><<<num_items, device::kPostThreads, 0, stream>>>(
      scores, reinterpret_cast<const int4*>(items), device::ToSelectConfig(config), sel_indices, sel_counts,
      sel_batch_stride, sel_head_stride, sel_count_batch_stride);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lychee
