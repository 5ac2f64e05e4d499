// lychee-trainer and lychee-inference as real processes for the integration, CLI and fault tests:
// started with their output in a log file, reached over loopback gRPC, killed with SIGKILL when a
// test says so.
#pragma once

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>

#include <catch2/catch.hpp>

#include <chrono>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "common/base/head_partition.h"
#include "harness/child_process.h"
#include "lychee/v1/inference.grpc.pb.h"
#include "lychee/v1/trainer.grpc.pb.h"

namespace lychee::testing {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

inline constexpr char kModelName[] = "tiny-llama-retrieval";
// The partitions shipped with the bundled model, published by hand in the tests.
inline const std::vector<std::string> kShippedPartitions = {
    "models/tiny-llama-retrieval/partitions/learned-target-0.25.json",
    "models/tiny-llama-retrieval/partitions/retrieval-head-0.json"};

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Waits for `condition`, polling; fails the test with `what` after `timeout`.
inline void WaitFor(const std::string& what, std::chrono::milliseconds timeout, const std::function<bool()>& condition) {
  const auto until = Clock::now() + timeout;
  while (Clock::now() < until) {
    if (condition()) return;
    std::this_thread::sleep_for(50ms);
  }
  FAIL("timed out waiting for " << what);
}

inline std::unique_ptr<grpc::ClientContext> Context(std::chrono::seconds timeout = 30s) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + timeout);
  return context;
}

// The port a server printed in its log ("<service> on port N"), printed after the one that
// `skip_bytes` of the log already held (a restart appends to the same log).
inline int PortFromLog(const std::string& log_path, const std::string& service, size_t skip_bytes = 0) {
  int port = 0;
  WaitFor("a server to print its port in " + log_path, 120s, [&] {
    std::smatch match;
    const std::string log = ReadAll(log_path);
    const std::string fresh = log.size() > skip_bytes ? log.substr(skip_bytes) : "";
    if (std::regex_search(fresh, match, std::regex(service + " on port ([0-9]+)"))) port = std::stoi(match[1]);
    return port != 0;
  });
  return port;
}

inline v1::HeadPartition ShippedPartition(size_t index) {
  absl::StatusOr<HeadPartition> partition = LoadHeadPartitionJson(kShippedPartitions.at(index));
  REQUIRE(partition.ok());
  return HeadPartitionToProto(*partition);
}

inline v1::PublishHeadPartitionRequest PublishRequest(size_t shipped_index) {
  v1::PublishHeadPartitionRequest request;
  request.mutable_model()->set_name(kModelName);
  *request.mutable_partition() = ShippedPartition(shipped_index);
  return request;
}

// A server process and its log; Start again after a kill restarts it with the same arguments.
class Server {
 public:
  Server(std::string program, std::string service, std::vector<std::string> args, std::string log)
      : program_(std::move(program)), service_(std::move(service)), args_(std::move(args)), log_(std::move(log)) {}

  void Start() {
    const size_t log_before = ReadAll(log_).size();
    process_ = std::make_unique<ChildProcess>(program_, args_, log_);
    port_ = PortFromLog(log_, service_, log_before);
    channel_ = grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
  }
  void KillHard() { REQUIRE(process_->Kill(SIGKILL)); }
  bool running() { return process_ != nullptr && process_->running(); }
  pid_t pid() const { return process_->pid(); }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  const std::string& log() const { return log_; }
  std::string log_text() const { return ReadAll(log_); }

 private:
  const std::string program_;
  const std::string service_;
  const std::vector<std::string> args_;
  const std::string log_;
  std::unique_ptr<ChildProcess> process_;
  std::shared_ptr<grpc::Channel> channel_;
  int port_ = 0;
};

inline std::unique_ptr<Server> MakeTrainer(const std::string& registry, const std::string& log,
                                           std::vector<std::string> extra_args = {}) {
  std::vector<std::string> args = {"--listen", "127.0.0.1:0", "--registry-dir", registry, "--threads", "1"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  return std::make_unique<Server>(LYCHEE_TRAINER, "TrainerService", std::move(args), log);
}

inline std::unique_ptr<Server> MakeInference(const std::string& state, const std::string& log,
                                             std::vector<std::string> extra_args = {}) {
  // Shadow validation off: these tests roll out partitions they pick for their own reasons
  // (shadow_validation_test covers the validation).
  std::vector<std::string> args = {"--listen",  "127.0.0.1:0", "--state-dir",         state,
                                   "--threads", "1",           "--shadow-validation", "false"};
  args.insert(args.end(), extra_args.begin(), extra_args.end());
  return std::make_unique<Server>(LYCHEE_INFERENCE, "InferenceService", std::move(args), log);
}

inline std::unique_ptr<v1::TrainerService::Stub> TrainerStub(const Server& trainer) {
  return v1::TrainerService::NewStub(trainer.channel());
}
inline std::unique_ptr<v1::InferenceService::Stub> InferenceStub(const Server& inference) {
  return v1::InferenceService::NewStub(inference.channel());
}

// The registry's readable versions of the bundled model, by the trainer.
inline std::vector<v1::HeadPartition> ListVersions(v1::TrainerService::Stub& trainer) {
  v1::ListHeadPartitionsRequest request;
  request.mutable_model()->set_name(kModelName);
  v1::ListHeadPartitionsResponse response;
  const grpc::Status status = trainer.ListHeadPartitions(Context().get(), request, &response);
  REQUIRE(status.ok());
  return {response.partitions().begin(), response.partitions().end()};
}

inline grpc::Status GetVersion(v1::TrainerService::Stub& trainer, uint64_t version, v1::HeadPartition* partition) {
  v1::GetHeadPartitionRequest request;
  request.mutable_model()->set_name(kModelName);
  request.set_version(version);
  return trainer.GetHeadPartition(Context().get(), request, partition);
}

inline v1::Job GetJob(v1::TrainerService::Stub& trainer, const std::string& name) {
  v1::GetJobRequest request;
  request.set_name(name);
  v1::Job job;
  const grpc::Status status = trainer.GetJob(Context().get(), request, &job);
  REQUIRE(status.ok());
  return job;
}

inline v1::ServerInfo ServerInfo(v1::InferenceService::Stub& inference) {
  v1::ServerInfo info;
  const grpc::Status status = inference.GetServerInfo(Context().get(), {}, &info);
  REQUIRE(status.ok());
  return info;
}

struct GenerationResult {
  grpc::Status status;
  int tokens = 0;
  uint64_t partition_version = 0;
  bool hybrid = false;
};

inline GenerationResult Generate(v1::InferenceService::Stub& inference, const std::string& prompt, int max_new_tokens,
                                 std::chrono::seconds timeout = 120s) {
  v1::GenerateRequest request;
  request.set_text(prompt);
  request.set_max_new_tokens(max_new_tokens);
  auto context = Context(timeout);
  auto reader = inference.Generate(context.get(), request);
  GenerationResult result;
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    result.tokens += response.token_ids_size();
    if (response.has_done()) {
      result.partition_version = response.done().partition_version();
      result.hybrid = response.done().attention_mode() == v1::ATTENTION_MODE_HYBRID;
    }
  }
  result.status = reader->Finish();
  return result;
}

}  // namespace lychee::testing
