// Which requests run each iteration of the engine: a bounded waiting queue, admission, and
// preemption when the KV pool runs out. Requests run in the order they were admitted, oldest
// first; each iteration gives every running request one prefill chunk (while it reads its prompt)
// or one decode step, after making sure the pool has the pages of the positions it will write.
// When it has not, the youngest running request is preempted: its sequence is dropped and it goes
// back to the front of the queue, to be prefilled again from its prompt and the tokens it has
// generated. The oldest is never preempted for a younger one, and fits alone because Submit
// refuses a request that could outgrow the whole pool, so the engine always makes progress.
// Free of LibTorch.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "inference/engine_request.h"
#include "inference/kv_cache_manager.h"

namespace lychee {

struct SchedulerOptions {
  int max_batch = 16;
  int max_queued = 64;
  int64_t prefill_chunk_tokens = 512;
};

struct PrefillChunk {
  EngineRequest* request = nullptr;
  int64_t tokens = 0;
};

// One iteration's work, in the order the engine applies it. The pages of `preempted` are counted
// as free in the plan, so their sequences must be dropped before anything runs.
struct SchedulerOutput {
  std::vector<EngineRequest*> preempted;
  // Admitted this iteration: each needs a new sequence (it had none, or it was preempted).
  std::vector<EngineRequest*> admitted;
  std::vector<PrefillChunk> prefills;
  std::vector<EngineRequest*> decodes;
};

class Scheduler {
 public:
  Scheduler(SchedulerOptions options, const KvCacheManager& kv) : options_(options), kv_(kv) {}

  // Any thread. Queues the request; RESOURCE_EXHAUSTED when more than max_queued would wait
  // behind the requests the next iteration can admit, UNAVAILABLE once stopped.
  absl::Status Add(std::unique_ptr<EngineRequest> request);
  int64_t num_waiting() const;
  int64_t num_running() const;
  // Add refuses from now on, and WaitForWork returns false.
  void Stop();

  // The engine's thread only, from here on.
  // Waits up to `poll` while nothing runs and nothing waits; false once stopped.
  bool WaitForWork(std::chrono::milliseconds poll);
  // Requests, waiting or running, whose client cancelled or whose deadline passed.
  std::vector<EngineRequest*> Abandoned() const;
  SchedulerOutput Schedule();
  // The requests whose status is kFinished, no longer scheduled.
  std::vector<std::unique_ptr<EngineRequest>> TakeFinished();
  // Every request still held, for the engine to end at shutdown.
  std::vector<std::unique_ptr<EngineRequest>> TakeAll();

 private:
  // Pages the first prefill chunk of a waiting request takes.
  int64_t AdmissionPages(const EngineRequest& request) const;
  int64_t ChunkTokens(const EngineRequest& request) const;
  // Drops the sequence of the youngest running request (in the plan: its pages count as free) and
  // queues it first.
  void PreemptYoungest(SchedulerOutput& output, int64_t& free_pages);
  // Waiting requests the next iteration would not admit.
  int64_t Blocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  const SchedulerOptions options_;
  const KvCacheManager& kv_;

  mutable absl::Mutex mutex_;
  std::deque<std::unique_ptr<EngineRequest>> waiting_ ABSL_GUARDED_BY(mutex_);
  int64_t num_running_ ABSL_GUARDED_BY(mutex_) = 0;
  bool stopped_ ABSL_GUARDED_BY(mutex_) = false;

  // Oldest first. The engine's thread only, so unguarded.
  std::vector<std::unique_ptr<EngineRequest>> running_;
};

}  // namespace lychee
