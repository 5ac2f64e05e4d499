#include "inference/trainer_watcher.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "lychee/v1/trainer.grpc.pb.h"

namespace lychee {

TrainerWatcher::TrainerWatcher(TrainerWatcherOptions options, PartitionManager& partitions)
    : options_(std::move(options)), partitions_(partitions) {
  thread_ = std::thread([this] { Run(); });
}

TrainerWatcher::~TrainerWatcher() {
  {
    absl::MutexLock lock(&mutex_);
    stopping_ = true;
    if (call_ != nullptr) call_->TryCancel();
  }
  thread_.join();
}

bool TrainerWatcher::connected() const {
  absl::MutexLock lock(&mutex_);
  return connected_;
}

std::string TrainerWatcher::last_error() const {
  absl::MutexLock lock(&mutex_);
  return last_error_;
}

void TrainerWatcher::SetState(bool connected, const std::string& error) {
  absl::MutexLock lock(&mutex_);
  connected_ = connected;
  if (!error.empty()) last_error_ = error;
}

void TrainerWatcher::Run() {
  std::chrono::milliseconds backoff = options_.initial_backoff;
  while (true) {
    const auto started = std::chrono::steady_clock::now();
    Follow();
    absl::MutexLock lock(&mutex_);
    if (stopping_) return;
    // A stream that lived a while was a working connection: start the backoff over.
    if (std::chrono::steady_clock::now() - started > options_.max_backoff) backoff = options_.initial_backoff;
    mutex_.AwaitWithTimeout(absl::Condition(&stopping_), absl::FromChrono(backoff));
    if (stopping_) return;
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
}

void TrainerWatcher::Follow() {
  auto channel = grpc::CreateChannel(options_.trainer_address, options_.credentials != nullptr
                                                                   ? options_.credentials
                                                                   : grpc::InsecureChannelCredentials());
  auto stub = v1::TrainerService::NewStub(channel);
  auto context = std::make_shared<grpc::ClientContext>();
  {
    absl::MutexLock lock(&mutex_);
    if (stopping_) return;
    call_ = context;
  }
  v1::WatchHeadPartitionsRequest request;
  request.mutable_model()->set_fingerprint(options_.model_fingerprint);
  // Everything published while this service was away; from the start when it holds nothing.
  request.set_after_version(partitions_.highest_version());
  auto reader = stub->WatchHeadPartitions(context.get(), request);
  // The stream sends nothing until a partition is published: the channel state says whether
  // the trainer is there.
  const bool reachable = channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (reachable) SetState(true, "");
  v1::HeadPartition proto;
  while (reader->Read(&proto)) {
    SetState(true, "");
    absl::StatusOr<HeadPartition> partition = HeadPartitionFromProto(proto);
    // The manager logs, counts and reports rejections; a bad partition must not end the watch.
    if (partition.ok()) {
      partitions_.Offer(*partition).IgnoreError();
    } else {
      partitions_.RejectUnreadable(proto.version(), partition.status());
    }
  }
  const grpc::Status status = reader->Finish();
  {
    absl::MutexLock lock(&mutex_);
    call_ = nullptr;
    connected_ = false;
    if (!stopping_) {
      last_error_ = absl::StrCat("watch of ", options_.trainer_address, " ended: ", status.error_message().empty() ? "stream closed" : status.error_message());
    }
  }
}

}  // namespace lychee
