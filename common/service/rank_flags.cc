#include "common/service/rank_flags.h"

#include <cstdint>

#include "absl/flags/flag.h"

// Named as RankWorkers passes them (kTensorParallelRankFlag, kTensorParallelRendezvousFlag).
ABSL_FLAG(int64_t, tensor_parallel_rank, 0, "set by rank 0 on the ranks it starts; not for users");
ABSL_FLAG(std::string, tensor_parallel_rendezvous, "", "set by rank 0 on the ranks it starts; not for users");

namespace lychee {

WorkerRankFlags WorkerRankFromFlags() {
  return {static_cast<int>(absl::GetFlag(FLAGS_tensor_parallel_rank)), absl::GetFlag(FLAGS_tensor_parallel_rendezvous)};
}

}  // namespace lychee
