// What the model needs of CUDA beyond LibTorch's portable API: capture and replay of LibTorch work
// as a CUDA graph, and the device's free memory. Kept apart so that only a CUDA LibTorch compiles
// it (cuda_support.cc; cuda_support_none.cc elsewhere).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/statusor.h"

namespace lychee {

class CapturedGraph {
 public:
  virtual ~CapturedGraph() = default;
  // Launches the captured work on the current CUDA stream.
  virtual void Replay() = 0;
};

// Runs `work` (LibTorch operations and kernels on the current CUDA device) under stream capture on
// a side stream, its allocations served from the graph's own memory pool, so that the tensors it
// leaves behind stay valid for every replay. Nothing executes during capture. An error (an
// operation that synchronizes, copies from pageable host memory, or throws) ends the capture and
// is returned; the caller then runs `work` eagerly. UNIMPLEMENTED without a CUDA LibTorch.
absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureCudaGraph(const std::function<void()>& work);

// Bytes of memory free on the current CUDA device (cudaMemGetInfo); UNIMPLEMENTED without a CUDA
// LibTorch.
absl::StatusOr<int64_t> FreeCudaMemoryBytes();

// The most bytes of tensors LibTorch's caching allocator has had allocated at once on the current CUDA
// device since the last ResetPeakCudaMemory (the allocator's cached free blocks not counted);
// UNIMPLEMENTED without a CUDA LibTorch.
absl::StatusOr<int64_t> PeakCudaMemoryBytes();
absl::Status ResetPeakCudaMemory();

}  // namespace lychee
