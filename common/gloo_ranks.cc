#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/tensor_parallel.h"

namespace lychee {

absl::Status RunGlooRanksInThreads(int world_size,
                                   const std::function<absl::Status(std::shared_ptr<TensorParallelGroup>)>& rank_work) {
  std::string dir = (std::filesystem::temp_directory_path() / "lychee_tp_XXXXXX").string();
  if (mkdtemp(dir.data()) == nullptr) return absl::InternalError(absl::StrCat("cannot make a temp dir like ", dir));
  const std::string rendezvous = dir + "/rendezvous";
  std::vector<absl::Status> statuses(world_size);
  std::vector<std::thread> ranks;
  for (int rank = 0; rank < world_size; ++rank) {
    ranks.emplace_back([&, rank] {
      absl::StatusOr<std::shared_ptr<TensorParallelGroup>> group = JoinGlooGroup(rendezvous, rank, world_size);
      statuses[rank] = group.ok() ? rank_work(*std::move(group)) : group.status();
    });
  }
  for (std::thread& rank : ranks) rank.join();
  std::remove(rendezvous.c_str());
  rmdir(dir.c_str());
  for (const absl::Status& status : statuses) LYCHEE_RETURN_IF_ERROR(status);
  return absl::OkStatus();
}

}  // namespace lychee
