// Faults against the real processes: SIGKILL of the trainer during a job and during registry
// writes, SIGKILL of the inference service during generation, torn and damaged files in the
// registry and in the inference state directory, a full disk and a read-only registry. After
// every restart each acknowledged version is still there and verifies, no damaged partition is
// served, and no job the trainer accepted is silently gone.
#include <sys/mount.h>

#include <google/protobuf/util/message_differencer.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>

#include "common/base/durable_file.h"
#include "common/base/partition_store.h"
#include "harness/temp_dir.h"
#include "tests/server_processes.h"

namespace lychee::testing {
namespace {

namespace fs = std::filesystem;
using google::protobuf::util::MessageDifferencer;

bool SameProto(const google::protobuf::Message& a, const google::protobuf::Message& b) {
  return MessageDifferencer::Equals(a, b);
}

void WriteBytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
  REQUIRE(out.good());
}

// A job that runs long enough to be killed in the middle of (each step is a second or more here).
v1::SubmitCalibrationJobRequest JobRequest(int64_t steps) {
  v1::SubmitCalibrationJobRequest request;
  request.set_model(kModelName);
  request.mutable_config()->set_steps(steps);
  request.mutable_config()->set_target_density(0.25);
  request.mutable_config()->set_min_context_tokens(256);
  request.mutable_config()->set_max_context_tokens(512);
  request.mutable_config()->set_token_budget(256);
  return request;
}

v1::Job Submit(v1::TrainerService::Stub& trainer, int64_t steps) {
  v1::Job job;
  const grpc::Status status = trainer.SubmitCalibrationJob(Context().get(), JobRequest(steps), &job);
  INFO(status.error_message());
  REQUIRE(status.ok());
  return job;
}

bool IsFinalState(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED || state == v1::JOB_STATE_CANCELLED ||
         state == v1::JOB_STATE_INTERRUPTED;
}

v1::Job WaitForState(v1::TrainerService::Stub& trainer, const std::string& name, v1::JobState state,
                     std::chrono::seconds timeout) {
  v1::Job job;
  WaitFor(name + " to be " + v1::JobState_Name(state), timeout, [&] {
    job = GetJob(trainer, name);
    INFO(name << " is " << v1::JobState_Name(job.state()) << ": " << job.error().message());
    REQUIRE((job.state() == state || !IsFinalState(job.state())));
    return job.state() == state;
  });
  return job;
}

// Every acknowledged version is listed by the trainer, equal to what the acknowledgement said,
// and every file of the registry directory that is listed decodes as a whole record.
void CheckAcknowledgedVersions(v1::TrainerService::Stub& trainer, const std::string& registry,
                               const std::map<uint64_t, v1::HeadPartition>& acknowledged) {
  const std::vector<v1::HeadPartition> listed = ListVersions(trainer);
  std::map<uint64_t, v1::HeadPartition> by_version;
  for (const v1::HeadPartition& partition : listed) by_version[partition.version()] = partition;
  for (const auto& [version, partition] : acknowledged) {
    INFO("acknowledged version " << version);
    REQUIRE(by_version.count(version) == 1);
    CHECK(SameProto(by_version[version], partition));
    v1::HeadPartition fetched;
    REQUIRE(GetVersion(trainer, version, &fetched).ok());
    CHECK(SameProto(fetched, partition));
  }
  REQUIRE(!listed.empty());
  const fs::path model_dir = fs::path(registry) / "partitions" / listed.front().model_fingerprint();
  for (const v1::HeadPartition& partition : listed) {
    char name[32];
    std::snprintf(name, sizeof name, "%012llu.partition", static_cast<unsigned long long>(partition.version()));
    const std::string path = (model_dir / name).string();
    INFO(path);
    absl::StatusOr<std::string> record = ReadDurableRecord(path);
    REQUIRE(record.ok());
    absl::StatusOr<HeadPartition> stored = ParseStoredPartition(*record, path);
    REQUIRE(stored.ok());
    CHECK(SameProto(HeadPartitionToProto(*stored), partition));
  }
}

TEST_CASE("a trainer killed with SIGKILL during a job keeps every acknowledged version and every queued job") {
  TempDir dir;
  const std::string registry = (dir.path / "registry").string();
  auto trainer = MakeTrainer(registry, (dir.path / "trainer.log").string(), {"--max-concurrent-jobs", "1"});
  INFO("trainer log: " << trainer->log());
  trainer->Start();
  auto stub = TrainerStub(*trainer);

  std::map<uint64_t, v1::HeadPartition> acknowledged;
  for (size_t shipped = 0; shipped < kShippedPartitions.size(); ++shipped) {
    v1::HeadPartition published;
    REQUIRE(stub->PublishHeadPartition(Context().get(), PublishRequest(shipped), &published).ok());
    acknowledged[published.version()] = published;
  }
  // A job that ends before the kill: its version is acknowledged by SUCCEEDED.
  const v1::Job finished = WaitForState(*stub, Submit(*stub, 2).name(), v1::JOB_STATE_SUCCEEDED, 300s);
  {
    v1::HeadPartition published;
    REQUIRE(GetVersion(*stub, finished.result().partition_version(), &published).ok());
    acknowledged[published.version()] = published;
  }
  REQUIRE(acknowledged.size() == 3);

  // One job running, two queued behind it (one job at a time).
  const v1::Job running = Submit(*stub, 1000);
  const v1::Job queued_a = Submit(*stub, 2);
  const v1::Job queued_b = Submit(*stub, 2);
  WaitForState(*stub, running.name(), v1::JOB_STATE_RUNNING, 60s);
  WaitFor("the running job to make progress", 300s, [&] { return GetJob(*stub, running.name()).progress().step() >= 1; });
  CHECK(GetJob(*stub, queued_a.name()).state() == v1::JOB_STATE_QUEUED);
  CHECK(GetJob(*stub, queued_b.name()).state() == v1::JOB_STATE_QUEUED);
  trainer->KillHard();

  trainer->Start();
  stub = TrainerStub(*trainer);
  CheckAcknowledgedVersions(*stub, registry, acknowledged);
  v1::ListJobsResponse jobs;
  REQUIRE(stub->ListJobs(Context().get(), {}, &jobs).ok());
  REQUIRE(jobs.jobs_size() == 4);
  const v1::Job interrupted = GetJob(*stub, running.name());
  CHECK(interrupted.state() == v1::JOB_STATE_INTERRUPTED);
  CHECK(interrupted.error().message().find("stopped while this job was running") != std::string::npos);
  CHECK(GetJob(*stub, finished.name()).state() == v1::JOB_STATE_SUCCEEDED);
  // The queued jobs are queued again and run to the end, each publishing a new version.
  const v1::Job rerun_a = WaitForState(*stub, queued_a.name(), v1::JOB_STATE_SUCCEEDED, 300s);
  const v1::Job rerun_b = WaitForState(*stub, queued_b.name(), v1::JOB_STATE_SUCCEEDED, 300s);
  CHECK(rerun_a.result().partition_version() > finished.result().partition_version());
  CHECK(rerun_b.result().partition_version() > rerun_a.result().partition_version());
  for (const v1::Job& job : {rerun_a, rerun_b}) {
    v1::HeadPartition published;
    REQUIRE(GetVersion(*stub, job.result().partition_version(), &published).ok());
    acknowledged[published.version()] = published;
  }
  CheckAcknowledgedVersions(*stub, registry, acknowledged);
  CHECK(trainer->log_text().find("partition registry:") == std::string::npos);
}

TEST_CASE("a trainer killed with SIGKILL while publishing never serves a torn version") {
  TempDir dir;
  const std::string registry = (dir.path / "registry").string();
  auto trainer = MakeTrainer(registry, (dir.path / "trainer.log").string());
  INFO("trainer log: " << trainer->log());
  trainer->Start();

  // Two clients publish as fast as the trainer acknowledges; SIGKILL lands at a random moment.
  std::mutex mutex;
  std::map<uint64_t, v1::HeadPartition> acknowledged;
  std::atomic<bool> stop{false};
  std::vector<std::thread> publishers;
  for (size_t client = 0; client < 2; ++client) {
    publishers.emplace_back([&, client] {
      auto stub = TrainerStub(*trainer);
      for (size_t i = 0; !stop; ++i) {
        v1::HeadPartition published;
        if (!stub->PublishHeadPartition(Context(5s).get(), PublishRequest((client + i) % 2), &published).ok()) return;
        std::lock_guard<std::mutex> lock(mutex);
        acknowledged[published.version()] = published;
      }
    });
  }
  std::mt19937 random(std::random_device{}());
  WaitFor("some versions to be acknowledged", 60s, [&] {
    std::lock_guard<std::mutex> lock(mutex);
    return acknowledged.size() >= 5;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 700)(random)));
  trainer->KillHard();
  stop = true;
  for (std::thread& publisher : publishers) publisher.join();
  INFO(acknowledged.size() << " versions acknowledged before the kill");

  trainer->Start();
  auto stub = TrainerStub(*trainer);
  CheckAcknowledgedVersions(*stub, registry, acknowledged);
  const std::vector<v1::HeadPartition> after_kill = ListVersions(*stub);
  const uint64_t highest = after_kill.back().version();

  // Damage by hand what a crash or a bad disk could leave: a truncated file, a flipped byte, a
  // temporary of a write cut short, garbage under a version's name, a whole record under the
  // wrong version's name.
  trainer->KillHard();
  const fs::path model_dir = fs::path(registry) / "partitions" / after_kill.front().model_fingerprint();
  const auto file_of = [&](uint64_t version) {
    char name[32];
    std::snprintf(name, sizeof name, "%012llu.partition", static_cast<unsigned long long>(version));
    return model_dir / name;
  };
  const std::string whole = ReadAll(file_of(1).string());
  WriteBytes(file_of(1), whole.substr(0, whole.size() / 2));
  std::string flipped = ReadAll(file_of(2).string());
  flipped[flipped.size() - 3] ^= 0x40;
  WriteBytes(file_of(2), flipped);
  WriteBytes(file_of(highest + 1).string() + ".tmp-Xy12Ab", whole.substr(0, 20));
  WriteBytes(file_of(highest + 2), "not a record at all");
  WriteBytes(file_of(highest + 3), ReadAll(file_of(3).string()));
  for (uint64_t damaged : {uint64_t{1}, uint64_t{2}, highest + 2, highest + 3}) acknowledged.erase(damaged);

  trainer->Start();
  stub = TrainerStub(*trainer);
  const std::string log = trainer->log_text();
  for (const fs::path& path : {file_of(1), file_of(2), file_of(highest + 2), file_of(highest + 3)}) {
    INFO(path.string() << " is reported in the log");
    CHECK(log.find("partition registry: " + path.string()) != std::string::npos);
  }
  CHECK(log.find(".tmp-Xy12Ab") == std::string::npos);  // a temporary is never a version: ignored
  CheckAcknowledgedVersions(*stub, registry, acknowledged);
  for (uint64_t damaged : {uint64_t{1}, uint64_t{2}, highest + 2, highest + 3}) {
    INFO("damaged version " << damaged);
    v1::HeadPartition partition;
    const grpc::Status status = GetVersion(*stub, damaged, &partition);
    CHECK(status.error_code() == grpc::StatusCode::DATA_LOSS);
    for (const v1::HeadPartition& listed : ListVersions(*stub)) CHECK(listed.version() != damaged);
  }
  // A damaged version's number is never handed out again.
  v1::HeadPartition next;
  REQUIRE(stub->PublishHeadPartition(Context().get(), PublishRequest(0), &next).ok());
  CHECK(next.version() == highest + 4);

  // An inference service following this registry from scratch gets every readable version and
  // none of the damaged ones.
  auto inference = MakeInference((dir.path / "state").string(), (dir.path / "inference.log").string(),
                                 {"--trainer", trainer->address()});
  INFO("inference log: " << inference->log());
  inference->Start();
  auto inference_stub = InferenceStub(*inference);
  WaitFor("the newest version to be active", 120s,
          [&] { return ServerInfo(*inference_stub).active_partition_version() == next.version(); });
  v1::ListPartitionsResponse held;
  REQUIRE(inference_stub->ListPartitions(Context().get(), {}, &held).ok());
  std::vector<uint64_t> held_versions;
  for (const v1::HeadPartition& partition : held.partitions()) held_versions.push_back(partition.version());
  std::vector<uint64_t> expected_versions;
  for (const v1::HeadPartition& partition : ListVersions(*stub)) expected_versions.push_back(partition.version());
  CHECK(held_versions == expected_versions);
}

TEST_CASE("damaged files in the inference state directory are reported and never served") {
  TempDir dir;
  auto trainer = MakeTrainer((dir.path / "registry").string(), (dir.path / "trainer.log").string());
  trainer->Start();
  auto trainer_stub = TrainerStub(*trainer);
  for (size_t shipped : {0, 1, 0}) {
    v1::HeadPartition published;
    REQUIRE(trainer_stub->PublishHeadPartition(Context().get(), PublishRequest(shipped), &published).ok());
  }
  const fs::path state = dir.path / "state";
  const std::string inference_log = (dir.path / "inference.log").string();
  INFO("inference log: " << inference_log);
  auto following = MakeInference(state.string(), inference_log, {"--trainer", trainer->address()});
  following->Start();
  WaitFor("version 3 to be active", 120s,
          [&] { return ServerInfo(*InferenceStub(*following)).active_partition_version() == 3; });
  following->KillHard();

  // The active version's file loses a byte in the middle, version 1's is cut short, a temporary
  // of an interrupted write is left behind.
  const fs::path partitions = state / "partitions";
  std::string active = ReadAll((partitions / "3.pb").string());
  active[active.size() / 2] ^= 0x01;
  WriteBytes(partitions / "3.pb", active);
  const std::string first = ReadAll((partitions / "1.pb").string());
  WriteBytes(partitions / "1.pb", first.substr(0, first.size() - 5));
  WriteBytes(partitions / "4.pb.tmp-AbCdEf", first.substr(0, 10));

  // Alone, the service starts with none active rather than a damaged one, and says why.
  const size_t log_before = ReadAll(inference_log).size();
  auto alone = MakeInference(state.string(), inference_log);
  alone->Start();
  auto stub = InferenceStub(*alone);
  const std::string log = ReadAll(inference_log).substr(log_before);
  CHECK(log.find("partition state: " + (partitions / "3.pb").string()) != std::string::npos);
  CHECK(log.find("partition state: " + (partitions / "1.pb").string()) != std::string::npos);
  CHECK(log.find("version 3 was active but is not readable") != std::string::npos);
  CHECK(log.find("4.pb.tmp-AbCdEf") == std::string::npos);
  CHECK(ServerInfo(*stub).active_partition_version() == 0);
  v1::ListPartitionsResponse held;
  REQUIRE(stub->ListPartitions(Context().get(), {}, &held).ok());
  REQUIRE(held.partitions_size() == 1);
  CHECK(held.partitions(0).version() == 2);
  for (uint64_t damaged : {1, 3}) {
    v1::GenerateRequest request;
    request.set_text("Which version?");
    request.set_max_new_tokens(2);
    request.mutable_attention()->set_mode(v1::ATTENTION_MODE_HYBRID);
    request.mutable_attention()->set_partition_version(damaged);
    auto context = Context();
    auto reader = stub->Generate(context.get(), request);
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
    }
    CHECK(reader->Finish().error_code() == grpc::StatusCode::NOT_FOUND);
  }
  const GenerationResult dense = Generate(*stub, "The harbour was quiet.", 4);
  REQUIRE(dense.status.ok());
  CHECK(!dense.hybrid);
  alone->KillHard();

  // Following the trainer again, the damaged newest version is fetched again, rewritten whole
  // and activated.
  following->Start();
  stub = InferenceStub(*following);
  WaitFor("version 3 to be active again", 120s, [&] { return ServerInfo(*stub).active_partition_version() == 3; });
  absl::StatusOr<std::string> repaired = ReadDurableFile((partitions / "3.pb").string());
  CHECK(repaired.ok());
  const GenerationResult hybrid = Generate(*stub, "The harbour was quiet.", 4);
  REQUIRE(hybrid.status.ok());
  CHECK(hybrid.partition_version == 3);
}

TEST_CASE("an inference service killed with SIGKILL during generation restarts with its active version") {
  TempDir dir;
  auto trainer = MakeTrainer((dir.path / "registry").string(), (dir.path / "trainer.log").string());
  trainer->Start();
  auto trainer_stub = TrainerStub(*trainer);
  for (size_t shipped : {0, 1}) {
    v1::HeadPartition published;
    REQUIRE(trainer_stub->PublishHeadPartition(Context().get(), PublishRequest(shipped), &published).ok());
  }
  auto inference = MakeInference((dir.path / "state").string(), (dir.path / "inference.log").string(),
                                 {"--trainer", trainer->address()});
  INFO("inference log: " << inference->log());
  inference->Start();
  auto stub = InferenceStub(*inference);
  WaitFor("version 2 to be active", 120s, [&] { return ServerInfo(*stub).active_partition_version() == 2; });
  // Version 1 is chosen by an operator: the restart must bring back that choice, not the newest.
  v1::ActivatePartitionRequest activate;
  activate.set_version(1);
  v1::ServerInfo info;
  REQUIRE(stub->ActivatePartition(Context().get(), activate, &info).ok());

  std::atomic<int> streaming{0};
  std::atomic<int> completed{0};
  std::vector<std::thread> clients;
  std::vector<GenerationResult> cut(4);
  for (int client = 0; client < 4; ++client) {
    clients.emplace_back([&, client] {
      auto client_stub = InferenceStub(*inference);
      while (true) {
        v1::GenerateRequest request;
        request.set_text("Client " + std::to_string(client) + " asks what the sailor found.");
        request.set_max_new_tokens(200);
        auto context = Context(120s);
        auto reader = client_stub->Generate(context.get(), request);
        v1::GenerateResponse response;
        bool counted = false;
        while (reader->Read(&response)) {
          if (!counted) ++streaming;
          counted = true;
        }
        const grpc::Status status = reader->Finish();
        if (counted) --streaming;
        if (!status.ok()) {
          cut[client].status = status;
          return;
        }
        ++completed;
      }
    });
  }
  WaitFor("every client to be streaming", 120s, [&] { return streaming == 4; });
  inference->KillHard();
  for (std::thread& client : clients) client.join();
  for (const GenerationResult& result : cut) CHECK(result.status.error_code() == grpc::StatusCode::UNAVAILABLE);

  inference->Start();
  stub = InferenceStub(*inference);
  info = ServerInfo(*stub);
  CHECK(info.active_partition_version() == 1);
  CHECK(info.activated_by() == "restored");
  v1::ListPartitionsResponse held;
  REQUIRE(stub->ListPartitions(Context().get(), {}, &held).ok());
  CHECK(held.partitions_size() == 2);
  const GenerationResult after = Generate(*stub, "The harbour was quiet.", 8);
  REQUIRE(after.status.ok());
  CHECK(after.tokens > 0);
  CHECK(after.partition_version == 1);
  // The history survived too: rollback goes to the version active before the operator's choice.
  REQUIRE(stub->Rollback(Context().get(), {}, &info).ok());
  CHECK(info.active_partition_version() == 2);
}

// A small tmpfs mounted for one test, unmounted when it ends.
class SmallFilesystem {
 public:
  // False, with a warning that the test of `what` is skipped, where it cannot be mounted.
  bool Mount(const fs::path& at, const std::string& size, const std::string& what) {
    fs::create_directories(at);
    if (::mount("tmpfs", at.c_str(), "tmpfs", 0, ("size=" + size).c_str()) != 0) {
      const std::string why = std::strerror(errno);
      WARN("SKIPPED: cannot mount a small tmpfs for the "
           << what << " (mount: " << why << "; needs CAP_SYS_ADMIN, e.g. root outside a restricted container)");
      return false;
    }
    at_ = at;
    size_ = size;
    return true;
  }
  // errno's text when the remount failed.
  std::string SetReadOnly(bool read_only) {
    const unsigned long flags = MS_REMOUNT | (read_only ? MS_RDONLY : 0);
    if (::mount("tmpfs", at_.c_str(), "tmpfs", flags, ("size=" + size_).c_str()) != 0) return std::strerror(errno);
    return "";
  }
  // Writes zeros into `file` until the filesystem is full.
  void Fill(const fs::path& file) {
    std::FILE* out = std::fopen(file.c_str(), "wb");
    REQUIRE(out != nullptr);
    const std::string block(4096, '\0');
    while (std::fwrite(block.data(), 1, block.size(), out) == block.size() && std::fflush(out) == 0) {
    }
    std::fclose(out);
  }
  ~SmallFilesystem() {
    if (!at_.empty()) ::umount2(at_.c_str(), MNT_DETACH);
  }

 private:
  fs::path at_;
  std::string size_;
};

std::vector<std::string> EntriesUnder(const fs::path& dir) {
  std::vector<std::string> entries;
  for (const fs::directory_entry& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) entries.push_back(fs::relative(entry.path(), dir).string());
  }
  std::sort(entries.begin(), entries.end());
  return entries;
}

// A trainer whose registry, and an inference service whose state directory, sit on a 1 MiB tmpfs,
// with version 1 published and active.
struct ServicesOnSmallDisk {
  TempDir dir;
  SmallFilesystem disk;
  fs::path mount_point = dir.path / "small";
  fs::path registry = mount_point / "registry";
  std::unique_ptr<Server> trainer, inference;
  std::unique_ptr<v1::TrainerService::Stub> stub;
  std::unique_ptr<v1::InferenceService::Stub> inference_stub;
  std::map<uint64_t, v1::HeadPartition> acknowledged;
  std::vector<std::string> files_before;

  // False, with a warning that the test of `what` is skipped, where the tmpfs cannot be mounted.
  bool Start(const std::string& what) {
    if (!disk.Mount(mount_point, "1m", what)) return false;
    trainer = MakeTrainer(registry.string(), (dir.path / "trainer.log").string());
    trainer->Start();
    stub = TrainerStub(*trainer);
    v1::HeadPartition published;
    REQUIRE(stub->PublishHeadPartition(Context().get(), PublishRequest(0), &published).ok());
    acknowledged[published.version()] = published;
    inference = MakeInference((mount_point / "state").string(), (dir.path / "inference.log").string(),
                              {"--trainer", trainer->address()});
    inference->Start();
    inference_stub = InferenceStub(*inference);
    WaitFor("version 1 to be active", 120s,
            [&] { return ServerInfo(*inference_stub).active_partition_version() == 1; });
    files_before = EntriesUnder(mount_point);
    return true;
  }

  // After a refused write: both servers still up and serving, nothing of the refused write listed;
  // then, the constraint lifted, publishing works again and the inference service rolls it out.
  void CheckServingThenResume() {
    REQUIRE(trainer->running());
    REQUIRE(inference->running());
    CheckAcknowledgedVersions(*stub, registry.string(), acknowledged);
    CHECK(ListVersions(*stub).size() == 1);
    const GenerationResult during = Generate(*inference_stub, "The harbour was quiet.", 4);
    REQUIRE(during.status.ok());
    CHECK(during.partition_version == 1);

    v1::HeadPartition published;
    REQUIRE(stub->PublishHeadPartition(Context().get(), PublishRequest(1), &published).ok());
    acknowledged[published.version()] = published;
    WaitFor("the new version to be active", 120s,
            [&] { return ServerInfo(*inference_stub).active_partition_version() == published.version(); });
    trainer->KillHard();
    trainer->Start();
    stub = TrainerStub(*trainer);
    CheckAcknowledgedVersions(*stub, registry.string(), acknowledged);
    CHECK(trainer->log_text().find("partition registry:") == std::string::npos);
  }
};

TEST_CASE("a full disk refuses publishing cleanly and publishing resumes after", "[disk]") {
  ServicesOnSmallDisk services;
  if (!services.Start("full-disk test")) return;
  INFO("trainer log: " << services.trainer->log() << "\ninference log: " << services.inference->log());
  services.disk.Fill(services.mount_point / "filler");
  v1::HeadPartition published;
  const grpc::Status refused = services.stub->PublishHeadPartition(Context().get(), PublishRequest(1), &published);
  INFO(refused.error_message());
  CHECK(refused.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  CHECK(refused.error_message().find("No space left on device") != std::string::npos);
  // A job cannot be journaled, so it is refused rather than accepted and lost.
  v1::Job job;
  const grpc::Status job_refused = services.stub->SubmitCalibrationJob(Context().get(), JobRequest(2), &job);
  CHECK(job_refused.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  std::vector<std::string> files_full = EntriesUnder(services.mount_point);
  files_full.erase(std::find(files_full.begin(), files_full.end(), "filler"));
  CHECK(files_full == services.files_before);  // nothing half-written is left
  fs::remove(services.mount_point / "filler");
  services.CheckServingThenResume();
}

TEST_CASE("a read-only registry refuses publishing cleanly and publishing resumes after", "[disk-readonly]") {
  ServicesOnSmallDisk services;
  if (!services.Start("read-only test")) return;
  INFO("trainer log: " << services.trainer->log() << "\ninference log: " << services.inference->log());
  if (const std::string why = services.disk.SetReadOnly(true); !why.empty()) {
    WARN("SKIPPED: cannot remount the tmpfs read-only (" << why << ")");
    return;
  }
  v1::HeadPartition published;
  const grpc::Status refused = services.stub->PublishHeadPartition(Context().get(), PublishRequest(1), &published);
  INFO(refused.error_message());
  // absl maps EROFS to PERMISSION_DENIED; the message names the cause.
  CHECK(refused.error_code() == grpc::StatusCode::PERMISSION_DENIED);
  CHECK(refused.error_message().find("Read-only file system") != std::string::npos);
  v1::Job job;
  CHECK(!services.stub->SubmitCalibrationJob(Context().get(), JobRequest(2), &job).ok());
  CHECK(EntriesUnder(services.mount_point) == services.files_before);
  REQUIRE(services.disk.SetReadOnly(false).empty());
  services.CheckServingThenResume();
}

TEST_CASE("an inference service whose state directory is full keeps serving its active version", "[disk]") {
  TempDir dir;
  SmallFilesystem disk;
  const fs::path state = dir.path / "state";
  if (!disk.Mount(state, "1m", "full state directory")) return;
  auto trainer = MakeTrainer((dir.path / "registry").string(), (dir.path / "trainer.log").string());
  trainer->Start();
  auto trainer_stub = TrainerStub(*trainer);
  v1::HeadPartition published;
  REQUIRE(trainer_stub->PublishHeadPartition(Context().get(), PublishRequest(0), &published).ok());
  auto inference = MakeInference(state.string(), (dir.path / "inference.log").string(), {"--trainer", trainer->address()});
  INFO("inference log: " << inference->log());
  inference->Start();
  auto stub = InferenceStub(*inference);
  WaitFor("version 1 to be active", 120s, [&] { return ServerInfo(*stub).active_partition_version() == 1; });

  disk.Fill(state / "filler");
  REQUIRE(trainer_stub->PublishHeadPartition(Context().get(), PublishRequest(1), &published).ok());
  v1::ServerInfo info;
  WaitFor("version 2 to be refused", 60s, [&] {
    info = ServerInfo(*stub);
    return info.rejected_size() > 0;
  });
  CHECK(info.rejected(0).version() == 2);
  CHECK(info.rejected(0).reason().find("No space left on device") != std::string::npos);
  CHECK(info.active_partition_version() == 1);
  const GenerationResult during = Generate(*stub, "The harbour was quiet.", 4);
  REQUIRE(during.status.ok());
  CHECK(during.partition_version == 1);
  CHECK(!fs::exists(state / "partitions" / "2.pb"));

  fs::remove(state / "filler");
  REQUIRE(trainer_stub->PublishHeadPartition(Context().get(), PublishRequest(0), &published).ok());
  WaitFor("version 3 to be active", 120s, [&] { return ServerInfo(*stub).active_partition_version() == 3; });
  inference->KillHard();
  inference->Start();
  stub = InferenceStub(*inference);
  CHECK(ServerInfo(*stub).active_partition_version() == 3);
}

}  // namespace
}  // namespace lychee::testing
