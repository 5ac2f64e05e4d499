// Follows a lychee-trainer's WatchHeadPartitions for the served model and offers every new
// partition to the PartitionManager. When the stream breaks (trainer restarted, killed, not up
// yet) it reconnects with exponential backoff and asks only for versions above the highest it
// holds, so that nothing published while it was away is missed. Free of LibTorch.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "inference/partition_manager.h"

namespace grpc {
class ChannelCredentials;
class ClientContext;
}

namespace lychee {

struct TrainerWatcherOptions {
  std::string trainer_address;
  std::string model_fingerprint;
  // How to reach the trainer (TLS, a client certificate); null: plaintext. The watch is a read
  // and needs no token.
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  std::chrono::milliseconds initial_backoff{100};
  std::chrono::milliseconds max_backoff{5000};
};

class TrainerWatcher {
 public:
  // Starts following at once; `partitions` must outlive the watcher.
  TrainerWatcher(TrainerWatcherOptions options, PartitionManager& partitions);
  ~TrainerWatcher();

  bool connected() const;
  std::string last_error() const;
  const std::string& trainer_address() const { return options_.trainer_address; }

 private:
  void Run();
  // One subscription, until the stream ends; OK when stopped.
  void Follow();
  void SetState(bool connected, const std::string& error);

  const TrainerWatcherOptions options_;
  PartitionManager& partitions_;
  mutable absl::Mutex mutex_;
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  bool connected_ ABSL_GUARDED_BY(mutex_) = false;
  std::string last_error_ ABSL_GUARDED_BY(mutex_);
  std::shared_ptr<grpc::ClientContext> call_ ABSL_GUARDED_BY(mutex_);
  std::thread thread_;
};

}  // namespace lychee
