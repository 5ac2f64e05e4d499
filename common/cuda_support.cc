#include "common/cuda_support.h"

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

}  // namespace

absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureCudaGraph(const std::function<void()>& work) {
  auto graph = std::make_unique<TorchGraph>();
  // Capture must not run on the default stream; the work queued before it must be done, since the
  // capture stream does not wait for other streams.
  if (const cudaError_t synced = cudaDeviceSynchronize(); synced != cudaSuccess) {
    return absl::InternalError(absl::StrCat("cudaDeviceSynchronize() before capturing a CUDA graph: ",
                                            cudaGetErrorName(synced), " (", cudaGetErrorString(synced), ")"));
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

absl::StatusOr<int64_t> FreeCudaMemoryBytes() {
  size_t free_bytes = 0, total_bytes = 0;
  if (const cudaError_t error = cudaMemGetInfo(&free_bytes, &total_bytes); error != cudaSuccess) {
    return absl::InternalError(
        absl::StrCat("cudaMemGetInfo: ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")"));
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
