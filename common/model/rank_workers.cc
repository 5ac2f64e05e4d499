#include "common/model/rank_workers.h"

#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "common/base/status_macros.h"
#include "common/model/cuda_support.h"

namespace lychee {
namespace {

// How a reaped worker ended, as a status naming it.
absl::Status WorkerEnd(const std::string& group_kind, int rank, pid_t pid, int wait_status) {
  if (WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0) return absl::OkStatus();
  if (WIFSIGNALED(wait_status)) {
    return absl::UnavailableError(
        absl::StrCat(group_kind, " rank ", rank, " (pid ", pid, ") was killed by signal ", WTERMSIG(wait_status)));
  }
  return absl::InternalError(
      absl::StrCat(group_kind, " rank ", rank, " (pid ", pid, ") exited with status ", WEXITSTATUS(wait_status)));
}

// The GPU each rank computes on, as CUDA_VISIBLE_DEVICES names it: the i-th entry of this process's
// list for rank i, or GPU i where it sets none.
absl::StatusOr<std::vector<std::string>> GpuPerRank(int world_size) {
  std::vector<std::string> gpus;
  const char* visible = getenv("CUDA_VISIBLE_DEVICES");
  if (visible == nullptr) {
    for (int rank = 0; rank < world_size; ++rank) gpus.push_back(std::to_string(rank));
    return gpus;
  }
  for (absl::string_view gpu : absl::StrSplit(visible, ',', absl::SkipWhitespace())) {
    gpus.emplace_back(absl::StripAsciiWhitespace(gpu));
  }
  if (static_cast<int>(gpus.size()) < world_size) {
    return absl::FailedPreconditionError(absl::StrCat(world_size, " ranks need a GPU each, and CUDA_VISIBLE_DEVICES='",
                                                      visible, "' names ", gpus.size()));
  }
  return gpus;
}

// This process's environment with CUDA_VISIBLE_DEVICES set to `gpu` (unchanged when `gpu` is empty).
std::vector<std::string> WorkerEnvironment(const std::string& gpu) {
  std::vector<std::string> environment;
  constexpr absl::string_view kVisible = "CUDA_VISIBLE_DEVICES=";
  for (char** entry = environ; *entry != nullptr; ++entry) {
    if (gpu.empty() || !absl::StartsWith(*entry, kVisible)) environment.emplace_back(*entry);
  }
  if (!gpu.empty()) environment.push_back(absl::StrCat(kVisible, gpu));
  return environment;
}

std::vector<char*> NullTerminated(std::vector<std::string>& strings) {
  std::vector<char*> pointers;
  for (std::string& string : strings) pointers.push_back(string.data());
  pointers.push_back(nullptr);
  return pointers;
}

}  // namespace

absl::StatusOr<std::string> SelfExecutable() {
  std::error_code error;
  std::filesystem::path path = std::filesystem::read_symlink("/proc/self/exe", error);
  if (error) return absl::InternalError(absl::StrCat("cannot resolve /proc/self/exe: ", error.message()));
  return path.string();
}

absl::StatusOr<std::unique_ptr<RankWorkers>> RankWorkers::Start(const std::string& program,
                                                                const std::vector<std::string>& args, int world_size,
                                                                const std::string& group_kind, RankDevice device) {
  if (world_size < 1) return absl::InvalidArgumentError(absl::StrCat("rank workers: world size ", world_size));
  std::vector<std::string> gpus(world_size);
  if (device == RankDevice::kCuda) {
    absl::StatusOr<std::vector<std::string>> per_rank = GpuPerRank(world_size);
    if (!per_rank.ok()) {
      return absl::Status(per_rank.status().code(),
                          absl::StrCat(group_kind, " on cuda: ", per_rank.status().message()));
    }
    gpus = *std::move(per_rank);
  }
  std::string dir = (std::filesystem::temp_directory_path() / "lychee_tp_XXXXXX").string();
  if (mkdtemp(dir.data()) == nullptr) return absl::InternalError(absl::StrCat("cannot make a temp dir like ", dir));
  std::unique_ptr<RankWorkers> workers(new RankWorkers(dir, dir + "/rendezvous", group_kind, world_size));
  absl::MutexLock lock(&workers->mutex_);
  const pid_t launcher = getpid();
  for (int rank = 1; rank < world_size; ++rank) {
    std::vector<std::string> argv_strings = {program};
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    for (std::string flag : {absl::StrCat("--", kTensorParallelRankFlag), std::to_string(rank),
                             absl::StrCat("--", kTensorParallelRendezvousFlag), workers->rendezvous_file_}) {
      argv_strings.push_back(std::move(flag));
    }
    std::vector<char*> argv = NullTerminated(argv_strings);
    std::vector<std::string> environment_strings = WorkerEnvironment(gpus[rank]);
    std::vector<char*> environment = NullTerminated(environment_strings);
    // Everything the child needs is built before the fork: between fork and exec a child of a
    // threaded process may only make async-signal-safe calls.
    const pid_t pid = fork();
    if (pid < 0)
      return absl::InternalError(absl::StrCat("fork for ", group_kind, " rank ", rank, ": ", strerror(errno)));
    if (pid == 0) {
      // A launcher that died before prctl ran would leave this worker waiting for it.
      if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != launcher) _exit(126);
      execve(argv[0], argv.data(), environment.data());
      _exit(127);
    }
    workers->pids_.push_back(pid);
  }
  return workers;
}

RankWorkers::~RankWorkers() {
  StopWatching();
  absl::MutexLock lock(&mutex_);
  for (pid_t& pid : pids_) {
    if (pid == 0) continue;
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  }
  std::remove(rendezvous_file_.c_str());
  rmdir(dir_.c_str());
}

pid_t RankWorkers::pid(int rank) const {
  absl::MutexLock lock(&mutex_);
  return pids_.at(rank - 1);
}

void RankWorkers::WatchForLoss(std::function<void(const absl::Status&)> on_lost, std::chrono::milliseconds period) {
  StopWatching();
  {
    absl::MutexLock lock(&mutex_);
    stop_watching_ = false;
  }
  watcher_ = std::thread([this, on_lost = std::move(on_lost), period] {
    while (true) {
      absl::Status lost;
      {
        absl::MutexLock lock(&mutex_);
        if (mutex_.AwaitWithTimeout(absl::Condition(&stop_watching_), absl::FromChrono(period))) return;
        lost = Reap(/*block=*/false);
      }
      if (!lost.ok()) {
        on_lost(lost);
        return;
      }
    }
  });
}

void RankWorkers::StopWatching() {
  {
    absl::MutexLock lock(&mutex_);
    stop_watching_ = true;
  }
  if (watcher_.joinable()) watcher_.join();
}

absl::Status RankWorkers::Wait() {
  StopWatching();
  absl::MutexLock lock(&mutex_);
  return Reap(/*block=*/true);
}

absl::Status RankWorkers::WaitForLost(std::chrono::milliseconds patience) {
  StopWatching();
  const auto deadline = std::chrono::steady_clock::now() + patience;
  while (true) {
    {
      absl::MutexLock lock(&mutex_);
      const absl::Status ended = Reap(/*block=*/false);
      const bool all_reaped = std::all_of(pids_.begin(), pids_.end(), [](pid_t pid) { return pid == 0; });
      if (!ended.ok() || all_reaped || std::chrono::steady_clock::now() >= deadline) return ended;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

absl::Status RankWorkers::Reap(bool block) {
  absl::Status first_killed, first_failed;
  for (size_t index = 0; index < pids_.size(); ++index) {
    if (pids_[index] == 0) continue;
    int wait_status = 0;
    pid_t reaped;
    while ((reaped = waitpid(pids_[index], &wait_status, block ? 0 : WNOHANG)) < 0) {
      if (errno != EINTR) return absl::InternalError(absl::StrCat("waitpid: ", strerror(errno)));
    }
    if (reaped == 0) continue;  // still running
    const absl::Status end = WorkerEnd(group_kind_, static_cast<int>(index) + 1, pids_[index], wait_status);
    (WIFSIGNALED(wait_status) ? first_killed : first_failed).Update(end);
    pids_[index] = 0;
  }
  // A killed rank is the cause; the others then fail on the group they lost.
  return first_killed.ok() ? first_failed : first_killed;
}

absl::Status CheckGpuPerRank(RankDevice device, int world_size, const std::string& what) {
  if (device != RankDevice::kCuda || world_size <= 1) return absl::OkStatus();
  const int gpus = CudaDeviceCount();
  if (gpus >= world_size) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(what, " on cuda needs a GPU per rank: ", world_size,
                                                    " ranks, and this machine shows ", gpus, " GPU(s)"));
}

absl::Status RunRanksInProcesses(RankDevice device, int world_size, const std::string& program,
                                 const std::vector<std::string>& worker_args,
                                 const std::function<absl::Status(std::shared_ptr<TensorParallelGroup>)>& rank_work) {
  LYCHEE_RETURN_IF_ERROR(CheckGpuPerRank(device, world_size, absl::StrCat(world_size, " ranks")));
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<RankWorkers> workers,
                          RankWorkers::Start(program, worker_args, world_size, "tensor-parallel", device));
  absl::StatusOr<std::shared_ptr<TensorParallelGroup>> group =
      JoinRankGroup(device, workers->rendezvous_file(), /*rank=*/0, world_size);
  absl::Status status = group.ok() ? rank_work(*std::move(group)) : group.status();
  // Rank 0's own failure is the one to report; the workers it leaves behind are killed with it.
  if (!status.ok()) return status;
  return workers->Wait();
}

absl::Status RunAsRank(RankDevice device, int world_size, int worker_rank, const std::string& rendezvous_file,
                       const std::vector<std::string>& worker_args,
                       const std::function<absl::Status(std::shared_ptr<TensorParallelGroup>)>& rank_work) {
  if (world_size == 1) return rank_work(nullptr);
  if (worker_rank > 0) {
    LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<TensorParallelGroup> group,
                            JoinRankGroup(device, rendezvous_file, worker_rank, world_size));
    return rank_work(std::move(group));
  }
  LYCHEE_ASSIGN_OR_RETURN(const std::string self, SelfExecutable());
  return RunRanksInProcesses(device, world_size, self, worker_args, rank_work);
}

}  // namespace lychee
