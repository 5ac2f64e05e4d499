// The trainer and the inference service as real processes on loopback: a calibration job's
// partition reaches the inference service and is activated while clients stream generations,
// rollback works, and a trainer killed with SIGKILL mid-job neither stops the serving nor keeps
// the inference service from catching up once it is back.
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <functional>
#include <iterator>
#include <mutex>
#include <regex>
#include <thread>

#include "common/base/head_partition.h"
#include "harness/child_process.h"
#include "harness/temp_dir.h"
#include "lychee/v1/inference.grpc.pb.h"
#include "lychee/v1/trainer.grpc.pb.h"
#include "tests/server_processes.h"

namespace lychee {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr int kClients = 8;

using testing::Context;
using testing::kModelName;
using testing::PortFromLog;
using testing::WaitFor;

struct Trainer {
  std::unique_ptr<testing::ChildProcess> process;
  std::unique_ptr<v1::TrainerService::Stub> stub;
  int port = 0;

  void Start(const std::string& registry, const std::string& log, int fixed_port) {
    const std::string listen = "127.0.0.1:" + std::to_string(fixed_port);
    process = std::make_unique<testing::ChildProcess>(
        LYCHEE_TRAINER, std::vector<std::string>{"--listen", listen, "--registry-dir", registry}, log);
    port = PortFromLog(log, "TrainerService");
    if (fixed_port != 0) REQUIRE(port == fixed_port);
    stub = v1::TrainerService::NewStub(
        grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  }
};

struct Generation : testing::GenerationResult {
  Clock::time_point started;
  Clock::time_point finished;
};

TEST_CASE("partitions roll out from a trainer to an inference service under load") {
  testing::TempDir dir;
  const std::string registry = (dir.path / "registry").string();
  const std::string state = (dir.path / "state").string();
  const std::string trainer_log = (dir.path / "trainer.log").string();
  const std::string inference_log = (dir.path / "inference.log").string();
  INFO("logs: " << trainer_log << " and " << inference_log);

  Trainer trainer;
  trainer.Start(registry, trainer_log, 0);
  // Version 1: the partition shipped with the model, published by hand.
  {
    absl::StatusOr<HeadPartition> shipped = LoadHeadPartitionJson("models/tiny-llama-retrieval/partitions/learned-target-0.25.json");
    REQUIRE(shipped.ok());
    v1::PublishHeadPartitionRequest request;
    request.mutable_model()->set_name(kModelName);
    *request.mutable_partition() = HeadPartitionToProto(*shipped);
    v1::HeadPartition published;
    const grpc::Status status = trainer.stub->PublishHeadPartition(Context().get(), request, &published);
    REQUIRE(status.ok());
    REQUIRE(published.version() == 1);
  }

  // Shadow validation off: this test rolls out a 20-step calibration result and retrieval-head-0,
  // which it would rightly reject (shadow_validation_test covers it).
  testing::ChildProcess inference(
      LYCHEE_INFERENCE,
      {"--listen", "127.0.0.1:0", "--state-dir", state, "--trainer", "127.0.0.1:" + std::to_string(trainer.port),
       "--metrics-listen", "127.0.0.1:0", "--max-batch", "16", "--shadow-validation", "false"},
      inference_log);
  const int inference_port = PortFromLog(inference_log, "InferenceService");
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(inference_port), grpc::InsecureChannelCredentials());
  auto inference_stub = v1::InferenceService::NewStub(channel);
  const auto server_info = [&] {
    v1::ServerInfo info;
    const grpc::Status status = inference_stub->GetServerInfo(Context().get(), {}, &info);
    REQUIRE(status.ok());
    return info;
  };
  WaitFor("version 1 to be active", 60s, [&] { return server_info().active_partition_version() == 1; });

  // Clients stream generations with the server's default attention (hybrid with the active
  // partition) until told to stop.
  std::atomic<bool> stop_clients{false};
  std::mutex results_mutex;
  std::vector<Generation> results;
  std::vector<std::thread> clients;
  for (int client = 0; client < kClients; ++client) {
    clients.emplace_back([&, client] {
      auto stub = v1::InferenceService::NewStub(channel);
      while (!stop_clients) {
        const Clock::time_point started = Clock::now();
        testing::GenerationResult result = testing::Generate(
            *stub, "Client " + std::to_string(client) + " asks: what did the old sailor find in the harbour?", 12);
        const Generation generation{std::move(result), started, Clock::now()};
        std::lock_guard<std::mutex> lock(results_mutex);
        results.push_back(generation);
      }
    });
  }
  const auto completed = [&] {
    std::lock_guard<std::mutex> lock(results_mutex);
    return results.size();
  };
  // Generations that started after `since` and have ended.
  const auto completed_since = [&](Clock::time_point since) {
    std::lock_guard<std::mutex> lock(results_mutex);
    return std::count_if(results.begin(), results.end(), [&](const Generation& g) { return g.started > since; });
  };
  WaitFor("the clients to complete some generations", 120s, [&] { return completed() >= kClients; });

  // A short calibration job publishes version 2, which the inference service activates.
  v1::SubmitCalibrationJobRequest job_request;
  job_request.set_model(kModelName);
  job_request.mutable_config()->set_steps(2);
  job_request.mutable_config()->set_target_density(0.25);
  job_request.mutable_config()->set_min_context_tokens(256);
  job_request.mutable_config()->set_max_context_tokens(512);
  job_request.mutable_config()->set_token_budget(256);
  v1::Job job;
  REQUIRE(trainer.stub->SubmitCalibrationJob(Context().get(), job_request, &job).ok());
  WaitFor("the calibration job to publish", 300s, [&] {
    v1::GetJobRequest get;
    get.set_name(job.name());
    REQUIRE(trainer.stub->GetJob(Context().get(), get, &job).ok());
    REQUIRE(job.state() != v1::JOB_STATE_FAILED);
    return job.state() == v1::JOB_STATE_SUCCEEDED;
  });
  REQUIRE(job.result().partition_version() == 2);
  WaitFor("version 2 to be active", 60s, [&] { return server_info().active_partition_version() == 2; });
  CHECK(server_info().activated_by() == "trainer");
  const Clock::time_point activated = Clock::now();
  WaitFor("generations admitted after the rollout", 120s, [&] { return completed_since(activated) >= kClients; });

  // Rollback returns to version 1 for new sequences.
  const Clock::time_point rollback_issued = Clock::now();
  v1::ServerInfo after_rollback;
  REQUIRE(inference_stub->Rollback(Context().get(), {}, &after_rollback).ok());
  CHECK(after_rollback.active_partition_version() == 1);
  CHECK(after_rollback.activated_by() == "rollback");
  const Clock::time_point rolled_back = Clock::now();
  WaitFor("generations admitted after the rollback", 120s, [&] { return completed_since(rolled_back) >= kClients; });

  // The trainer dies with SIGKILL in the middle of a job; the inference service goes on.
  job_request.mutable_config()->set_steps(1000);
  REQUIRE(trainer.stub->SubmitCalibrationJob(Context().get(), job_request, &job).ok());
  WaitFor("the long job to run", 60s, [&] {
    v1::GetJobRequest get;
    get.set_name(job.name());
    REQUIRE(trainer.stub->GetJob(Context().get(), get, &job).ok());
    return job.state() == v1::JOB_STATE_RUNNING;
  });
  const int trainer_port = trainer.port;
  REQUIRE(trainer.process->Kill(SIGKILL));
  WaitFor("the inference service to notice", 30s, [&] { return !server_info().trainer_connected(); });
  const Clock::time_point trainer_down = Clock::now();
  WaitFor("generations while the trainer is down", 120s, [&] { return completed_since(trainer_down) >= kClients; });

  // Back on the same address, the trainer publishes version 3 and the inference service,
  // reconnecting by itself, activates it.
  trainer.Start(registry, (dir.path / "trainer-restarted.log").string(), trainer_port);
  const Clock::time_point version_3_published = Clock::now();
  {
    v1::GetJobRequest get;
    get.set_name(job.name());
    REQUIRE(trainer.stub->GetJob(Context().get(), get, &job).ok());
    CHECK(job.state() == v1::JOB_STATE_INTERRUPTED);
    absl::StatusOr<HeadPartition> shipped = LoadHeadPartitionJson("models/tiny-llama-retrieval/partitions/retrieval-head-0.json");
    REQUIRE(shipped.ok());
    v1::PublishHeadPartitionRequest request;
    request.mutable_model()->set_name(kModelName);
    *request.mutable_partition() = HeadPartitionToProto(*shipped);
    v1::HeadPartition published;
    REQUIRE(trainer.stub->PublishHeadPartition(Context().get(), request, &published).ok());
    REQUIRE(published.version() == 3);
  }
  WaitFor("version 3 to be active", 60s, [&] { return server_info().active_partition_version() == 3; });
  CHECK(server_info().trainer_connected());
  const Clock::time_point caught_up = Clock::now();
  WaitFor("generations after catching up", 120s, [&] { return completed_since(caught_up) >= kClients; });

  stop_clients = true;
  for (std::thread& client : clients) client.join();

  size_t after_activation = 0;
  for (const Generation& generation : results) {
    INFO("a generation started " << std::chrono::duration<double>(generation.started - activated).count()
                                 << " s after the rollout to version 2");
    REQUIRE(generation.status.ok());
    CHECK(generation.tokens > 0);
    CHECK(generation.hybrid);
    CHECK(generation.partition_version >= 1);
    CHECK(generation.partition_version <= 3);
    // A request admitted after a switch, and over before the next one began, got the
    // partition it switched to.
    if (generation.started > caught_up) {
      CHECK(generation.partition_version == 3);
    } else if (generation.started > rolled_back && generation.finished < version_3_published) {
      CHECK(generation.partition_version == 1);
    } else if (generation.started > activated && generation.finished < rollback_issued) {
      CHECK(generation.partition_version == 2);
      ++after_activation;
    }
  }
  CHECK(after_activation >= static_cast<size_t>(kClients));
  CHECK(inference.running());
}

}  // namespace
}  // namespace lychee
