// A tensor-parallel rank 1..N-1 for tensor_parallel_test, started by RankWorkers:
//   tensor_parallel_worker --model DIR --prompt-ids 1,2,3 --steps N --tensor-parallel N [--device cpu|cuda]
//       [--partition FILE --budget TOKENS] --tensor-parallel-rank R --tensor-parallel-rendezvous FILE
// decodes greedily as the test's rank 0 does (RankGenerate) and exits 0, or prints its error and
// exits 1 (a lost group included).
#include <iostream>
#include <map>
#include <optional>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/base/status_macros.h"
#include "common/model/rank_workers.h"
#include "tests/common/tensor_parallel_generation.h"

namespace {

absl::StatusOr<int> IntFlag(const std::map<std::string, std::string>& flags, const std::string& name) {
  int value = 0;
  const auto found = flags.find(name);
  if (found == flags.end() || !absl::SimpleAtoi(found->second, &value)) {
    return absl::InvalidArgumentError("tensor_parallel_worker: --" + name + " needs an integer");
  }
  return value;
}

absl::Status Run(const std::map<std::string, std::string>& flags) {
  LYCHEE_ASSIGN_OR_RETURN(const int rank, IntFlag(flags, lychee::kTensorParallelRankFlag));
  LYCHEE_ASSIGN_OR_RETURN(const int world_size, IntFlag(flags, "tensor-parallel"));
  LYCHEE_ASSIGN_OR_RETURN(const int steps, IntFlag(flags, "steps"));
  std::vector<int32_t> prompt;
  for (absl::string_view id : absl::StrSplit(flags.at("prompt-ids"), ',')) {
    int32_t value = 0;
    if (!absl::SimpleAtoi(id, &value)) return absl::InvalidArgumentError("tensor_parallel_worker: bad --prompt-ids");
    prompt.push_back(value);
  }
  std::optional<lychee::HeadPartition> partition;
  if (flags.count("partition") > 0) {
    LYCHEE_ASSIGN_OR_RETURN(const int budget, IntFlag(flags, "budget"));
    LYCHEE_ASSIGN_OR_RETURN(partition, lychee::testing::PartitionWithBudget(flags.at("partition"), budget));
  }
  const auto device = flags.find("device");
  LYCHEE_ASSIGN_OR_RETURN(const lychee::ModelOptions options,
                          lychee::ModelOptionsForDevice(device == flags.end() ? "cpu" : device->second));
  LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<lychee::TensorParallelGroup> group,
                          lychee::JoinRankGroup(lychee::RankDeviceNamed(options.device.str()),
                                                flags.at(lychee::kTensorParallelRendezvousFlag), rank, world_size));
  return lychee::testing::RankGenerate(flags.at("model"), options, std::move(group), partition, prompt, steps).status();
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags;
  for (int i = 1; i + 1 < argc; i += 2) flags[std::string(argv[i]).substr(2)] = argv[i + 1];
  for (const char* required : {"model", "prompt-ids", lychee::kTensorParallelRendezvousFlag}) {
    if (flags.count(required) == 0) {
      std::cerr << "tensor_parallel_worker: --" << required << " is missing\n";
      return 1;
    }
  }
  const absl::Status status = Run(flags);
  if (!status.ok()) std::cerr << "tensor_parallel_worker: " << status << "\n";
  return status.ok() ? 0 : 1;
}
