// JoinNcclGroup on LibTorch's c10d ProcessGroupNCCL (pip's CUDA LibTorch ships it; Debian's CPU 1.13
// does not, and builds nccl_group_none.cc instead).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <exception>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model/tensor_parallel.h"
#include "common/model/torch_errors.h"

namespace lychee {
namespace {

class NcclGroup : public TensorParallelGroup {
 public:
  NcclGroup(c10::intrusive_ptr<c10d::ProcessGroupNCCL> group, int rank, int world_size,
            std::chrono::milliseconds timeout)
      : group_(std::move(group)), rank_(rank), world_size_(world_size), timeout_(timeout) {}

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::chrono::milliseconds timeout() const override { return timeout_; }
  bool capturable_in_cuda_graphs() const override { return true; }

  // A CUDA tensor's collective is queued on NCCL's stream and the current stream waits for it, with
  // no host synchronization (a CUDA graph captures both); a CPU tensor (a rank command's bytes) is
  // staged through the GPU, and the host waits for it.
  void AllReduceSum(at::Tensor& tensor) const override {
    Staged(tensor, "all-reduce", [&](std::vector<at::Tensor>& tensors) { group_->allreduce(tensors)->wait(); });
  }

  void Broadcast(at::Tensor& tensor, int root) const override {
    c10d::BroadcastOptions options;
    options.rootRank = root;
    Staged(tensor, "broadcast", [&](std::vector<at::Tensor>& tensors) { group_->broadcast(tensors, options)->wait(); });
  }

 private:
  template <typename Collective>
  void Staged(at::Tensor& tensor, const char* name, const Collective& collective) const {
    ThrowIfAborted();
    try {
      if (tensor.is_cuda()) {
        std::vector<at::Tensor> tensors{tensor};
        collective(tensors);
        return;
      }
      std::vector<at::Tensor> tensors{tensor.to(at::Device(at::kCUDA, 0))};
      collective(tensors);
      tensor.copy_(tensors[0]);
    } catch (const std::exception& error) {
      throw CollectiveFailure(error, name, rank_, world_size_);
    }
  }

  // Ends the communicators: kernels waiting on a lost peer return, and the stream they held goes on.
  void AbortCollectives() const override { group_->abort(); }

  c10::intrusive_ptr<c10d::ProcessGroupNCCL> group_;
  int rank_;
  int world_size_;
  std::chrono::milliseconds timeout_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<TensorParallelGroup>> JoinNcclGroup(const std::string& rendezvous_file, int rank,
                                                                   int world_size, std::chrono::milliseconds timeout) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("nccl group: rank ", rank, " is outside [0, ", world_size, ")"));
  }
  // Rank 0 sees every GPU the ranks use; a worker sees its own alone (RankWorkers).
  const int gpus = static_cast<int>(c10::cuda::device_count());
  if (gpus < (rank == 0 ? world_size : 1)) {
    return absl::FailedPreconditionError(absl::StrCat("tensor parallelism over ", world_size,
                                                      " ranks on cuda needs a GPU per rank; rank ", rank, " sees ",
                                                      gpus, " (NCCL cannot put two ranks on one GPU)"));
  }
  try {
    c10::cuda::set_device(0);
    auto store = c10::make_intrusive<c10d::FileStore>(rendezvous_file, world_size);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
    return std::make_shared<NcclGroup>(std::move(group), rank, world_size, timeout);
  } catch (const std::exception& error) {
    return absl::UnavailableError(absl::StrCat("nccl group: rank ", rank, " of ", world_size,
                                               " could not join through ", rendezvous_file, ": ", error.what()));
  }
}

}  // namespace lychee
