// JoinGlooGroup on LibTorch's c10d ProcessGroupGloo (Debian's LibTorch 1.13 and pip's 2.x both
// ship it; the calls here are the ones both versions have).
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <chrono>
#include <exception>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model/tensor_parallel.h"
#include "common/model/torch_errors.h"

namespace lychee {
namespace {

class GlooGroup : public TensorParallelGroup {
 public:
  GlooGroup(c10::intrusive_ptr<c10d::ProcessGroupGloo> group, int rank, int world_size,
            std::chrono::milliseconds timeout)
      : group_(std::move(group)), rank_(rank), world_size_(world_size), timeout_(timeout) {}

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::chrono::milliseconds timeout() const override { return timeout_; }

  void AllReduceSum(at::Tensor& tensor) const override {
    std::vector<at::Tensor> tensors{tensor};
    Run("all-reduce", [&] { group_->allreduce(tensors)->wait(); });
  }

  void Broadcast(at::Tensor& tensor, int root) const override {
    std::vector<at::Tensor> tensors{tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    Run("broadcast", [&] { group_->broadcast(tensors, options)->wait(); });
  }

 private:
  // Runs one collective, throwing what it throws as a CollectiveError naming it and this rank.
  template <typename Collective>
  void Run(const char* name, const Collective& collective) const {
    ThrowIfAborted();
    try {
      collective();
    } catch (const std::exception& error) {
      throw CollectiveFailure(error, name, rank_, world_size_);
    }
  }

  c10::intrusive_ptr<c10d::ProcessGroupGloo> group_;
  int rank_;
  int world_size_;
  std::chrono::milliseconds timeout_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<TensorParallelGroup>> JoinGlooGroup(const std::string& rendezvous_file, int rank,
                                                                   int world_size, std::chrono::milliseconds timeout) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(absl::StrCat("gloo group: rank ", rank, " is outside [0, ", world_size, ")"));
  }
  try {
    auto store = c10::make_intrusive<c10d::FileStore>(rendezvous_file, world_size);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, options);
    return std::make_shared<GlooGroup>(std::move(group), rank, world_size, timeout);
  } catch (const std::exception& error) {
    return absl::UnavailableError(absl::StrCat("gloo group: rank ", rank, " of ", world_size,
                                               " could not join through ", rendezvous_file, ": ", error.what()));
  }
}

}  // namespace lychee
