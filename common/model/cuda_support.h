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

// The CUDA devices this process sees; 0 without a CUDA LibTorch or a GPU.
int CudaDeviceCount();

// Bytes of memory free on the current CUDA device (cudaMemGetInfo); UNIMPLEMENTED without a CUDA
// LibTorch.
absl::StatusOr<int64_t> FreeCudaMemoryBytes();

// The most bytes of tensors LibTorch's caching allocator has had allocated at once on the current CUDA
// device since the last ResetPeakCudaMemory (the allocator's cached free blocks not counted);
// UNIMPLEMENTED without a CUDA LibTorch.
absl::StatusOr<int64_t> PeakCudaMemoryBytes();
absl::Status ResetPeakCudaMemory();

// Serving's kernels and a background job's (shadow validation) share the GPU: with serving's stream
// at the device's greatest priority and the background's at its least, the block scheduler starts
// serving's waiting blocks first whenever both have work queued.
enum class CudaStreamPriority { kServing, kBackground };

// While alive, the calling thread's current CUDA stream (which LibTorch and our kernels launch on)
// is a stream of its own with the priority asked for; destroyed on the same thread, it waits for that
// stream's work and restores the thread's previous stream.
class ThreadCudaStream {
 public:
  virtual ~ThreadCudaStream() = default;
  // CUDA's number for the stream's priority: lower runs first.
  virtual int priority() const = 0;
};

// The serving stream is a blocking one, ordered after work that other threads queued on the legacy
// default stream (weights being loaded, a KV pool being zeroed); the background stream is
// non-blocking, so that serving never waits behind it. UNIMPLEMENTED without a CUDA LibTorch.
absl::StatusOr<std::unique_ptr<ThreadCudaStream>> UseCudaStreamOnThisThread(CudaStreamPriority priority,
                                                                            int device_index);

}  // namespace lychee
