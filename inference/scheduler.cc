#include "inference/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lychee {

absl::Status Scheduler::Add(std::unique_ptr<EngineRequest> request) {
  absl::MutexLock lock(&mutex_);
  if (stopped_) return absl::UnavailableError("the server is shutting down");
  waiting_.push_back(std::move(request));
  if (Blocked() > options_.max_queued) {
    waiting_.pop_back();
    return absl::ResourceExhaustedError(absl::StrCat(
        "the server is full: ", num_running_, " sequences run, ", kv_.used_pages(), " of ", kv_.num_pages(),
        " KV pages are in use and ", waiting_.size(), " requests wait already; retry later"));
  }
  return absl::OkStatus();
}

int64_t Scheduler::num_waiting() const {
  absl::MutexLock lock(&mutex_);
  return static_cast<int64_t>(waiting_.size());
}

int64_t Scheduler::num_running() const {
  absl::MutexLock lock(&mutex_);
  return num_running_;
}

void Scheduler::Stop() {
  absl::MutexLock lock(&mutex_);
  stopped_ = true;
}

bool Scheduler::WaitForWork(std::chrono::milliseconds poll) {
  absl::MutexLock lock(&mutex_);
  const auto has_work = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return stopped_ || !waiting_.empty(); };
  if (running_.empty()) mutex_.AwaitWithTimeout(absl::Condition(&has_work), absl::FromChrono(poll));
  return !stopped_;
}

std::vector<EngineRequest*> Scheduler::Abandoned() const {
  const EngineClock::time_point now = EngineClock::now();
  std::vector<EngineRequest*> abandoned;
  const auto check = [&](const std::unique_ptr<EngineRequest>& request) {
    if (request->status == RequestStatus::kFinished) return;
    if (request->stream->cancelled() || now > request->request.deadline) abandoned.push_back(request.get());
  };
  std::for_each(running_.begin(), running_.end(), check);
  absl::MutexLock lock(&mutex_);
  std::for_each(waiting_.begin(), waiting_.end(), check);
  return abandoned;
}

int64_t Scheduler::ChunkTokens(const EngineRequest& request) const {
  return std::min(options_.prefill_chunk_tokens, request.prefill_target() - request.computed_tokens);
}

int64_t Scheduler::AdmissionPages(const EngineRequest& request) const { return kv_.PagesFor(ChunkTokens(request)); }

SchedulerOutput Scheduler::Schedule() {
  SchedulerOutput output;
  int64_t free_pages = kv_.free_pages();
  for (size_t i = 0; i < running_.size(); ++i) {
    EngineRequest& request = *running_[i];
    const int64_t tokens = request.prefilling() ? ChunkTokens(request) : 1;
    const int64_t needed = kv_.PagesFor(request.computed_tokens + tokens) - kv_.PagesFor(request.computed_tokens);
    // Younger requests give way first; with none left, the request itself does.
    while (needed > free_pages && running_.size() > i) PreemptYoungest(output, free_pages);
    if (i == running_.size()) break;
    free_pages -= needed;
    if (request.prefilling()) {
      output.prefills.push_back({&request, tokens});
    } else {
      output.decodes.push_back(&request);
    }
  }
  absl::MutexLock lock(&mutex_);
  // A request preempted now would only be admitted again into the room it just gave up.
  if (output.preempted.empty()) {
    while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < options_.max_batch) {
      EngineRequest& request = *waiting_.front();
      const int64_t needed = AdmissionPages(request);
      if (needed > free_pages) break;
      free_pages -= needed;
      if (request.status == RequestStatus::kWaiting) {
        request.summary.queue_seconds = std::chrono::duration<double>(EngineClock::now() - request.arrived).count();
      }
      request.status = RequestStatus::kRunning;
      output.admitted.push_back(&request);
      output.prefills.push_back({&request, ChunkTokens(request)});
      running_.push_back(std::move(waiting_.front()));
      waiting_.pop_front();
    }
  }
  num_running_ = static_cast<int64_t>(running_.size());
  return output;
}

void Scheduler::PreemptYoungest(SchedulerOutput& output, int64_t& free_pages) {
  std::unique_ptr<EngineRequest> victim = std::move(running_.back());
  running_.pop_back();
  free_pages += kv_.PagesFor(victim->computed_tokens);
  victim->computed_tokens = 0;
  victim->status = RequestStatus::kPreempted;
  ++victim->summary.preemptions;
  output.preempted.push_back(victim.get());
  absl::MutexLock lock(&mutex_);
  // Ahead of every request that never ran; victims of one iteration go youngest first, so each
  // older one lands in front of it.
  waiting_.push_front(std::move(victim));
  num_running_ = static_cast<int64_t>(running_.size());
}

std::vector<std::unique_ptr<EngineRequest>> Scheduler::TakeFinished() {
  std::vector<std::unique_ptr<EngineRequest>> finished;
  const auto take = [&](auto& requests) {
    for (auto it = requests.begin(); it != requests.end();) {
      if ((*it)->status == RequestStatus::kFinished) {
        finished.push_back(std::move(*it));
        it = requests.erase(it);
      } else {
        ++it;
      }
    }
  };
  take(running_);
  absl::MutexLock lock(&mutex_);
  take(waiting_);
  num_running_ = static_cast<int64_t>(running_.size());
  return finished;
}

std::vector<std::unique_ptr<EngineRequest>> Scheduler::TakeAll() {
  std::vector<std::unique_ptr<EngineRequest>> all = std::move(running_);
  running_.clear();
  absl::MutexLock lock(&mutex_);
  for (std::unique_ptr<EngineRequest>& request : waiting_) all.push_back(std::move(request));
  waiting_.clear();
  num_running_ = 0;
  return all;
}

int64_t Scheduler::Blocked() const {
  int64_t sequences = num_running_;
  int64_t free_pages = kv_.free_pages();
  int64_t admissible = 0;
  for (const std::unique_ptr<EngineRequest>& request : waiting_) {
    const int64_t needed = AdmissionPages(*request);
    if (sequences >= options_.max_batch || needed > free_pages) break;
    ++sequences;
    free_pages -= needed;
    ++admissible;
  }
  return static_cast<int64_t>(waiting_.size()) - admissible;
}

}  // namespace lychee
