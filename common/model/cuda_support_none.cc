#include "common/model/cuda_support.h"

namespace lychee {

absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureCudaGraph(const std::function<void()>&) {
  return absl::UnimplementedError("CUDA graphs need a LibTorch built with CUDA");
}

int CudaDeviceCount() { return 0; }

absl::StatusOr<int64_t> FreeCudaMemoryBytes() {
  return absl::UnimplementedError("this LibTorch build has no CUDA");
}

absl::StatusOr<int64_t> PeakCudaMemoryBytes() { return absl::UnimplementedError("this LibTorch build has no CUDA"); }

absl::Status ResetPeakCudaMemory() { return absl::UnimplementedError("this LibTorch build has no CUDA"); }

absl::StatusOr<std::unique_ptr<ThreadCudaStream>> UseCudaStreamOnThisThread(CudaStreamPriority, int) {
  return absl::UnimplementedError("this LibTorch build has no CUDA");
}

}  // namespace lychee
