// lychee-inference: the generation server (lychee.v1.InferenceService).
#include <glog/logging.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "common/base/model_config.h"
#include "common/base/status_macros.h"
#include "common/model/rank_workers.h"
#include "common/service/rank_flags.h"
#include "common/service/resource_paths.h"
#include "common/service/service_main.h"
#include "common/service/shutdown_signals.h"
#include "inference/rank_mirror.h"
#include "inference/service.h"

ABSL_FLAG(std::string, model, lychee::ResourcePathOrEmpty(lychee::kBundledModelPath),
          "the model to serve (a directory; default the bundled one)");
ABSL_FLAG(std::string, state_dir, "", "partitions received and which one is active (kept across restarts); required");
ABSL_FLAG(std::string, listen, lychee::InferenceServerOptions{}.listen_address, "HOST:PORT where to serve");
ABSL_FLAG(std::string, trainer, "",
          "HOST:PORT of a lychee-trainer whose partitions to follow and roll out (default: none; partitions then "
          "change only through the admin RPCs)");
ABSL_FLAG(std::string, trainer_tls_ca, "",
          "reach the trainer over TLS, verified with the PEM CA certificates of this file");
ABSL_FLAG(std::string, trainer_tls_cert, "",
          "with --trainer-tls-key: a client certificate for a trainer that requires mutual TLS");
ABSL_FLAG(std::string, trainer_tls_key, "", "the key of --trainer-tls-cert");
ABSL_FLAG(std::string, metrics_listen, "", "IP:PORT where to serve Prometheus metrics at /metrics (default: off)");
ABSL_FLAG(std::string, http_listen, "",
          "[HOST:]PORT where to serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
          "/v1/models, /health, /metrics); a bare port listens on 127.0.0.1 (default: off). HTTPS with "
          "--tls-cert/--tls-key; the client token as 'Authorization: Bearer TOKEN'");
ABSL_FLAG(std::string, device, "cpu", "cpu or cuda");
ABSL_FLAG(int64_t, tensor_parallel, 1,
          "decode across N ranks, each holding its shard of the weights: this process is rank 0 (the server), ranks "
          "1..N-1 are processes of this binary it starts (over Gloo on cpu, NCCL on cuda with a GPU each; N must "
          "divide the model's KV heads)");
ABSL_FLAG(int64_t, tensor_parallel_timeout_s, 60,
          "seconds a tensor-parallel rank may fall silent within a step before the others give it up (the service "
          "then reports NOT_SERVING)");
ABSL_FLAG(int64_t, threads, 0, "LibTorch intra-op threads (0: LibTorch's own default)");
ABSL_FLAG(std::optional<int64_t>, kv_cache_mib, std::nullopt,
          "MiB of the KV cache: a pool of pages of 64 positions that sequences take as they grow (default 2048)");
ABSL_FLAG(std::optional<double>, kv_cache_fraction, std::nullopt,
          "CUDA only: size the KV cache as this fraction (0 < F <= 1) of the device's free memory once the model is "
          "loaded, in place of --kv-cache-mib");
ABSL_FLAG(bool, cuda_graphs, true, "capture decode steps as CUDA graphs and replay them (true or false)");
ABSL_FLAG(int64_t, audit_every, lychee::kDefaultAuditEvery,
          "audit every Nth decode step of audited requests that name no period");
ABSL_FLAG(int64_t, max_batch, 16, "sequences decoded together");
ABSL_FLAG(int64_t, max_queued, 64, "requests that may wait for KV memory");
ABSL_FLAG(int64_t, max_new_tokens, 4096, "the most tokens one request may ask for");
ABSL_FLAG(int64_t, max_context, 0, "context limit in tokens (0: the model's)");
ABSL_FLAG(int64_t, prefill_chunk, 512, "prompt tokens prefilled per step of the scheduler");
ABSL_FLAG(std::string, default_attention, "hybrid",
          "hybrid or dense: what requests that name no mode get (hybrid: the active partition, or dense while there "
          "is none)");
ABSL_FLAG(std::string, tls_cert, "",
          "with --tls-key: serve TLS with the PEM certificate chain of this file (default plaintext)");
ABSL_FLAG(std::string, tls_key, "", "the PEM key of --tls-cert");
ABSL_FLAG(std::string, tls_client_ca, "", "mutual TLS: clients must present a certificate the CA of this file signed");
ABSL_FLAG(std::string, admin_token_file, "",
          "activate, rollback and hold need the token of this file ('authorization: Bearer TOKEN'); without it they "
          "are open, which only a loopback --listen accepts");
ABSL_FLAG(std::string, client_token_file, "",
          "the other RPCs need the token of this file (or the admin one); it never passes an admin check (needs "
          "--admin-token-file)");
ABSL_FLAG(bool, insecure_admin, false, "allow open admin RPCs on a --listen beyond the loopback");
ABSL_FLAG(bool, log_requests, false, "log one line per gRPC call (method, peer, status, time) at INFO");
ABSL_FLAG(bool, shadow_validation, true,
          "validate each partition from the trainer against dense before it becomes active, and reject it outside "
          "the bounds of the --shadow-max-* flags (true or false)");
ABSL_FLAG(std::string, shadow_heldout_corpus,
          lychee::ResourcePathOrEmpty(absl::StrCat(lychee::kCorpusDir, "/kjv-heldout.txt.gz")),
          "text (.gz too) the pass-key and multi-key prompts are built from");
ABSL_FLAG(std::string, shadow_prompts_file, "",
          "an operator's JSON-lines prompts in place of the generated ones ({\"task\": ..., \"prompt\": ..., "
          "\"answer\": ...} per line)");
ABSL_FLAG(int64_t, shadow_context, lychee::ShadowValidationOptions{}.context_tokens, "tokens of each generated prompt");
ABSL_FLAG(int64_t, shadow_prompts, lychee::ShadowValidationOptions{}.prompts_per_task, "generated prompts per task");
ABSL_FLAG(int64_t, shadow_budget, lychee::ShadowValidationOptions{}.token_budget,
          "the token budget of sparse heads in validation (0: the partition's, scaled by the validation context over "
          "the served one)");
ABSL_FLAG(bool, shadow_low_priority_stream, true,
          "on CUDA, run shadow validation on a stream below serving's priority (false: at serving's, to "
          "measure what the priority buys)");
ABSL_FLAG(int64_t, shadow_threads, lychee::ShadowValidationOptions{}.threads,
          "intra-op threads of the validation thread");
ABSL_FLAG(double, shadow_max_accuracy_drop, lychee::ShadowValidationOptions{}.max_accuracy_drop,
          "promote only when every task's accuracy >= dense's - F");
ABSL_FLAG(double, shadow_max_dropped_mass, lychee::ShadowValidationOptions{}.max_dropped_mass,
          "promote only when the audited mean dropped mass <= F");
ABSL_FLAG(double, canary_fraction, 0,
          "in [0, 1]: a partition from the trainer that passed shadow validation starts as a canary for "
          "this fraction of new sequences while another is active (0: it becomes active for all at once)");
ABSL_FLAG(int64_t, canary_sequences, lychee::CanaryBounds{}.sequences,
          "measured canary sequences after which a canary is decided");
ABSL_FLAG(double, canary_max_dropped_mass, lychee::CanaryBounds{}.max_dropped_mass,
          "promote a canary only when its mean audited dropped mass <= F");
ABSL_FLAG(double, canary_max_error_rate, lychee::CanaryBounds{}.max_error_rate,
          "... and its fraction of sequences ending in an error <= F");
ABSL_FLAG(double, canary_max_latency_ratio, lychee::CanaryBounds{}.max_latency_ratio,
          "... and its mean per-token latency <= F times the stable version's; otherwise it is rolled back");

namespace {

constexpr char kUsage[] = "usage: lychee-inference --state-dir DIR [flags]";

// The command line's arguments after the program's name: what tensor-parallel ranks are started with.
std::vector<std::string>& CommandLineArguments() {
  static auto* arguments = new std::vector<std::string>();
  return *arguments;
}

absl::Status Serve() {
  lychee::InferenceServerOptions options;
  options.state_dir = absl::GetFlag(FLAGS_state_dir);
  if (options.state_dir.empty()) return absl::InvalidArgumentError("--state-dir is required");
  options.listen_address = absl::GetFlag(FLAGS_listen);
  options.trainer_address = absl::GetFlag(FLAGS_trainer);
  options.metrics_address = absl::GetFlag(FLAGS_metrics_listen);
  options.http_address = absl::GetFlag(FLAGS_http_listen);
  options.trainer_tls.ca_file = absl::GetFlag(FLAGS_trainer_tls_ca);
  options.trainer_tls.cert_file = absl::GetFlag(FLAGS_trainer_tls_cert);
  options.trainer_tls.key_file = absl::GetFlag(FLAGS_trainer_tls_key);
  if (options.trainer_tls.enabled() && options.trainer_address.empty()) {
    return absl::InvalidArgumentError("--trainer-tls-* flags need --trainer");
  }
  options.tls.cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls.key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls.client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.access.admin_token_file = absl::GetFlag(FLAGS_admin_token_file);
  options.access.client_token_file = absl::GetFlag(FLAGS_client_token_file);
  options.access.insecure_admin = absl::GetFlag(FLAGS_insecure_admin);
  options.log_requests = absl::GetFlag(FLAGS_log_requests);
  lychee::EngineOptions& engine = options.engine;
  LYCHEE_ASSIGN_OR_RETURN(engine.model_dir, lychee::RequireFlagPath(absl::GetFlag(FLAGS_model), "--model"));
  engine.device = absl::GetFlag(FLAGS_device);
  LYCHEE_ASSIGN_OR_RETURN(const int64_t threads, lychee::FlagInRange(FLAGS_threads, 0, 1024));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t max_batch, lychee::FlagInRange(FLAGS_max_batch, 1, 1024));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t max_queued, lychee::FlagInRange(FLAGS_max_queued, 0, 100000));
  LYCHEE_ASSIGN_OR_RETURN(engine.max_new_tokens_limit, lychee::FlagInRange(FLAGS_max_new_tokens, 1, 1 << 20));
  LYCHEE_ASSIGN_OR_RETURN(engine.max_context_tokens, lychee::FlagInRange(FLAGS_max_context, 0, int64_t{1} << 24));
  LYCHEE_ASSIGN_OR_RETURN(engine.prefill_chunk_tokens, lychee::FlagInRange(FLAGS_prefill_chunk, 1, 1 << 20));
  LYCHEE_ASSIGN_OR_RETURN(engine.audit_every, lychee::FlagInRange(FLAGS_audit_every, 1, 1 << 20));
  const std::optional<int64_t> kv_mib = absl::GetFlag(FLAGS_kv_cache_mib);
  if (kv_mib && (*kv_mib < 1 || *kv_mib > int64_t{1} << 24)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-cache-mib must be in [1, ", int64_t{1} << 24, "], got ", *kv_mib));
  }
  if (const std::optional<double> fraction = absl::GetFlag(FLAGS_kv_cache_fraction)) {
    if (kv_mib) return absl::InvalidArgumentError("give --kv-cache-mib or --kv-cache-fraction, not both");
    if (!(*fraction > 0 && *fraction <= 1)) {
      return absl::InvalidArgumentError(absl::StrCat("--kv-cache-fraction must be in (0, 1], got ", *fraction));
    }
    engine.kv_cache_fraction = *fraction;
  }
  engine.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  engine.threads = static_cast<int>(threads);
  engine.kv_cache_bytes = kv_mib.value_or(2048) << 20;
  engine.max_batch = static_cast<int>(max_batch);
  engine.max_queued = static_cast<int>(max_queued);
  const std::string default_attention = absl::GetFlag(FLAGS_default_attention);
  if (default_attention != "hybrid" && default_attention != "dense") {
    return absl::InvalidArgumentError(
        absl::StrCat("--default-attention must be hybrid or dense, got '", default_attention, "'"));
  }
  engine.hybrid_by_default = default_attention == "hybrid";

  lychee::ShadowValidationOptions& shadow = options.shadow;
  shadow.enabled = absl::GetFlag(FLAGS_shadow_validation);
  shadow.prompts_file = absl::GetFlag(FLAGS_shadow_prompts_file);
  shadow.low_priority_stream = absl::GetFlag(FLAGS_shadow_low_priority_stream);
  shadow.heldout_corpus = absl::GetFlag(FLAGS_shadow_heldout_corpus);
  if (shadow.enabled && shadow.prompts_file.empty()) {
    LYCHEE_ASSIGN_OR_RETURN(shadow.heldout_corpus,
                            lychee::RequireFlagPath(shadow.heldout_corpus, "--shadow-heldout-corpus"));
  }
  LYCHEE_ASSIGN_OR_RETURN(shadow.context_tokens, lychee::FlagInRange(FLAGS_shadow_context, 64, int64_t{1} << 24));
  LYCHEE_ASSIGN_OR_RETURN(shadow.prompts_per_task, lychee::FlagInRange(FLAGS_shadow_prompts, 1, 100000));
  LYCHEE_ASSIGN_OR_RETURN(shadow.token_budget, lychee::FlagInRange(FLAGS_shadow_budget, 0, int64_t{1} << 24));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t shadow_threads, lychee::FlagInRange(FLAGS_shadow_threads, 1, 1024));
  shadow.threads = static_cast<int>(shadow_threads);
  shadow.max_accuracy_drop = absl::GetFlag(FLAGS_shadow_max_accuracy_drop);
  shadow.max_dropped_mass = absl::GetFlag(FLAGS_shadow_max_dropped_mass);

  // Written so that NaN fails too.
  const auto in_unit_interval = [](const absl::Flag<double>& flag, absl::string_view name) -> absl::StatusOr<double> {
    const double value = absl::GetFlag(flag);
    if (!(value >= 0 && value <= 1)) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " must be in [0, 1], got ", value));
    }
    return value;
  };
  lychee::CanaryBounds& canary = options.canary_bounds;
  LYCHEE_ASSIGN_OR_RETURN(canary.sequences, lychee::FlagInRange(FLAGS_canary_sequences, 1, 1 << 20));
  LYCHEE_ASSIGN_OR_RETURN(canary.max_dropped_mass,
                          in_unit_interval(FLAGS_canary_max_dropped_mass, "canary-max-dropped-mass"));
  LYCHEE_ASSIGN_OR_RETURN(canary.max_error_rate, in_unit_interval(FLAGS_canary_max_error_rate, "canary-max-error-rate"));
  canary.max_latency_ratio = absl::GetFlag(FLAGS_canary_max_latency_ratio);
  if (!(canary.max_latency_ratio >= 1 && std::isfinite(canary.max_latency_ratio))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--canary-max-latency-ratio must be a finite number of at least 1, got ", canary.max_latency_ratio));
  }
  LYCHEE_ASSIGN_OR_RETURN(options.offer_canary_fraction, in_unit_interval(FLAGS_canary_fraction, "canary-fraction"));

  LYCHEE_ASSIGN_OR_RETURN(const int64_t tensor_parallel, lychee::FlagInRange(FLAGS_tensor_parallel, 1, 1024));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t step_timeout_s,
                          lychee::FlagInRange(FLAGS_tensor_parallel_timeout_s, 1, int64_t{1} << 20));
  const int world_size = static_cast<int>(tensor_parallel);
  const lychee::RankDevice rank_device = lychee::RankDeviceNamed(engine.device);
  const std::chrono::seconds step_timeout(step_timeout_s);

  // A follower rank ends with its rank 0: by rank 0's shutdown command, or by the SIGKILL that
  // RankWorkers arranges when rank 0 dies; a terminal's Ctrl-C is rank 0's to handle.
  const sigset_t signals = lychee::BlockShutdownSignals();
  // Every rank joins serving's group, then (with shadow validation) the validation's, in this order.
  const auto join_groups = [&](const std::string& rendezvous_file, int rank) -> absl::Status {
    LYCHEE_ASSIGN_OR_RETURN(engine.tensor_parallel,
                            lychee::JoinRankGroup(rank_device, rendezvous_file, rank, world_size, step_timeout));
    if (shadow.enabled) {
      LYCHEE_ASSIGN_OR_RETURN(
          shadow.tensor_parallel,
          lychee::JoinRankGroup(rank_device, lychee::ShadowValidationRendezvousFile(rendezvous_file), rank, world_size,
                                step_timeout));
    }
    return absl::OkStatus();
  };
  if (const lychee::WorkerRankFlags worker = lychee::WorkerRankFromFlags(); worker.rank > 0) {
    LYCHEE_RETURN_IF_ERROR(join_groups(worker.rendezvous_file, worker.rank));
    return lychee::RunRankFollower(engine, shadow);
  }
  std::unique_ptr<lychee::RankWorkers> workers;
  if (world_size > 1) {
    LYCHEE_RETURN_IF_ERROR(
        lychee::CheckGpuPerRank(rank_device, world_size, absl::StrCat("--tensor-parallel ", world_size)));
    // Checked before the ranks start, so that a bad count is one error rather than N.
    LYCHEE_ASSIGN_OR_RETURN(const lychee::ModelConfig config,
                            lychee::ModelConfig::FromFile(engine.model_dir + "/config.json"));
    LYCHEE_RETURN_IF_ERROR(lychee::ShardModelConfig(config, world_size).status());
    LYCHEE_ASSIGN_OR_RETURN(const std::string self, lychee::SelfExecutable());
    LYCHEE_ASSIGN_OR_RETURN(
        workers, lychee::RankWorkers::Start(self, CommandLineArguments(), world_size, "tensor-parallel", rank_device));
    LYCHEE_RETURN_IF_ERROR(join_groups(workers->rendezvous_file(), 0));
    // A follower's process that ends ends the groups at once: the next step, or the one waiting on
    // the lost rank's collective (NCCL would wait for ever), fails UNAVAILABLE naming it.
    workers->WatchForLoss(
        [serving = engine.tensor_parallel, validation = shadow.tensor_parallel](const absl::Status& lost) {
          LOG(ERROR) << "lychee-inference: " << lost.message();
          for (const auto& group : {serving, validation}) {
            if (group != nullptr) group->Abort(std::string(lost.message()));
          }
        });
  }

  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<lychee::InferenceServer> server, lychee::InferenceServer::Start(options));
  std::string serving = absl::StrCat(
      "lychee-inference: serving lychee.v1.InferenceService on port ", server->port(), " (", options.listen_address,
      "), ", options.tls.client_ca_file.empty() ? (options.tls.enabled() ? "TLS" : "plaintext") : "mutual TLS",
      ", admin RPCs ", options.access.admin_token_file.empty() ? "open" : "need the admin token", ", client RPCs ",
      options.access.client_token_file.empty() ? "open" : "need the client token", ", model ", engine.model_dir, " on ",
      engine.device);
  if (world_size > 1) absl::StrAppend(&serving, " over ", world_size, " tensor-parallel ranks");
  if (server->metrics_port() != 0) absl::StrAppend(&serving, ", metrics on port ", server->metrics_port());
  if (server->http_port() != 0) {
    absl::StrAppend(&serving, ", OpenAI-compatible HTTP API on port ", server->http_port(), " (",
                    options.tls.enabled() ? "HTTPS" : "HTTP", ")");
  }
  if (!options.trainer_address.empty()) {
    absl::StrAppend(&serving, ", following trainer ", options.trainer_address,
                    options.trainer_tls.enabled() ? " over TLS" : "");
  }
  LOG(INFO) << serving;
  if (server->http_port() != 0 && !server->chat_template_status().ok()) {
    LOG(WARNING) << "lychee-inference: /v1/chat/completions answers 400 for this model: "
                 << server->chat_template_status().message();
  }
  const int signal_number = lychee::WaitForShutdownSignal(signals);
  LOG(INFO) << "lychee-inference: signal " << signal_number << ", shutting down";
  const bool ranks_together = server->serving_status().ok();
  server->Shutdown();
  // Destroying the engine sends the other ranks their shutdown command.
  server.reset();
  // After a lost rank (logged when it was lost) a follower may be stopped rather than gone, and would
  // never end on its own: ~RankWorkers kills and reaps what is left.
  if (workers != nullptr && ranks_together) {
    if (absl::Status ended = workers->Wait(); !ended.ok()) LOG(WARNING) << "lychee-inference: " << ended.message();
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  CommandLineArguments().assign(argv + 1, argv + argc);
  return lychee::ServiceMain(argc, argv, "lychee-inference", kUsage, __FILE__, Serve);
}
