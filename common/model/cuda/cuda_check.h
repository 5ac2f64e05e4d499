// LYCHEE_CUDA_CHECK(call, what): checks a CUDA runtime call or kernel launcher that returns a
// cudaError_t, in the LibTorch entry points of the CUDA kernels. A failure throws from TORCH_CHECK
// with what was attempted, the call as written, file:line, and the error's name and description,
// not a bare code; cudaErrorMemoryAllocation throws c10::OutOfMemoryError, so that the engine fails
// the step's requests with RESOURCE_EXHAUSTED rather than INTERNAL (common/model/torch_errors.h).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <string>

namespace lychee::cuda {

// "CUDA check failed: <what>: <call> at <file>:<line>: cudaErrorInvalidValue (invalid argument)".
inline std::string CudaFailure(cudaError_t error, const char* what, const char* call, const char* file, int line) {
  return std::string("CUDA check failed: ") + what + ": " + call + " at " + file + ":" + std::to_string(line) + ": " +
         cudaGetErrorName(error) + " (" + cudaGetErrorString(error) + ")";
}

}  // namespace lychee::cuda

#define LYCHEE_CUDA_CHECK(call, what)                                                                          \
  do {                                                                                                         \
    const cudaError_t lychee_cuda_error = (call);                                                              \
    if (lychee_cuda_error != cudaSuccess) {                                                                    \
      const std::string lychee_cuda_failure =                                                                  \
          ::lychee::cuda::CudaFailure(lychee_cuda_error, what, #call, __FILE__, __LINE__);                     \
      TORCH_CHECK_WITH(OutOfMemoryError, lychee_cuda_error != cudaErrorMemoryAllocation, lychee_cuda_failure); \
      TORCH_CHECK(false, lychee_cuda_failure);                                                                 \
    }                                                                                                          \
  } while (0)
