// The LibTorch entry points' check of a tensor that the CUDA kernels read as 16-byte vectors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lychee {
namespace cuda {

// The last dimension contiguous, every other stride a multiple of 8 elements, data 16-byte aligned.
inline void CheckVectorizable(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, ": the last dimension must be contiguous, strides ", t.strides());
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) % 8 == 0 || t.size(d) == 1, name, ": strides must be multiples of 8 elements, got ",
                t.strides());
  }
  TORCH_CHECK((reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0, name, ": data must be 16-byte aligned");
}

}  // namespace cuda
}  // namespace lychee
