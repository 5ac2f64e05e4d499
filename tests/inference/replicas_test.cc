// Inference replicas behind HAProxy on the loopback, as scripts/replicas.sh runs them (one trainer,
// two replicas, HAProxy in front for gRPC and HTTP): a partition published to the trainer reaches
// every replica within a stated time; a replica killed with SIGKILL while streams run fails its
// own streams only, the others' complete; once HAProxy's health check drops it, new requests
// succeed on the other replica. HAProxy must be installed (CI installs Debian's): without it the
// script, and so this test, fails.
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <signal.h>
#include <strings.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "harness/child_process.h"
#include "harness/temp_dir.h"
#include "lychee/v1/inference.grpc.pb.h"
#include "lychee/v1/trainer.grpc.pb.h"
#include "tests/http_get.h"
#include "tests/server_processes.h"

namespace lychee {
namespace {

using namespace std::chrono_literals;
using testing::Clock;
using testing::Context;
using testing::ReadAll;
using testing::WaitFor;

constexpr int kReplicas = 2;
// What a rollout may take to reach every replica: the watch delivers a publication at once and
// activation on the CPU is a validation and a pointer swap (tens of milliseconds measured), so the
// rest is slack for a loaded two-core machine running the sanitizers' build.
constexpr auto kRolloutBound = 10s;
// From the kill to HAProxy marking the replica down: two failed checks 500 ms apart, plus slack.
constexpr auto kDetectionBound = 20s;
// From the script's start to HAProxy counting every replica up: the trainer and two replicas
// load the model on a loaded machine.
constexpr auto kStartBound = 300s;

struct ProcessEntry {
  pid_t pid = 0;
  int grpc_port = 0;
  int http_port = 0;
};

// scripts/replicas.sh, run until the test ends, then stopped with SIGTERM (which stops what it
// started; SIGKILL would leave the servers running).
class ReplicaSet {
 public:
  explicit ReplicaSet(const testing::TempDir& dir) {
    // HAProxy's three ports are chosen free here and bound by HAProxy a few seconds later; another
    // process may take one meanwhile, so a start that fails on a bind is retried on fresh ports.
    for (int attempt = 1;; ++attempt) {
      dir_ = dir.path / ("replicas-" + std::to_string(attempt));
      log_ = dir_.string() + ".out";
      const std::vector<int> ports = testing::FreePorts(3);
      grpc_port = ports[0];
      http_port = ports[1];
      stats_port = ports[2];
      script_ = std::make_unique<testing::ChildProcess>(
          "scripts/replicas.sh",
          std::vector<std::string>{"--build", LYCHEE_BUILD_DIR, "--dir", dir_.string(), "--replicas",
                                   std::to_string(kReplicas), "--trainer-port", "0", "--grpc-port",
                                   std::to_string(grpc_port), "--http-port", std::to_string(http_port), "--stats-port",
                                   std::to_string(stats_port),
                                   // The rollouts measured include retrieval-head-0, which shadow
                                   // validation rightly rejects: this test is about propagation.
                                   "--", "--shadow-validation", "false"},
          log_);
      INFO("scripts/replicas.sh's output: " << log_ << "; its logs: " << dir_.string());
      const auto until = Clock::now() + kStartBound;
      while (ReadAll(log_).find("replicas: ready") == std::string::npos && script_->running() && Clock::now() < until) {
        std::this_thread::sleep_for(100ms);
      }
      const std::string output = ReadAll(log_);
      if (output.find("replicas: ready") != std::string::npos) break;
      if (attempt < 3 && !script_->running() && output.find("cannot bind socket") != std::string::npos) continue;
      // SIGTERM, which the script passes on to what it started (the destructor does not run).
      script_->Kill(SIGTERM, 30s);
      FAIL("scripts/replicas.sh did not get ready within " << kStartBound.count() << " s:\n" << output);
    }
    std::istringstream table(ReadAll((dir_ / "processes.txt").string()));
    std::string name, http;
    ProcessEntry entry;
    for (std::string line; std::getline(table, line);) {
      if (line.empty() || line[0] == '#') continue;
      std::istringstream fields(line);
      fields >> name >> entry.pid >> entry.grpc_port >> http;
      entry.http_port = http == "-" ? 0 : std::stoi(http);
      processes[name] = entry;
    }
    REQUIRE(processes.count("trainer") == 1);
    for (int i = 1; i <= kReplicas; ++i) REQUIRE(processes.count(ReplicaName(i)) == 1);
  }
  ~ReplicaSet() {
    if (!script_->Kill(SIGTERM, 30s)) std::cerr << "scripts/replicas.sh did not stop on SIGTERM\n";
  }

  static std::string ReplicaName(int i) { return "replica-" + std::to_string(i); }
  std::string Address(int port) const { return "127.0.0.1:" + std::to_string(port); }

  // The status HAProxy's statistics give `server` in `backend` ("UP", "DOWN", "UP 1/2", ...).
  std::string ServerStatus(const std::string& backend, const std::string& server) const {
    const testing::HttpResponse stats = testing::ParseHttpResponse(testing::HttpGet(stats_port, "/stats;csv"));
    std::istringstream rows(stats.body);
    for (std::string row; std::getline(rows, row);) {
      std::vector<std::string> fields;
      std::istringstream cells(row);
      for (std::string cell; std::getline(cells, cell, ',');) fields.push_back(cell);
      if (fields.size() > 17 && fields[0] == backend && fields[1] == server) return fields[17];
    }
    return "";
  }

  int grpc_port = 0;
  int http_port = 0;
  int stats_port = 0;
  std::map<std::string, ProcessEntry> processes;

 private:
  std::filesystem::path dir_;
  std::string log_;
  std::unique_ptr<testing::ChildProcess> script_;
};

// One generation through the balancer, gRPC or HTTP (server-sent events), on a thread of its own.
struct Stream {
  std::string replica;  // the server HAProxy chose, from x-lychee-replica
  bool ok = false;      // ended with its final message (gRPC's done, the HTTP [DONE])
  int tokens = 0;
  uint64_t partition_version = 0;
  std::atomic<bool> started{false};  // its first token arrived
  std::atomic<bool> finished{false};
  std::string error;
};

std::string HeaderValue(const std::string& headers, const std::string& name) {
  std::istringstream lines(headers);
  for (std::string line; std::getline(lines, line);) {
    if (line.size() > name.size() + 1 && strncasecmp(line.c_str(), name.c_str(), name.size()) == 0 &&
        line[name.size()] == ':') {
      const size_t start = line.find_first_not_of(' ', name.size() + 1);
      const size_t end = line.find_last_not_of("\r ");
      return line.substr(start, end + 1 - start);
    }
  }
  return "";
}

void StreamGrpc(v1::InferenceService::Stub& balancer, const std::string& prompt, int max_tokens, Stream& stream) {
  v1::GenerateRequest request;
  request.set_text(prompt);
  request.set_max_new_tokens(max_tokens);
  auto context = Context(120s);
  auto reader = balancer.Generate(context.get(), request);
  v1::GenerateResponse response;
  bool done = false;
  while (reader->Read(&response)) {
    if (stream.replica.empty()) {
      const auto metadata = context->GetServerInitialMetadata();
      const auto replica = metadata.find("x-lychee-replica");
      if (replica != metadata.end()) stream.replica.assign(replica->second.data(), replica->second.size());
    }
    stream.tokens += response.token_ids_size();
    if (stream.tokens > 0) stream.started = true;
    if (response.has_done()) {
      done = true;
      stream.partition_version = response.done().partition_version();
    }
  }
  const grpc::Status status = reader->Finish();
  stream.ok = status.ok() && done;
  stream.error = "gRPC status " + std::to_string(status.error_code()) + ": " + status.error_message();
  stream.finished = true;
}

void StreamHttp(int port, const std::string& prompt, int max_tokens, Stream& stream) {
  testing::OpenRequest request(
      port, "/v1/completions",
      R"({"prompt": ")" + prompt + R"(", "stream": true, "max_tokens": )" + std::to_string(max_tokens) + "}");
  if (request.ReadUntil("\"text\"")) {
    stream.replica = HeaderValue(request.received().substr(0, request.received().find("\r\n\r\n")), "x-lychee-replica");
    stream.started = true;
    stream.ok = request.ReadUntil("data: [DONE]");
  }
  if (!stream.ok) {
    stream.error = "the response ended after " + std::to_string(request.received().size()) + " bytes, without [DONE]";
  }
  stream.finished = true;
}

TEST_CASE("replicas behind HAProxy: rollouts reach all; a killed replica fails only its own streams") {
  testing::TempDir dir;
  ReplicaSet replicas(dir);
  auto trainer = v1::TrainerService::NewStub(grpc::CreateChannel(
      replicas.Address(replicas.processes["trainer"].grpc_port), grpc::InsecureChannelCredentials()));
  std::vector<std::unique_ptr<v1::InferenceService::Stub>> direct;
  for (int i = 1; i <= kReplicas; ++i) {
    direct.push_back(v1::InferenceService::NewStub(
        grpc::CreateChannel(replicas.Address(replicas.processes[ReplicaSet::ReplicaName(i)].grpc_port),
                            grpc::InsecureChannelCredentials())));
  }
  auto balancer = v1::InferenceService::NewStub(
      grpc::CreateChannel(replicas.Address(replicas.grpc_port), grpc::InsecureChannelCredentials()));

  // Rollouts: each shipped partition, published to the trainer, becomes active on every replica;
  // the time from the publication's answer to each replica's activation is measured.
  for (size_t shipped = 0; shipped < testing::kShippedPartitions.size(); ++shipped) {
    v1::HeadPartition published;
    REQUIRE(trainer->PublishHeadPartition(Context().get(), testing::PublishRequest(shipped), &published).ok());
    const Clock::time_point published_at = Clock::now();
    std::vector<double> seconds(kReplicas, -1);
    while (Clock::now() - published_at < kRolloutBound) {
      for (int i = 0; i < kReplicas; ++i) {
        if (seconds[i] < 0 && testing::ServerInfo(*direct[i]).active_partition_version() == published.version()) {
          seconds[i] = std::chrono::duration<double>(Clock::now() - published_at).count();
        }
      }
      if (std::count(seconds.begin(), seconds.end(), -1.0) == 0) break;
      std::this_thread::sleep_for(2ms);
    }
    for (int i = 0; i < kReplicas; ++i) {
      INFO(ReplicaSet::ReplicaName(i + 1)
           << " never activated version " << published.version() << " within " << kRolloutBound.count() << " s");
      CHECK(seconds[i] >= 0);
      std::cout << "rollout of version " << published.version() << " to " << ReplicaSet::ReplicaName(i + 1) << ": "
                << seconds[i] * 1000 << " ms after the publication\n";
    }
    // New requests through the balancer get it, whichever replica serves them.
    std::set<std::string> served_by;
    for (int request = 0; request < 2 * kReplicas; ++request) {
      Stream stream;
      StreamGrpc(*balancer, "What did the old sailor find?", 4, stream);
      REQUIRE(stream.ok);
      CHECK(stream.partition_version == published.version());
      served_by.insert(stream.replica);
    }
    CHECK(served_by.size() == kReplicas);
  }

  // Streams on both replicas, gRPC and HTTP; replica-1 is killed once all of them are under way.
  constexpr int kStreamsPerProtocol = 2 * kReplicas;
  constexpr int kMaxTokens = 64;
  std::vector<std::unique_ptr<Stream>> streams;
  std::vector<std::thread> threads;
  for (int i = 0; i < 2 * kStreamsPerProtocol; ++i) {
    streams.push_back(std::make_unique<Stream>());
    const std::string prompt = "Stream " + std::to_string(i) + " tells the story of the harbour, at length:";
    Stream& stream = *streams.back();
    if (i < kStreamsPerProtocol) {
      threads.emplace_back([&, prompt] { StreamGrpc(*balancer, prompt, kMaxTokens, stream); });
    } else {
      threads.emplace_back([&, prompt] { StreamHttp(replicas.http_port, prompt, kMaxTokens, stream); });
    }
  }
  WaitFor("every stream's first token", 60s, [&] {
    return std::all_of(streams.begin(), streams.end(), [](const auto& s) { return s->started || s->finished; });
  });
  const std::string killed = ReplicaSet::ReplicaName(1);
  std::vector<bool> running_at_kill;
  for (const auto& stream : streams) running_at_kill.push_back(!stream->finished);
  REQUIRE(kill(replicas.processes[killed].pid, SIGKILL) == 0);
  const Clock::time_point killed_at = Clock::now();

  // HAProxy's health checks drop it from both backends.
  WaitFor("HAProxy to mark " + killed + " down", kDetectionBound, [&] {
    return replicas.ServerStatus("grpc_replicas", killed) == "DOWN" &&
           replicas.ServerStatus("http_replicas", killed) == "DOWN";
  });
  std::cout << "HAProxy marked the killed replica down "
            << std::chrono::duration<double>(Clock::now() - killed_at).count() << " s after the kill\n";
  // New requests, gRPC and HTTP, succeed on the other replica while the streams still run.
  for (int request = 0; request < 2 * kReplicas; ++request) {
    Stream grpc;
    StreamGrpc(*balancer, "What did the old sailor find?", 4, grpc);
    CHECK(grpc.ok);
    CHECK(grpc.replica == ReplicaSet::ReplicaName(2));
    const testing::HttpResponse http = testing::HttpRequest(replicas.http_port, "POST", "/v1/completions",
                                                            R"({"prompt": "The harbour", "max_tokens": 4})");
    CHECK(http.status == 200);
    CHECK(HeaderValue(http.headers, "x-lychee-replica") == ReplicaSet::ReplicaName(2));
  }

  for (std::thread& thread : threads) thread.join();
  int failed_on_killed = 0;
  std::map<std::string, int> per_replica;
  for (size_t i = 0; i < streams.size(); ++i) {
    const Stream& stream = *streams[i];
    INFO("stream " << i << (i < kStreamsPerProtocol ? " (gRPC)" : " (HTTP)") << " on '" << stream.replica << "', "
                   << stream.tokens << " tokens: " << stream.error);
    std::cout << "stream " << i << " on " << stream.replica << ": "
              << (i < kStreamsPerProtocol ? "gRPC, " + std::to_string(stream.tokens) + " tokens" : std::string("HTTP"))
              << ", " << (stream.ok ? "complete" : "broken off") << (running_at_kill[i] ? "" : " before the kill")
              << (stream.ok ? "" : " (" + stream.error + ")") << "\n";
    ++per_replica[stream.replica];
    if (stream.replica == killed) {
      // Its stream breaks off, unless it had ended before the kill.
      if (running_at_kill[i]) {
        CHECK(!stream.ok);
        ++failed_on_killed;
      }
    } else {
      CHECK(stream.replica == ReplicaSet::ReplicaName(2));
      CHECK(stream.ok);
    }
  }
  // Both replicas served some of the streams, and the kill cut some off.
  CHECK(per_replica.size() == kReplicas);
  CHECK(failed_on_killed > 0);
}

}  // namespace
}  // namespace lychee
