// Programmatic dependent launch (sm_90), shared by the model's kernels (common/model/cuda) and the
// attention kernels (kernels/cuda). A kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization
// may have its CTAs scheduled while the previous kernel of the stream still runs, as soon as every
// CTA of that kernel has called LaunchDependents (or exited). Such a kernel must call
// WaitPrerequisites in every CTA before it reads anything an earlier kernel wrote, or writes anything;
// before that it may only read data that no kernel of the stream writes (weights). Because each
// waits for its predecessor's completion, the order of the stream holds transitively. Device code
// only; every function is a no-op before sm_90.
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
}  // namespace cuda
}  // namespace lychee
