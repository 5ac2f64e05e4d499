#include "tools/lychee/inference_commands.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/base/status_macros.h"
#include "kernels/policy.h"
#include "lychee/v1/inference.grpc.pb.h"
#include "tools/lychee/args.h"
#include "tools/lychee/grpc_client.h"

namespace lychee::cli {
namespace {

constexpr char kDefaultServer[] = "127.0.0.1:50062";

using InferenceClient = ServiceClient<v1::InferenceService>;

absl::StatusOr<InferenceClient> ClientFor(const Args& args) {
  return InferenceClient::Connect("inference server", args.GetOr("server", kDefaultServer), args);
}

std::string FinishReasonName(v1::FinishReason reason) {
  const std::string name = v1::FinishReason_Name(reason);
  constexpr size_t kPrefix = sizeof("FINISH_REASON_") - 1;
  return name.size() > kPrefix ? name.substr(kPrefix) : name;
}

void PrintCanaryArm(const char* side, const v1::CanaryArm& arm) {
  std::printf(
      "  %s version %llu: %llu sequences, %llu errors, mean dropped mass %.4f over %llu measured, per-token "
      "latency mean %.2f ms, p99 of sequences %.2f ms\n",
      side, static_cast<unsigned long long>(arm.version()), static_cast<unsigned long long>(arm.sequences()),
      static_cast<unsigned long long>(arm.errors()), arm.mean_dropped_mass(),
      static_cast<unsigned long long>(arm.audited_sequences()), 1e3 * arm.mean_token_latency_seconds(),
      1e3 * arm.p99_sequence_token_latency_seconds());
}

void PrintCanary(const v1::CanaryStatus& canary) {
  std::printf("canary of partition %llu (fraction %.3f): %s%s\n",
              static_cast<unsigned long long>(canary.canary().version()), canary.fraction(), canary.state().c_str(),
              canary.reason().empty() ? "" : absl::StrCat(" (", canary.reason(), ")").c_str());
  std::printf(
      "  decided after %u measured canary sequences: mean dropped mass <= %.3f, error rate <= %.3f, per-token latency "
      "<= %.2f x stable\n",
      canary.decide_after_sequences(), canary.max_dropped_mass(), canary.max_error_rate(), canary.max_latency_ratio());
  PrintCanaryArm("canary", canary.canary());
  PrintCanaryArm("stable", canary.stable());
}

void PrintInfo(const v1::ServerInfo& info) {
  std::printf("model %s (%s), %u layers x %u KV heads, context %u tokens, device %s\n", info.model().c_str(),
              info.model_fingerprint().c_str(), info.num_layers(), info.num_kv_heads(), info.max_context_tokens(),
              info.device().c_str());
  if (info.active_partition_version() == 0) {
    std::printf("active partition: none (hybrid requests are refused; dense is served)\n");
  } else {
    std::printf("active partition: version %llu (%s), activated by %s\n",
                static_cast<unsigned long long>(info.active_partition_version()), info.active_partition_source().c_str(),
                info.activated_by().c_str());
  }
  std::printf("rollouts %s\n", info.rollout_held() ? "HELD: new partitions are stored, not activated" : "automatic");
  if (info.trainer_address().empty()) {
    std::printf("trainer: none\n");
  } else {
    // The last error outlives the reconnection; once connected again it would only mislead.
    const bool show_error = !info.trainer_connected() && !info.trainer_last_error().empty();
    std::printf("trainer %s: %s%s\n", info.trainer_address().c_str(), info.trainer_connected() ? "connected" : "not connected",
                show_error ? absl::StrCat(" (last error: ", info.trainer_last_error(), ")").c_str() : "");
  }
  std::printf("load: %u sequences active, %u queued, KV %.1f of %.1f MiB in use (%llu of %llu pages)\n",
              info.active_sequences(), info.queued_requests(),
              static_cast<double>(info.kv_cache_bytes_reserved()) / (1 << 20),
              static_cast<double>(info.kv_cache_bytes_limit()) / (1 << 20),
              static_cast<unsigned long long>(info.kv_cache_pages_used()),
              static_cast<unsigned long long>(info.kv_cache_pages_total()));
  for (const v1::RejectedPartition& rejected : info.rejected()) {
    std::printf("rejected partition %llu: %s\n", static_cast<unsigned long long>(rejected.version()),
                rejected.reason().c_str());
  }
  if (info.has_canary()) PrintCanary(info.canary());
}

absl::Status ReadPrompt(const Args& args, v1::GenerateRequest& request) {
  if (args.Has("prompt") == args.Has("prompt-file")) {
    return absl::InvalidArgumentError("give exactly one of --prompt TEXT and --prompt-file FILE");
  }
  if (args.Has("prompt")) {
    request.set_text(*args.Get("prompt"));
    return absl::OkStatus();
  }
  std::ifstream in(*args.Get("prompt-file"), std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", *args.Get("prompt-file")));
  request.set_text(std::string(std::istreambuf_iterator<char>(in), {}));
  return absl::OkStatus();
}

// The policy that --attention or --policy names, with --budget and --partition-version where it
// takes them: --attention dense|hybrid is the policy dense|lychee; --budget or --partition-version
// alone is lychee (the server's default, hybrid) with them.
absl::StatusOr<PolicyKind> RemotePolicyKind(const Args& args) {
  if (args.Has("attention") && args.Has("policy")) {
    return absl::InvalidArgumentError("give one of --attention and --policy");
  }
  if (args.Has("policy")) return ParsePolicyKind(*args.Get("policy"));
  const std::string mode = args.GetOr("attention", "hybrid");
  if (mode != "dense" && mode != "hybrid") {
    return absl::InvalidArgumentError(absl::StrCat("--attention must be dense or hybrid, got '", mode, "'"));
  }
  return mode == "dense" ? PolicyKind::kDense : PolicyKind::kLychee;
}

// --attention, --policy, --budget, --partition-version, --audit and --audit-every as the request's
// attention; none of them: the server's default.
absl::Status SetAttention(const Args& args, v1::AttentionOptions* attention) {
  if (args.Has("audit") && !args.Has("policy")) return absl::InvalidArgumentError("--audit goes with --policy");
  if (args.Has("audit-every")) {
    if (!args.Has("audit")) return absl::InvalidArgumentError("--audit-every goes with --audit");
    LYCHEE_ASSIGN_OR_RETURN(const int64_t every, args.GetInt("audit-every", 0));
    if (every < 1 || every > UINT32_MAX)
      return absl::InvalidArgumentError("--audit-every must be a positive step count");
    attention->set_audit_every(static_cast<uint32_t>(every));
  }
  attention->set_audit(args.Has("audit"));
  std::optional<uint32_t> budget;
  if (args.Has("budget")) {
    LYCHEE_ASSIGN_OR_RETURN(const int64_t tokens, args.GetInt("budget", 0));
    if (tokens < 1 || tokens > UINT32_MAX) return absl::InvalidArgumentError("--budget must be a positive token count");
    budget = static_cast<uint32_t>(tokens);
  }
  std::optional<uint64_t> version;
  if (args.Has("partition-version")) {
    LYCHEE_ASSIGN_OR_RETURN(const int64_t number, args.GetInt("partition-version", 0));
    if (number < 1) return absl::InvalidArgumentError("--partition-version must be >= 1");
    version = static_cast<uint64_t>(number);
  }
  if (!args.Has("attention") && !args.Has("policy") && !budget && !version) return absl::OkStatus();
  LYCHEE_ASSIGN_OR_RETURN(const PolicyKind kind, RemotePolicyKind(args));
  if (version && !PolicyNeedsPartition(kind)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--partition-version: policy ", PolicyName(kind), " uses no partition"));
  }
  if (budget && (kind == PolicyKind::kDense || kind == PolicyKind::kDoubleP)) {
    return absl::InvalidArgumentError(absl::StrCat("--budget: policy ", PolicyName(kind), " takes no token budget"));
  }
  switch (kind) {
    case PolicyKind::kDense: attention->mutable_dense(); break;
    case PolicyKind::kDoubleP: attention->mutable_double_p(); break;
    case PolicyKind::kLychee: {
      v1::LycheeAttention* lychee = attention->mutable_lychee();
      if (budget) lychee->set_token_budget(*budget);
      if (version) lychee->set_partition_version(*version);
      break;
    }
    case PolicyKind::kStreaming: {
      v1::StreamingAttention* streaming = attention->mutable_streaming();
      if (budget) streaming->set_token_budget(*budget);
      if (version) streaming->set_partition_version(*version);
      break;
    }
    case PolicyKind::kPrhs:
      if (budget) attention->mutable_prhs()->set_token_budget(*budget);
      attention->mutable_prhs();
      break;
    case PolicyKind::kTidal:
      if (budget) attention->mutable_tidal()->set_token_budget(*budget);
      attention->mutable_tidal();
      break;
    case PolicyKind::kQuest:
      if (budget) attention->mutable_quest()->set_token_budget(*budget);
      attention->mutable_quest();
      break;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunRemoteGenerate(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(
      Args args, Args::Parse(argv,
                             WithConnectionFlags({"server", "prompt", "prompt-file", "max-new-tokens", "temperature",
                                                  "top-p", "seed", "stop", "attention", "policy", "budget",
                                                  "partition-version", "max-dropped-mass", "timeout", "audit-every"}),
                             {"print-ids", "audit"}));
  v1::GenerateRequest request;
  LYCHEE_RETURN_IF_ERROR(ReadPrompt(args, request));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t max_new_tokens, args.GetInt("max-new-tokens", 64));
  if (max_new_tokens < 1 || max_new_tokens > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("--max-new-tokens must be >= 1, got ", max_new_tokens));
  }
  request.set_max_new_tokens(static_cast<int32_t>(max_new_tokens));
  LYCHEE_ASSIGN_OR_RETURN(const double temperature, args.GetDouble("temperature", 0));
  request.set_temperature(temperature);
  LYCHEE_ASSIGN_OR_RETURN(const double top_p, args.GetDouble("top-p", 1));
  request.set_top_p(top_p);
  LYCHEE_ASSIGN_OR_RETURN(const int64_t seed, args.GetInt("seed", 0));
  request.set_seed(static_cast<uint64_t>(seed));
  if (args.Has("stop")) request.add_stop(*args.Get("stop"));
  LYCHEE_RETURN_IF_ERROR(SetAttention(args, request.mutable_attention()));
  if (args.Has("max-dropped-mass")) {
    // The server checks the range.
    LYCHEE_ASSIGN_OR_RETURN(const double bound, args.GetDouble("max-dropped-mass", 0));
    request.mutable_attention()->set_max_dropped_mass(bound);
  }
  LYCHEE_ASSIGN_OR_RETURN(const double timeout, args.GetDouble("timeout", 0));

  LYCHEE_ASSIGN_OR_RETURN(InferenceClient client, ClientFor(args));
  const std::unique_ptr<grpc::ClientContext> context = client.StreamContext();
  if (timeout > 0) {
    context->set_deadline(std::chrono::system_clock::now() +
                         std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::duration<double>(timeout)));
  }
  auto reader = client.stub().Generate(context.get(), request);
  v1::GenerateResponse response;
  std::vector<int32_t> ids;
  std::optional<v1::GenerateDone> done;
  while (reader->Read(&response)) {
    std::cout << response.text() << std::flush;
    ids.insert(ids.end(), response.token_ids().begin(), response.token_ids().end());
    if (response.has_done()) done = response.done();
  }
  LYCHEE_RETURN_IF_ERROR(client.Check(reader->Finish()));
  std::cout << "\n";
  if (args.Has("print-ids")) std::cout << absl::StrJoin(ids, " ") << "\n";
  if (done) {
    const v1::Timings& timings = done->timings();
    std::cerr << "[" << done->usage().completion_tokens() << " tokens after " << done->usage().prompt_tokens()
              << " prompt tokens; first token " << timings.time_to_first_token_seconds() * 1e3 << " ms, then "
              << timings.mean_token_latency_seconds() * 1e3 << " ms/token; "
              << (done->attention_mode() == v1::ATTENTION_MODE_HYBRID
                      ? absl::StrCat("hybrid, partition ", done->partition_version(), ", budget ", done->token_budget())
                      : std::string("dense"))
              << "; ended by " << FinishReasonName(done->finish_reason()) << "]\n";
    if (!done->policy().empty()) std::cerr << "[policy " << done->policy() << "]\n";
    if (done->preemptions() > 0) {
      std::cerr << "[preempted " << done->preemptions()
                << (done->preemptions() == 1 ? " time" : " times")
                << " when the server's KV cache ran out; recomputed each time]\n";
    }
    if (done->has_telemetry() && done->telemetry().decode_steps() > 0) {
      const v1::AttentionTelemetry& telemetry = done->telemetry();
      uint64_t tokens = 0;
      for (uint64_t count : telemetry.tokens_attended()) tokens += count;
      const double steps = static_cast<double>(telemetry.decode_steps());
      std::cerr << "[per decode step: " << static_cast<double>(tokens) / steps / std::max(1, telemetry.tokens_attended_size())
                << " positions per KV head, " << static_cast<double>(telemetry.kv_bytes_read()) / steps / (1 << 20)
                << " MiB of KV read"
                << (telemetry.audited() ? absl::StrCat("; dropped attention mass mean ", telemetry.mean_dropped_mass(),
                                                       ", max ", telemetry.max_dropped_mass())
                                        : std::string())
                << "]\n";
    }
    if (done->has_dense_fallback()) std::cerr << "[dense from here: " << done->dense_fallback().reason() << "]\n";
  }
  return absl::OkStatus();
}

absl::Status RunServerInfo(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(Args args, Args::Parse(argv, WithConnectionFlags({"server"}), {}));
  LYCHEE_ASSIGN_OR_RETURN(InferenceClient client, ClientFor(args));
  v1::ServerInfo info;
  LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().GetServerInfo(client.UnaryContext().get(), {}, &info)));
  PrintInfo(info);
  return absl::OkStatus();
}

absl::Status RunActivate(const std::vector<std::string>& argv) {
  if (argv.empty() || argv[0].rfind("--", 0) == 0) return absl::InvalidArgumentError("missing VERSION");
  uint64_t version = 0;
  if (!absl::SimpleAtoi(argv[0], &version) || version == 0) {
    return absl::InvalidArgumentError(absl::StrCat("VERSION must be a number >= 1, got '", argv[0], "'"));
  }
  LYCHEE_ASSIGN_OR_RETURN(Args args,
                          Args::Parse({argv.begin() + 1, argv.end()}, WithConnectionFlags({"server"}), {}));
  LYCHEE_ASSIGN_OR_RETURN(InferenceClient client, ClientFor(args));
  v1::ActivatePartitionRequest request;
  request.set_version(version);
  v1::ServerInfo info;
  LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().ActivatePartition(client.UnaryContext().get(), request, &info)));
  PrintInfo(info);
  return absl::OkStatus();
}

absl::Status RunCanary(const std::vector<std::string>& argv) {
  const bool starts = !argv.empty() && argv[0].rfind("--", 0) != 0;
  uint64_t version = 0;
  if (starts && (!absl::SimpleAtoi(argv[0], &version) || version == 0)) {
    return absl::InvalidArgumentError(absl::StrCat("VERSION must be a number >= 1, got '", argv[0], "'"));
  }
  LYCHEE_ASSIGN_OR_RETURN(Args args,
                          Args::Parse({argv.begin() + (starts ? 1 : 0), argv.end()},
                                      WithConnectionFlags({"server", "fraction", "max-dropped-mass", "max-error-rate"}),
                                      {"promote", "abort"}));
  const bool decides = args.Has("promote") || args.Has("abort");
  if (starts == decides || (args.Has("promote") && args.Has("abort"))) {
    return absl::InvalidArgumentError("give VERSION --fraction F, --promote or --abort");
  }
  if (starts != args.Has("fraction"))
    return absl::InvalidArgumentError("--fraction goes with VERSION, and VERSION with it");
  LYCHEE_ASSIGN_OR_RETURN(InferenceClient client, ClientFor(args));
  v1::ServerInfo info;
  if (decides) {
    v1::DecideCanaryRequest request;
    request.set_action(args.Has("promote") ? v1::CANARY_ACTION_PROMOTE : v1::CANARY_ACTION_ABORT);
    LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().DecideCanary(client.UnaryContext().get(), request, &info)));
  } else {
    v1::ActivatePartitionRequest request;
    request.set_version(version);
    LYCHEE_ASSIGN_OR_RETURN(const double fraction, args.GetDouble("fraction", 0));
    request.set_canary_fraction(fraction);
    if (args.Has("max-dropped-mass")) {
      LYCHEE_ASSIGN_OR_RETURN(const double bound, args.GetDouble("max-dropped-mass", 0));
      request.set_canary_max_dropped_mass(bound);
    }
    if (args.Has("max-error-rate")) {
      LYCHEE_ASSIGN_OR_RETURN(const double bound, args.GetDouble("max-error-rate", 0));
      request.set_canary_max_error_rate(bound);
    }
    LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().ActivatePartition(client.UnaryContext().get(), request, &info)));
  }
  PrintInfo(info);
  return absl::OkStatus();
}

absl::Status RunRollback(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(Args args, Args::Parse(argv, WithConnectionFlags({"server"}), {}));
  LYCHEE_ASSIGN_OR_RETURN(InferenceClient client, ClientFor(args));
  v1::ServerInfo info;
  LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().Rollback(client.UnaryContext().get(), {}, &info)));
  PrintInfo(info);
  return absl::OkStatus();
}

absl::Status RunHold(const std::vector<std::string>& argv) {
  if (argv.empty() || (argv[0] != "on" && argv[0] != "off")) return absl::InvalidArgumentError("hold takes on or off");
  LYCHEE_ASSIGN_OR_RETURN(Args args,
                          Args::Parse({argv.begin() + 1, argv.end()}, WithConnectionFlags({"server"}), {}));
  LYCHEE_ASSIGN_OR_RETURN(InferenceClient client, ClientFor(args));
  v1::SetRolloutHoldRequest request;
  request.set_hold(argv[0] == "on");
  v1::ServerInfo info;
  LYCHEE_RETURN_IF_ERROR(client.Check(client.stub().SetRolloutHold(client.UnaryContext().get(), request, &info)));
  PrintInfo(info);
  return absl::OkStatus();
}

}  // namespace lychee::cli
