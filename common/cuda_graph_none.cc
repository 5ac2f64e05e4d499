#include "common/cuda_graph.h"

namespace lychee {

absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureCudaGraph(const std::function<void()>&) {
  return absl::UnimplementedError("CUDA graphs need a LibTorch built with CUDA");
}

}  // namespace lychee
