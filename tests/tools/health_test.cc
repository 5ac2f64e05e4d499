// `lychee health` and `lychee partition --svg` against real servers: the health client stubs
// (proto/grpc/health/v1) linked beside grpc++'s own health service in one binary with an
// in-process TrainerServer, a plain gRPC server set NOT_SERVING, and a lychee-trainer process
// driven through the CLI as a container's health check would.
#include <fcntl.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <chrono>
#include <fstream>
#include <iterator>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "common/base/head_partition.h"
#include "common/base/partition_store.h"
#include "harness/temp_dir.h"
#include "tests/http_get.h"
#include "tests/run_command.h"
#include "tests/tools/xml_check.h"
#include "tools/lychee/health_command.h"
#include "trainer/service.h"

extern char** environ;

namespace lychee {
namespace {

using testing::RunCommand;
using testing::TempDir;
constexpr auto kTimeout = std::chrono::seconds(5);

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

CalibrationRunner RunnerThatRunsNothing() {
  return [](const CalibrationJobInputs&) -> absl::StatusOr<std::unique_ptr<CalibrationSession>> {
    return absl::UnimplementedError("this test runs no calibration");
  };
}

// A lychee-trainer process on a free loopback port, its output in a log; SIGTERM at the end.
class TrainerProcess {
 public:
  TrainerProcess(const std::string& registry_dir, const std::string& log_path) : log_path_(log_path) {
    const std::vector<std::string> args = {LYCHEE_TRAINER, "--listen", "127.0.0.1:0", "--registry-dir", registry_dir,
                                           "--model-root", "models"};
    std::vector<char*> argv;
    for (const std::string& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
    const int error = posix_spawn(&pid_, LYCHEE_TRAINER, &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    REQUIRE(error == 0);
  }
  ~TrainerProcess() { Stop(); }

  // The port it announced ("serving ... on port N"), 0 when it did not within 60 seconds.
  int WaitForPort() {
    static const std::regex kServing("on port (\\d+)");
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < give_up && pid_ > 0) {
      std::smatch match;
      const std::string log = ReadFile(log_path_);
      if (std::regex_search(log, match, kServing)) return std::stoi(match[1]);
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) pid_ = 0;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return 0;
  }

  // SIGTERM, then the exit code (-1 when a signal ended it).
  int Stop() {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = 0;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

 private:
  std::string log_path_;
  pid_t pid_ = 0;
};

testing::CommandResult Cli(const std::string& args) { return RunCommand(std::string(LYCHEE_CLI) + " " + args); }

TEST_CASE("the health client and grpc++'s health service share a binary: an in-process trainer is SERVING") {
  TempDir registry;
  TrainerServerOptions options;
  options.listen_address = "127.0.0.1:0";
  options.registry_dir = registry.str();
  options.jobs.model_root = "models";
  auto server = TrainerServer::Start(options, RunnerThatRunsNothing());
  REQUIRE(server.ok());
  const std::string target = "127.0.0.1:" + std::to_string((*server)->port());

  const absl::StatusOr<std::string> whole = cli::CheckHealth(target, "", kTimeout);
  REQUIRE(whole.ok());
  CHECK(*whole == "SERVING");

  const absl::StatusOr<std::string> unknown = cli::CheckHealth(target, "no.such.Service", kTimeout);
  CHECK(unknown.status().code() == absl::StatusCode::kNotFound);
  CHECK_THAT(std::string(unknown.status().message()),
             Catch::Contains(target + " service no.such.Service") && Catch::Contains("NOT_FOUND"));
  CHECK(cli::RunHealth({"--target", target}).ok());
  CHECK(cli::RunHealth({"--target", target, "--service", "no.such.Service"}).code() == absl::StatusCode::kNotFound);
}

TEST_CASE("a server that reports NOT_SERVING fails the health command; nothing listening is UNAVAILABLE") {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  REQUIRE(server != nullptr);
  const std::string target = "127.0.0.1:" + std::to_string(port);
  CHECK(cli::CheckHealth(target, "", kTimeout).value() == "SERVING");
  server->GetHealthCheckService()->SetServingStatus(false);
  CHECK(cli::CheckHealth(target, "", kTimeout).value() == "NOT_SERVING");
  const absl::Status status = cli::RunHealth({"--target", target});
  CHECK(status.code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(status.message()), Catch::Contains(target + " is NOT_SERVING"));
  server->Shutdown();

  const std::string nobody = "127.0.0.1:" + std::to_string(testing::FreePorts(1)[0]);
  const absl::StatusOr<std::string> closed = cli::CheckHealth(nobody, "", kTimeout);
  CHECK(closed.status().code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(closed.status().message()), Catch::Contains("health check of " + nobody));
}

TEST_CASE("lychee health and lychee partition --svg against a lychee-trainer process") {
  TempDir dir;
  const std::string registry = (dir.path / "registry").string();
  {
    // The shipped learned partition, published as version 1 of the bundled model.
    auto store = PartitionStore::Open(registry);
    REQUIRE(store.ok());
    auto partition = LoadHeadPartitionJson("models/tiny-llama-retrieval/partitions/learned-target-0.25.json");
    REQUIRE(partition.ok());
    REQUIRE((*store)->Publish(*partition).value() == 1);
  }
  TrainerProcess trainer(registry, (dir.path / "trainer.log").string());
  const int port = trainer.WaitForPort();
  INFO(ReadFile((dir.path / "trainer.log").string()));
  REQUIRE(port > 0);
  const std::string target = "127.0.0.1:" + std::to_string(port);

  const testing::CommandResult healthy = Cli("health --target " + target);
  CHECK(healthy.exit_code == 0);
  CHECK(healthy.output == target + ": SERVING\n");
  const testing::CommandResult unknown = Cli("health --target " + target + " --service no.such.Service");
  CHECK(unknown.exit_code == 1);
  CHECK_THAT(unknown.output, Catch::Contains("NOT_FOUND"));
  const testing::CommandResult bad_flag = Cli("health --target " + target + " --timeout 0");
  CHECK(bad_flag.exit_code == 1);
  CHECK_THAT(bad_flag.output, Catch::Contains("--timeout"));

  const std::string svg_path = (dir.path / "partition.svg").string();
  const testing::CommandResult shown = Cli("partition latest --trainer " + target + " --svg " + svg_path);
  INFO(shown.output);
  CHECK(shown.exit_code == 0);
  CHECK_THAT(shown.output, Catch::Contains("partition version 1, density 0.100") &&
                               Catch::Contains("              3  R1.00  S0.00\n") &&
                               Catch::Contains("wrote " + svg_path));
  const std::string svg = ReadFile(svg_path);
  CHECK(testing::XmlProblem(svg) == "");
  CHECK_THAT(svg, Catch::Contains("<title>partition version 1, density 0.100: shipped: calibration job jobs/1 of "
                                   "scripts/partition-eval.sh on the H100</title>"));
  const testing::CommandResult unwritable =
      Cli("partition latest --trainer " + target + " --svg " + (dir.path / "no/such/dir/p.svg").string());
  CHECK(unwritable.exit_code == 1);
  CHECK_THAT(unwritable.output, Catch::Contains("no/such/dir/p.svg"));

  CHECK(trainer.Stop() == 0);
  const testing::CommandResult stopped = Cli("health --target " + target + " --timeout 2");
  CHECK(stopped.exit_code == 1);
  CHECK_THAT(stopped.output, Catch::Contains("UNAVAILABLE"));
}

}  // namespace
}  // namespace lychee
