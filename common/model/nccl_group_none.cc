// JoinNcclGroup where this build's LibTorch has no NCCL process group (common/model/CMakeLists.txt).
#include "absl/strings/str_cat.h"
#include "common/model/tensor_parallel.h"

namespace lychee {

absl::StatusOr<std::shared_ptr<TensorParallelGroup>> JoinNcclGroup(const std::string& rendezvous_file, int rank,
                                                                   int world_size, std::chrono::milliseconds) {
  return absl::UnimplementedError(absl::StrCat("nccl group (rank ", rank, " of ", world_size, " at ", rendezvous_file,
                                               "): this build's LibTorch has no NCCL process group"));
}

}  // namespace lychee
