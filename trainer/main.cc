// lychee-trainer: the calibration job server (lychee.v1.TrainerService).
#include <glog/logging.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/service_main.h"
#include "common/shutdown_signals.h"
#include "common/status_macros.h"
#include "tools/lychee/args.h"
#include "trainer/job_runner.h"
#include "trainer/service.h"

namespace {

constexpr char kUsage[] = R"(usage: lychee-trainer --registry-dir DIR [flags]

  --listen HOST:PORT          where to serve (default 127.0.0.1:50061)
  --model-root DIR            models are the directories under it (default )" LYCHEE_SOURCE_DIR R"(/models)
  --data-root DIR             corpora that jobs name are paths under it (default )" LYCHEE_SOURCE_DIR R"(/data)
  --registry-dir DIR          published partitions (DIR/partitions) and the job journal (DIR/jobs)
  --max-concurrent-jobs N     jobs that run at once (default 1)
  --max-queued-jobs N         jobs that may wait (default 64)
  --device cpu|cuda           where jobs run (default cpu)
  --threads N                 LibTorch intra-op threads per job (default 0: LibTorch's own
                              default, OMP_NUM_THREADS or 1)
  --tls-cert FILE --tls-key FILE
                              serve TLS with this PEM certificate chain and key (default plaintext)
  --tls-client-ca FILE        mutual TLS: clients must present a certificate this CA signed
  --admin-token-file FILE     submit, cancel and publish need this token ('authorization: Bearer
                              TOKEN'); without it they are open, which only a loopback --listen
                              accepts
  --insecure-admin            allow open admin RPCs on a --listen beyond the loopback
  --metrics-listen IP:PORT    serve Prometheus metrics at /metrics (default: off)
  --log-requests              log one line per gRPC call (method, peer, status, time) at INFO
A job that names no corpus uses )" LYCHEE_SOURCE_DIR R"(/data/corpus/calibration.txt.gz; a sweep
that names no validation corpus builds its prompts from )" LYCHEE_SOURCE_DIR "/data/corpus/persuasion.txt.gz\n";

absl::Status Serve(const std::vector<std::string>& argv) {
  LYCHEE_ASSIGN_OR_RETURN(
      lychee::cli::Args args,
      lychee::cli::Args::Parse(
          argv,
          {"listen", "model-root", "data-root", "registry-dir", "max-concurrent-jobs", "max-queued-jobs", "device",
           "threads", "tls-cert", "tls-key", "tls-client-ca", "admin-token-file", "metrics-listen"},
          {"insecure-admin", "log-requests"}));
  lychee::TrainerServerOptions options;
  options.listen_address = args.GetOr("listen", options.listen_address);
  options.registry_dir = args.GetOr("registry-dir", "");
  if (options.registry_dir.empty()) return absl::InvalidArgumentError("--registry-dir is required");
  options.tls.cert_file = args.GetOr("tls-cert", "");
  options.tls.key_file = args.GetOr("tls-key", "");
  options.tls.client_ca_file = args.GetOr("tls-client-ca", "");
  options.access.admin_token_file = args.GetOr("admin-token-file", "");
  options.access.insecure_admin = args.Has("insecure-admin");
  options.metrics_address = args.GetOr("metrics-listen", "");
  options.log_requests = args.Has("log-requests");
  options.jobs.model_root = args.GetOr("model-root", LYCHEE_SOURCE_DIR "/models");
  options.jobs.data_root = args.GetOr("data-root", LYCHEE_SOURCE_DIR "/data");
  options.jobs.default_corpus = LYCHEE_SOURCE_DIR "/data/corpus/calibration.txt.gz";
  options.jobs.default_heldout_corpus = LYCHEE_SOURCE_DIR "/data/corpus/persuasion.txt.gz";
  LYCHEE_ASSIGN_OR_RETURN(const int64_t concurrent, args.GetInt("max-concurrent-jobs", 1));
  LYCHEE_ASSIGN_OR_RETURN(const int64_t queued, args.GetInt("max-queued-jobs", 64));
  if (concurrent < 1 || concurrent > 64) {
    return absl::InvalidArgumentError(absl::StrCat("--max-concurrent-jobs must be in [1, 64], got ", concurrent));
  }
  if (queued < 1 || queued > 100000) {
    return absl::InvalidArgumentError(absl::StrCat("--max-queued-jobs must be in [1, 100000], got ", queued));
  }
  options.jobs.max_concurrent_jobs = static_cast<int>(concurrent);
  options.jobs.max_queued_jobs = static_cast<int>(queued);
  LYCHEE_ASSIGN_OR_RETURN(const int64_t threads, args.GetInt("threads", 0));
  if (threads < 0 || threads > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("--threads must be in [0, 1024], got ", threads));
  }
  LYCHEE_ASSIGN_OR_RETURN(lychee::CalibrationRunner runner,
                          lychee::MakeCalibrationRunner(args.GetOr("device", "cpu"), static_cast<int>(threads)));

  const sigset_t signals = lychee::BlockShutdownSignals();

  LYCHEE_ASSIGN_OR_RETURN(std::unique_ptr<lychee::TrainerServer> server,
                          lychee::TrainerServer::Start(options, std::move(runner)));
  LOG(INFO) << "lychee-trainer: serving lychee.v1.TrainerService on port " << server->port() << " ("
            << options.listen_address << "), "
            << (options.tls.client_ca_file.empty() ? (options.tls.enabled() ? "TLS" : "plaintext") : "mutual TLS")
            << ", admin RPCs " << (options.access.admin_token_file.empty() ? "open" : "need the admin token")
            << ", registry " << options.registry_dir
            << (server->metrics_port() != 0 ? absl::StrCat(", metrics on port ", server->metrics_port()) : "");
  const int signal_number = lychee::WaitForShutdownSignal(signals);
  LOG(INFO) << "lychee-trainer: signal " << signal_number << ", shutting down";
  server->Shutdown();
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) { return lychee::ServiceMain(argc, argv, "lychee-trainer", kUsage, Serve); }
