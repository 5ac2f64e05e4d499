// The trainer end to end over gRPC on the loopback: the service in-process on 127.0.0.1:0 with
// the real calibration on the bundled model (tiny settings), the health and reflection services,
// the error codes, and the lychee CLI against it.
#include <catch2/catch.hpp>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/security/credentials.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "common/base/model_fingerprint.h"
#include "common/base/retrieval_tasks.h"
#include "common/service/grpc_status.h"
#include "harness/temp_dir.h"
#include "lychee/v1/trainer.grpc.pb.h"
#include "tests/run_command.h"
#include "tests/trainer/bundled_jobs.h"
#include "trainer/job_runner.h"
#include "trainer/service.h"

namespace lychee {
namespace {
namespace fs = std::filesystem;
using Clock = std::chrono::system_clock;

constexpr char kModel[] = "tiny-llama-retrieval";

using testing::TempDir;

// The head of the calibration corpus, enough for the short contexts of these jobs: tokenizing the
// whole corpus would take most of the test's time on 2 cores.
constexpr char kSmallCorpus[] = "small.txt";
// The same for a sweep's held-out validation text.
constexpr char kSmallHeldout[] = "small-heldout.txt";
constexpr size_t kSmallCorpusBytes = 60000;

struct Trainer {
  TempDir registry;
  TempDir data;
  std::unique_ptr<TrainerServer> server;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::TrainerService::Stub> stub;

  Trainer() {
    TrainerServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.registry_dir = registry.path.string();
    options.jobs.model_root = "models";
    options.jobs.data_root = data.path.string();
    const std::string corpus = ReadTextCorpus("data/corpus/calibration.txt.gz").value();
    std::ofstream(data.path / kSmallCorpus, std::ios::binary) << corpus.substr(0, corpus.rfind('\n', kSmallCorpusBytes));
    const std::string heldout = ReadTextCorpus("data/corpus/kjv-heldout.txt.gz").value();
    std::ofstream(data.path / kSmallHeldout, std::ios::binary)
        << heldout.substr(0, heldout.rfind('\n', kSmallCorpusBytes));
    options.jobs.default_corpus = "data/corpus/calibration.txt.gz";
    server = TrainerServer::Start(options, MakeCalibrationRunner("cpu").value()).value();
    channel = grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
    stub = v1::TrainerService::NewStub(channel);
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(server->port()); }
};

std::unique_ptr<grpc::ClientContext> Context(int seconds = 60) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(Clock::now() + std::chrono::seconds(seconds));
  return context;
}

v1::SubmitCalibrationJobRequest Tiny(int64_t steps = 2) {
  v1::SubmitCalibrationJobRequest request = testing::SmallCalibrationJob(steps);
  request.set_corpus(kSmallCorpus);
  return request;
}

v1::ModelSelector ModelNamed(const std::string& name) {
  v1::ModelSelector selector;
  selector.set_name(name);
  return selector;
}

// Every update WatchJob sends until the stream ends.
std::vector<v1::Job> WatchToEnd(v1::TrainerService::Stub& stub, const std::string& name) {
  auto context = Context(300);
  v1::WatchJobRequest request;
  request.set_name(name);
  auto reader = stub.WatchJob(context.get(), request);
  std::vector<v1::Job> updates;
  v1::Job job;
  while (reader->Read(&job)) updates.push_back(job);
  CHECK(reader->Finish().ok());
  return updates;
}

// The first partition a WatchHeadPartitions stream sends (version 0 when none came in time).
uint64_t FirstWatched(v1::TrainerService::Stub& stub, std::optional<uint64_t> after_version, int seconds) {
  auto context = Context(seconds);
  v1::WatchHeadPartitionsRequest request;
  *request.mutable_model() = ModelNamed(kModel);
  if (after_version) request.set_after_version(*after_version);
  auto reader = stub.WatchHeadPartitions(context.get(), request);
  v1::HeadPartition partition;
  const uint64_t version = reader->Read(&partition) ? partition.version() : 0;
  context->TryCancel();
  reader->Finish();
  return version;
}

// One request message and one response message over a method by name: how the test reaches
// the health and reflection services, whose generated stubs are not installed.
std::pair<grpc::Status, std::string> RawCall(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                                             const std::string& request) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue queue;
  grpc::ClientContext context;
  context.set_deadline(Clock::now() + std::chrono::seconds(10));
  void* tag = nullptr;
  bool ok = false;
  auto call = stub.PrepareCall(&context, method, &queue);
  call->StartCall(reinterpret_cast<void*>(1));
  queue.Next(&tag, &ok);
  grpc::Slice slice(request);
  call->Write(grpc::ByteBuffer(&slice, 1), reinterpret_cast<void*>(2));
  queue.Next(&tag, &ok);
  call->WritesDone(reinterpret_cast<void*>(3));
  queue.Next(&tag, &ok);
  grpc::ByteBuffer response;
  call->Read(&response, reinterpret_cast<void*>(4));
  queue.Next(&tag, &ok);
  std::string bytes;
  if (ok) {
    std::vector<grpc::Slice> slices;
    response.Dump(&slices);
    for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  queue.Next(&tag, &ok);
  queue.Shutdown();
  while (queue.Next(&tag, &ok)) {
  }
  return {status, bytes};
}

using CliResult = testing::CommandResult;

CliResult Cli(const Trainer& trainer, const std::string& args) {
  return testing::RunCommand(std::string(LYCHEE_CLI) + " " + args + " --trainer " + trainer.address());
}

TEST_CASE("the health and reflection services are on") {
  Trainer trainer;
  // grpc.health.v1.HealthCheckRequest{service: ""} is empty; the answer is {status: SERVING (1)}.
  const auto [health, answer] = RawCall(trainer.channel, "/grpc.health.v1.Health/Check", "");
  CHECK(health.ok());
  CHECK(answer == std::string("\x08\x01", 2));
  // ServerReflectionRequest{list_services: ""}: field 7, length 0.
  const auto [reflection, services] =
      RawCall(trainer.channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", std::string("\x3a\x00", 2));
  CHECK(reflection.ok());
  CHECK_THAT(services, Catch::Contains("lychee.v1.TrainerService"));
  CHECK_THAT(services, Catch::Contains("grpc.health.v1.Health"));
}

TEST_CASE("a tiny job runs to SUCCEEDED; its partition is listed, fetched, watched, and shown by the CLI") {
  Trainer trainer;
  // A watcher subscribed before anything is published gets the first version when it appears.
  std::atomic<uint64_t> early_watch{0};
  std::thread watcher([&] { early_watch = FirstWatched(*trainer.stub, std::nullopt, 240); });

  v1::Job submitted;
  REQUIRE(trainer.stub->SubmitCalibrationJob(Context().get(), Tiny(), &submitted).ok());
  CHECK(submitted.name() == "jobs/1");
  CHECK(submitted.state() == v1::JOB_STATE_QUEUED);

  const std::vector<v1::Job> updates = WatchToEnd(*trainer.stub, "jobs/1");
  REQUIRE(!updates.empty());
  const v1::Job& last = updates.back();
  INFO(last.error().message());
  REQUIRE(last.state() == v1::JOB_STATE_SUCCEEDED);
  CHECK(last.progress().step() == 2);
  CHECK(last.progress().total_steps() == 2);
  CHECK(last.progress().expected_density() > 0);
  // The multiplier the distillation gradient implies: zero when the sparse windows cover these
  // short samples, so only its being a number is checked.
  CHECK(std::isfinite(last.progress().lambda()));
  CHECK(last.progress().tokens_per_second() > 0);
  CHECK(std::any_of(updates.begin(), updates.end(), [](const v1::Job& job) {
    return job.state() == v1::JOB_STATE_RUNNING && job.progress().step() >= 1 && std::isfinite(job.progress().loss());
  }));
  const std::string fingerprint = ModelFingerprint("models/tiny-llama-retrieval").value();
  CHECK(last.result().model_fingerprint() == fingerprint);
  CHECK(last.result().partition_version() == 1);

  watcher.join();
  CHECK(early_watch == 1);

  v1::ListHeadPartitionsRequest list_request;
  *list_request.mutable_model() = ModelNamed(kModel);
  v1::ListHeadPartitionsResponse listed;
  REQUIRE(trainer.stub->ListHeadPartitions(Context().get(), list_request, &listed).ok());
  CHECK(listed.model_fingerprint() == fingerprint);
  REQUIRE(listed.partitions_size() == 1);
  const v1::HeadPartition& partition = listed.partitions(0);
  CHECK(partition.version() == 1);
  CHECK(partition.model_fingerprint() == fingerprint);
  CHECK(partition.source() == "trainer job jobs/1");
  CHECK(partition.metrics().job_name() == "jobs/1");
  CHECK(partition.metrics().steps() == 2);
  CHECK(partition.num_layers() == 6);
  CHECK(partition.gates_size() == 5 * 2);
  CHECK(partition.token_budget() == 512);

  v1::GetHeadPartitionRequest get_request;
  *get_request.mutable_model() = ModelNamed(kModel);
  v1::HeadPartition latest;
  REQUIRE(trainer.stub->GetHeadPartition(Context().get(), get_request, &latest).ok());
  CHECK(latest.SerializeAsString() == partition.SerializeAsString());
  get_request.set_version(7);
  CHECK(trainer.stub->GetHeadPartition(Context().get(), get_request, &latest).error_code() == grpc::StatusCode::NOT_FOUND);

  // Late subscribers: without after_version the newest comes first; after_version 0 resends all.
  CHECK(FirstWatched(*trainer.stub, std::nullopt, 20) == 1);
  CHECK(FirstWatched(*trainer.stub, 0, 20) == 1);
  CHECK(FirstWatched(*trainer.stub, 1, 2) == 0);

  const CliResult jobs = Cli(trainer, "jobs");
  CHECK(jobs.exit_code == 0);
  CHECK_THAT(jobs.output, Catch::Contains("jobs/1") && Catch::Contains("SUCCEEDED") &&
                              Catch::Contains("partition version 1"));
  const CliResult watch = Cli(trainer, "watch jobs/1");
  CHECK(watch.exit_code == 0);
  CHECK_THAT(watch.output, Catch::Contains("jobs/1 SUCCEEDED: partition version 1\n"));
  const CliResult partitions = Cli(trainer, "partitions");
  CHECK(partitions.exit_code == 0);
  CHECK_THAT(partitions.output, Catch::Contains(fingerprint + ": 1 partition(s)") &&
                                    Catch::Contains("trainer job jobs/1"));
  const CliResult shown = Cli(trainer, "partition 1");
  CHECK(shown.exit_code == 0);
  // Layer 0 is dense and has no learned gates: plain R cells.
  CHECK_THAT(shown.output, Catch::Contains("layer \\ KV head      0      1\n              0      R      R\n"));
  const CliResult json = Cli(trainer, "partition latest --json");
  REQUIRE(json.exit_code == 0);
  CHECK(nlohmann::json::parse(json.output)["numLayers"] == 6);
}

TEST_CASE("a running job is cancelled within a step and the queued job behind it still runs") {
  Trainer trainer;
  v1::Job job;
  REQUIRE(trainer.stub->SubmitCalibrationJob(Context().get(), Tiny(100000), &job).ok());
  REQUIRE(trainer.stub->SubmitCalibrationJob(Context().get(), Tiny(2), &job).ok());
  CHECK(job.name() == "jobs/2");

  auto context = Context(300);
  v1::WatchJobRequest request;
  request.set_name("jobs/1");
  auto reader = trainer.stub->WatchJob(context.get(), request);
  v1::Job update;
  while (reader->Read(&update) && update.progress().step() < 1) {
  }
  REQUIRE(update.state() == v1::JOB_STATE_RUNNING);
  v1::CancelJobRequest cancel;
  cancel.set_name("jobs/1");
  const int64_t step_seen = update.progress().step();
  REQUIRE(trainer.stub->CancelJob(Context().get(), cancel, &job).ok());
  CHECK(job.state() == v1::JOB_STATE_RUNNING);
  while (reader->Read(&update)) {
  }
  CHECK(reader->Finish().ok());
  CHECK(update.state() == v1::JOB_STATE_CANCELLED);
  CHECK(update.error().code() == grpc::StatusCode::CANCELLED);
  // Counted in steps, not seconds: a step's time depends on the machine and its load. The watch
  // may trail the job by one step, and the step under way when the cancel lands completes.
  CHECK(update.progress().step() <= step_seen + 2);

  CHECK(WatchToEnd(*trainer.stub, "jobs/2").back().state() == v1::JOB_STATE_SUCCEEDED);
  const CliResult again = Cli(trainer, "cancel jobs/1");
  CHECK(again.exit_code == 1);
  CHECK_THAT(again.output, Catch::Contains("FAILED_PRECONDITION") && Catch::Contains("already CANCELLED"));
}

TEST_CASE("bad requests get the matching gRPC code and a message naming the field; the trainer stays up") {
  Trainer trainer;
  const auto submit = [&](const std::function<void(v1::SubmitCalibrationJobRequest&)>& change) {
    v1::SubmitCalibrationJobRequest request = Tiny();
    change(request);
    v1::Job job;
    return trainer.stub->SubmitCalibrationJob(Context().get(), request, &job);
  };
  grpc::Status status = submit([](auto& r) { r.mutable_config()->set_target_density(0); });
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK_THAT(status.error_message(), Catch::Contains("target_density"));
  status = submit([](auto& r) { r.set_model("llama-9000"); });
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK_THAT(status.error_message(), Catch::Contains("model: unknown model 'llama-9000'"));
  status = submit([](auto& r) { r.set_corpus("../../etc/passwd"); });
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK_THAT(status.error_message(), Catch::Contains("corpus"));
  status = submit([](auto& r) { r.mutable_config()->set_steps(0); });
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  CHECK_THAT(status.error_message(), Catch::Contains("steps"));
  status = submit([](auto& r) { r.mutable_config()->set_max_context_tokens(200000000); });
  CHECK(status.error_code() == grpc::StatusCode::INVALID_ARGUMENT);

  v1::GetJobRequest get;
  v1::Job job;
  get.set_name("jobs/42");
  CHECK(trainer.stub->GetJob(Context().get(), get, &job).error_code() == grpc::StatusCode::NOT_FOUND);
  get.set_name("42");
  CHECK(trainer.stub->GetJob(Context().get(), get, &job).error_code() == grpc::StatusCode::INVALID_ARGUMENT);

  v1::WatchJobRequest watch;
  watch.set_name("jobs/42");
  auto context = Context();
  auto reader = trainer.stub->WatchJob(context.get(), watch);
  CHECK(!reader->Read(&job));
  CHECK(reader->Finish().error_code() == grpc::StatusCode::NOT_FOUND);

  v1::ListHeadPartitionsRequest list;
  v1::ListHeadPartitionsResponse listed;
  CHECK(trainer.stub->ListHeadPartitions(Context().get(), list, &listed).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  list.mutable_model()->set_fingerprint("../../x");
  CHECK(trainer.stub->ListHeadPartitions(Context().get(), list, &listed).error_code() == grpc::StatusCode::INVALID_ARGUMENT);
  list.mutable_model()->set_fingerprint(std::string(64, 'a'));
  CHECK(trainer.stub->ListHeadPartitions(Context().get(), list, &listed).ok());
  CHECK(listed.partitions_size() == 0);

  const CliResult cli = Cli(trainer, "submit --target-density 1.5 --steps 2");
  CHECK(cli.exit_code == 1);
  CHECK_THAT(cli.output, Catch::Contains("INVALID_ARGUMENT") && Catch::Contains("target_density"));

  v1::ListJobsResponse jobs;
  REQUIRE(trainer.stub->ListJobs(Context().get(), {}, &jobs).ok());
  CHECK(jobs.jobs_size() == 0);
}

TEST_CASE("a sweep through the CLI: one job trains and validates each target, and watch and jobs show its table") {
  Trainer trainer;
  const std::string sweep_flags =
      std::string("--steps 2 --min-context 256 --max-context 384 --passkeys 2 --budget 128 ") +
      "--block-size 16 --sink 16 --recent 32 --seed 5 --corpus " + kSmallCorpus + " --validation-corpus " +
      kSmallHeldout + " --validation-context 512 --validation-samples 2 --max-accuracy-drop 1";
  const CliResult submitted = Cli(trainer, "submit --target-densities 0.1,0.3 " + sweep_flags);
  INFO(submitted.output);
  REQUIRE(submitted.exit_code == 0);
  CHECK(submitted.output == "jobs/1\n");

  testing::TempDir out;
  const std::string plot = (out.path / "sweep.svg").string();
  const CliResult watch = Cli(trainer, "watch jobs/1 --plot " + plot);
  INFO(watch.output);
  REQUIRE(watch.exit_code == 0);
  // Both targets pass a bound of 1; the sparser is published.
  CHECK_THAT(watch.output, Catch::Contains("jobs/1 SUCCEEDED: partition version 1") &&
                               Catch::Contains("sweep over 2 target(s): validation 512-token prompts, budget 128") &&
                               Catch::Contains("passkey") && Catch::Contains("multikey") && Catch::Contains("* 0.1 ") &&
                               Catch::Contains("published as version 1") &&
                               Catch::Contains("published the partition of target 0.1"));
  std::ifstream svg_file(plot);
  const std::string svg((std::istreambuf_iterator<char>(svg_file)), std::istreambuf_iterator<char>());
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK_THAT(svg, Catch::Contains("dense") && Catch::Contains("0.3"));

  v1::GetJobRequest get;
  get.set_name("jobs/1");
  v1::Job job;
  REQUIRE(trainer.stub->GetJob(Context().get(), get, &job).ok());
  REQUIRE(job.sweep().rows_size() == 2);
  CHECK(job.sweep().rows(0).deployed_density() == Approx(0.1));
  CHECK(job.sweep().rows(1).deployed_density() == Approx(0.3));
  CHECK(job.sweep().dense().kv_bytes_measured());
  CHECK(job.sweep().rows(0).validation().kv_bytes_per_token() < job.sweep().rows(1).validation().kv_bytes_per_token());
  CHECK(job.sweep().rows(1).validation().kv_bytes_per_token() < job.sweep().dense().kv_bytes_per_token());
  CHECK(job.sweep().rows(0).validation().tasks(0).samples() == 2);

  const CliResult jobs = Cli(trainer, "jobs");
  CHECK_THAT(jobs.output, Catch::Contains("sweep(2)") && Catch::Contains("published as version 1"));

  // Bad input is refused by the trainer, naming the field; nothing is queued.
  const CliResult outside = Cli(trainer, "submit --target-densities 0.1,1.5 " + sweep_flags);
  CHECK(outside.exit_code == 1);
  CHECK_THAT(outside.output, Catch::Contains("INVALID_ARGUMENT") && Catch::Contains("target_densities[1]"));
  const CliResult empty = Cli(trainer, "submit --target-densities '' " + sweep_flags);
  CHECK_THAT(empty.output, Catch::Contains("INVALID_ARGUMENT") && Catch::Contains("target_densities: empty"));
  const CliResult many =
      Cli(trainer, "submit --target-densities 0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1 " +
                       sweep_flags);
  CHECK_THAT(many.output, Catch::Contains("INVALID_ARGUMENT") && Catch::Contains("at most 16 targets, got 17"));
  const CliResult bound = Cli(trainer, "submit --sweep --steps 2 --max-accuracy-drop 1.5");
  CHECK_THAT(bound.output, Catch::Contains("INVALID_ARGUMENT") && Catch::Contains("sweep.max_accuracy_drop"));
  v1::ListJobsResponse listed;
  REQUIRE(trainer.stub->ListJobs(Context().get(), {}, &listed).ok());
  CHECK(listed.jobs_size() == 1);
}

TEST_CASE("absl and gRPC status codes map one to one, messages unchanged") {
  for (int code = 0; code <= 16; ++code) {
    const absl::Status status(static_cast<absl::StatusCode>(code), code == 0 ? "" : "what went wrong");
    const grpc::Status converted = ToGrpcStatus(status);
    CHECK(static_cast<int>(converted.error_code()) == code);
    CHECK(FromGrpcStatus(converted) == status);
  }
  CHECK(ToGrpcStatus(absl::NotFoundError("no job jobs/3")).error_message() == "no job jobs/3");
}

}  // namespace
}  // namespace lychee
