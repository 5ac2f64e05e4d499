// Ranks 1..N-1 of a process group (tensor- or data-parallel; Gloo on CPUs, NCCL on GPUs) as worker
// processes of the process that is rank 0: each worker is a program (usually the launcher's own
// binary) re-executed with hidden flags naming its rank and the group's rendezvous file, and it
// joins the group there (JoinRankGroup). Free of LibTorch.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/model/tensor_parallel.h"

namespace lychee {

// The hidden flags a worker is started with, appended to its arguments as "--FLAG VALUE".
inline constexpr char kTensorParallelRankFlag[] = "tensor-parallel-rank";
inline constexpr char kTensorParallelRendezvousFlag[] = "tensor-parallel-rendezvous";

// The path of this process's own binary, for a launcher that re-executes itself (resolved, so
// that ps shows the workers by their program's name).
absl::StatusOr<std::string> SelfExecutable();

class RankWorkers {
 public:
  // Starts ranks 1..world_size-1, each `program` with `args`, then "--tensor-parallel-rank R
  // --tensor-parallel-rendezvous FILE" (the world size is for `args` to carry). A worker is killed
  // when the thread that started it ends (PR_SET_PDEATHSIG), so that none outlives its rank 0; its
  // output goes where this process's does. `group_kind` names the group in errors ("data-parallel
  // rank 1 ... was killed"). On kCuda, worker r sees only GPU r of this process's visible GPUs (its
  // CUDA_VISIBLE_DEVICES), as its cuda:0; rank 0 keeps them all and computes on the first.
  static absl::StatusOr<std::unique_ptr<RankWorkers>> Start(const std::string& program,
                                                            const std::vector<std::string>& args, int world_size,
                                                            const std::string& group_kind = "tensor-parallel",
                                                            RankDevice device = RankDevice::kCpu);
  // SIGKILLs and reaps the workers still running, and removes the rendezvous dir.
  ~RankWorkers();
  RankWorkers(const RankWorkers&) = delete;
  RankWorkers& operator=(const RankWorkers&) = delete;

  // The file where the ranks meet: rank 0 passes it to JoinRankGroup.
  const std::string& rendezvous_file() const { return rendezvous_file_; }
  int world_size() const { return world_size_; }
  // Rank r's process id; 0 once it was reaped.
  pid_t pid(int rank) const;

  // Starts a thread that looks every `period` for a worker that ended badly (killed, or exited
  // non-zero) and then calls `on_lost`, once, from that thread, with the status Wait would give:
  // for a launcher to end its groups (TensorParallelGroup::Abort) as soon as a rank is gone, rather
  // than when a collective finds out (NCCL's never do). Wait, WaitForLost and the destructor stop it.
  void WatchForLoss(std::function<void(const absl::Status&)> on_lost,
                    std::chrono::milliseconds period = std::chrono::milliseconds(100));

  // Waits for every worker to end: OK when all exited 0; otherwise UNAVAILABLE naming the lowest
  // rank that a signal killed (the others then fail on the group they lost), or else the lowest
  // rank that exited non-zero.
  absl::Status Wait();
  // What rank 0 calls when its group failed, to learn which worker was lost: reaps the workers that
  // have ended or end within `patience`, without waiting for the others, and reports them as Wait
  // does (OK when none of them ended badly). Returns as soon as one has.
  absl::Status WaitForLost(std::chrono::milliseconds patience);

 private:
  RankWorkers(std::string dir, std::string rendezvous_file, std::string group_kind, int world_size)
      : dir_(std::move(dir)),
        rendezvous_file_(std::move(rendezvous_file)),
        group_kind_(std::move(group_kind)),
        world_size_(world_size) {}

  // Reaps the workers still running, blocking for each (`block`) or only taking those that have
  // ended, and returns the status of the worst end among them (see Wait).
  absl::Status Reap(bool block) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);
  void StopWatching() ABSL_LOCKS_EXCLUDED(mutex_);

  const std::string dir_;
  const std::string rendezvous_file_;
  const std::string group_kind_;
  const int world_size_;
  mutable absl::Mutex mutex_;
  std::vector<pid_t> pids_ ABSL_GUARDED_BY(mutex_);  // rank r's at r - 1; 0 once reaped
  bool stop_watching_ ABSL_GUARDED_BY(mutex_) = false;
  std::thread watcher_;
};

// FAILED_PRECONDITION, starting with `what` (the flag that asked for the ranks), when `world_size`
// ranks on kCuda would not have a GPU each in this process's view; OK on kCpu. For a launcher to
// check before it starts any rank.
absl::Status CheckGpuPerRank(RankDevice device, int world_size, const std::string& what);

// Runs `rank_work` as rank 0 of a group on `device` in this process, with ranks 1..world_size-1 as
// workers started by RankWorkers::Start(program, worker_args, world_size); each worker must make
// the same collective calls. Rank 0's error first (a worker's death shows there as UNAVAILABLE),
// then the lowest failing worker's.
absl::Status RunRanksInProcesses(RankDevice device, int world_size, const std::string& program,
                                 const std::vector<std::string>& worker_args,
                                 const std::function<absl::Status(std::shared_ptr<TensorParallelGroup>)>& rank_work);

// The one entry of a binary that runs as any of `world_size` ranks: with 1 rank, `rank_work(nullptr)`
// alone; in a worker (`worker_rank` > 0, the value of its hidden rank flag) joins the group at
// `rendezvous_file` as that rank; otherwise rank 0 of RunRanksInProcesses, re-executing this
// binary with `worker_args`.
absl::Status RunAsRank(RankDevice device, int world_size, int worker_rank, const std::string& rendezvous_file,
                       const std::vector<std::string>& worker_args,
                       const std::function<absl::Status(std::shared_ptr<TensorParallelGroup>)>& rank_work);

}  // namespace lychee
