// JoinGlooGroup where this build's LibTorch has no Gloo headers (common/model/CMakeLists.txt).
#include "absl/strings/str_cat.h"
#include "common/model/tensor_parallel.h"

namespace lychee {

absl::StatusOr<std::shared_ptr<TensorParallelGroup>> JoinGlooGroup(const std::string& rendezvous_file, int rank,
                                                                   int world_size, std::chrono::milliseconds) {
  return absl::UnimplementedError(absl::StrCat("gloo group (rank ", rank, " of ", world_size, " at ", rendezvous_file,
                                               "): this build's LibTorch has no Gloo process group"));
}

}  // namespace lychee
