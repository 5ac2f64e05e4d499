// Programmatic dependent launch (sm_90), shared by the model's kernels (common/model/cuda) and the
// attention kernels (kernels/cuda). A kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization
// may have its CTAs scheduled while the previous kernel of the stream still runs, as soon as every
// CTA of that kernel has called LaunchDependents (or exited). Such a kernel must call
// WaitPrerequisites in every CTA before it reads anything an earlier kernel wrote, or writes anything;
// before that it may only read data that no kernel of the stream writes (weights). Because each
// waits for its predecessor's completion, the order of the stream holds transitively. The device
// functions are no-ops before sm_90; LaunchKernel makes such a launch from the host.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lychee {
namespace cuda {
namespace device {

// Lets the next kernel of the stream be scheduled once every CTA of this one has called this.
__device__ __forceinline__ void LaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Waits until the previous kernel of the stream has completed and its memory is visible.
__device__ __forceinline__ void WaitPrerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Starts bringing `bytes` (a multiple of 16) from global memory at `p` (16-byte aligned) into L2,
// without waiting and without registers or shared memory.
__device__ __forceinline__ void PrefetchL2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

}  // namespace device

// Launches `kernel`; with `overlap_previous`, as a programmatic dependent launch: `kernel` must
// then call WaitPrerequisites as described above. Host code.
template <typename... Params, typename... Args>
cudaError_t LaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                         cudaStream_t stream, bool overlap_previous, Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = dynamic_smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = overlap_previous ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

}  // namespace cuda
}  // namespace lychee
