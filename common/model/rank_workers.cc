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

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"

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

}  // namespace

absl::StatusOr<std::string> SelfExecutable() {
  std::error_code error;
  std::filesystem::path path = std::filesystem::read_symlink("/proc/self/exe", error);
  if (error) return absl::InternalError(absl::StrCat("cannot resolve /proc/self/exe: ", error.message()));
  return path.string();
}

absl::StatusOr<std::unique_ptr<RankWorkers>> RankWorkers::Start(const std::string& program,
                                                                const std::vector<std::string>& args, int world_size,
                                                                const std::string& group_kind) {
  if (world_size < 1) return absl::InvalidArgumentError(absl::StrCat("rank workers: world size ", world_size));
  std::string dir = (std::filesystem::temp_directory_path() / "lychee_tp_XXXXXX").string();
  if (mkdtemp(dir.data()) == nullptr) return absl::InternalError(absl::StrCat("cannot make a temp dir like ", dir));
  std::unique_ptr<RankWorkers> workers(new RankWorkers(dir, dir + "/rendezvous", group_kind));
  const pid_t launcher = getpid();
  for (int rank = 1; rank < world_size; ++rank) {
    std::vector<std::string> argv_strings = {program};
    argv_strings.insert(argv_strings.end(), args.begin(), args.end());
    for (std::string flag : {absl::StrCat("--", kTensorParallelRankFlag), std::to_string(rank),
                             absl::StrCat("--", kTensorParallelRendezvousFlag), workers->rendezvous_file_}) {
      argv_strings.push_back(std::move(flag));
    }
    std::vector<char*> argv;
    for (std::string& arg : argv_strings) argv.push_back(arg.data());
    argv.push_back(nullptr);
    // Everything the child needs is built before the fork: between fork and exec a child of a
    // threaded process may only make async-signal-safe calls.
    const pid_t pid = fork();
    if (pid < 0)
      return absl::InternalError(absl::StrCat("fork for ", group_kind, " rank ", rank, ": ", strerror(errno)));
    if (pid == 0) {
      // A launcher that died before prctl ran would leave this worker waiting for it.
      if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != launcher) _exit(126);
      execv(argv[0], argv.data());
      _exit(127);
    }
    workers->pids_.push_back(pid);
  }
  return workers;
}

RankWorkers::~RankWorkers() {
  for (pid_t& pid : pids_) {
    if (pid == 0) continue;
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  }
  std::remove(rendezvous_file_.c_str());
  rmdir(dir_.c_str());
}

absl::Status RankWorkers::Wait() { return Reap(/*block=*/true); }

absl::Status RankWorkers::WaitForLost(std::chrono::milliseconds patience) {
  const auto deadline = std::chrono::steady_clock::now() + patience;
  while (true) {
    const absl::Status ended = Reap(/*block=*/false);
    const bool all_reaped = std::all_of(pids_.begin(), pids_.end(), [](pid_t pid) { return pid == 0; });
    if (!ended.ok() || all_reaped || std::chrono::steady_clock::now() >= deadline) return ended;
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

absl::Status RunGlooRanksInProcesses(
    int world_size, const std::string& program, const std::vector<std::string>& worker_args,
    const std::function<absl::Status(std::shared_ptr<TensorParallelGroup>)>& rank_work) {
  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<RankWorkers> workers, RankWorkers::Start(program, worker_args, world_size));
  absl::StatusOr<std::shared_ptr<TensorParallelGroup>> group =
      JoinGlooGroup(workers->rendezvous_file(), /*rank=*/0, world_size);
  absl::Status status = group.ok() ? rank_work(*std::move(group)) : group.status();
  // Rank 0's own failure is the one to report; the workers it leaves behind are killed with it.
  if (!status.ok()) return status;
  return workers->Wait();
}

absl::Status RunAsGlooRank(int world_size, int worker_rank, const std::string& rendezvous_file,
                           const std::vector<std::string>& worker_args,
                           const std::function<absl::Status(std::shared_ptr<TensorParallelGroup>)>& rank_work) {
  if (world_size == 1) return rank_work(nullptr);
  if (worker_rank > 0) {
    LYCHEE_ASSIGN_OR_RETURN(std::shared_ptr<TensorParallelGroup> group,
                            JoinGlooGroup(rendezvous_file, worker_rank, world_size));
    return rank_work(std::move(group));
  }
  LYCHEE_ASSIGN_OR_RETURN(const std::string self, SelfExecutable());
  return RunGlooRanksInProcesses(world_size, self, worker_args, rank_work);
}

}  // namespace lychee
