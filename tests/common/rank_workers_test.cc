// RankWorkers' placement of GPU ranks: each worker sees only its own GPU (CUDA_VISIBLE_DEVICES), so
// that its cuda:0 is the GPU its rank owns; checked with /bin/sh workers that write down what they see.
#include "common/model/rank_workers.h"

#include <signal.h>
#include <stdlib.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <optional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "harness/temp_dir.h"

namespace lychee {
namespace {

// Sets or unsets CUDA_VISIBLE_DEVICES for the life of the object.
class VisibleDevices {
 public:
  explicit VisibleDevices(const std::optional<std::string>& value) {
    if (const char* old = getenv("CUDA_VISIBLE_DEVICES")) old_ = old;
    value ? setenv("CUDA_VISIBLE_DEVICES", value->c_str(), 1) : unsetenv("CUDA_VISIBLE_DEVICES");
  }
  ~VisibleDevices() { old_ ? setenv("CUDA_VISIBLE_DEVICES", old_->c_str(), 1) : unsetenv("CUDA_VISIBLE_DEVICES"); }

 private:
  std::optional<std::string> old_;
};

// What each worker of `world_size` ranks on `device` saw as CUDA_VISIBLE_DEVICES ("unset" where it
// had none), by rank 1..world_size-1.
std::vector<std::string> SeenByWorkers(RankDevice device, int world_size) {
  testing::TempDir dir;
  // A worker's arguments end with "--tensor-parallel-rank R ...": $2 is its rank.
  const std::string script = absl::StrCat("printf %s \"${CUDA_VISIBLE_DEVICES-unset}\" > ", dir.str(), "/seen-$2");
  auto workers = RankWorkers::Start("/bin/sh", {"-c", script, "sh"}, world_size, "tensor-parallel", device);
  REQUIRE(workers.ok());
  REQUIRE((*workers)->Wait().ok());
  std::vector<std::string> seen;
  for (int rank = 1; rank < world_size; ++rank) {
    std::stringstream text;
    text << std::ifstream(absl::StrCat(dir.str(), "/seen-", rank)).rdbuf();
    seen.push_back(text.str());
  }
  return seen;
}

TEST_CASE("a GPU rank's worker sees only its own GPU, as its cuda:0") {
  {
    const VisibleDevices none(std::nullopt);
    CHECK(SeenByWorkers(RankDevice::kCuda, 3) == std::vector<std::string>{"1", "2"});
  }
  {
    const VisibleDevices some("3,5, 7");
    CHECK(SeenByWorkers(RankDevice::kCuda, 3) == std::vector<std::string>{"5", "7"});
  }
  {
    const VisibleDevices uuids("GPU-aa,GPU-bb");
    CHECK(SeenByWorkers(RankDevice::kCuda, 2) == std::vector<std::string>{"GPU-bb"});
  }
}

TEST_CASE("CPU ranks' workers keep this process's CUDA_VISIBLE_DEVICES") {
  const VisibleDevices some("3,5");
  CHECK(SeenByWorkers(RankDevice::kCpu, 2) == std::vector<std::string>{"3,5"});
  const VisibleDevices none(std::nullopt);
  CHECK(SeenByWorkers(RankDevice::kCpu, 2) == std::vector<std::string>{"unset"});
}

TEST_CASE("more GPU ranks than CUDA_VISIBLE_DEVICES names are refused, naming both counts") {
  const VisibleDevices two("0,1");
  auto workers = RankWorkers::Start("/bin/true", {}, 4, "tensor-parallel", RankDevice::kCuda);
  REQUIRE_FALSE(workers.ok());
  CHECK(workers.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(workers.status().message()),
             Catch::Contains("4 ranks need a GPU each") && Catch::Contains("names 2"));
}

TEST_CASE("the watch on the workers reports a killed one at once, and not one that exits 0") {
  auto workers = RankWorkers::Start("/bin/sh", {"-c", "[ \"$2\" = 1 ] && exec sleep 60; exit 0", "sh"}, 3);
  REQUIRE(workers.ok());
  absl::Mutex mutex;
  std::optional<absl::Status> lost;
  (*workers)->WatchForLoss(
      [&](const absl::Status& status) {
        absl::MutexLock lock(&mutex);
        lost = status;
      },
      std::chrono::milliseconds(20));
  // Rank 2 exits 0 at once: no loss.
  absl::SleepFor(absl::Milliseconds(300));
  {
    absl::MutexLock lock(&mutex);
    CHECK_FALSE(lost.has_value());
  }
  const pid_t sleeper = (*workers)->pid(1);
  REQUIRE(kill(sleeper, SIGKILL) == 0);
  absl::MutexLock lock(&mutex);
  REQUIRE(mutex.AwaitWithTimeout(absl::Condition(
                                     +[](std::optional<absl::Status>* seen) { return seen->has_value(); }, &lost),
                                 absl::Seconds(10)));
  CHECK(lost->code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(lost->message()),
             Catch::Contains(absl::StrCat("tensor-parallel rank 1 (pid ", sleeper, ") was killed by signal 9")));
}

}  // namespace
}  // namespace lychee
