// The job manager without gRPC and without a real calibration (a scripted runner stands in):
// bad input, path confinement, the queue, cancellation, and recovery from the journal.
#include <catch2/catch.hpp>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include "common/base/model_fingerprint.h"
#include "common/base/partition_store.h"
#include "common/service/metrics.h"
#include "harness/temp_dir.h"
#include "tests/trainer/bundled_jobs.h"
#include "trainer/job_journal.h"
#include "trainer/job_manager.h"
#include "trainer/paths.h"

namespace lychee {
namespace {
namespace fs = std::filesystem;
using std::chrono::milliseconds;

constexpr char kModel[] = "tiny-llama-retrieval";

using testing::TempDir;

// Stands in for the model: Calibrate reports `steps` steps, each after `release` allows it, and
// stops with CANCELLED within one step of the flag; it records how many jobs ran at once. Validate
// scores a partition by its density: dense gets every task right, a partition of density d gets
// `accuracy_of_density(d)`.
struct ScriptedRunner {
  std::atomic<bool> release{true};
  std::atomic<int> running{0};
  std::atomic<int> most_running{0};
  std::atomic<int> calls{0};
  std::atomic<int> calibrations{0};
  std::atomic<int> validations{0};
  // Calibrations after this many wait for `release` even when it was set before.
  std::atomic<int> hold_after{1 << 30};
  absl::Status fail_with = absl::OkStatus();
  std::function<double(double)> accuracy_of_density = [](double density) { return density >= 0.2 ? 1.0 : 0.5; };

  class Session final : public CalibrationSession {
   public:
    explicit Session(ScriptedRunner& runner) : runner_(runner) {
      const int now = ++runner_.running;
      int most = runner_.most_running;
      while (now > most && !runner_.most_running.compare_exchange_weak(most, now)) {
      }
    }
    ~Session() override { --runner_.running; }

    absl::StatusOr<HeadPartition> Calibrate(const CalibrationConfig& config, const ProgressCallback& on_progress,
                                            const std::atomic<bool>& cancelled) override {
      if (!runner_.fail_with.ok()) return runner_.fail_with;
      const bool held = ++runner_.calibrations > runner_.hold_after;
      for (int64_t step = 0; step < config.steps; ++step) {
        while ((!runner_.release || held) && !cancelled) std::this_thread::sleep_for(milliseconds(1));
        if (cancelled) return absl::CancelledError("stopped");
        CalibrationProgress progress;
        progress.step = step + 1;
        progress.total_steps = config.steps;
        progress.loss = 1.0 / (step + 1);
        progress.expected_density = config.target_density;
        on_progress(progress);
      }
      // Layer 0 and the round-down of target x 10 of the other heads are retrieval heads.
      HeadPartition partition = HeadPartition::AllRetrieval(6, 2, config.selection);
      const int retrieval = static_cast<int>(config.target_density * 10 + 1e-9);
      for (int head = retrieval; head < 10; ++head) partition.set_role(1 + head / 2, head % 2, HeadRole::kSparse);
      partition.training.steps = config.steps;
      partition.training.target_density = config.target_density;
      partition.training.expected_density = config.target_density;
      return partition;
    }

    absl::StatusOr<PartitionValidation> Validate(const HeadPartition& partition,
                                                 const std::atomic<bool>& cancelled) override {
      ++runner_.validations;
      if (cancelled) return absl::CancelledError("stopped");
      const auto result = [](double accuracy, double bytes) {
        ValidationResult r;
        r.tasks = {{"passkey", 20, static_cast<int64_t>(accuracy * 20), accuracy},
                   {"multikey", 20, static_cast<int64_t>(accuracy * 20), accuracy}};
        r.kv_bytes_per_token = bytes;
        r.kv_bytes_measured = true;
        return r;
      };
      PartitionValidation validation;
      validation.token_budget = partition.selection().token_budget;
      validation.dense = result(1.0, 1000);
      const double density = partition.RetrievalDensity();
      validation.partition = result(runner_.accuracy_of_density(density), 200 + 800 * density);
      return validation;
    }

   private:
    ScriptedRunner& runner_;
  };

  CalibrationRunner AsRunner() {
    return [this](const CalibrationJobInputs&) -> absl::StatusOr<std::unique_ptr<CalibrationSession>> {
      ++calls;
      return std::make_unique<Session>(*this);
    };
  }
};

struct Setup {
  TempDir registry;
  TempDir data;
  std::unique_ptr<PartitionStore> store = PartitionStore::Open(registry.path.string()).value();
  ScriptedRunner runner;

  JobManagerOptions Options(int concurrent = 1) const {
    JobManagerOptions options = testing::BundledJobOptions(data.path.string(), (registry.path / "jobs").string());
    options.max_concurrent_jobs = concurrent;
    return options;
  }
  std::unique_ptr<JobManager> Manager(int concurrent = 1) {
    return JobManager::Create(Options(concurrent), *store, runner.AsRunner()).value();
  }
};

v1::SubmitCalibrationJobRequest Request(int64_t steps = 3) {
  v1::SubmitCalibrationJobRequest request;
  request.set_model(kModel);
  request.mutable_config()->set_steps(steps);
  request.mutable_config()->set_target_density(0.5);
  request.mutable_config()->set_min_context_tokens(256);
  request.mutable_config()->set_max_context_tokens(384);
  request.mutable_config()->set_token_budget(512);
  return request;
}

// Waits (up to 20 s) until the job satisfies `done`; returns it as last seen.
v1::Job WaitFor(const JobManager& manager, const std::string& name, const std::function<bool(const v1::Job&)>& done) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  uint64_t revision = 0;
  while (true) {
    const JobManager::Update update = manager.WaitForUpdate(name, revision, milliseconds(100)).value();
    revision = update.revision;
    if (done(update.job) || std::chrono::steady_clock::now() > deadline) return update.job;
  }
}

v1::Job WaitForState(const JobManager& manager, const std::string& name, v1::JobState state) {
  return WaitFor(manager, name, [state](const v1::Job& job) { return job.state() == state; });
}

TEST_CASE("bad requests are refused with a code and the field named, and take no job number") {
  Setup setup;
  std::ofstream(setup.data.path / "short.txt") << "Too short a corpus.";
  std::ofstream(setup.registry.path / "secret.txt") << std::string(10000, 'x');
  fs::create_symlink(setup.registry.path / "secret.txt", setup.data.path / "link-out.txt");
  auto manager = setup.Manager();

  struct Case {
    std::string what;
    std::function<void(v1::SubmitCalibrationJobRequest&)> change;
    absl::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"no model", [](auto& r) { r.set_model(""); }, absl::StatusCode::kInvalidArgument, "model: required"},
      {"unknown model", [](auto& r) { r.set_model("no-such-model"); }, absl::StatusCode::kInvalidArgument, "model: unknown model 'no-such-model'"},
      {"model path", [](auto& r) { r.set_model("../models/tiny-llama-retrieval"); }, absl::StatusCode::kInvalidArgument, "model: '../models"},
      {"density 0", [](auto& r) { r.mutable_config()->set_target_density(0); }, absl::StatusCode::kInvalidArgument, "target_density"},
      {"density 1.5", [](auto& r) { r.mutable_config()->set_target_density(1.5); }, absl::StatusCode::kInvalidArgument, "target_density"},
      {"steps 0", [](auto& r) { r.mutable_config()->set_steps(0); }, absl::StatusCode::kInvalidArgument, "steps"},
      {"steps -4", [](auto& r) { r.mutable_config()->set_steps(-4); }, absl::StatusCode::kInvalidArgument, "steps must be > 0, got -4"},
      {"budget below a block", [](auto& r) { r.mutable_config()->set_token_budget(32); }, absl::StatusCode::kInvalidArgument, "token_budget 32 is below one block"},
      {"context beyond the model", [](auto& r) { r.mutable_config()->set_max_context_tokens(100000); }, absl::StatusCode::kInvalidArgument, "max_context_tokens 100000 exceeds"},
      {"short corpus", [](auto& r) { r.set_corpus("short.txt"); }, absl::StatusCode::kFailedPrecondition, "corpus: 'short.txt' holds 19 bytes"},
      {"absolute corpus", [](auto& r) { r.set_corpus("/etc/passwd"); }, absl::StatusCode::kInvalidArgument, "corpus: '/etc/passwd' is absolute"},
      {"dot-dot corpus", [](auto& r) { r.set_corpus("../secret.txt"); }, absl::StatusCode::kInvalidArgument, "corpus: '../secret.txt' has '..'"},
      {"symlink out", [](auto& r) { r.set_corpus("link-out.txt"); }, absl::StatusCode::kInvalidArgument, "corpus: 'link-out.txt' leads outside the data root"},
      {"missing corpus", [](auto& r) { r.set_corpus("missing.txt"); }, absl::StatusCode::kInvalidArgument, "corpus: no file 'missing.txt'"},
  };
  for (const Case& c : cases) {
    INFO(c.what);
    v1::SubmitCalibrationJobRequest request = Request();
    c.change(request);
    const absl::Status status = manager->Submit(request).status();
    CHECK(status.code() == c.code);
    CHECK_THAT(std::string(status.message()), Catch::Contains(c.message));
  }
  CHECK(manager->List().empty());
  CHECK(manager->Submit(Request()).value().name() == "jobs/1");
}

TEST_CASE("a corpus path stays inside the data root") {
  TempDir data;
  TempDir outside;
  fs::create_directories(data.path / "books");
  std::ofstream(data.path / "books" / "a.txt") << "text";
  std::ofstream(outside.path / "b.txt") << "text";
  fs::create_symlink(data.path / "books", data.path / "shelf");  // a symlink that stays inside
  fs::create_symlink(outside.path, data.path / "elsewhere");     // one that leads out

  CHECK(ResolveCorpusPath(data.path.string(), "books/a.txt").value() == fs::canonical(data.path / "books/a.txt").string());
  CHECK(ResolveCorpusPath(data.path.string(), "shelf/a.txt").value() == fs::canonical(data.path / "books/a.txt").string());
  CHECK(ResolveCorpusPath(data.path.string(), "./books/a.txt").ok());
  for (const std::string escape : {"elsewhere/b.txt", "books/../../x.txt", "/etc/hostname", ""}) {
    INFO(escape);
    CHECK(ResolveCorpusPath(data.path.string(), escape).status().code() == absl::StatusCode::kInvalidArgument);
  }
  CHECK(ResolveCorpusPath(data.path.string(), "books").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(ResolveCorpusPath("", "books/a.txt").status().code() == absl::StatusCode::kFailedPrecondition);
}

TEST_CASE("jobs run one at a time by default, in order, and publish to the registry") {
  Setup setup;
  auto manager = setup.Manager();
  const v1::Job queued = manager->Submit(Request(4)).value();
  CHECK(queued.name() == "jobs/1");
  CHECK(queued.state() == v1::JOB_STATE_QUEUED);
  // The job records the whole config it runs with, defaults included.
  CHECK(queued.request().config().has_learning_rate());
  CHECK(queued.request().config().learning_rate() == CalibrationConfig().learning_rate);
  CHECK(queued.request().config().steps() == 4);
  manager->Submit(Request(2)).value();

  const v1::Job first = WaitForState(*manager, "jobs/1", v1::JOB_STATE_SUCCEEDED);
  const v1::Job second = WaitForState(*manager, "jobs/2", v1::JOB_STATE_SUCCEEDED);
  REQUIRE(first.state() == v1::JOB_STATE_SUCCEEDED);
  REQUIRE(second.state() == v1::JOB_STATE_SUCCEEDED);
  CHECK(setup.runner.most_running == 1);
  CHECK(first.progress().step() == 4);
  CHECK(first.progress().loss() == Approx(0.25));
  CHECK(first.start_unix_seconds() >= first.create_unix_seconds());
  CHECK(first.end_unix_seconds() >= first.start_unix_seconds());

  const std::string fingerprint = ModelFingerprint("models/tiny-llama-retrieval").value();
  CHECK(first.result().model_fingerprint() == fingerprint);
  CHECK(first.result().partition_version() == 1);
  CHECK(second.result().partition_version() == 2);
  const auto published = setup.store->Get(fingerprint, 1).value();
  CHECK(published->source == "trainer job jobs/1");
  CHECK(published->training.job_name == "jobs/1");
  CHECK(published->created_unix_seconds > 0);
  CHECK(published->role(3, 1) == HeadRole::kSparse);
  CHECK(published->selection().token_budget == 512);
  CHECK(manager->List().size() == 2);
}

TEST_CASE("the job metrics count jobs by state and time every step, and keep the last loss") {
  Setup setup;
  MetricsRegistry registry;
  JobManagerOptions options = setup.Options();
  options.metrics = &registry;
  auto manager = JobManager::Create(options, *setup.store, setup.runner.AsRunner()).value();
  CHECK(registry.Render().find("lychee_trainer_last_loss NaN\n") != std::string::npos);
  setup.runner.hold_after = 1;  // the second job waits before its first step
  manager->Submit(Request(4)).value();
  manager->Submit(Request(2)).value();
  manager->Submit(Request(2)).value();
  REQUIRE(WaitForState(*manager, "jobs/1", v1::JOB_STATE_SUCCEEDED).state() == v1::JOB_STATE_SUCCEEDED);
  REQUIRE(WaitForState(*manager, "jobs/2", v1::JOB_STATE_RUNNING).state() == v1::JOB_STATE_RUNNING);

  const std::string text = registry.Render();
  CHECK(text.find("# TYPE lychee_trainer_jobs gauge\n") != std::string::npos);
  CHECK(text.find("lychee_trainer_jobs{state=\"succeeded\"} 1\n") != std::string::npos);
  CHECK(text.find("lychee_trainer_jobs{state=\"running\"} 1\n") != std::string::npos);
  CHECK(text.find("lychee_trainer_jobs{state=\"queued\"} 1\n") != std::string::npos);
  CHECK(text.find("lychee_trainer_jobs{state=\"failed\"} 0\n") != std::string::npos);
  // The first job's four steps; the second is held before its first.
  CHECK(text.find("# TYPE lychee_trainer_step_seconds histogram\n") != std::string::npos);
  CHECK(text.find("lychee_trainer_step_seconds_count 4\n") != std::string::npos);
  CHECK(text.find("lychee_trainer_last_loss 0.25\n") != std::string::npos);
}

TEST_CASE("--max-concurrent-jobs lets that many jobs run at once") {
  Setup setup;
  setup.runner.release = false;
  auto manager = setup.Manager(2);
  for (int i = 0; i < 3; ++i) manager->Submit(Request()).value();
  WaitForState(*manager, "jobs/2", v1::JOB_STATE_RUNNING);
  CHECK(manager->Get("jobs/1").value().state() == v1::JOB_STATE_RUNNING);
  CHECK(manager->Get("jobs/2").value().state() == v1::JOB_STATE_RUNNING);
  CHECK(manager->Get("jobs/3").value().state() == v1::JOB_STATE_QUEUED);
  // RUNNING is set before the runner is called: wait until both are inside it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (setup.runner.running < 2 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(milliseconds(1));
  setup.runner.release = true;
  CHECK(WaitForState(*manager, "jobs/3", v1::JOB_STATE_SUCCEEDED).state() == v1::JOB_STATE_SUCCEEDED);
  CHECK(setup.runner.most_running == 2);
}

TEST_CASE("cancelling: a queued job at once, a running one within a step, a final one not at all") {
  Setup setup;
  setup.runner.release = false;
  auto manager = setup.Manager();
  manager->Submit(Request(1000)).value();
  manager->Submit(Request()).value();
  WaitForState(*manager, "jobs/1", v1::JOB_STATE_RUNNING);

  const v1::Job queued = manager->Cancel("jobs/2").value();
  CHECK(queued.state() == v1::JOB_STATE_CANCELLED);
  CHECK(queued.error().code() == static_cast<int>(absl::StatusCode::kCancelled));

  const v1::Job running = manager->Cancel("jobs/1").value();
  CHECK(running.state() == v1::JOB_STATE_RUNNING);
  const auto start = std::chrono::steady_clock::now();
  const v1::Job cancelled = WaitForState(*manager, "jobs/1", v1::JOB_STATE_CANCELLED);
  CHECK(cancelled.state() == v1::JOB_STATE_CANCELLED);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));

  const absl::Status again = manager->Cancel("jobs/1").status();
  CHECK(again.code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(again.message()), Catch::Contains("already CANCELLED"));
  CHECK(manager->Cancel("jobs/9").status().code() == absl::StatusCode::kNotFound);
  CHECK(manager->Cancel("job-1").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(manager->Get("jobs/0").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(setup.runner.calls == 1);  // the cancelled queued job never ran
}

TEST_CASE("a failing calibration ends FAILED with its code and message, and the next job still runs") {
  Setup setup;
  setup.runner.fail_with = absl::FailedPreconditionError("calibration corpus has 10 tokens, fewer than max_context_tokens 384");
  auto manager = setup.Manager();
  manager->Submit(Request()).value();
  const v1::Job failed = WaitForState(*manager, "jobs/1", v1::JOB_STATE_FAILED);
  CHECK(failed.state() == v1::JOB_STATE_FAILED);
  CHECK(failed.error().code() == static_cast<int>(absl::StatusCode::kFailedPrecondition));
  CHECK(failed.error().message() == "calibration corpus has 10 tokens, fewer than max_context_tokens 384");
  setup.runner.fail_with = absl::OkStatus();
  manager->Submit(Request()).value();
  CHECK(WaitForState(*manager, "jobs/2", v1::JOB_STATE_SUCCEEDED).result().partition_version() == 1);
}

TEST_CASE("a full queue is RESOURCE_EXHAUSTED") {
  Setup setup;
  setup.runner.release = false;
  JobManagerOptions options = setup.Options();
  options.max_queued_jobs = 1;
  auto manager = JobManager::Create(options, *setup.store, setup.runner.AsRunner()).value();
  manager->Submit(Request()).value();
  WaitForState(*manager, "jobs/1", v1::JOB_STATE_RUNNING);
  manager->Submit(Request()).value();
  const absl::Status full = manager->Submit(Request()).status();
  CHECK(full.code() == absl::StatusCode::kResourceExhausted);
  CHECK_THAT(std::string(full.message()), Catch::Contains("max-queued-jobs"));
  setup.runner.release = true;
}

TEST_CASE("after a crash, RUNNING jobs become INTERRUPTED, QUEUED ones run, damaged journals show up") {
  Setup setup;
  const JobJournal journal = JobJournal::Open((setup.registry.path / "jobs").string()).value();
  const auto journaled = [&](uint64_t number, v1::JobState state) {
    v1::Job job;
    job.set_name(JobName(number));
    job.set_state(state);
    *job.mutable_request() = Request(2);
    job.mutable_progress()->set_step(1);
    job.mutable_progress()->set_total_steps(2);
    REQUIRE(journal.Write(job).ok());
  };
  journaled(1, v1::JOB_STATE_RUNNING);
  journaled(2, v1::JOB_STATE_QUEUED);
  journaled(3, v1::JOB_STATE_SUCCEEDED);
  journaled(4, v1::JOB_STATE_QUEUED);
  std::ofstream(setup.registry.path / "jobs" / "000000000005.job") << "torn";
  {
    auto manager = setup.Manager();
    REQUIRE(manager->recovery_problems().size() == 1);
    CHECK_THAT(manager->recovery_problems()[0], Catch::Contains("jobs/5"));

    const v1::Job interrupted = manager->Get("jobs/1").value();
    CHECK(interrupted.state() == v1::JOB_STATE_INTERRUPTED);
    CHECK(interrupted.error().code() == static_cast<int>(absl::StatusCode::kAborted));
    CHECK_THAT(interrupted.error().message(), Catch::Contains("last journaled at step 1 of 2"));
    CHECK(WaitForState(*manager, "jobs/2", v1::JOB_STATE_SUCCEEDED).result().partition_version() == 1);
    CHECK(WaitForState(*manager, "jobs/4", v1::JOB_STATE_SUCCEEDED).result().partition_version() == 2);
    CHECK(manager->Get("jobs/3").value().state() == v1::JOB_STATE_SUCCEEDED);
    const v1::Job damaged = manager->Get("jobs/5").value();
    CHECK(damaged.state() == v1::JOB_STATE_INTERRUPTED);
    CHECK(damaged.error().code() == static_cast<int>(absl::StatusCode::kDataLoss));
    CHECK(manager->Submit(Request()).value().name() == "jobs/6");
    WaitForState(*manager, "jobs/6", v1::JOB_STATE_SUCCEEDED);
  }
  // What recovery decided is itself journaled.
  const JobJournal::Contents contents = journal.Load();
  REQUIRE(contents.jobs.size() == 5);
  CHECK(contents.jobs[0].state() == v1::JOB_STATE_INTERRUPTED);
  CHECK(contents.jobs[1].state() == v1::JOB_STATE_SUCCEEDED);
  CHECK(contents.jobs[4].name() == "jobs/6");
  CHECK(contents.damaged.size() == 1);
  CHECK(contents.last_number == 6);
}

TEST_CASE("shutting down interrupts the running job and keeps the queued ones for the next start") {
  Setup setup;
  setup.runner.release = false;
  {
    auto manager = setup.Manager();
    manager->Submit(Request()).value();
    manager->Submit(Request()).value();
    WaitForState(*manager, "jobs/1", v1::JOB_STATE_RUNNING);
  }
  setup.runner.release = true;
  auto manager = setup.Manager();
  const v1::Job interrupted = manager->Get("jobs/1").value();
  CHECK(interrupted.state() == v1::JOB_STATE_INTERRUPTED);
  CHECK_THAT(interrupted.error().message(), Catch::Contains("shut down"));
  CHECK(WaitForState(*manager, "jobs/2", v1::JOB_STATE_SUCCEEDED).state() == v1::JOB_STATE_SUCCEEDED);
  CHECK(manager->recovery_problems().empty());
}

v1::SubmitCalibrationJobRequest SweepRequest(const std::vector<double>& targets, int64_t steps = 2) {
  v1::SubmitCalibrationJobRequest request = Request(steps);
  for (double target : targets) request.add_target_densities(target);
  request.mutable_sweep()->set_validation_context_tokens(512);
  return request;
}

std::vector<uint64_t> PublishedVersions(const PartitionStore& store) {
  std::vector<uint64_t> versions;
  for (const auto& partition : store.List(ModelFingerprint("models/tiny-llama-retrieval").value())) {
    versions.push_back(partition->version);
  }
  return versions;
}

TEST_CASE("a sweep's bad targets and quality bound are INVALID_ARGUMENT naming the field, and change nothing") {
  Setup setup;
  auto manager = setup.Manager();
  struct Case {
    std::string what;
    std::function<void(v1::SubmitCalibrationJobRequest&)> change;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"empty list", [](auto& r) { r.clear_target_densities(); }, "target_densities: empty"},
      {"target 0", [](auto& r) { r.set_target_densities(1, 0); }, "target_densities[1]: must be in (0, 1], got 0"},
      {"target above 1", [](auto& r) { r.set_target_densities(0, 1.5); },
       "target_densities[0]: must be in (0, 1], got 1.5"},
      {"negative target", [](auto& r) { r.set_target_densities(2, -0.1); }, "target_densities[2]"},
      {"17 targets",
       [](auto& r) {
         for (int i = 0; i < 14; ++i) r.add_target_densities(0.5);
       },
       "target_densities: at most 16 targets, got 17"},
      {"bound below 0", [](auto& r) { r.mutable_sweep()->set_max_accuracy_drop(-0.01); },
       "sweep.max_accuracy_drop: must be in [0, 1], got -0.01"},
      {"bound above 1", [](auto& r) { r.mutable_sweep()->set_max_accuracy_drop(1.5); }, "sweep.max_accuracy_drop"},
      {"no samples", [](auto& r) { r.mutable_sweep()->set_validation_samples(0); }, "sweep.validation_samples"},
      {"short context", [](auto& r) { r.mutable_sweep()->set_validation_context_tokens(50); },
       "sweep.validation_context_tokens"},
      {"negative budget", [](auto& r) { r.mutable_sweep()->set_validation_token_budget(-1); },
       "sweep.validation_token_budget"},
      {"prompts outside the root", [](auto& r) { r.mutable_sweep()->set_validation_prompts("../x.jsonl"); },
       "sweep.validation_prompts: '../x.jsonl' has '..'"},
      {"malformed prompts file", [](auto& r) { r.mutable_sweep()->set_validation_prompts("prompts.jsonl"); },
       "sweep.validation_prompts: prompts.jsonl:2: \"answer\" must be a string"},
      {"prompts and corpus",
       [](auto& r) {
         r.mutable_sweep()->set_validation_prompts("p.jsonl");
         r.mutable_sweep()->set_validation_corpus("c.txt");
       },
       "not both"},
  };
  std::ofstream(setup.data.path / "prompts.jsonl") << "{\"task\": \"t\", \"prompt\": \"p\", \"answer\": \" a\"}\n"
                                                   << "{\"task\": \"t\", \"prompt\": \"p\"}\n";
  for (const Case& c : cases) {
    INFO(c.what);
    v1::SubmitCalibrationJobRequest request = SweepRequest({0.1, 0.2, 0.3});
    c.change(request);
    const absl::Status status = manager->Submit(request).status();
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(status.message()), Catch::Contains(c.message));
  }
  CHECK(manager->List().empty());
  CHECK(setup.runner.calls == 0);
  // Targets without the sweep message still make a sweep; the sweep message without targets is refused above.
  v1::SubmitCalibrationJobRequest bare = SweepRequest({0.3});
  bare.clear_sweep();
  const v1::Job queued = manager->Submit(bare).value();
  CHECK(queued.name() == "jobs/1");
  // The job records the sweep config it runs with, defaults included.
  CHECK(queued.request().sweep().max_accuracy_drop() == 0.05);
  CHECK(queued.request().sweep().validation_context_tokens() == 2048);
  CHECK(queued.request().sweep().validation_samples() == 20);
}

TEST_CASE("a sweep trains and validates every target, publishes the sparsest within the bound, and keeps its table") {
  Setup setup;
  {
    auto manager = setup.Manager();
    // Dense scores 1.0 on both tasks; densities below 0.2 score 0.5, more than 0.05 below.
    const v1::Job job = WaitForState(*manager, manager->Submit(SweepRequest({0.3, 0.05, 0.2, 0.1})).value().name(),
                                     v1::JOB_STATE_SUCCEEDED);
    REQUIRE(job.state() == v1::JOB_STATE_SUCCEEDED);
    CHECK(setup.runner.calls == 1);  // one session for the whole sweep
    CHECK(setup.runner.calibrations == 4);
    CHECK(setup.runner.validations == 4);
    const v1::SweepResult& sweep = job.sweep();
    REQUIRE(sweep.rows_size() == 4);
    CHECK(sweep.dense().tasks_size() == 2);
    CHECK(sweep.dense().kv_bytes_per_token() == 1000);
    CHECK(sweep.validation_context_tokens() == 512);
    CHECK(sweep.validation_token_budget() == 512);
    const std::vector<double> deployed = {0.3, 0.0, 0.2, 0.1};
    const std::vector<bool> within = {true, false, true, false};
    for (int i = 0; i < 4; ++i) {
      INFO(i);
      CHECK(sweep.rows(i).deployed_density() == Approx(deployed[i]));
      CHECK(sweep.rows(i).within_bound() == within[i]);
      CHECK(sweep.rows(i).partition().layers_size() == 6);
      CHECK(sweep.rows(i).training_seconds() >= 0);
    }
    CHECK_THAT(sweep.rows(1).verdict(), Catch::Contains("passkey: accuracy 0.500 against dense 1.000"));
    REQUIRE(sweep.has_chosen());
    CHECK(sweep.chosen() == 2);  // 0.2: the sparsest of those within the bound
    CHECK(sweep.rows(2).partition_version() == 1);
    CHECK(sweep.rows(0).partition_version() == 0);
    CHECK(job.result().partition_version() == 1);
    CHECK_THAT(sweep.summary(), Catch::Contains("target 0.2") && Catch::Contains("version 1"));
    CHECK(PublishedVersions(*setup.store) == std::vector<uint64_t>{1});
    const auto published = setup.store->Get(ModelFingerprint("models/tiny-llama-retrieval").value(), 1).value();
    CHECK(published->RetrievalDensity() == Approx(0.2));
    CHECK(published->training.job_name == "jobs/1");
  }
  // The table is journaled with the job: a restarted trainer shows it.
  auto restarted = setup.Manager();
  const v1::Job again = restarted->Get("jobs/1").value();
  CHECK(again.sweep().rows_size() == 4);
  CHECK(again.sweep().chosen() == 2);
}

TEST_CASE("a sweep cancelled halfway keeps its finished partitions unpublished and says so") {
  Setup setup;
  setup.runner.hold_after = 2;  // the third target waits
  auto manager = setup.Manager();
  const std::string name = manager->Submit(SweepRequest({0.3, 0.2, 0.1, 0.05})).value().name();
  WaitFor(*manager, name, [](const v1::Job& job) { return job.progress().target_index() == 3; });
  manager->Cancel(name).value();
  const v1::Job job = WaitForState(*manager, name, v1::JOB_STATE_CANCELLED);
  REQUIRE(job.state() == v1::JOB_STATE_CANCELLED);
  CHECK(job.sweep().rows_size() == 2);
  CHECK_FALSE(job.sweep().has_chosen());
  CHECK_THAT(job.error().message(), Catch::Contains("target 3 of 4") &&
                                        Catch::Contains("the partitions of targets 0.3, 0.2 are kept with the job") &&
                                        Catch::Contains("unpublished"));
  CHECK_THAT(job.sweep().summary(), Catch::Contains("kept with the job"));
  CHECK(PublishedVersions(*setup.store).empty());
}

TEST_CASE("a sweep with no target within the bound publishes nothing and fails, keeping its table") {
  Setup setup;
  setup.runner.accuracy_of_density = [](double) { return 0.9; };
  auto manager = setup.Manager();
  v1::SubmitCalibrationJobRequest request = SweepRequest({0.1, 0.2});
  request.mutable_sweep()->set_max_accuracy_drop(0.05);
  const v1::Job job = WaitForState(*manager, manager->Submit(request).value().name(), v1::JOB_STATE_FAILED);
  REQUIRE(job.state() == v1::JOB_STATE_FAILED);
  CHECK(job.error().code() == static_cast<int>(absl::StatusCode::kFailedPrecondition));
  CHECK_THAT(job.error().message(), Catch::Contains("no target kept every task's accuracy within 0.05"));
  CHECK(job.sweep().rows_size() == 2);
  CHECK(PublishedVersions(*setup.store).empty());
  // With a looser bound the same accuracies pass.
  request.mutable_sweep()->set_max_accuracy_drop(0.1);
  const v1::Job loose = WaitForState(*manager, manager->Submit(request).value().name(), v1::JOB_STATE_SUCCEEDED);
  CHECK(loose.sweep().chosen() == 0);
}

TEST_CASE("a sweep the trainer stops halfway is INTERRUPTED with its finished rows, after a restart too") {
  Setup setup;
  setup.runner.hold_after = 1;
  {
    auto manager = setup.Manager();
    const std::string name = manager->Submit(SweepRequest({0.3, 0.2})).value().name();
    WaitFor(*manager, name, [](const v1::Job& job) { return job.progress().target_index() == 2; });
  }
  auto manager = setup.Manager();
  const v1::Job job = manager->Get("jobs/1").value();
  CHECK(job.state() == v1::JOB_STATE_INTERRUPTED);
  CHECK(job.sweep().rows_size() == 1);
  CHECK_THAT(job.error().message(), Catch::Contains("the partitions of targets 0.3 are kept with the job"));
  CHECK(PublishedVersions(*setup.store).empty());
}

}  // namespace
}  // namespace lychee
