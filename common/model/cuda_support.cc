#include "common/model/cuda_support.h"

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"

namespace lychee {
namespace {

class TorchGraph : public CapturedGraph {
 public:
  void Replay() override { graph_.replay(); }
  at::cuda::CUDAGraph& graph() { return graph_; }

 private:
  at::cuda::CUDAGraph graph_;
};

class PrioritizedStream : public ThreadCudaStream {
 public:
  PrioritizedStream(cudaStream_t stream, int priority, c10::cuda::CUDAStream previous)
      : stream_(stream), priority_(priority), previous_(previous) {
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromExternal(stream_, previous_.device_index()));
  }
  ~PrioritizedStream() override {
    // The caching allocator may hand this stream's freed blocks to a later stream with the same
    // handle only once their work is done.
    (void)cudaStreamSynchronize(stream_);
    c10::cuda::setCurrentCUDAStream(previous_);
    (void)cudaStreamDestroy(stream_);
  }
  int priority() const override { return priority_; }

 private:
  cudaStream_t stream_;
  int priority_;
  c10::cuda::CUDAStream previous_;
};

absl::Status CudaError(const char* call, cudaError_t error) {
  return absl::InternalError(absl::StrCat(call, ": ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<ThreadCudaStream>> UseCudaStreamOnThisThread(CudaStreamPriority priority,
                                                                            int device_index) {
  c10::cuda::CUDAGuard device(static_cast<c10::DeviceIndex>(device_index));
  int least = 0, greatest = 0;
  if (const cudaError_t error = cudaDeviceGetStreamPriorityRange(&least, &greatest); error != cudaSuccess) {
    return CudaError("cudaDeviceGetStreamPriorityRange", error);
  }
  const bool serving = priority == CudaStreamPriority::kServing;
  const int number = serving ? greatest : least;
  cudaStream_t stream = nullptr;
  if (const cudaError_t error =
          cudaStreamCreateWithPriority(&stream, serving ? cudaStreamDefault : cudaStreamNonBlocking, number);
      error != cudaSuccess) {
    return CudaError("cudaStreamCreateWithPriority", error);
  }
  return std::make_unique<PrioritizedStream>(
      stream, number, c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_index)));
}

absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureCudaGraph(const std::function<void()>& work) {
  auto graph = std::make_unique<TorchGraph>();
  // Capture must not run on the default stream; the work queued before it must be done, since the
  // capture stream does not wait for other streams.
  if (const cudaError_t synced = cudaDeviceSynchronize(); synced != cudaSuccess) {
    return CudaError("cudaDeviceSynchronize() before capturing a CUDA graph", synced);
  }
  c10::cuda::CUDAStream capture_stream = c10::cuda::getStreamFromPool();
  c10::cuda::CUDAStreamGuard guard(capture_stream);
  try {
    // Thread-local mode: other threads' CUDA calls (a second model, a checkpoint load) do not
    // invalidate this capture.
    graph->graph().capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
  } catch (const c10::Error& error) {
    return absl::InternalError(absl::StrCat("cannot begin a CUDA graph capture: ", error.what_without_backtrace()));
  }
  std::string failure;
  try {
    work();
  } catch (const std::exception& error) {
    failure = error.what();
  }
  try {
    graph->graph().capture_end();
  } catch (const std::exception& error) {
    if (failure.empty()) failure = error.what();
  }
  if (!failure.empty()) {
    // A broken capture can leave a sticky error state in the runtime: clear it for the eager run.
    (void)cudaGetLastError();
    return absl::InternalError(absl::StrCat("CUDA graph capture failed: ", failure.substr(0, 500)));
  }
  return std::unique_ptr<CapturedGraph>(std::move(graph));
}

int CudaDeviceCount() { return static_cast<int>(c10::cuda::device_count()); }

absl::StatusOr<int64_t> FreeCudaMemoryBytes() {
  size_t free_bytes = 0, total_bytes = 0;
  if (const cudaError_t error = cudaMemGetInfo(&free_bytes, &total_bytes); error != cudaSuccess) {
    return CudaError("cudaMemGetInfo", error);
  }
  return static_cast<int64_t>(free_bytes);
}

absl::StatusOr<int64_t> PeakCudaMemoryBytes() {
  // Index 0 of each statistic is the aggregate over the allocator's small and large pools.
  return c10::cuda::CUDACachingAllocator::getDeviceStats(c10::cuda::current_device()).allocated_bytes[0].peak;
}

absl::Status ResetPeakCudaMemory() {
  c10::cuda::CUDACachingAllocator::resetPeakStats(c10::cuda::current_device());
  return absl::OkStatus();
}

}  // namespace lychee
