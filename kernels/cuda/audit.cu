// The sampled audit's reduction (hybrid_decode.h, LaunchAuditDroppedMass): one warp per row.
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/hybrid_decode.h"

namespace lychee {
namespace cuda {
namespace device {
namespace {

__global__ void AuditDroppedMassKernel(const float* lse, const float* dense_lse, int64_t lse_batch_stride,
                                       int num_q_heads, int group, uint64_t sparse_kv_heads, double* const* targets) {
  double* target = targets[blockIdx.x];
  if (target == nullptr) return;
  const float* row = lse + blockIdx.x * lse_batch_stride;
  const float* dense_row = dense_lse + blockIdx.x * lse_batch_stride;
  float sum = 0.f, most = 0.f;
  for (int h = threadIdx.x; h < num_q_heads; h += 32) {
    if (((sparse_kv_heads >> (h / group)) & 1) == 0) continue;
    // The sparse head's positions are a subset of the dense twin's: lse <= dense_lse but for rounding.
    const float delta = fminf(1.f, fmaxf(0.f, 1.f - exp2f(row[h] - dense_row[h])));
    sum += delta;
    most = fmaxf(most, delta);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  most = WarpMax(most);
  if (threadIdx.x == 0) {
    atomicAdd(target, static_cast<double>(sum));
    // Non-negative doubles order as their bit patterns do.
    atomicMax(reinterpret_cast<unsigned long long*>(target + 1),
              static_cast<unsigned long long>(__double_as_longlong(static_cast<double>(most))));
  }
}

}  // namespace
}  // namespace device

cudaError_t LaunchAuditDroppedMass(const float* lse, const float* dense_lse, int64_t lse_batch_stride, int rows,
                                   int num_q_heads, int group, uint64_t sparse_kv_heads, double* const* targets,
                                   cudaStream_t stream) {
  if (rows == 0 || sparse_kv_heads == 0) return cudaSuccess;
  if (lse == nullptr || dense_lse == nullptr || targets == nullptr || group < 1 || num_q_heads % group != 0 ||
      num_q_heads / group > 64) {
    return cudaErrorInvalidValue;
  }
  device::AuditDroppedMassKernel<<<rows, 32, 0, stream>>>(lse, dense_lse, lse_batch_stride, num_q_heads, group,
                                                          sparse_kv_heads, targets);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lychee
