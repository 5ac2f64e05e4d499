// Data-parallel calibration jobs through the job manager with the real runner: rank 0 in this
// process, rank 1 a lychee-trainer calibration worker (LYCHEE_TRAINER). The published partition
// matches the one-rank job's, and so does every target's of a sweep; a killed worker fails its job,
// naming the rank, and the next job runs; a cancelled job leaves no worker behind.
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/base/head_partition.h"
#include "common/base/partition_store.h"
#include "harness/temp_dir.h"
#include "tests/trainer/bundled_jobs.h"
#include "trainer/job_manager.h"
#include "trainer/job_runner.h"

namespace lychee {
namespace {
namespace fs = std::filesystem;

// A small job with 2 samples per step, one for each of 2 ranks: a few seconds a job.
v1::SubmitCalibrationJobRequest Request(int64_t steps) {
  v1::SubmitCalibrationJobRequest request = testing::SmallCalibrationJob(steps);
  request.mutable_config()->set_samples_per_step(2);
  return request;
}

struct Trainer {
  explicit Trainer(int data_parallel) {
    JobManagerOptions options = testing::BundledJobOptions(data.path.string(), (registry.path / "jobs").string());
    options.data_parallel = data_parallel;
    manager = JobManager::Create(options, *store, MakeCalibrationRunner("cpu", 1, LYCHEE_TRAINER).value()).value();
  }

  // Waits (up to 5 minutes: 2 cores under a parallel ctest) until the job satisfies `done`.
  v1::Job WaitFor(const std::string& name, const std::function<bool(const v1::Job&)>& done) const {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
    uint64_t revision = 0;
    while (true) {
      const JobManager::Update update = manager->WaitForUpdate(name, revision, std::chrono::milliseconds(100)).value();
      revision = update.revision;
      if (done(update.job) || std::chrono::steady_clock::now() > deadline) return update.job;
    }
  }
  v1::Job WaitForEnd(const std::string& name) const {
    return WaitFor(name, [](const v1::Job& job) { return IsFinal(job.state()); });
  }
  // Submits and waits for the end.
  v1::Job Run(const v1::SubmitCalibrationJobRequest& request) const {
    return WaitForEnd(manager->Submit(request).value().name());
  }

  testing::TempDir registry;
  testing::TempDir data;
  std::unique_ptr<PartitionStore> store = PartitionStore::Open(registry.path.string()).value();
  std::unique_ptr<JobManager> manager;
};

// The processes whose parent is this one: the calibration workers, as nothing else here starts any.
std::vector<pid_t> ChildProcesses() {
  std::vector<pid_t> children;
  for (const fs::directory_entry& entry : fs::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;  // gone meanwhile
    // "pid (comm) state ppid ...": comm may hold spaces, so read after its closing parenthesis.
    std::istringstream rest(line.substr(line.rfind(')') + 1));
    std::string state;
    pid_t parent = 0;
    rest >> state >> parent;
    if (parent == getpid()) children.push_back(static_cast<pid_t>(std::stoi(name)));
  }
  return children;
}

// The same roles, gate means and final loss: what two ranks over a batch learn is what one learns.
void CheckSamePartition(const HeadPartition& mine, const HeadPartition& reference) {
  REQUIRE(mine.gates.size() == reference.gates.size());
  for (size_t i = 0; i < reference.gates.size(); ++i) {
    INFO("layer " << reference.gates[i].layer << " KV head " << reference.gates[i].kv_head);
    CHECK(mine.gates[i].kuma_mean == Approx(reference.gates[i].kuma_mean).epsilon(1e-4));
  }
  for (int layer = 0; layer < reference.num_layers(); ++layer) {
    for (int head = 0; head < reference.num_kv_heads(); ++head) {
      CHECK(mine.role(layer, head) == reference.role(layer, head));
    }
  }
  CHECK(mine.training.final_distillation_loss == Approx(reference.training.final_distillation_loss).epsilon(1e-4));
}

v1::Job RunningPastFirstStep(const Trainer& trainer, const std::string& name) {
  return trainer.WaitFor(name, [](const v1::Job& job) { return job.progress().step() >= 1 || IsFinal(job.state()); });
}

TEST_CASE("a job on two data-parallel ranks publishes the partition of the one-rank job", "[data_parallel]") {
  Trainer one_rank(1);
  const v1::Job single = one_rank.Run(Request(3));
  INFO("one rank: " << single.ShortDebugString());
  REQUIRE(single.state() == v1::JOB_STATE_SUCCEEDED);
  Trainer two_ranks(2);
  const v1::Job data_parallel = two_ranks.Run(Request(3));
  INFO("two ranks: " << data_parallel.ShortDebugString());
  REQUIRE(data_parallel.state() == v1::JOB_STATE_SUCCEEDED);
  CHECK(ChildProcesses().empty());

  const PartitionStore::Snapshot reference =
      one_rank.store->Get(single.result().model_fingerprint(), single.result().partition_version()).value();
  const PartitionStore::Snapshot mine =
      two_ranks.store->Get(data_parallel.result().model_fingerprint(), data_parallel.result().partition_version())
          .value();
  CheckSamePartition(*mine, *reference);
}

TEST_CASE("every target of a sweep on two data-parallel ranks learns the one-rank sweep's partition",
          "[data_parallel]") {
  v1::SubmitCalibrationJobRequest request = Request(2);
  request.add_target_densities(0.1);
  request.add_target_densities(0.3);
  v1::SweepConfig* sweep = request.mutable_sweep();
  sweep->set_validation_context_tokens(256);
  sweep->set_validation_samples(1);
  sweep->set_max_accuracy_drop(1);
  Trainer one_rank(1);
  const v1::Job single = one_rank.Run(request);
  INFO("one rank: " << single.ShortDebugString());
  REQUIRE(single.state() == v1::JOB_STATE_SUCCEEDED);
  Trainer two_ranks(2);
  const v1::Job data_parallel = two_ranks.Run(request);
  INFO("two ranks: " << data_parallel.ShortDebugString());
  REQUIRE(data_parallel.state() == v1::JOB_STATE_SUCCEEDED);
  CHECK(ChildProcesses().empty());
  REQUIRE(single.sweep().rows_size() == 2);
  REQUIRE(data_parallel.sweep().rows_size() == 2);
  for (int row = 0; row < 2; ++row) {
    INFO("target " << single.sweep().rows(row).target_density());
    CheckSamePartition(HeadPartitionFromProto(data_parallel.sweep().rows(row).partition()).value(),
                       HeadPartitionFromProto(single.sweep().rows(row).partition()).value());
  }
}

TEST_CASE("a killed data-parallel worker fails its job naming the rank, and the next job runs", "[data_parallel]") {
  Trainer trainer(2);
  const std::string name = trainer.manager->Submit(Request(10000)).value().name();
  REQUIRE(RunningPastFirstStep(trainer, name).state() == v1::JOB_STATE_RUNNING);
  const std::vector<pid_t> workers = ChildProcesses();
  REQUIRE(workers.size() == 1);
  REQUIRE(kill(workers[0], SIGKILL) == 0);

  const v1::Job failed = trainer.WaitForEnd(name);
  INFO(failed.ShortDebugString());
  CHECK(failed.state() == v1::JOB_STATE_FAILED);
  CHECK(failed.error().code() == static_cast<int32_t>(absl::StatusCode::kUnavailable));
  CHECK_THAT(failed.error().message(),
             Catch::Contains("data-parallel rank 1 (pid " + std::to_string(workers[0]) + ") was killed by signal 9"));
  CHECK(ChildProcesses().empty());

  const v1::Job next = trainer.Run(Request(2));
  INFO(next.ShortDebugString());
  CHECK(next.state() == v1::JOB_STATE_SUCCEEDED);
}

TEST_CASE("cancelling a data-parallel job ends it CANCELLED and leaves no worker running", "[data_parallel]") {
  Trainer trainer(2);
  const std::string name = trainer.manager->Submit(Request(10000)).value().name();
  REQUIRE(RunningPastFirstStep(trainer, name).state() == v1::JOB_STATE_RUNNING);
  REQUIRE(ChildProcesses().size() == 1);
  REQUIRE(trainer.manager->Cancel(name).ok());
  const v1::Job cancelled = trainer.WaitForEnd(name);
  INFO(cancelled.ShortDebugString());
  CHECK(cancelled.state() == v1::JOB_STATE_CANCELLED);
  CHECK(cancelled.error().code() == static_cast<int32_t>(absl::StatusCode::kCancelled));
  CHECK(ChildProcesses().empty());
}

TEST_CASE("samples per step that the trainer's ranks cannot split are refused at submission, naming both",
          "[data_parallel]") {
  Trainer trainer(2);
  v1::SubmitCalibrationJobRequest request = Request(3);
  request.mutable_config()->set_samples_per_step(3);
  const absl::Status refused = trainer.manager->Submit(request).status();
  CHECK(refused.code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(refused.message()), Catch::Contains("samples_per_step"));
  CHECK_THAT(std::string(refused.message()), Catch::Contains("2 data-parallel ranks"));
  CHECK_THAT(std::string(refused.message()), Catch::Contains("got 3"));
  CHECK(trainer.manager->List().empty());
}

TEST_CASE("lychee-trainer refuses more data-parallel ranks than GPUs on cuda at startup", "[data_parallel]") {
  testing::TempDir registry;
  const std::string command = std::string(LYCHEE_TRAINER) + " --registry-dir " + registry.path.string() +
                              " --listen 127.0.0.1:0 --data-parallel 64 --device cuda 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::string output;
  char buffer[4096];
  while (fgets(buffer, sizeof buffer, pipe) != nullptr) output += buffer;
  const int status = pclose(pipe);
  INFO(output);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);
  // This machine's GPUs, if any, are fewer than 64.
  CHECK_THAT(output, Catch::Contains("--data-parallel 64 on cuda needs a GPU per rank: 64 ranks"));
}

}  // namespace
}  // namespace lychee
