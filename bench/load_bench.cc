// Load on loopback: concurrent streaming clients of lychee-inference for a number of rounds while
// a new head partition is published to lychee-trainer (and so rolled out) every few seconds.
// Prints per round the requests, tokens/s, per-token latency (client side, between streamed
// tokens), time to first token, errors and the inference process's resident memory; exits 1 on
// any error, when a rollout does not reach the inference service, or when the memory grows after
// the first round by more than --rss-tolerance-mib.
#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "common/base/head_partition.h"
#include "common/base/status_macros.h"
#include "common/service/command_line.h"
#include "common/service/resource_paths.h"
#include "harness/child_process.h"
#include "harness/temp_dir.h"
#include "lychee/v1/inference.grpc.pb.h"
#include "lychee/v1/trainer.grpc.pb.h"

ABSL_FLAG(int64_t, clients, 8, "concurrent streaming clients");
ABSL_FLAG(int64_t, rounds, 4, "rounds");
ABSL_FLAG(double, seconds, 15, "length of a round in seconds");
ABSL_FLAG(double, rollout_every, 3, "publish a new partition version this often (seconds)");
ABSL_FLAG(int64_t, max_new_tokens, 32, "tokens per request");
ABSL_FLAG(int64_t, threads, 1, "LibTorch threads of each server");
ABSL_FLAG(double, rss_tolerance_mib, 8, "growth of the inference RSS over round 1 that fails the run (MiB)");
ABSL_FLAG(std::string, trainer, "", "HOST:PORT of a trainer to use instead of starting one");
ABSL_FLAG(std::string, inference, "",
          "HOST:PORT of an inference service to use instead of starting one (give --inference-pid for its memory "
          "figure)");
ABSL_FLAG(int64_t, inference_pid, 0, "the process id of --inference");
ABSL_FLAG(std::string, trainer_binary, "",
          "the lychee-trainer to start (default: the one beside load_bench, else the first in $PATH)");
ABSL_FLAG(std::string, inference_binary, "",
          "the lychee-inference to start (default: the one beside load_bench, else the first in $PATH)");
ABSL_FLAG(bool, shadow_validation, false,
          "whether the inference service it starts validates each partition against dense first (false: "
          "retrieval-head-0 would be rejected, and the bench measures rollouts)");

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr char kUsage[] =
    "usage: load_bench [flags]\n\nPartitions published: the bundled model's "
    "partitions/{learned-target-0.25,retrieval-head-0}.json, alternating.\n";

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The port a server started by this program printed in its log.
absl::StatusOr<int> PortFromLog(const std::string& log_path, const std::string& service, lychee::testing::ChildProcess& process) {
  const auto until = Clock::now() + 120s;
  while (Clock::now() < until) {
    std::smatch match;
    const std::string log = ReadAll(log_path);
    if (std::regex_search(log, match, std::regex(service + " on port ([0-9]+)"))) return std::stoi(match[1]);
    if (!process.running()) return absl::UnavailableError(absl::StrCat(service, " exited; see ", log_path));
    std::this_thread::sleep_for(50ms);
  }
  return absl::DeadlineExceededError(absl::StrCat(service, " did not start within 120 s; see ", log_path));
}

// The server binary to start: `given` (its --NAME-binary flag) unless empty, else the program `name`
// beside load_bench or in $PATH; the error says which flags would do instead.
absl::StatusOr<std::string> ServerBinary(const std::string& given, const std::string& name, const std::string& flag) {
  if (!given.empty()) return given;
  absl::StatusOr<std::string> found = lychee::FindProgram(name);
  if (!found.ok()) {
    return absl::NotFoundError(absl::StrCat(found.status().message(), "; give --", flag, "-binary PATH, or --", flag,
                                            " HOST:PORT of a running server"));
  }
  return found;
}

std::unique_ptr<grpc::ClientContext> Context(std::chrono::seconds timeout) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + timeout);
  return context;
}

// VmRSS of `pid` in MiB; 0 when unknown.
double RssMib(pid_t pid) {
  if (pid <= 0) return 0;
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return 0;
}

double Percentile(std::vector<double> values, double fraction) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t index = std::min(values.size() - 1, static_cast<size_t>(fraction * static_cast<double>(values.size())));
  return values[index];
}

struct RoundStats {
  std::mutex mutex;
  int64_t requests = 0;
  int64_t tokens = 0;
  int64_t errors = 0;
  std::vector<double> token_latencies;  // seconds between consecutive streamed tokens
  std::vector<double> first_token_latencies;
  std::vector<std::string> error_messages;
};

// One streaming generation; what it measured goes into `stats`.
void RunOne(lychee::v1::InferenceService::Stub& stub, const std::string& prompt, int max_new_tokens, RoundStats& stats) {
  lychee::v1::GenerateRequest request;
  request.set_text(prompt);
  request.set_max_new_tokens(max_new_tokens);
  const Clock::time_point started = Clock::now();
  auto context = Context(120s);
  auto reader = stub.Generate(context.get(), request);
  lychee::v1::GenerateResponse response;
  std::vector<double> gaps;
  double first_token = -1;
  Clock::time_point last = started;
  int64_t tokens = 0;
  bool done = false;
  while (reader->Read(&response)) {
    const Clock::time_point now = Clock::now();
    const int count = response.token_ids_size();
    if (count > 0) {
      if (first_token < 0) {
        first_token = std::chrono::duration<double>(now - started).count();
        // Tokens that arrived merged with the first are spread over no time.
        for (int i = 1; i < count; ++i) gaps.push_back(0);
      } else {
        // Tokens merged into one message share the gap since the previous message.
        const double gap = std::chrono::duration<double>(now - last).count() / count;
        for (int i = 0; i < count; ++i) gaps.push_back(gap);
      }
      last = now;
      tokens += count;
    }
    done = done || response.has_done();
  }
  const grpc::Status status = reader->Finish();
  std::lock_guard<std::mutex> lock(stats.mutex);
  ++stats.requests;
  if (!status.ok() || !done || tokens == 0) {
    ++stats.errors;
    if (stats.error_messages.size() < 5) {
      stats.error_messages.push_back(status.ok() ? "a stream ended without its final message"
                                                 : absl::StrCat("code ", status.error_code(), ": ", status.error_message()));
    }
    return;
  }
  stats.tokens += tokens;
  stats.first_token_latencies.push_back(first_token);
  stats.token_latencies.insert(stats.token_latencies.end(), gaps.begin(), gaps.end());
}

absl::Status Run() {
  const int64_t clients = absl::GetFlag(FLAGS_clients);
  const bool shadow_validation = absl::GetFlag(FLAGS_shadow_validation);
  const int64_t rounds = absl::GetFlag(FLAGS_rounds);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  const double rollout_every = absl::GetFlag(FLAGS_rollout_every);
  const int64_t max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  const int64_t threads = absl::GetFlag(FLAGS_threads);
  const double rss_tolerance = absl::GetFlag(FLAGS_rss_tolerance_mib);
  const int64_t given_pid = absl::GetFlag(FLAGS_inference_pid);
  if (clients < 1 || rounds < 1 || seconds <= 0 || rollout_every <= 0 || max_new_tokens < 1 || threads < 1) {
    return absl::InvalidArgumentError("--clients, --rounds, --seconds, --rollout-every, --max-new-tokens and --threads must be positive");
  }

  // Servers this program starts live in a temporary directory, killed when it ends.
  lychee::testing::TempDir dir;
  std::unique_ptr<lychee::testing::ChildProcess> trainer_process;
  std::unique_ptr<lychee::testing::ChildProcess> inference_process;
  std::string trainer_address = absl::GetFlag(FLAGS_trainer);
  if (trainer_address.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(const std::string binary,
                            ServerBinary(absl::GetFlag(FLAGS_trainer_binary), "lychee-trainer", "trainer"));
    const std::string log = (dir.path / "trainer.log").string();
    trainer_process = std::make_unique<lychee::testing::ChildProcess>(
        binary,
        std::vector<std::string>{"--listen", "127.0.0.1:0", "--registry-dir", (dir.path / "registry").string(),
                                 "--threads", std::to_string(threads)},
        log);
    LYCHEE_ASSIGN_OR_RETURN(const int port, PortFromLog(log, "TrainerService", *trainer_process));
    trainer_address = absl::StrCat("127.0.0.1:", port);
  }
  auto trainer = lychee::v1::TrainerService::NewStub(grpc::CreateChannel(trainer_address, grpc::InsecureChannelCredentials()));

  std::vector<lychee::v1::HeadPartition> shipped;
  for (const char* name : {"learned-target-0.25", "retrieval-head-0"}) {
    LYCHEE_ASSIGN_OR_RETURN(const std::string path, lychee::ResourcePath(absl::StrCat(lychee::kBundledModelPath,
                                                                                      "/partitions/", name, ".json")));
    LYCHEE_ASSIGN_OR_RETURN(const lychee::HeadPartition partition, lychee::LoadHeadPartitionJson(path));
    shipped.push_back(lychee::HeadPartitionToProto(partition));
  }
  size_t published_count = 0;
  const auto publish = [&]() -> absl::StatusOr<uint64_t> {
    lychee::v1::PublishHeadPartitionRequest request;
    request.mutable_model()->set_name(lychee::kBundledModelName);
    *request.mutable_partition() = shipped[published_count++ % shipped.size()];
    lychee::v1::HeadPartition published;
    const grpc::Status status = trainer->PublishHeadPartition(Context(30s).get(), request, &published);
    if (!status.ok()) return absl::UnavailableError(absl::StrCat("publishing to the trainer: ", status.error_message()));
    return published.version();
  };
  LYCHEE_ASSIGN_OR_RETURN(uint64_t latest_version, publish());

  std::string inference_address = absl::GetFlag(FLAGS_inference);
  pid_t inference_pid = static_cast<pid_t>(given_pid);
  if (inference_address.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(const std::string binary,
                            ServerBinary(absl::GetFlag(FLAGS_inference_binary), "lychee-inference", "inference"));
    const std::string log = (dir.path / "inference.log").string();
    inference_process = std::make_unique<lychee::testing::ChildProcess>(
        binary,
        std::vector<std::string>{"--listen", "127.0.0.1:0", "--state-dir", (dir.path / "state").string(), "--trainer",
                                 trainer_address, "--threads", std::to_string(threads), "--max-batch",
                                 std::to_string(std::max<int64_t>(16, clients)),
                                 absl::StrCat("--shadow-validation=", shadow_validation ? "true" : "false")},
        log);
    LYCHEE_ASSIGN_OR_RETURN(const int port, PortFromLog(log, "InferenceService", *inference_process));
    inference_address = absl::StrCat("127.0.0.1:", port);
    inference_pid = inference_process->pid();
  }
  auto channel = grpc::CreateChannel(inference_address, grpc::InsecureChannelCredentials());
  auto inference = lychee::v1::InferenceService::NewStub(channel);
  const auto active_version = [&]() -> uint64_t {
    lychee::v1::ServerInfo info;
    return inference->GetServerInfo(Context(30s).get(), {}, &info).ok() ? info.active_partition_version() : 0;
  };
  const auto wait_active = [&](uint64_t version, std::chrono::seconds timeout) {
    const auto until = Clock::now() + timeout;
    while (Clock::now() < until && active_version() != version) std::this_thread::sleep_for(50ms);
    return active_version() == version;
  };
  if (!wait_active(latest_version, 120s)) {
    return absl::DeadlineExceededError(absl::StrCat("version ", latest_version, " was not activated within 120 s"));
  }

  std::printf("load_bench: %lld clients, %lld rounds of %.0f s, a rollout every %.1f s, %lld new tokens per request, "
              "%lld LibTorch thread(s) per server\n",
              static_cast<long long>(clients), static_cast<long long>(rounds), seconds, rollout_every,
              static_cast<long long>(max_new_tokens), static_cast<long long>(threads));
  std::printf("%5s %8s %8s %9s %12s %12s %12s %7s %8s %7s %8s\n", "round", "requests", "tokens", "tokens/s",
              "p50 tok ms", "p99 tok ms", "p50 TTFT ms", "errors", "rollouts", "active", "RSS MiB");
  std::fflush(stdout);

  int64_t total_errors = 0;
  double first_round_rss = 0;
  double max_growth = 0;
  std::string failure;
  for (int64_t round = 1; round <= rounds; ++round) {
    RoundStats stats;
    const Clock::time_point start = Clock::now();
    const Clock::time_point end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
    std::vector<std::thread> threads_of_clients;
    for (int64_t client = 0; client < clients; ++client) {
      threads_of_clients.emplace_back([&, client] {
        auto stub = lychee::v1::InferenceService::NewStub(channel);
        for (int64_t i = 0; Clock::now() < end; ++i) {
          RunOne(*stub,
                 absl::StrCat("Client ", client, ", request ", i, ": the old sailor walked along the harbour and found"),
                 static_cast<int>(max_new_tokens), stats);
        }
      });
    }
    int rollouts = 0;
    absl::Status publish_error;
    for (Clock::time_point next = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(rollout_every));
         next < end; next += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(rollout_every))) {
      std::this_thread::sleep_until(next);
      absl::StatusOr<uint64_t> version = publish();
      if (!version.ok()) {
        publish_error = version.status();
        break;
      }
      latest_version = *version;
      ++rollouts;
    }
    for (std::thread& thread : threads_of_clients) thread.join();
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    LYCHEE_RETURN_IF_ERROR(publish_error);
    const bool rolled_out = wait_active(latest_version, 30s);
    const double rss = RssMib(inference_pid);
    if (round == 1) first_round_rss = rss;
    max_growth = std::max(max_growth, rss - first_round_rss);
    std::printf("%5lld %8lld %8lld %9.1f %12.1f %12.1f %12.1f %7lld %8d %7llu %8.1f\n", static_cast<long long>(round),
                static_cast<long long>(stats.requests), static_cast<long long>(stats.tokens),
                static_cast<double>(stats.tokens) / elapsed, 1e3 * Percentile(stats.token_latencies, 0.5),
                1e3 * Percentile(stats.token_latencies, 0.99), 1e3 * Percentile(stats.first_token_latencies, 0.5),
                static_cast<long long>(stats.errors), rollouts, static_cast<unsigned long long>(active_version()), rss);
    std::fflush(stdout);
    for (const std::string& message : stats.error_messages) std::fprintf(stderr, "load_bench: error: %s\n", message.c_str());
    total_errors += stats.errors;
    if (!rolled_out && failure.empty()) failure = absl::StrCat("version ", latest_version, " was not active 30 s after round ", round);
  }
  std::printf("errors %lld; inference RSS after round 1 %.1f MiB, largest growth after it %.1f MiB (tolerance %.1f)\n",
              static_cast<long long>(total_errors), first_round_rss, max_growth, rss_tolerance);
  if (total_errors > 0) return absl::InternalError(absl::StrCat(total_errors, " requests failed"));
  if (!failure.empty()) return absl::InternalError(failure);
  if (inference_pid > 0 && max_growth > rss_tolerance) {
    return absl::InternalError(absl::StrCat("the inference RSS grew by ", max_growth, " MiB after round 1"));
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  absl::Status status = lychee::ParseFlags(argc, argv, __FILE__);
  if (status.ok()) status = Run();
  if (!status.ok()) {
    std::cerr << "load_bench: " << status.message() << "\n";
    return 1;
  }
  return 0;
}
