// The `lychee` commands that drive an inference server, against real lychee-trainer and
// lychee-inference processes on loopback.
#include <catch2/catch.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <thread>

#include "harness/child_process.h"
#include "harness/temp_dir.h"
#include "tests/run_command.h"
#include "tests/server_processes.h"

namespace lychee {
namespace {

using namespace std::chrono_literals;

using testing::PortFromLog;

TEST_CASE("lychee publishes, generates against the server, and rolls partitions out and back") {
  testing::TempDir dir;
  const std::string trainer_log = (dir.path / "trainer.log").string();
  const std::string inference_log = (dir.path / "inference.log").string();
  testing::ChildProcess trainer(LYCHEE_TRAINER,
                                {"--listen", "127.0.0.1:0", "--registry-dir", (dir.path / "registry").string()},
                                trainer_log);
  const std::string trainer_address = "127.0.0.1:" + std::to_string(PortFromLog(trainer_log, "TrainerService"));
  testing::ChildProcess inference(LYCHEE_INFERENCE,
                                  {"--listen", "127.0.0.1:0", "--state-dir", (dir.path / "state").string(), "--trainer",
                                   trainer_address, "--shadow-validation", "false"},
                                  inference_log);
  const std::string server = "127.0.0.1:" + std::to_string(PortFromLog(inference_log, "InferenceService"));
  const std::string cli = std::string(LYCHEE_CLI) + " ";
  const auto run = [&](const std::string& command) { return testing::RunCommand(cli + command); };

  testing::CommandResult result = run("server-info --server " + server);
  REQUIRE(result.exit_code == 0);
  CHECK(result.output.find("active partition: none") != std::string::npos);

  for (const char* file : {"learned-target-0.25.json", "retrieval-head-0.json"}) {
    result = run(std::string("publish models/tiny-llama-retrieval/partitions/") + file + " --trainer " + trainer_address);
    REQUIRE(result.exit_code == 0);
  }
  CHECK(result.output.find("as version 2") != std::string::npos);
  const auto until = std::chrono::steady_clock::now() + 30s;
  do {
    result = run("server-info --server " + server);
  } while (result.output.find("version 2 (") == std::string::npos && std::chrono::steady_clock::now() < until);
  CHECK(result.output.find("active partition: version 2") != std::string::npos);
  CHECK(result.output.find("connected") != std::string::npos);

  result = run("generate --server " + server + " --prompt 'The harbour was quiet and' --max-new-tokens 6");
  REQUIRE(result.exit_code == 0);
  CHECK(result.output.find("hybrid, partition 2") != std::string::npos);
  result = run("generate --server " + server + " --prompt 'The harbour' --max-new-tokens 3 --attention dense --print-ids");
  REQUIRE(result.exit_code == 0);
  CHECK(result.output.find("dense") != std::string::npos);

  result = run("generate --server " + server + " --prompt 'The harbour was quiet and' --max-new-tokens 4 --policy prhs --audit --budget 512");
  INFO(result.output);
  REQUIRE(result.exit_code == 0);
  CHECK(result.output.find("[policy prhs budget=512") != std::string::npos);
  CHECK(result.output.find("dropped attention mass mean") != std::string::npos);

  result = run("partitions --server " + server);
  REQUIRE(result.exit_code == 0);
  CHECK(result.output.find("holds 2 partition(s); active: 2") != std::string::npos);
  const std::string svg = (dir.path / "p1.svg").string();
  result = run("partition 1 --server " + server + " --svg " + svg);
  REQUIRE(result.exit_code == 0);
  CHECK(std::filesystem::file_size(svg) > 100);

  result = run("rollback --server " + server);
  REQUIRE(result.exit_code == 0);
  CHECK(result.output.find("version 1 (") != std::string::npos);
  CHECK(result.output.find("activated by rollback") != std::string::npos);
  result = run("hold on --server " + server);
  CHECK(result.output.find("HELD") != std::string::npos);
  result = run("activate 2 --server " + server);
  REQUIRE(result.exit_code == 0);
  CHECK(result.output.find("version 2 (") != std::string::npos);

  result = run("activate 9 --server " + server);
  CHECK(result.exit_code == 1);
  CHECK(result.output.find("NOT_FOUND") != std::string::npos);
  result = run("generate --server " + server + " --prompt '' ");
  CHECK(result.exit_code == 1);
  CHECK(result.output.find("INVALID_ARGUMENT") != std::string::npos);
}

TEST_CASE("lychee-inference refuses KV cache and graph flags it cannot honour, naming the alternative") {
  testing::TempDir dir;
  const std::string inference = std::string(LYCHEE_INFERENCE) + " --listen 127.0.0.1:0 --state-dir " +
                                (dir.path / "state").string() + " ";
  testing::CommandResult result = testing::RunCommand(inference + "--kv-cache-fraction 0.5");
  CHECK(result.exit_code == 1);
  CHECK(result.output.find("on the CPU give --kv-cache-mib") != std::string::npos);
  result = testing::RunCommand(inference + "--kv-cache-fraction 0.5 --kv-cache-mib 64");
  CHECK(result.exit_code == 1);
  CHECK(result.output.find("not both") != std::string::npos);
  result = testing::RunCommand(inference + "--kv-cache-fraction 1.5");
  CHECK(result.exit_code == 1);
  CHECK(result.output.find("--kv-cache-fraction must be in (0, 1]") != std::string::npos);
  result = testing::RunCommand(inference + "--cuda-graphs maybe");
  CHECK(result.exit_code == 1);
  CHECK(result.output.find("--cuda-graphs must be true or false") != std::string::npos);
}

TEST_CASE("lychee-inference refuses bad shadow-validation flags before it starts, naming the flag") {
  testing::TempDir dir;
  const std::filesystem::path state = dir.path / "state";
  const std::string inference =
      std::string(LYCHEE_INFERENCE) + " --listen 127.0.0.1:0 --state-dir " + state.string() + " ";
  const std::string malformed = (dir.path / "prompts.jsonl").string();
  std::ofstream(malformed) << "not json\n";
  for (const auto& [flags, named] : std::vector<std::pair<std::string, std::string>>{
           {"--shadow-max-accuracy-drop 1.5", "--shadow-max-accuracy-drop must be in [0, 1]"},
           {"--shadow-max-dropped-mass -0.1", "--shadow-max-dropped-mass must be in [0, 1]"},
           {"--shadow-heldout-corpus /no/such/corpus.txt", "--shadow-heldout-corpus"},
           {"--shadow-prompts-file /no/such/prompts.jsonl", "--shadow-prompts-file"},
           {"--shadow-prompts-file " + malformed, "--shadow-prompts-file"},
           {"--shadow-validation maybe", "--shadow-validation must be true or false"}}) {
    const testing::CommandResult result = testing::RunCommand(inference + flags);
    INFO(flags << ": " << result.output);
    CHECK(result.exit_code == 1);
    CHECK(result.output.find("usage: lychee-inference") != std::string::npos);  // printed for INVALID_ARGUMENT
    CHECK(result.output.find(named) != std::string::npos);
    CHECK(!std::filesystem::exists(state));  // nothing started, nothing written
  }
}

TEST_CASE("lychee-inference refuses bad canary flags, and lychee canary bad arguments, before anything starts") {
  testing::TempDir dir;
  const std::filesystem::path state = dir.path / "state";
  const std::string inference =
      std::string(LYCHEE_INFERENCE) + " --listen 127.0.0.1:0 --state-dir " + state.string() + " ";
  // lychee canary is refused before it asks a server: none listens on port 1.
  const std::string canary = std::string(LYCHEE_CLI) + " canary ";
  const std::string server = " --server 127.0.0.1:1";
  const std::string choose = "give VERSION --fraction F, --promote or --abort";
  for (const auto& [command, named] : std::vector<std::pair<std::string, std::string>>{
           {inference + "--canary-fraction 1.5", "--canary-fraction must be in [0, 1]"},
           {inference + "--canary-max-dropped-mass -0.1", "--canary-max-dropped-mass must be in [0, 1]"},
           {inference + "--canary-max-error-rate 2", "--canary-max-error-rate must be in [0, 1]"},
           {inference + "--canary-max-latency-ratio 0.5", "--canary-max-latency-ratio must be a finite number"},
           {inference + "--canary-sequences 0", "--canary-sequences must be in [1, "},
           {canary + "--fraction 0.5" + server, choose},
           {canary + "2" + server, "--fraction goes with VERSION"},
           {canary + "2 --fraction 0.5 --promote" + server, choose},
           {canary + "--promote --abort" + server, choose},
           {canary + "0 --fraction 0.5" + server, "VERSION must be a number >= 1"}}) {
    const testing::CommandResult result = testing::RunCommand(command);
    INFO(command << ": " << result.output);
    CHECK(result.exit_code == 1);
    CHECK(result.output.find(named) != std::string::npos);
    CHECK(!std::filesystem::exists(state));
  }
}

}  // namespace
}  // namespace lychee
