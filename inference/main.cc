// lychee-inference: the generation server (lychee.v1.InferenceService).
#include <glog/logging.h>

#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/service_main.h"
#include "common/shutdown_signals.h"
#include "common/status_macros.h"
#include "inference/service.h"
#include "tools/lychee/args.h"

namespace {

constexpr char kUsage[] = R"(usage: lychee-inference --state-dir DIR [flags]

  --model DIR                 the model to serve (default )" LYCHEE_DEFAULT_MODEL_DIR R"()
  --state-dir DIR             partitions received and which one is active (kept across restarts)
  --listen HOST:PORT          where to serve (default 127.0.0.1:50062)
  --trainer HOST:PORT         a lychee-trainer whose partitions to follow and roll out (default:
                              none; partitions then change only through the admin RPCs)
  --trainer-tls-ca FILE       reach the trainer over TLS, verified with these PEM CA certificates
  --trainer-tls-cert FILE --trainer-tls-key FILE
                              a client certificate for a trainer that requires mutual TLS
  --metrics-listen IP:PORT    serve Prometheus metrics at /metrics (default: off)
  --http-listen [HOST:]PORT   serve the OpenAI-compatible HTTP API (/v1/completions,
                              /v1/chat/completions, /v1/models, /health, /metrics); a bare port
                              listens on 127.0.0.1 (default: off). HTTPS with --tls-cert/--tls-key;
                              the client token as 'Authorization: Bearer TOKEN'
  --device cpu|cuda           (default cpu)
  --threads N                 LibTorch intra-op threads (default 0: LibTorch's own default)
  --kv-cache-mib N            the KV cache: a pool of pages of 64 positions that sequences take as
                              they grow (default 2048)
  --kv-cache-fraction F       CUDA only: size the KV cache as this fraction (0 < F <= 1) of the
                              device's free memory once the model is loaded, in place of
                              --kv-cache-mib
  --cuda-graphs true|false    capture decode steps as CUDA graphs and replay them (default true)
  --audit-every N             audit every Nth decode step of audited requests that name no period
                              (default 16)
  --max-batch N               sequences decoded together (default 16)
  --max-queued N              requests that may wait for KV memory (default 64)
  --max-new-tokens N          the most tokens one request may ask for (default 4096)
  --max-context N             context limit in tokens (default: the model's)
  --prefill-chunk N           prompt tokens prefilled per step of the scheduler (default 512)
  --default-attention hybrid|dense
                              what requests that name no mode get (default hybrid: the active
                              partition, or dense while there is none)
  --tls-cert FILE --tls-key FILE
                              serve TLS with this PEM certificate chain and key (default plaintext)
  --tls-client-ca FILE        mutual TLS: clients must present a certificate this CA signed
  --admin-token-file FILE     activate, rollback and hold need this token ('authorization: Bearer
                              TOKEN'); without it they are open, which only a loopback --listen
                              accepts
  --client-token-file FILE    the other RPCs need this token (or the admin one); it never passes
                              an admin check (needs --admin-token-file)
  --insecure-admin            allow open admin RPCs on a --listen beyond the loopback
  --log-requests              log one line per gRPC call (method, peer, status, time) at INFO
  --shadow-validation true|false
                              validate each partition from the trainer against dense before it
                              becomes active, and reject it outside the bounds below (default true)
  --shadow-heldout-corpus FILE
                              text (.gz too) the pass-key and multi-key prompts are built from
                              (default )" LYCHEE_SOURCE_DIR R"(/data/corpus/kjv-heldout.txt.gz)
  --shadow-prompts-file FILE  an operator's JSON-lines prompts in place of the generated ones
                              ({"task": ..., "prompt": ..., "answer": ...} per line)
  --shadow-context N          tokens of each generated prompt (default 1024)
  --shadow-prompts N          generated prompts per task (default 4)
  --shadow-budget N           the token budget of sparse heads in validation (default 0: the
                              partition's, scaled by the validation context over the served one)
  --shadow-threads N          intra-op threads of the validation thread (default 1)
  --shadow-max-accuracy-drop F
                              promote only when every task's accuracy >= dense's - F (default 0.05)
  --shadow-max-dropped-mass F promote only when the audited mean dropped mass <= F (default 0.2)
)";

absl::Status Serve(const std::vector<std::string>& argv) {
  const std::set<std::string> valued_flags = {"model",
                                              "state-dir",
                                              "listen",
                                              "trainer",
                                              "metrics-listen",
                                              "http-listen",
                                              "device",
                                              "threads",
                                              "kv-cache-mib",
                                              "kv-cache-fraction",
                                              "cuda-graphs",
                                              "audit-every",
                                              "max-batch",
                                              "max-queued",
                                              "max-new-tokens",
                                              "max-context",
                                              "prefill-chunk",
                                              "default-attention",
                                              "tls-cert",
                                              "tls-key",
                                              "tls-client-ca",
                                              "admin-token-file",
                                              "client-token-file",
                                              "trainer-tls-ca",
                                              "trainer-tls-cert",
                                              "trainer-tls-key",
                                              "shadow-validation",
                                              "shadow-heldout-corpus",
                                              "shadow-prompts-file",
                                              "shadow-context",
                                              "shadow-prompts",
                                              "shadow-threads",
                                              "shadow-budget",
                                              "shadow-max-accuracy-drop",
                                              "shadow-max-dropped-mass"};
  LYCHEE_ASSIGN_OR_RETURN(lychee::cli::Args args,
                          lychee::cli::Args::Parse(argv, valued_flags, {"insecure-admin", "log-requests"}));
  lychee::InferenceServerOptions options;
  options.state_dir = args.GetOr("state-dir", "");
  if (options.state_dir.empty()) return absl::InvalidArgumentError("--state-dir is required");
  options.listen_address = args.GetOr("listen", options.listen_address);
  options.trainer_address = args.GetOr("trainer", "");
  options.metrics_address = args.GetOr("metrics-listen", "");
  options.http_address = args.GetOr("http-listen", "");
  options.trainer_tls.ca_file = args.GetOr("trainer-tls-ca", "");
  options.trainer_tls.cert_file = args.GetOr("trainer-tls-cert", "");
  options.trainer_tls.key_file = args.GetOr("trainer-tls-key", "");
  if (options.trainer_tls.enabled() && options.trainer_address.empty()) {
    return absl::InvalidArgumentError("--trainer-tls-* flags need --trainer");
  }
  options.tls.cert_file = args.GetOr("tls-cert", "");
  options.tls.key_file = args.GetOr("tls-key", "");
  options.tls.client_ca_file = args.GetOr("tls-client-ca", "");
  options.access.admin_token_file = args.GetOr("admin-token-file", "");
  options.access.client_token_file = args.GetOr("client-token-file", "");
  options.access.insecure_admin = args.Has("insecure-admin");
  options.log_requests = args.Has("log-requests");
  lychee::EngineOptions& engine = options.engine;
  engine.model_dir = args.GetOr("model", LYCHEE_DEFAULT_MODEL_DIR);
  engine.device = args.GetOr("device", "cpu");
  const auto in_range = [&](const std::string& flag, int64_t fallback, int64_t low, int64_t high) -> absl::StatusOr<int64_t> {
    LYCHEE_ASSIGN_OR_RETURN(const int64_t value, args.GetInt(flag, fallback));
    if (value < low || value > high) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, " must be in [", low, ", ", high, "], got ", value));
    }
    return value;
  };
  LYCHEE_ASSIGN_OR_RETURN(const int64_t threads, in_range("threads", 0, 0, 1024));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t kv_mib, in_range("kv-cache-mib", 2048, 1, int64_t{1} << 24));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t max_batch, in_range("max-batch", 16, 1, 1024));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t max_queued, in_range("max-queued", 64, 0, 100000));
  LYCHEE_ASSIGN_OR_RETURN(engine.max_new_tokens_limit, in_range("max-new-tokens", 4096, 1, 1 << 20));
  LYCHEE_ASSIGN_OR_RETURN(engine.max_context_tokens, in_range("max-context", 0, 0, int64_t{1} << 24));
  LYCHEE_ASSIGN_OR_RETURN(engine.prefill_chunk_tokens, in_range("prefill-chunk", 512, 1, 1 << 20));
  LYCHEE_ASSIGN_OR_RETURN(engine.audit_every, in_range("audit-every", lychee::kDefaultAuditEvery, 1, 1 << 20));
  if (args.Has("kv-cache-fraction")) {
    if (args.Has("kv-cache-mib")) {
      return absl::InvalidArgumentError("give --kv-cache-mib or --kv-cache-fraction, not both");
    }
    LYCHEE_ASSIGN_OR_RETURN(engine.kv_cache_fraction, args.GetDouble("kv-cache-fraction", 0));
    if (!(engine.kv_cache_fraction > 0 && engine.kv_cache_fraction <= 1)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--kv-cache-fraction must be in (0, 1], got ", *args.Get("kv-cache-fraction")));
    }
  }
  const std::string cuda_graphs = args.GetOr("cuda-graphs", "true");
  if (cuda_graphs != "true" && cuda_graphs != "false") {
    return absl::InvalidArgumentError(absl::StrCat("--cuda-graphs must be true or false, got '", cuda_graphs, "'"));
  }
  engine.cuda_graphs = cuda_graphs == "true";
  engine.threads = static_cast<int>(threads);
  engine.kv_cache_bytes = kv_mib << 20;
  engine.max_batch = static_cast<int>(max_batch);
  engine.max_queued = static_cast<int>(max_queued);
  const std::string default_attention = args.GetOr("default-attention", "hybrid");
  if (default_attention != "hybrid" && default_attention != "dense") {
    return absl::InvalidArgumentError(
        absl::StrCat("--default-attention must be hybrid or dense, got '", default_attention, "'"));
  }
  engine.hybrid_by_default = default_attention == "hybrid";

  lychee::ShadowValidationOptions& shadow = options.shadow;
  const std::string shadow_validation = args.GetOr("shadow-validation", "true");
  if (shadow_validation != "true" && shadow_validation != "false") {
    return absl::InvalidArgumentError(
        absl::StrCat("--shadow-validation must be true or false, got '", shadow_validation, "'"));
  }
  shadow.enabled = shadow_validation == "true";
  shadow.heldout_corpus = args.GetOr("shadow-heldout-corpus", LYCHEE_SOURCE_DIR "/data/corpus/kjv-heldout.txt.gz");
  shadow.prompts_file = args.GetOr("shadow-prompts-file", "");
  LYCHEE_ASSIGN_OR_RETURN(shadow.context_tokens,
                          in_range("shadow-context", shadow.context_tokens, 64, int64_t{1} << 24));
  LYCHEE_ASSIGN_OR_RETURN(shadow.prompts_per_task, in_range("shadow-prompts", shadow.prompts_per_task, 1, 100000));
  LYCHEE_ASSIGN_OR_RETURN(shadow.token_budget, in_range("shadow-budget", shadow.token_budget, 0, int64_t{1} << 24));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t shadow_threads, in_range("shadow-threads", shadow.threads, 1, 1024));
  shadow.threads = static_cast<int>(shadow_threads);
  LYCHEE_ASSIGN_OR_RETURN(shadow.max_accuracy_drop,
                          args.GetDouble("shadow-max-accuracy-drop", shadow.max_accuracy_drop));
  LYCHEE_ASSIGN_OR_RETURN(shadow.max_dropped_mass, args.GetDouble("shadow-max-dropped-mass", shadow.max_dropped_mass));

  const sigset_t signals = lychee::BlockShutdownSignals();

  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<lychee::InferenceServer> server, lychee::InferenceServer::Start(options));
  std::string serving = absl::StrCat(
      "lychee-inference: serving lychee.v1.InferenceService on port ", server->port(), " (", options.listen_address,
      "), ", options.tls.client_ca_file.empty() ? (options.tls.enabled() ? "TLS" : "plaintext") : "mutual TLS",
      ", admin RPCs ", options.access.admin_token_file.empty() ? "open" : "need the admin token", ", client RPCs ",
      options.access.client_token_file.empty() ? "open" : "need the client token", ", model ", engine.model_dir, " on ",
      engine.device);
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
  server->Shutdown();
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) { return lychee::ServiceMain(argc, argv, "lychee-inference", kUsage, Serve); }
