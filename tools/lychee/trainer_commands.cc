#include "tools/lychee/trainer_commands.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/base/durable_file.h"
#include "common/base/head_partition.h"
#include "common/base/status_macros.h"
#include "common/service/grpc_status.h"
#include "common/service/resource_paths.h"
#include "lychee/v1/inference.grpc.pb.h"
#include "lychee/v1/trainer.grpc.pb.h"
#include "tools/lychee/args.h"
#include "tools/lychee/grpc_client.h"
#include "tools/lychee/partition_view.h"
#include "tools/lychee/sweep_view.h"

namespace lychee::cli {
namespace {

constexpr char kDefaultTrainer[] = "127.0.0.1:50061";
constexpr char kDefaultServer[] = "127.0.0.1:50062";

// The commands that take one positional argument (a job name, a version) before their flags.
absl::StatusOr<std::pair<std::string, Args>> ParseWithOperand(const std::vector<std::string>& argv,
                                                               const std::string& operand,
                                                               const std::set<std::string>& valued,
                                                               const std::set<std::string>& switches) {
  if (argv.empty() || argv[0].rfind("--", 0) == 0) return absl::InvalidArgumentError(absl::StrCat("missing ", operand));
  LYCHEE_ASSIGN_OR_RETURN(Args args, Args::Parse({argv.begin() + 1, argv.end()}, valued, switches));
  return std::make_pair(argv[0], std::move(args));
}

using TrainerClient = ServiceClient<v1::TrainerService>;
using InferenceClient = ServiceClient<v1::InferenceService>;

absl::StatusOr<TrainerClient> ConnectTrainer(const Args& args) {
  return TrainerClient::Connect("trainer", args.GetOr("trainer", kDefaultTrainer), args);
}

std::string StateName(v1::JobState state) {
  const std::string name = v1::JobState_Name(state);
  constexpr size_t kPrefix = sizeof("JOB_STATE_") - 1;
  return name.size() > kPrefix ? name.substr(kPrefix) : name;
}

std::string Outcome(const v1::Job& job) {
  if (job.has_result()) return absl::StrCat("partition version ", job.result().partition_version());
  if (job.has_error()) {
    return absl::StrCat(absl::StatusCodeToString(static_cast<absl::StatusCode>(job.error().code())), ": ",
                        job.error().message());
  }
  return "";
}

std::string Duration(double seconds) {
  const long long s = static_cast<long long>(seconds + 0.5);
  char text[32];
  if (s >= 3600) {
    std::snprintf(text, sizeof text, "%lldh%02lldm", s / 3600, s / 60 % 60);
  } else if (s >= 60) {
    std::snprintf(text, sizeof text, "%lldm%02llds", s / 60, s % 60);
  } else {
    std::snprintf(text, sizeof text, "%llds", s);
  }
  return text;
}

std::string UtcTime(int64_t unix_seconds) {
  if (unix_seconds == 0) return "-";
  const std::time_t time = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  gmtime_r(&time, &tm);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%d %H:%M:%SZ", &tm);
  return text;
}

std::string ProgressLine(const v1::Job& job) {
  const v1::JobProgress& p = job.progress();
  if (job.state() != v1::JOB_STATE_RUNNING) return absl::StrCat(job.name(), " ", StateName(job.state()));
  // A sweep says which target it is at; the bar, the steps and the target density are that target's.
  const bool at_sweep_target = p.target_index() >= 1 && p.target_index() <= job.request().target_densities_size();
  const double target_density =
      at_sweep_target ? job.request().target_densities(p.target_index() - 1) : job.request().config().target_density();
  const std::string target = at_sweep_target ? absl::StrCat(" target ", p.target_index(), "/", p.target_count(), " (",
                                                            target_density, ") ", p.phase())
                                             : "";
  if (p.phase() == "validating") return absl::StrCat(job.name(), target, " against dense");
  if (p.step() == 0) return absl::StrCat(job.name(), " RUNNING", target, ": loading, step 0/", p.total_steps());
  constexpr int kWidth = 24;
  const int filled = p.total_steps() > 0 ? static_cast<int>(kWidth * p.step() / p.total_steps()) : 0;
  char numbers[224];
  std::snprintf(
      numbers, sizeof numbers, "step %lld/%lld  loss %.4g  density %.3f (target %.3f)  lambda %.3g  %.0f tok/s  ETA %s",
      static_cast<long long>(p.step()), static_cast<long long>(p.total_steps()), p.loss(), p.expected_density(),
      target_density, p.lambda(), p.tokens_per_second(), Duration(p.eta_seconds()).c_str());
  return absl::StrCat(job.name(), target, " [", std::string(filled, '#'), std::string(kWidth - filled, '.'), "] ",
                      numbers);
}

absl::Status SetInt(const Args& args, const std::string& flag, const std::function<void(int64_t)>& set) {
  if (!args.Has(flag)) return absl::OkStatus();
  LYCHEE_ASSIGN_OR_RETURN(const int64_t value, args.GetInt(flag, 0));
  set(value);
  return absl::OkStatus();
}

absl::Status SetDouble(const Args& args, const std::string& flag, const std::function<void(double)>& set) {
  if (!args.Has(flag)) return absl::OkStatus();
  LYCHEE_ASSIGN_OR_RETURN(const double value, args.GetDouble(flag, 0));
  set(value);
  return absl::OkStatus();
}

absl::StatusOr<v1::ModelSelector> ModelFromArgs(const Args& args) {
  v1::ModelSelector selector;
  if (args.Has("fingerprint")) {
    if (args.Has("model")) return absl::InvalidArgumentError("give --model or --fingerprint, not both");
    selector.set_fingerprint(*args.Get("fingerprint"));
  } else {
    selector.set_name(args.GetOr("model", kBundledModelName));
  }
  return selector;
}

// Share of retrieval heads outside layer 0, as the partition's owner computes it.
std::string Density(const v1::HeadPartition& proto) {
  const absl::StatusOr<HeadPartition> partition = HeadPartitionFromProto(proto);
  if (!partition.ok()) return "?";
  char text[16];
  std::snprintf(text, sizeof text, "%.3f", partition->RetrievalDensity());
  return text;
}

// What a trained partition's density came to against its target. The deployed density is read from
// the roles, which also covers partitions trained before TrainingMetrics recorded it; with N KV heads
// outside layer 0 it can only be a multiple of 1/N, so the trainer rounds the target down to one.
std::string TrainedDensities(const HeadPartition& partition) {
  const TrainingRecord& t = partition.training;
  const int64_t gated_heads = (partition.num_layers() - 1) * partition.num_kv_heads();
  char text[224];
  if (gated_heads == 0) {
    std::snprintf(text, sizeof text, "density: expected %.3f, deployed %.3f, target %.3f (no KV head outside layer 0)",
                  t.expected_density, partition.RetrievalDensity(), t.target_density);
  } else {
    std::snprintf(text, sizeof text,
                  "density: expected %.3f, deployed %.3f, target %.3f (%lld KV heads outside layer 0: "
                  "reachable densities are multiples of %.4g)",
                  t.expected_density, partition.RetrievalDensity(), t.target_density,
                  static_cast<long long>(gated_heads), 1.0 / static_cast<double>(gated_heads));
  }
  return text;
}

absl::StatusOr<HeadPartition> PublishedPartition(TrainerClient& client, const v1::JobResult& result) {
  v1::GetHeadPartitionRequest request;
  request.mutable_model()->set_fingerprint(result.model_fingerprint());
  request.set_version(result.partition_version());
  v1::HeadPartition proto;
  LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().GetHeadPartition(client.UnaryContext().get(), request, &proto)));
  return HeadPartitionFromProto(proto);
}

}  // namespace

absl::Status RunSubmit(const std::vector<std::string>& argv) {
  std::set<std::string> valued = {
      "trainer",     "model",         "corpus",          "target-density", "steps",
      "min-context", "max-context",   "passkeys",        "learning-rate",  "sparse-keep-ratio",
      "sparse-sink", "sparse-recent", "block-size",      "budget",         "sink",
      "recent",      "seed",          "samples-per-step"};
  valued.insert(SweepValuedFlags().begin(), SweepValuedFlags().end());
  LYCHEE_ASSIGN_OR_RETURN(Args args, Args::Parse(argv, WithConnectionFlags(valued), SweepSwitches()));
  v1::SubmitCalibrationJobRequest request;
  LYCHEE_RETURN_IF_ERROR(AddSweepFromArgs(args, request));
  if (!args.Has("target-density") && !request.has_sweep()) {
    return absl::InvalidArgumentError("--target-density (or --target-densities, or --sweep) is required");
  }
  if (!args.Has("steps")) return absl::InvalidArgumentError("--steps is required");
  request.set_model(args.GetOr("model", kBundledModelName));
  request.set_corpus(args.GetOr("corpus", ""));
  v1::CalibrationConfig* config = request.mutable_config();
  LYCHEE_RETURN_IF_ERROR(SetDouble(args, "target-density", [&](double v) { config->set_target_density(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "steps", [&](int64_t v) { config->set_steps(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "samples-per-step", [&](int64_t v) { config->set_samples_per_step(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "min-context", [&](int64_t v) { config->set_min_context_tokens(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "max-context", [&](int64_t v) { config->set_max_context_tokens(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "passkeys", [&](int64_t v) { config->set_passkeys_per_sample(v); }));
  LYCHEE_RETURN_IF_ERROR(SetDouble(args, "learning-rate", [&](double v) { config->set_learning_rate(v); }));
  LYCHEE_RETURN_IF_ERROR(SetDouble(args, "sparse-keep-ratio", [&](double v) { config->set_sparse_keep_ratio(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "sparse-sink", [&](int64_t v) { config->set_sparse_sink_tokens(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "sparse-recent", [&](int64_t v) { config->set_sparse_recent_tokens(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "block-size", [&](int64_t v) { config->set_block_size(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "budget", [&](int64_t v) { config->set_token_budget(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "sink", [&](int64_t v) { config->set_sink_tokens(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "recent", [&](int64_t v) { config->set_recent_tokens(v); }));
  LYCHEE_RETURN_IF_ERROR(SetInt(args, "seed", [&](int64_t v) { config->set_seed(static_cast<uint64_t>(v)); }));

  LYCHEE_ASSIGN_OR_RETURN(TrainerClient client, ConnectTrainer(args));
  v1::Job job;
  LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().SubmitCalibrationJob(client.UnaryContext().get(), request, &job)));
  std::cout << job.name() << "\n";
  return absl::OkStatus();
}

absl::Status RunWatch(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(auto parsed,
                          ParseWithOperand(argv, "JOB (e.g. jobs/1)", WithConnectionFlags({"trainer", "plot"}), {}));
  const auto& [name, args] = parsed;
  LYCHEE_ASSIGN_OR_RETURN(TrainerClient client, ConnectTrainer(args));
  const std::unique_ptr<grpc::ClientContext> context = client.StreamContext();
  v1::WatchJobRequest request;
  request.set_name(name);
  std::unique_ptr<grpc::ClientReader<v1::Job>> reader = client.stub().WatchJob(context.get(), request);
  // On a terminal the bar redraws in place; in a log every update is a line of its own.
  const bool redraw = isatty(STDERR_FILENO);
  std::optional<v1::Job> last;
  v1::Job job;
  while (reader->Read(&job)) {
    std::cerr << (redraw ? "\r\033[K" : "") << ProgressLine(job) << (redraw ? "" : "\n") << std::flush;
    last = job;
  }
  if (redraw && last) std::cerr << "\n";
  LYCHEE_RETURN_IF_ERROR(client.Check(reader->Finish()));
  if (!last || (!last->has_result() && !last->has_error())) {
    return absl::UnavailableError(absl::StrCat("the watch of ", name, " ended before the job did"));
  }
  std::cout << last->name() << " " << StateName(last->state()) << ": " << Outcome(*last) << "\n";
  if (IsSweep(*last)) {
    std::cout << RenderSweepTable(*last);
    if (args.Has("plot")) {
      LYCHEE_RETURN_IF_ERROR(ReplaceFile(*args.Get("plot"), RenderSweepSvg(*last)));
      std::cerr << "wrote " << *args.Get("plot") << "\n";
    }
  } else if (args.Has("plot")) {
    return absl::InvalidArgumentError(absl::StrCat("--plot: job ", name, " is no sweep; it has no table to plot"));
  }
  if (last->state() != v1::JOB_STATE_SUCCEEDED) {
    return absl::AbortedError(absl::StrCat("job ", name, " ended ", StateName(last->state())));
  }
  // The job's result is the partition it published, and its densities are what the user asked for.
  const absl::StatusOr<HeadPartition> partition = PublishedPartition(client, last->result());
  // The job did succeed: a partition that cannot be read back is reported, not turned into a failure.
  if (!partition.ok()) {
    std::cerr << "could not read partition version " << last->result().partition_version() << ": "
              << partition.status() << "\n";
    return absl::OkStatus();
  }
  std::cout << TrainedDensities(*partition) << "\n";
  return absl::OkStatus();
}

absl::Status RunJobs(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(Args args, Args::Parse(argv, WithConnectionFlags({"trainer"}), {}));
  LYCHEE_ASSIGN_OR_RETURN(TrainerClient client, ConnectTrainer(args));
  v1::ListJobsResponse response;
  LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().ListJobs(client.UnaryContext().get(), {}, &response)));
  std::printf("%-10s %-12s %-24s %-13s %-7s %s\n", "NAME", "STATE", "MODEL", "STEP", "TARGET", "OUTCOME");
  for (const v1::Job& job : response.jobs()) {
    const std::string step = absl::StrCat(job.progress().step(), "/", job.progress().total_steps());
    const std::string target = IsSweep(job) ? absl::StrCat("sweep(", job.request().target_densities_size(), ")")
                                            : absl::StrFormat("%.4g", job.request().config().target_density());
    std::printf("%-10s %-12s %-24s %-13s %-7s %s\n", job.name().c_str(), StateName(job.state()).c_str(),
                job.request().model().c_str(), step.c_str(), target.c_str(), Outcome(job).c_str());
    if (IsSweep(job)) std::cout << RenderSweepTable(job);
  }
  return absl::OkStatus();
}

absl::Status RunCancel(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(auto parsed,
                          ParseWithOperand(argv, "JOB (e.g. jobs/1)", WithConnectionFlags({"trainer"}), {}));
  const auto& [name, args] = parsed;
  LYCHEE_ASSIGN_OR_RETURN(TrainerClient client, ConnectTrainer(args));
  v1::CancelJobRequest request;
  request.set_name(name);
  v1::Job job;
  LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().CancelJob(client.UnaryContext().get(), request, &job)));
  std::cout << job.name() << " " << StateName(job.state())
            << (job.state() == v1::JOB_STATE_RUNNING ? ": stops within one step" : "") << "\n";
  return absl::OkStatus();
}

absl::Status RunPartitions(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(Args args,
                          Args::Parse(argv, WithConnectionFlags({"trainer", "server", "model", "fingerprint"}), {}));
  std::vector<v1::HeadPartition> partitions;
  if (args.Has("server")) {
    LYCHEE_ASSIGN_OR_RETURN(InferenceClient client,
                            InferenceClient::Connect("inference server", *args.Get("server"), args));
    v1::ListPartitionsResponse response;
    LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().ListPartitions(client.UnaryContext().get(), {}, &response)));
    std::printf("inference server %s holds %d partition(s); active: %llu\n", args.Get("server")->c_str(),
                response.partitions_size(), static_cast<unsigned long long>(response.active_version()));
    partitions.assign(response.partitions().begin(), response.partitions().end());
  } else {
    LYCHEE_ASSIGN_OR_RETURN(TrainerClient client, ConnectTrainer(args));
    v1::ListHeadPartitionsRequest request;
    LYCHEE_ASSIGN_OR_RETURN(*request.mutable_model(), ModelFromArgs(args));
    v1::ListHeadPartitionsResponse response;
    LYCHEE_RETURN_IF_ERROR(
        client.Check(client.stub().ListHeadPartitions(client.UnaryContext().get(), request, &response)));
    std::printf("model fingerprint %s: %d partition(s)\n", response.model_fingerprint().c_str(),
                response.partitions_size());
    partitions.assign(response.partitions().begin(), response.partitions().end());
  }
  std::printf("%-8s %-21s %-8s %-7s %-10s %s\n", "VERSION", "CREATED", "DENSITY", "STEPS", "LOSS", "SOURCE");
  for (const v1::HeadPartition& partition : partitions) {
    std::printf("%-8llu %-21s %-8s %-7llu %-10.4g %s\n", static_cast<unsigned long long>(partition.version()),
                UtcTime(partition.created_unix_seconds()).c_str(), Density(partition).c_str(),
                static_cast<unsigned long long>(partition.metrics().steps()), partition.metrics().final_loss(),
                partition.source().c_str());
  }
  return absl::OkStatus();
}

absl::Status RunPartition(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(
      auto parsed, ParseWithOperand(argv, "VERSION (a number, or latest)",
                                    WithConnectionFlags({"trainer", "server", "model", "fingerprint", "svg"}), {"json"}));
  const auto& [version_text, args] = parsed;
  uint64_t version = 0;
  if (version_text != "latest" && (!absl::SimpleAtoi(version_text, &version) || version == 0)) {
    return absl::InvalidArgumentError(absl::StrCat("VERSION must be a number >= 1 or latest, got '", version_text, "'"));
  }
  v1::HeadPartition proto;
  if (args.Has("server")) {
    // The inference server's own copies: what it validated and may serve.
    LYCHEE_ASSIGN_OR_RETURN(InferenceClient client,
                            InferenceClient::Connect("inference server", *args.Get("server"), args));
    v1::ListPartitionsResponse response;
    LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().ListPartitions(client.UnaryContext().get(), {}, &response)));
    const auto found = std::find_if(response.partitions().begin(), response.partitions().end(),
                                    [&](const v1::HeadPartition& p) { return p.version() == version; });
    if (version == 0 && response.partitions_size() > 0) {
      proto = *response.partitions().rbegin();
    } else if (found != response.partitions().end()) {
      proto = *found;
    } else {
      return absl::NotFoundError(absl::StrCat("inference server ", *args.Get("server"), " holds no partition ", version_text));
    }
  } else {
    v1::GetHeadPartitionRequest request;
    request.set_version(version);
    LYCHEE_ASSIGN_OR_RETURN(*request.mutable_model(), ModelFromArgs(args));
    LYCHEE_ASSIGN_OR_RETURN(TrainerClient client, ConnectTrainer(args));
    LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().GetHeadPartition(client.UnaryContext().get(), request, &proto)));
  }
  LYCHEE_ASSIGN_OR_RETURN(const HeadPartition partition, HeadPartitionFromProto(proto));
  if (args.Has("svg")) {
    const std::string svg_path = *args.Get("svg");
    LYCHEE_RETURN_IF_ERROR(ReplaceFile(svg_path, RenderPartitionSvg(partition)));
    std::cerr << "wrote " << svg_path << "\n";
  }
  if (args.Has("json")) {
    LYCHEE_ASSIGN_OR_RETURN(const std::string json, HeadPartitionToJson(partition));
    std::cout << json << "\n";
    return absl::OkStatus();
  }
  std::cout << RenderPartitionMap(partition);
  std::cout << "model " << partition.model_fingerprint << ", created " << UtcTime(partition.created_unix_seconds) << "\n";
  if (partition.training.steps > 0) {
    std::printf("trained %lld steps in %s: loss %.4g, lambda %.3g\n%s\n",
                static_cast<long long>(partition.training.steps), Duration(partition.training.seconds).c_str(),
                partition.training.final_loss, partition.training.lambda, TrainedDensities(partition).c_str());
  }
  return absl::OkStatus();
}

absl::Status RunPublish(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(auto parsed, ParseWithOperand(argv, "FILE (a lychee.v1.HeadPartition in JSON)",
                                                        WithConnectionFlags({"trainer", "model"}), {}));
  const auto& [path, args] = parsed;
  LYCHEE_ASSIGN_OR_RETURN(const HeadPartition partition, LoadHeadPartitionJson(path));
  v1::PublishHeadPartitionRequest request;
  request.mutable_model()->set_name(args.GetOr("model", kBundledModelName));
  *request.mutable_partition() = HeadPartitionToProto(partition);
  LYCHEE_ASSIGN_OR_RETURN(TrainerClient client, ConnectTrainer(args));
  v1::HeadPartition published;
  LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().PublishHeadPartition(client.UnaryContext().get(), request, &published)));
  std::printf("published %s as version %llu of model %s\n", path.c_str(),
              static_cast<unsigned long long>(published.version()), published.model_fingerprint().c_str());
  return absl::OkStatus();
}

}  // namespace lychee::cli
